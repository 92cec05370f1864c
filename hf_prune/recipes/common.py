"""Pieces every recipe shares: argument dataclasses, strict config parsing, and the prune → recover → measure →
save → report steps. The task-specific parts (data, model class, metric) live in ``glue.py`` and
``image_classification.py``.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import time
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import EarlyStoppingCallback, HfArgumentParser, Trainer, TrainingArguments

from .. import costs, report
from ..api import prune
from ..budgets import BUDGETS, DEFAULT_BUDGET
from ..config import PruningConfig
from ..distributed import barrier
from ..plan import PrunePlan
from ..trainer import DistillationConfig, PruningTrainer

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class ConfigError(ValueError):
    """A recipe config or command line that cannot be run (unknown key, bad value)."""


# ------------------------------------------------------------------------------------------------ arguments


#: Recipe keys of earlier releases -> the PruningConfig field they set (accepted with a warning).
DEPRECATED_KEYS = {"prune_method": "method", "calibration_samples": "max_calibration_samples",
                   "flops_seq_len": "seq_len"}
#: PruningConfig fields a recipe takes from another argument group under the same name (TrainingArguments.seed).
_SHARED_FIELDS = ("seed",)


def config_field_docs(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Args:`` section of a dataclass's docstring (for ``--help``)."""
    docs: dict[str, str] = {}
    name = None
    in_args = False
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if not in_args or not stripped:
            continue
        m = re.match(r"^(\w+): (.*)$", stripped)
        if m and line.startswith(" " * 8) and not line.startswith(" " * 12):
            name = m.group(1)
            docs[name] = m.group(2)
        elif name:
            docs[name] += " " + stripped
    return docs


class _PruneArgumentsBase:
    """Methods of :class:`PruneArguments` (its fields are made from :class:`PruningConfig`'s)."""

    def budgets(self) -> list[dict[str, Any]]:
        """One budget dict per run, e.g. ``[{"flops_keep": 0.75}, {"flops_keep": 0.5}]``."""
        others = {k: getattr(self, k) for k in BUDGETS if k != "flops_keep" and getattr(self, k) is not None}
        flops = getattr(self, "flops_keep")
        if isinstance(flops, (int, float)):  # a YAML scalar instead of a list
            flops = [float(flops)]
        if flops and others:
            raise ConfigError(f"set flops_keep or {sorted(others)}, not both")
        if others:
            return [others]
        if flops:
            return [{"flops_keep": float(f)} for f in flops]
        return [dict(DEFAULT_BUDGET)]

    def pruning_config(self, budget: Mapping[str, Any], seed: int) -> PruningConfig:
        """The library's :class:`PruningConfig` for one budget (raises ConfigError on a bad value)."""
        values = {f.name: getattr(self, f.name) for f in fields(PruningConfig)
                  if f.name not in BUDGETS and f.name not in _SHARED_FIELDS}
        try:
            return PruningConfig(**values, **budget, seed=seed)
        except ValueError as e:
            raise ConfigError(str(e)) from e


def _prune_fields() -> list[tuple[str, Any, Any]]:
    """PruningConfig's fields as recipe arguments: same names, types and defaults (``flops_keep`` takes a list:
    one run per value), help from its docstring."""
    docs = config_field_docs(PruningConfig)
    types = typing.get_type_hints(PruningConfig)
    out = []
    for f in fields(PruningConfig):
        if f.name in _SHARED_FIELDS:
            continue
        help_text = docs.get(f.name, "").split(". ")[0]
        if f.name == "flops_keep":
            out.append((f.name, list[float] | None,
                        field(default=None, metadata={"help": "Fractions of layer FLOPs to keep; one run per value "
                                                              "(default 0.5 when no budget is set)."})))
        else:
            out.append((f.name, types[f.name], field(default=f.default, metadata={"help": help_text})))
    return out


#: What to prune and how much: exactly :class:`PruningConfig`'s fields under their own names (``seed`` is
#: ``TrainingArguments.seed``); several ``flops_keep`` values run one prune + recover per budget.
PruneArguments = make_dataclass("PruneArguments", _prune_fields(), bases=(_PruneArgumentsBase,))
PruneArguments.__module__ = __name__
PruneArguments.__doc__ = (
    "What to prune and how much: :class:`hf_prune.PruningConfig`'s fields under their own names (``seed`` is "
    "``TrainingArguments.seed``). Several ``flops_keep`` values run one prune + recover per budget."
)


@dataclass
class RecoveryArguments:
    """How the pruned model recovers. Learning rate, steps, weight decay, warmup, evaluation and saving come from
    ``TrainingArguments`` (recovery usually wants a lower learning rate than the dense fine-tune).

    Args:
        recovery: ``full`` fine-tunes all (unfrozen) weights, ``lora`` trains peft LoRA adapters and merges them,
            ``none`` skips recovery.
        distill_alpha: weight of the distillation loss from the unpruned model (0 turns distillation off).
        distill_temperature: softmax temperature of the logit distillation.
        distill_hidden_weight: weight of a hidden-state MSE to the teacher (0 = off).
        lora_r: LoRA rank for ``recovery=lora``.
        freeze: regular expressions of parameter names kept frozen during recovery, e.g. ``embeddings``.
        early_stopping_patience: stop recovery after this many evaluations without improvement (needs
            ``eval_strategy`` and ``load_best_model_at_end``); transformers' ``EarlyStoppingCallback``.
    """

    recovery: str = field(default="full", metadata={"help": "full, lora or none."})
    distill_alpha: float = field(default=0.5, metadata={"help": "Distillation loss weight (0 = off)."})
    distill_temperature: float = field(default=2.0, metadata={"help": "Distillation temperature."})
    distill_hidden_weight: float = field(default=0.0, metadata={"help": "Hidden-state MSE weight."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (recovery=lora)."})
    freeze: list[str] | None = field(
        default=None, metadata={"help": "Regexes of parameter names frozen during recovery, e.g. embeddings."}
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "EarlyStoppingCallback patience (needs eval and load_best_model_at_end)."}
    )

    def __post_init__(self) -> None:
        if self.recovery not in ("full", "lora", "none"):
            raise ConfigError(f"recovery must be full, lora or none, not {self.recovery!r}")
        if not 0 <= self.distill_alpha <= 1:
            raise ConfigError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")


@dataclass
class DenseArguments:
    """The dense model before pruning: fine-tune it on the task first, or start from a fine-tuned model.

    Args:
        dense_train: ``auto`` fine-tunes when the checkpoint has no trained head for the task (its classifier
            weights are newly initialised), ``yes`` always, ``no`` never.
        dense_learning_rate: learning rate of the dense fine-tune.
        dense_num_train_epochs: epochs of the dense fine-tune.
        dense_max_steps: steps of the dense fine-tune (overrides epochs when > 0).
        dense_cache: reuse a dense fine-tune saved in ``<output_dir>/dense`` by an earlier run with the same
            model, data and settings.
    """

    dense_train: str = field(default="auto", metadata={"help": "auto, yes or no."})
    dense_learning_rate: float = field(default=5e-5, metadata={"help": "Dense fine-tune learning rate."})
    dense_num_train_epochs: float = field(default=3.0, metadata={"help": "Dense fine-tune epochs."})
    dense_max_steps: int = field(default=-1, metadata={"help": "Dense fine-tune steps (> 0 overrides epochs)."})
    dense_cache: bool = field(default=True, metadata={"help": "Reuse <output_dir>/dense from an earlier run."})

    def __post_init__(self) -> None:
        if self.dense_train not in ("auto", "yes", "no"):
            raise ConfigError(f"dense_train must be auto, yes or no, not {self.dense_train!r}")


@dataclass
class BenchArguments:
    """Latency measured after pruning (dense and pruned interleaved, on the training device's CPU/GPU).

    Args:
        bench_latency: measure latency at all (off for quick runs and tests).
        bench_batch_sizes: batch sizes timed.
        bench_seq_len: sequence length of the timed inputs (text models).
        bench_repeats: timed repeats per model (the median is reported).
    """

    bench_latency: bool = field(default=True, metadata={"help": "Measure latency dense vs pruned."})
    bench_batch_sizes: list[int] = field(default_factory=lambda: [1, 32], metadata={"help": "Batch sizes timed."})
    bench_seq_len: int = field(default=128, metadata={"help": "Tokens per timed input."})
    bench_repeats: int = field(default=10, metadata={"help": "Timed repeats (median reported)."})


# ------------------------------------------------------------------------------------------------- parsing


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON recipe config as a flat dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe config is a mapping of argument names to values")
    return data


def parse_recipe_args(
    types: Sequence[type], argv: Sequence[str] | None, *, prog: str, description: str, recipe: str
) -> tuple[Any, ...]:
    """Parse ``[CONFIG.yaml|json] [--key value ...]`` into the dataclasses ``types``.

    The config file gives defaults, command-line flags override them. Unknown keys in either place are an
    error that lists the valid keys (a typo must never be silently ignored).
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(tuple(types), prog=prog, description=description)
    valid = sorted({f.name for t in types for f in fields(t)})
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
        cfg = _renamed(read_config_file(argv.pop(0)), "config key")
        found = cfg.pop("recipe", recipe)
        if found != recipe:
            raise ConfigError(f"this config is for the {found!r} recipe, not {recipe!r}: run it with hf-prune run")
        unknown = sorted(set(cfg) - set(valid))
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(_hint(k, valid) for k in unknown)}. "
                              f"Valid keys: {', '.join(valid)}")
        # Config values go through argparse like flags (types, choices, bools checked the same way); flags
        # given after them on the command line win.
        argv = _as_flags(cfg) + argv
    argv = [_renamed_flag(a) for a in argv]
    check_flags(parser, argv)
    try:
        return tuple(parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False))
    except ValueError as e:  # dataclass __post_init__ checks
        raise ConfigError(str(e)) from e


def _hint(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, valid, 2)
    return f"{name} (did you mean {', '.join(close)}?)" if close else name


def check_flags(parser: Any, argv: Sequence[str]) -> None:
    """Refuse ``--flags`` that ``parser`` does not know, naming the closest valid ones (as a mistyped config key
    is), before argparse's own less helpful message."""
    known = {o for action in parser._actions for o in action.option_strings}
    unknown = [a.split("=", 1)[0] for a in argv if a.startswith("--") and a.split("=", 1)[0] not in known]
    if unknown:
        # argparse also registers --a-b for --a_b; suggest the config's own spelling
        flags = sorted(o for o in known if o.startswith("--") and not ("-" in o[2:] and o.replace("-", "_")[2:] in
                                                                          {k[2:] for k in known}))
        raise ConfigError(f"unknown flags: {', '.join(_hint(u, flags) for u in unknown)}")


def _renamed(cfg: dict[str, Any], what: str) -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        if key in DEPRECATED_KEYS:
            new = DEPRECATED_KEYS[key]
            warnings.warn(f"{what} {key!r} is deprecated: it is PruningConfig's {new!r}; use that", FutureWarning,
                          stacklevel=3)
            if new in cfg:
                raise ConfigError(f"{key!r} and {new!r} are the same setting: keep only {new!r}")
            key = new
        out[key] = value
    return out


def _renamed_flag(arg: str) -> str:
    name, eq, value = arg.partition("=")
    if name.startswith("--") and name[2:] in DEPRECATED_KEYS:
        new = DEPRECATED_KEYS[name[2:]]
        warnings.warn(f"flag {name} is deprecated: it is PruningConfig's --{new}; use that", FutureWarning,
                      stacklevel=3)
        return f"--{new}{eq}{value}"
    return arg


def _as_flags(cfg: Mapping[str, Any]) -> list[str]:
    flags: list[str] = []
    for key, value in cfg.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            flags += [f"--{key}", *(_flag_value(v) for v in value)] if value else []
        else:
            flags += [f"--{key}", _flag_value(value)]
    return flags


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def args_dict(*objs: Any) -> dict[str, Any]:
    """The recipe's effective arguments (for results.json and the model card); tokens are never written."""
    out: dict[str, Any] = {}
    for obj in objs:
        data = obj.to_dict() if isinstance(obj, TrainingArguments) else asdict(obj)
        out.update({k: v for k, v in data.items() if "token" not in k})
    return json.loads(json.dumps(out, default=str))


# -------------------------------------------------------------------------------------------- recipe steps


def quiet_expected_warnings() -> None:
    """Silence transformers' per-layer-config warning, which every load of a pruned model triggers by design
    (hf_prune's model classes read the per-layer sizes themselves); entry points call this, the library does not."""
    import logging

    logging.getLogger("transformers.integrations.heterogeneity.configuration_utils").setLevel(logging.ERROR)


def quiet_cpu_(args: TrainingArguments) -> None:
    """No pinned memory without an accelerator: it does nothing there except warn on every dataloader."""
    if args.use_cpu or not torch.cuda.is_available():
        args.dataloader_pin_memory = False


def is_main_process(args: TrainingArguments) -> bool:
    return args.process_index == 0


def freeze_(model: nn.Module, patterns: Iterable[str] | None) -> list[str]:
    """Set ``requires_grad=False`` on parameters whose name matches any regex; returns the frozen names."""
    patterns = [re.compile(p) for p in (patterns or [])]
    frozen = []
    for name, p in model.named_parameters():
        if any(r.search(name) for r in patterns):
            p.requires_grad_(False)
            frozen.append(name)
    if patterns and not frozen:
        raise ConfigError(f"freeze patterns {[r.pattern for r in patterns]} match no parameter of the model")
    return frozen


def training_args_for(base: TrainingArguments, output_dir: str | Path, **overrides: Any) -> TrainingArguments:
    """A copy of ``base`` writing to ``output_dir`` with some fields changed (e.g. the dense fine-tune's lr)."""
    args = copy.deepcopy(base)
    args.output_dir = str(output_dir)
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def evaluate(
    model: nn.Module, args: TrainingArguments, eval_sets: Mapping[str, Any], compute_metrics: Callable,
    collator: Any = None, processing_class: Any = None,
) -> dict[str, float]:
    """Metrics on every eval split (``{"accuracy": ..}``; prefixed by split name when there are several)."""
    trainer = Trainer(model=model, args=training_args_for(args, Path(args.output_dir) / "eval", report_to=[]),
                      compute_metrics=compute_metrics, data_collator=collator, processing_class=processing_class)
    out: dict[str, float] = {}
    for split, ds in eval_sets.items():
        res = trainer.evaluate(ds, metric_key_prefix="eval")
        keep = {k[len("eval_"):]: float(v) for k, v in res.items()
                if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second", "_time", "loss", "epoch"))}
        out.update(keep if len(eval_sets) == 1 else {f"{split}/{k}": v for k, v in keep.items()})
    return out


@dataclass
class PruneResult:
    """One budget's prune (+ recover) run."""

    name: str
    budget: dict[str, Any]
    plan: PrunePlan
    model: nn.Module
    prune_seconds: float
    recovery_seconds: float = 0.0
    metrics_pruned: dict[str, float] = field(default_factory=dict)
    metrics_recovered: dict[str, float] | None = None


def run_name(budget: Mapping[str, Any]) -> str:
    """Folder name of a budget's run: ``flops50``, ``heads75_neurons50``, ``params20M``."""
    parts = []
    for key, value in budget.items():
        parts.append(f"params{value / 1e6:.3g}M" if key == "target_params" else f"{key.split('_')[0]}{round(value * 100)}")
    return "_".join(parts)


def prune_and_recover(
    dense: nn.Module,
    budget: Mapping[str, Any],
    *,
    prune_args: PruneArguments,
    recovery_args: RecoveryArguments,
    training_args: TrainingArguments,
    calibration: Sequence[Mapping[str, Any]],
    train_dataset: Any,
    evaluate_fn: Callable[[nn.Module], dict[str, float]],
    trainer_kwargs: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> PruneResult:
    """Prune a copy of ``dense`` to ``budget``, evaluate, recover under ``training_args``, evaluate again."""
    name = run_name(budget)
    cfg = prune_args.pruning_config(budget, seed=training_args.seed)
    cfg.progress = cfg.progress and is_main_process(training_args)
    model = copy.deepcopy(dense).requires_grad_(True)  # the teacher's copy was frozen by an earlier run
    log(f"[{name}] pruning: {cfg.method}, {cfg.importance} scores on {len(calibration)} calibration batches")
    start = time.perf_counter()
    model, plan = prune(model, calibration, cfg)
    result = PruneResult(name, dict(budget), plan, model, time.perf_counter() - start)
    result.metrics_pruned = evaluate_fn(model)
    log(f"[{name}] pruned in {result.prune_seconds:.1f}s: {result.metrics_pruned}")
    if recovery_args.recovery == "none":
        return result
    freeze_(model, recovery_args.freeze)
    distill = None
    if recovery_args.distill_alpha > 0:
        distill = DistillationConfig(recovery_args.distill_alpha, recovery_args.distill_temperature,
                                     recovery_args.distill_hidden_weight)
    callbacks = list((trainer_kwargs or {}).get("callbacks", []))
    if recovery_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recovery_args.early_stopping_patience))
    lora_config = None
    if recovery_args.recovery == "lora":
        from ..trainer import default_lora_config

        lora_config = default_lora_config(model, r=recovery_args.lora_r)
    args = training_args_for(training_args, Path(training_args.output_dir) / "trainer" / name)
    trainer = PruningTrainer(
        model, args, pruning_config=cfg, distillation=distill, teacher_model=dense if distill else None,
        recovery=recovery_args.recovery, lora_config=lora_config, train_dataset=train_dataset,
        **{k: v for k, v in (trainer_kwargs or {}).items() if k != "callbacks"}, callbacks=callbacks,
    )
    log(f"[{name}] recovery: {recovery_args.recovery} fine-tune"
        + (f" with distillation (alpha {distill.alpha})" if distill else "")
        + f", lr {args.learning_rate}, {args.max_steps if args.max_steps > 0 else args.num_train_epochs} "
        + ("steps" if args.max_steps > 0 else "epochs"))
    start = time.perf_counter()
    trainer.train()
    result.recovery_seconds = time.perf_counter() - start
    result.model = trainer.model
    if PrunePlan.of(result.model) != plan:
        raise RuntimeError(f"[{name}] recovery changed the pruned structure; this is a bug in hf_prune")
    result.metrics_recovered = evaluate_fn(result.model)
    log(f"[{name}] recovered in {result.recovery_seconds:.0f}s: {result.metrics_recovered}")
    return result


DENSE_KEY_FILE = "hf_prune_dense.json"


def dense_cache_matches(dense_dir: Path, key: Mapping[str, Any], dense_args: DenseArguments) -> bool:
    """Whether ``dense_dir`` holds a dense model trained by an earlier run with the same settings ``key``."""
    key_file = dense_dir / DENSE_KEY_FILE
    return dense_args.dense_cache and key_file.is_file() and json.loads(key_file.read_text()) == key


def train_dense_(
    model: nn.Module, *, dense_args: DenseArguments, training_args: TrainingArguments, train_dataset: Any,
    data_collator: Any, processing_class: Any, dense_dir: Path, key: Mapping[str, Any], what: str,
    log: Callable[[str], None] = print,
) -> None:
    """Train the dense model in place with the ``dense_*`` settings, then cache it in ``dense_dir`` with ``key``."""
    steps = dense_args.dense_max_steps
    log(f"dense: {what} ({steps if steps > 0 else dense_args.dense_num_train_epochs} "
        f"{'steps' if steps > 0 else 'epochs'}, lr {dense_args.dense_learning_rate})")
    args = training_args_for(training_args, Path(training_args.output_dir) / "trainer" / "dense",
                             learning_rate=dense_args.dense_learning_rate,
                             num_train_epochs=dense_args.dense_num_train_epochs, max_steps=steps,
                             eval_strategy="no", save_strategy="no", load_best_model_at_end=False, push_to_hub=False)
    start = time.perf_counter()
    Trainer(model, args, train_dataset=train_dataset, data_collator=data_collator,
            processing_class=processing_class).train()
    log(f"dense: trained in {time.perf_counter() - start:.0f}s")
    if is_main_process(training_args):
        model.save_pretrained(dense_dir)
        processing_class.save_pretrained(dense_dir)
        report.write_json(dense_dir / DENSE_KEY_FILE, key)
    barrier()


def run_budgets(
    dense: nn.Module,
    budgets: Sequence[Mapping[str, Any]],
    results: dict[str, Any],
    *,
    prune_args: PruneArguments,
    recovery_args: RecoveryArguments,
    bench_args: BenchArguments,
    training_args: TrainingArguments,
    calibration: Sequence[Mapping[str, Any]],
    train_dataset: Any,
    evaluate_fn: Callable[[nn.Module], dict[str, float]],
    trainer_kwargs: Mapping[str, Any],
    card: Mapping[str, Any],
    title: str,
    main_metric: str,
    latency_seq_len: int,
    inputs_fn: Callable[[nn.Module, int], Mapping[str, Any]] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every budget's prune → recover → measure → save (+ model card, heatmap, push), then the reports.

    ``results`` (with ``dense`` filled in) gains one entry per budget under ``runs``; the main process writes
    the checkpoints and reports, the others only train and wait.
    """
    from ..hub import push_pruned, write_model_card

    out = Path(training_args.output_dir)
    main_proc = is_main_process(training_args)
    seq = prune_args.seq_len
    processing_class = trainer_kwargs.get("processing_class")
    for budget in budgets:
        res = prune_and_recover(
            dense, budget, prune_args=prune_args, recovery_args=recovery_args, training_args=training_args,
            calibration=calibration, train_dataset=train_dataset, evaluate_fn=evaluate_fn,
            trainer_kwargs=trainer_kwargs, log=log,
        )
        run = {"name": res.name, "budget": res.budget, "prune_seconds": res.prune_seconds,
               "recovery_seconds": res.recovery_seconds, "metrics_pruned": res.metrics_pruned,
               "metrics_recovered": res.metrics_recovered, **model_stats(res.model, seq),
               "checkpoint": str(out / res.name)}
        if main_proc:
            model = res.model.eval()
            if bench_args.bench_latency:
                run["latency"] = measure_latency(dense, model, bench_args, latency_seq_len, inputs_fn=inputs_fn,
                                                 flops_seq_len=seq)
            model.save_pretrained(out / res.name)
            if processing_class is not None:
                processing_class.save_pretrained(out / res.name)
            report.plot_layer_heatmap(res.plan, PrunePlan.dense(dense), out / f"layers_{res.name}.png",
                                      title=f"{title} {res.name}: kept heads and FFN neurons")
            metrics = {"dense": results["dense"]["metrics"], "pruned": res.metrics_pruned}
            if res.metrics_recovered is not None:
                metrics["recovered"] = res.metrics_recovered
            device = "cpu" if training_args.use_cpu or not torch.cuda.is_available() else "cuda"
            speedup = {"device": device, "threads": torch.get_num_threads(), "seq_len": latency_seq_len,
                       "rows": run.get("latency", [])}
            write_model_card(out / res.name, repo_id=training_args.hub_model_id, metrics=metrics, speedup=speedup,
                             recipe=results["args"], seq_len=seq, **card)
            if training_args.push_to_hub:
                hub_id = training_args.hub_model_id
                repo = hub_id if len(budgets) == 1 else f"{hub_id}-{res.name}"
                run["pushed"] = push_pruned(out / res.name, repo, token=training_args.hub_token,
                                            private=training_args.hub_private_repo)
                log(f"[{res.name}] pushed to {run['pushed']}")
        results["runs"].append(run)
        barrier()
    if main_proc:
        table = write_reports(out, results, main_metric)
        print(f"\n{table}\n\nwrote {out / 'results.json'}, {out / 'results.md'} and plots; checkpoints: "
              + ", ".join(r["checkpoint"] for r in results["runs"]))
    return results


def measure_latency(
    dense: nn.Module, pruned: nn.Module, bench: BenchArguments, seq_len: int,
    inputs_fn: Callable[[nn.Module, int], Mapping[str, Any]] | None = None, flops_seq_len: int | None = None,
) -> list[dict[str, Any]]:
    """Latency of dense vs pruned (interleaved), per batch size, with the FLOPs-ideal speedup beside it."""
    fd = costs.count_flops(dense, flops_seq_len or seq_len)["total"]
    fp = costs.count_flops(pruned, flops_seq_len or seq_len)["total"]
    rows = []
    for bs in bench.bench_batch_sizes:
        inputs = inputs_fn(dense, bs) if inputs_fn else None
        lat = costs.compare_latency({"dense": dense, "pruned": pruned}, bs, seq_len, repeats=bench.bench_repeats,
                                    inputs=inputs)
        speed = lat["dense"].median_ms / lat["pruned"].median_ms
        rows.append({"batch_size": bs, "dense_ms": lat["dense"].median_ms, "pruned_ms": lat["pruned"].median_ms,
                     "speedup": speed, "ideal": fd / fp, "of_ideal": speed / (fd / fp)})
    return rows


def model_stats(model: nn.Module, seq_len: int) -> dict[str, Any]:
    return {"params": costs.count_params(model), "layer_flops": costs.count_flops(model, seq_len)["total"]}


# ------------------------------------------------------------------------------------------------ reports


def write_reports(output_dir: str | Path, results: dict[str, Any], main_metric: str) -> str:
    """``results.json``, ``results.md`` and the PNG plots of a recipe run; returns the markdown table."""
    out = Path(output_dir)
    dense = results["dense"]
    rows = [{"model": "dense", "budget": "-", main_metric: dense["metrics"].get(main_metric),
             "params": dense["params"], "params kept": 1.0, "FLOPs kept": 1.0}]
    for run in results["runs"]:
        lat = {r["batch_size"]: r for r in run.get("latency", [])}
        common = {"budget": run["name"], "params": run["params"], "params kept": run["params"] / dense["params"],
                  "FLOPs kept": run["layer_flops"] / dense["layer_flops"]}
        for bs, r in lat.items():
            common[f"b{bs} ms"] = r["pruned_ms"]
            common[f"b{bs} speedup"] = r["speedup"]
        rows.append({"model": "pruned", main_metric: run["metrics_pruned"].get(main_metric), **common})
        if run.get("metrics_recovered") is not None:
            rows.append({"model": "recovered", main_metric: run["metrics_recovered"].get(main_metric), **common,
                         "prune s": run["prune_seconds"], "recovery s": run["recovery_seconds"]})
    for bs in sorted({r["batch_size"] for run in results["runs"] for r in run.get("latency", [])}):
        first = next(r for run in results["runs"] for r in run.get("latency", []) if r["batch_size"] == bs)
        rows[0][f"b{bs} ms"] = first["dense_ms"]
        rows[0][f"b{bs} speedup"] = 1.0
    formats = {main_metric: ".4f", "params kept": ".1%", "FLOPs kept": ".1%", "prune s": ".1f", "recovery s": ".0f"}
    formats.update({k: ".1f" if k.endswith("ms") else ".2f" for row in rows for k in row if k.startswith("b")
                    and k != "budget"})
    table = report.markdown_table(rows, formats=formats)
    results["table"] = rows
    report.write_json(out / "results.json", results)
    head = (f"# {results['recipe']} recipe: {results.get('task', '')} on {results['model']}\n\n"
            f"Measured {results['environment']['date']} on {results['environment']['machine']} "
            f"({results['environment']['torch_threads']} torch threads). Latency: median forward time at seq "
            f"{results.get('bench_seq_len')}, dense and pruned interleaved.\n\n")
    report.write_text(out / "results.md", head + table + "\n")
    runs = results["runs"]
    if len(runs) > 1:
        series = {"pruned": [(r["layer_flops"] / dense["layer_flops"], r["metrics_pruned"][main_metric]) for r in runs]}
        if all(r.get("metrics_recovered") for r in runs):
            series["recovered"] = [(r["layer_flops"] / dense["layer_flops"], r["metrics_recovered"][main_metric])
                                   for r in runs]
        report.plot_metric_vs_flops(series, out / "metric_vs_flops.png", metric=main_metric,
                                    dense=dense["metrics"].get(main_metric))
    return table

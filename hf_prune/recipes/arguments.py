"""Recipe arguments: the dataclasses every recipe shares (prune, recover, dense, bench), made where possible from
the library's own configs, and strict parsing of ``[CONFIG.yaml|json] [--key value ...]`` (unknown keys and flags
are errors that name the closest valid ones; old keys are accepted with a deprecation warning)."""

from __future__ import annotations

import difflib
import json
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..budget_kinds import BUDGETS, DEFAULT_BUDGET, FIELD_BUDGETS
from ..config import PruningConfig, flag_fields, from_flag

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class ConfigError(ValueError):
    """A recipe config or command line that cannot be run (unknown key, bad value)."""


# ------------------------------------------------------------------------------------------------ arguments


#: Recipe keys of earlier releases -> the PruningConfig field they set (accepted with a warning).
DEPRECATED_KEYS = {"prune_method": "method", "calibration_samples": "max_calibration_samples",
                   "flops_seq_len": "seq_len"}
#: PruningConfig fields a recipe takes from another argument group under the same name (TrainingArguments.seed).
_SHARED_FIELDS = ("seed",)


class _PruneArgumentsBase:
    """Methods of :class:`PruneArguments` (its fields are made from :class:`PruningConfig`'s)."""

    def budgets(self) -> list[dict[str, Any]]:
        """One budget dict ``{kind: value}`` per run, e.g. ``[{"flops_keep": 0.75}, {"flops_keep": 0.5}]`` (a kind
        with ``several_values`` may list values: one run each); the depth budget (``layers_keep``) goes with every
        one of them."""
        others = {k: getattr(self, k) for k in FIELD_BUDGETS
                  if k not in LISTED_BUDGETS and getattr(self, k) is not None}
        others.update(from_flag("custom_budget", self.custom_budget) or {})
        depth = {k: v for k, v in others.items() if k in BUDGETS and BUDGETS[k].combines}
        others = {k: v for k, v in others.items() if k not in depth}
        listed = {k: getattr(self, k) for k in LISTED_BUDGETS if getattr(self, k)}
        listed = {k: [float(v)] if isinstance(v, (int, float)) else [float(x) for x in v]  # YAML scalar or list
                  for k, v in listed.items()}
        if listed and (others or len(listed) > 1):
            first, *rest = sorted(listed)
            raise ConfigError(f"set {first} or {sorted(rest + list(others))}, not both")
        if others:
            return [{**others, **depth}]
        if listed:
            (kind, values), = listed.items()
            return [{kind: v, **depth} for v in values]
        return [depth] if depth else [dict(DEFAULT_BUDGET)]

    def pruning_config(self, budget: Mapping[str, Any], seed: int) -> PruningConfig:
        """The library's :class:`PruningConfig` for one budget (raises ConfigError on a bad value)."""
        values = {f.name: getattr(self, f.name) for f in fields(PruningConfig)
                  if f.name not in FIELD_BUDGETS and f.name not in _SHARED_FIELDS and f.name != "custom_budget"}
        fields_ = {k: v for k, v in budget.items() if k in FIELD_BUDGETS}
        custom = {k: v for k, v in budget.items() if k not in FIELD_BUDGETS} or None
        try:
            return PruningConfig(**values, **fields_, custom_budget=custom, seed=seed)
        except ValueError as e:
            raise ConfigError(str(e)) from e


#: What to prune and how much: exactly :class:`PruningConfig`'s fields under their own names (``seed`` is
#: ``TrainingArguments.seed``); several ``flops_keep`` values run one prune + recover per budget.
#: Budget fields a recipe may list several values of (one run each): the kinds with ``several_values``.
LISTED_BUDGETS = tuple(k for k in FIELD_BUDGETS if BUDGETS[k].several_values)
PruneArguments = make_dataclass("PruneArguments", flag_fields(lists=LISTED_BUDGETS, exclude=_SHARED_FIELDS),
                                bases=(_PruneArgumentsBase,))
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
        bench_latency: measure latency at all (off for quick runs and tests): PyTorch, and each of
            ``export_formats`` in its own runtime against the dense model's export.
        bench_batch_sizes: batch sizes timed.
        bench_seq_len: sequence length of the timed inputs (text models).
        bench_repeats: timed repeats per model (the median is reported).
    """

    bench_latency: bool = field(default=True, metadata={"help": "Measure latency dense vs pruned (PyTorch, and each export format in its runtime)."})
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

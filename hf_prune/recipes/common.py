"""The steps every recipe shares: evaluate, prune → recover, the cached dense fine-tune, latency and size
measurements. :class:`hf_prune.recipes.recipe.Recipe` chains them; the arguments are in ``arguments.py``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

from .. import costs, report
from ..api import prune
from ..budget_kinds import BUDGETS
from ..distributed import barrier
from ..divergence import fidelity_line
from ..model_kinds import scored_view
from ..plan import PrunePlan
from ..trainer import DistillationConfig, PruningTrainer, default_lora_config
from .arguments import (  # noqa: F401  (re-exported: recipes and users import them from here)
    CONFIG_SUFFIXES,
    DEPRECATED_KEYS,
    BenchArguments,
    ConfigError,
    DenseArguments,
    PruneArguments,
    RecoveryArguments,
    args_dict,
    check_flags,
    parse_recipe_args,
    read_config_file,
)

# -------------------------------------------------------------------------------------------- recipe steps


def quiet_expected_warnings() -> None:
    """Silence transformers' per-layer-config warning, which every load of a pruned model triggers by design
    (hf_prune's model classes read the per-layer sizes themselves); entry points call this, the library does not."""
    logging.getLogger("transformers.integrations.heterogeneity.configuration_utils").setLevel(logging.ERROR)


@contextlib.contextmanager
def new_head_expected() -> Iterator[None]:
    """Loading a pretrained encoder into a task class: transformers' load report says the head is newly initialised,
    which is what the recipe expects (it reads ``output_loading_info`` and fine-tunes or warns itself)."""
    log = logging.getLogger("transformers.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


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
    quiet_cpu_(args)
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
    """Folder name of a budget's run: ``flops50``, ``heads75_neurons50``, ``params20M``, ``flops40_layers4`` (a layer
    count), ``layers50pct`` (a fraction of the layers)."""
    return "_".join(BUDGETS[key].run_label(value) for key, value in budget.items())


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
    if fidelity_line(plan.meta):  # label-free, from held-out calibration samples
        log(f"[{name}] {fidelity_line(plan.meta)}")
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
        lora_config = default_lora_config(scored_view(model), r=recovery_args.lora_r)
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
    result.model = trainer.outer_model or trainer.model  # a SentenceTransformer trains through its view
    if PrunePlan.of(scored_view(result.model)) != plan:
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


def measure_latency(
    dense: nn.Module, pruned: nn.Module, bench: BenchArguments, seq_len: int,
    inputs_fn: Callable[[nn.Module, int], Mapping[str, Any]] | None = None, flops_seq_len: int | None = None,
) -> list[dict[str, Any]]:
    """Latency of dense vs pruned (interleaved), per batch size, with the FLOPs-ideal speedup beside it (a
    sentence-transformers model is timed as its whole pipeline: encoder, pooling, normalisation)."""
    dense, pruned = scored_view(dense), scored_view(pruned)
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
    model = scored_view(model)
    return {"params": costs.count_params(model), "layer_flops": costs.count_flops(model, seq_len)["total"]}

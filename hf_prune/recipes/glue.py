"""GLUE recipe: (dense fine-tune) → prune → recover → evaluate → save → report → (push), for any GLUE task or a
``datasets`` dataset with named text/label columns.

    hf-prune run recipes/glue/sst2.yaml                                   # offline: embedded MiniLM, local SST-2
    hf-prune run recipes/glue/sst2.yaml --model_name_or_path bert-base-uncased --data_dir ""   # online: Hub
    accelerate launch recipes/run_glue.py recipes/glue/mrpc.yaml --flops_keep 0.6 0.4

Arguments are the dataclasses below plus ``PruneArguments``, ``RecoveryArguments``, ``DenseArguments``,
``BenchArguments`` and transformers' ``TrainingArguments`` (for the recovery run); a YAML/JSON config gives
defaults and command-line flags override them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
)

from .. import report
from ..hub import check_can_push, check_repo_id
from ..metrics import glue_compute_metrics, load_metric
from ..resources import base_model_id, resolve_data_dir, resolve_model_path
from ..tasks import GLUE_TASKS, TaskSpec, get_task, load_task_data
from .common import (
    BenchArguments,
    ConfigError,
    DenseArguments,
    PruneArguments,
    RecoveryArguments,
    args_dict,
    dense_cache_matches,
    evaluate,
    is_main_process,
    model_stats,
    parse_recipe_args,
    quiet_cpu_,
    quiet_expected_warnings,
    run_budgets,
    train_dense_,
)

RECIPE = "glue"


@dataclass
class ModelArguments:
    """The model to prune.

    Args:
        model_name_or_path: Hub id, local folder, or ``minilm`` for the embedded all-MiniLM-L6-v2 (offline).
        tokenizer_name: tokenizer to use if not the model's.
        cache_dir: where Hub downloads are stored.
        trust_remote_code: allow a Hub model's own modeling code.
    """

    model_name_or_path: str = field(default="minilm", metadata={"help": "Hub id, local folder, or 'minilm'."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Hub download cache."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the Hub model's own code."})


@dataclass
class DataArguments:
    """The task and its data.

    Args:
        task_name: a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), or a name for a custom task
            given by ``dataset_name`` + ``text_columns`` + ``label_column``.
        data_dir: folder with the task's files (GLUE ``train.tsv``/``dev.tsv`` or train/validation
            csv/jsonl/parquet), or a GLUE root holding ``<task>/``. ``embedded``: the SST-2 data shipped inside
            hf_prune (4,000 training sentences and the full dev set; offline, no files outside the package).
            Empty: load from the Hub (``nyu-mll/glue``).
        dataset_name: any ``datasets`` Hub dataset for a custom task.
        dataset_config_name: its config.
        text_columns: one or two text columns of a custom task.
        label_column: the label column of a custom task.
        num_labels: classes of a custom task (1 = regression).
        max_seq_length: tokens per example after truncation.
        max_train_samples: subsample the training set (quick runs).
        max_eval_samples: subsample the evaluation sets.
    """

    task_name: str = field(default="sst2", metadata={"help": "GLUE task or custom task name."})
    data_dir: str | None = field(default=None, metadata={"help": "Local data folder; empty = Hub."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset for a custom task."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its config."})
    text_columns: list[str] | None = field(default=None, metadata={"help": "Custom task text column(s)."})
    label_column: str = field(default="label", metadata={"help": "Custom task label column."})
    num_labels: int | None = field(default=None, metadata={"help": "Custom task classes (1 = regression)."})
    max_seq_length: int = field(default=128, metadata={"help": "Max tokens per example."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Subsample training data."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Subsample evaluation data."})

    def task(self) -> TaskSpec:
        if self.dataset_name or self.text_columns:
            if not (self.text_columns and self.num_labels):
                raise ConfigError("a custom task needs text_columns and num_labels (1 for regression)")
            return TaskSpec.custom(
                self.task_name, self.text_columns, label_column=self.label_column,
                num_labels=self.num_labels if self.num_labels > 1 else None, is_regression=self.num_labels == 1,
                hub_path=self.dataset_name, hub_config=self.dataset_config_name,
            )
        if self.task_name not in GLUE_TASKS:
            raise ConfigError(
                f"unknown task {self.task_name!r}: GLUE tasks are {', '.join(GLUE_TASKS)}; for other data set "
                "dataset_name (or data_dir), text_columns, label_column and num_labels"
            )
        return get_task(self.task_name)


ARG_TYPES = (ModelArguments, DataArguments, PruneArguments, RecoveryArguments, DenseArguments, BenchArguments,
             TrainingArguments)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    return parse_recipe_args(ARG_TYPES, argv, prog="hf-prune run <glue config>", recipe=RECIPE,
                             description="Prune and recover a model on a GLUE (or custom text) task.")


def _tokenize(data: Any, task: TaskSpec, tokenizer: Any, max_len: int) -> Any:
    fields_ = task.text_fields

    def fn(batch: dict[str, list]) -> dict[str, Any]:
        texts = [batch[c] for c in fields_]
        return tokenizer(*texts, truncation=True, max_length=max_len)

    keep = {"label"}
    return data.map(fn, batched=True, remove_columns=[c for c in data["train"].column_names if c not in keep],
                    desc="tokenizing")


def _calibration(train: Any, n: int, batch_size: int, collator: Any, args: TrainingArguments) -> list[dict]:
    """``n`` training samples (a seeded random subset; each process scores its own shard, and the scores are
    summed over processes, so every rank builds the same plan), batched and padded."""
    ds = train.shuffle(seed=args.seed).select(range(min(n, len(train))))
    ds = ds.shard(args.world_size, args.process_index) if args.world_size > 1 else ds
    rows = [ds[i] for i in range(len(ds))]
    return [collator(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def _dense_key(model_args: ModelArguments, data_args: DataArguments, dense_args: DenseArguments,
               args: TrainingArguments) -> dict[str, Any]:
    return {"model": model_args.model_name_or_path, "data": asdict(data_args), "dense": asdict(dense_args),
            "batch_size": args.per_device_train_batch_size, "seed": args.seed}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    model_args, data_args, prune_args, rec_args, dense_args, bench_args, training_args = parse_args(argv)
    quiet_expected_warnings()
    quiet_cpu_(training_args)
    main_proc = is_main_process(training_args)
    log = print if main_proc else (lambda *_: None)
    out = Path(training_args.output_dir)

    # ---- everything that can be wrong is checked before any long work
    task = data_args.task()
    budgets = prune_args.budgets()
    for b in budgets:
        prune_args.pruning_config(b, seed=training_args.seed)
    if training_args.push_to_hub:
        check_can_push(training_args.hub_model_id, training_args.hub_token)
    if training_args.hub_model_id:
        check_repo_id(training_args.hub_model_id, "hub_model_id")
    base_model = base_model_id(model_args.model_name_or_path)
    data = load_task_data(task, resolve_data_dir(data_args.data_dir, task.name), max_train_samples=data_args.max_train_samples,
                          max_eval_samples=data_args.max_eval_samples, seed=training_args.seed,
                          cache_dir=model_args.cache_dir)
    path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or path, cache_dir=model_args.cache_dir)
    tokenized = _tokenize(data, task, tokenizer, data_args.max_seq_length)
    collator = DataCollatorWithPadding(tokenizer)
    train, evals = tokenized["train"], {s: tokenized[s] for s in task.eval_splits}
    metric = load_metric(task)
    compute_metrics = glue_compute_metrics(task, metric)
    main_metric = task.main_metric
    log(f"task {task.name}: {len(train)} train, " + ", ".join(f"{len(v)} {k}" for k, v in evals.items())
        + f"; metrics via {metric.source}")

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        return evaluate(model, training_args, evals, compute_metrics, collator, tokenizer)

    # ---- dense model: fine-tuned here (cached), or already fine-tuned
    label_kw: dict[str, Any] = {"num_labels": task.num_labels}
    if not task.is_regression:
        label_kw.update(id2label=task.id2label, label2id=task.label2id)
    dense_dir, key = out / "dense", _dense_key(model_args, data_args, dense_args, training_args)
    if dense_cache_matches(dense_dir, key, dense_args):
        log(f"dense: reusing the fine-tuned model in {dense_dir}")
        dense = AutoModelForSequenceClassification.from_pretrained(dense_dir)
    else:
        dense, info = AutoModelForSequenceClassification.from_pretrained(
            path, cache_dir=model_args.cache_dir, trust_remote_code=model_args.trust_remote_code,
            output_loading_info=True, **label_kw,
        )
        untrained_head = bool(info.get("missing_keys"))
        if dense_args.dense_train == "yes" or (dense_args.dense_train == "auto" and untrained_head):
            train_dense_(dense, dense_args=dense_args, training_args=training_args, train_dataset=train,
                         data_collator=collator, processing_class=tokenizer, dense_dir=dense_dir, key=key,
                         what=f"fine-tuning {model_args.model_name_or_path} on {task.name}", log=log)
        elif untrained_head:
            log(f"warning: {model_args.model_name_or_path} has no trained head for {task.name} "
                f"(missing {info['missing_keys'][:4]}) and dense_train=no: its scores will be near chance")
    dense.eval()
    dense_metrics = eval_fn(dense)
    log(f"dense: {dense_metrics}")
    seq = prune_args.seq_len
    results: dict[str, Any] = {
        "recipe": RECIPE, "task": task.name, "model": model_args.model_name_or_path, "main_metric": main_metric,
        "environment": report.environment(), "bench_seq_len": bench_args.bench_seq_len,
        "args": args_dict(model_args, data_args, prune_args, rec_args, dense_args, bench_args, training_args),
        "dense": {"metrics": dense_metrics, **model_stats(dense, seq)}, "runs": [],
    }
    calibration = _calibration(train, prune_args.max_calibration_samples, training_args.per_device_train_batch_size,
                               collator, training_args)

    # ---- one prune + recover per budget, then the reports
    return run_budgets(
        dense, budgets, results, prune_args=prune_args, recovery_args=rec_args, bench_args=bench_args,
        training_args=training_args, calibration=calibration, train_dataset=train, evaluate_fn=eval_fn,
        trainer_kwargs={"data_collator": collator, "processing_class": tokenizer,
                        "eval_dataset": next(iter(evals.values())), "compute_metrics": compute_metrics},
        card={"base_model": base_model, "task": task.name,
              "dataset": task.hub_path or data_args.dataset_name},
        title=task.name, main_metric=main_metric, latency_seq_len=bench_args.bench_seq_len, log=log,
    )

if __name__ == "__main__":
    main()

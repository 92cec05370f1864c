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
from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
    set_seed,
)

from ..formats.settings import ServeArguments
from ..resources import resolve_data_dir, resolve_model_path
from .arguments import (
    BenchArguments,
    ConfigError,
    DenseArguments,
    PruneArguments,
    RecoveryArguments,
    parse_recipe_args,
)
from .common import dense_cache_matches, new_head_expected, train_dense_
from .metrics import glue_compute_metrics, load_metric
from .recipe import Recipe
from .tasks import GLUE_TASKS, TaskSpec, get_task, load_task_data

RECIPE = "glue"


@dataclass
class ModelArguments:
    """The model to prune.

    Args:
        model_name_or_path: Hub id, local folder, or an embedded model (offline): ``minilm`` (all-MiniLM-L6-v2),
            ``smollm2`` (SmolLM2-135M-Instruct, with ``HF_PRUNE_LLM=1 bash scripts/setup.sh``).
        tokenizer_name: tokenizer to use if not the model's.
        cache_dir: where Hub downloads are stored.
        trust_remote_code: allow a Hub model's own modeling code.
    """

    model_name_or_path: str = field(default="minilm", metadata={"help": "Hub id, folder, 'minilm' or 'smollm2'."})
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
             ServeArguments, TrainingArguments)


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


class GlueRecipe(Recipe):
    """The GLUE recipe's hooks: task data (GLUE TSVs, embedded SST-2, the Hub, or a custom ``datasets`` task),
    a sequence classifier (fine-tuned here and cached when it has no trained head), and GLUE metrics."""

    name = RECIPE

    def check(self) -> None:
        self.task = self.data_args.task()

    @property
    def task_name(self) -> str:
        return self.task.name

    def load_data(self) -> None:
        m, d, args, task = self.model_args, self.data_args, self.training_args, self.task
        data = load_task_data(task, resolve_data_dir(d.data_dir, task.name), max_train_samples=d.max_train_samples,
                              max_eval_samples=d.max_eval_samples, seed=args.seed, cache_dir=m.cache_dir)
        self.path = resolve_model_path(m.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(m.tokenizer_name or self.path, cache_dir=m.cache_dir)
        tokenized = _tokenize(data, task, tokenizer, d.max_seq_length)
        self.collator, self.processing_class = DataCollatorWithPadding(tokenizer), tokenizer
        self.train, self.evals = tokenized["train"], {s: tokenized[s] for s in task.eval_splits}
        metric = load_metric(task)
        self.compute_metrics, self.main_metric = glue_compute_metrics(task, metric), task.main_metric
        self.log(f"task {task.name}: {len(self.train)} train, "
                 + ", ".join(f"{len(v)} {k}" for k, v in self.evals.items()) + f"; metrics via {metric.source}")

    def dense_model(self) -> torch.nn.Module:
        m, task = self.model_args, self.task
        label_kw: dict[str, Any] = {"num_labels": task.num_labels}
        if not task.is_regression:
            label_kw.update(id2label=task.id2label, label2id=task.label2id)
        dense_dir, key = self.out / "dense", _dense_key(m, self.data_args, self.dense_args, self.training_args)
        if dense_cache_matches(dense_dir, key, self.dense_args):
            self.log(f"dense: reusing the fine-tuned model in {dense_dir}")
            return AutoModelForSequenceClassification.from_pretrained(dense_dir)
        set_seed(self.training_args.seed)  # the new head's random init is part of the run, like the data order
        with new_head_expected():
            dense, info = AutoModelForSequenceClassification.from_pretrained(
                self.path, cache_dir=m.cache_dir, trust_remote_code=m.trust_remote_code, output_loading_info=True,
                **label_kw,
            )
        untrained_head = bool(info.get("missing_keys"))
        if self.dense_args.dense_train == "yes" or (self.dense_args.dense_train == "auto" and untrained_head):
            train_dense_(dense, dense_args=self.dense_args, training_args=self.training_args,
                         train_dataset=self.train, data_collator=self.collator,
                         processing_class=self.processing_class, dense_dir=dense_dir, key=key,
                         what=f"fine-tuning {m.model_name_or_path} on {task.name}", log=self.log)
        elif untrained_head:
            self.log(f"warning: {m.model_name_or_path} has no trained head for {task.name} "
                     f"(missing {info['missing_keys'][:4]}) and dense_train=no: its scores will be near chance")
        return dense

    def calibration(self) -> list[dict]:
        args = self.training_args
        return _calibration(self.train, self.prune_args.max_calibration_samples, args.per_device_train_batch_size,
                            self.collator, args)

    def card(self) -> dict[str, Any]:
        return {"task": self.task.name, "dataset": self.task.hub_path or self.data_args.dataset_name}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return GlueRecipe(*parse_args(argv)).run()


if __name__ == "__main__":
    from ..distributed import exit_launched

    main()
    exit_launched()

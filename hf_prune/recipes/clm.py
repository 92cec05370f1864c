"""Causal language modelling recipe: prune a decoder LLM → recover on text (KD from the dense model, full or LoRA) →
held-out perplexity → latency → save → card → (push).

    hf-prune run recipes/clm/smollm2.yaml                     # offline: embedded SmolLM2-135M, embedded text
    hf-prune run recipes/clm/smollm2.yaml --model_name_or_path HuggingFaceTB/SmolLM2-360M --dataset_name wikitext \\
        --dataset_config_name wikitext-2-raw-v1 --data_dir ""  # online: any causal LM, any text dataset

The text is packed into blocks of ``block_size`` tokens (documents joined with the tokenizer's EOS): the training
text gives the calibration blocks (scores, retraining-free refit) and the recovery set, the validation text the
held-out blocks perplexity is measured on. The dense model is pruned as it is (no dense training stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, default_data_collator

from ..formats.settings import ServeArguments
from ..lm import perplexity, text_block_rows
from ..resources import EMBEDDED_DATA, embedded_glue_dir, read_tsv, resolve_model_path
from .arguments import (
    BenchArguments,
    ConfigError,
    DenseArguments,
    PruneArguments,
    RecoveryArguments,
    parse_recipe_args,
)
from .glue import ModelArguments
from .recipe import Recipe

RECIPE = "clm"
#: suffix -> ``datasets`` loader for local text files with a ``text_column``
_LOADERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class TextDataArguments:
    """The text to calibrate, recover and measure perplexity on.

    Args:
        data_dir: ``embedded``: the SST-2 sentences shipped inside hf_prune (4,000 training sentences for calibration
            and recovery, the 872 dev sentences for perplexity; offline). A folder: ``train`` and ``validation`` (or
            ``dev``) files in it, ``.txt`` (one document per line), ``.tsv`` (with a header), ``.csv``, ``.jsonl``
            or ``.parquet``. Empty: ``dataset_name`` from the Hub.
        dataset_name: a ``datasets`` Hub dataset with a text column (e.g. ``wikitext``).
        dataset_config_name: its config (e.g. ``wikitext-2-raw-v1``).
        text_column: the column holding the text (``.txt`` files have none; embedded SST-2: ``sentence``).
        block_size: tokens per packed block.
        max_train_blocks: training blocks kept for recovery (None: all).
        max_eval_blocks: held-out blocks perplexity is measured on (None: all).
    """

    data_dir: str | None = field(default=EMBEDDED_DATA, metadata={"help": "embedded, a folder, or empty (Hub)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub text dataset."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its config."})
    text_column: str = field(default="text", metadata={"help": "Text column."})
    block_size: int = field(default=128, metadata={"help": "Tokens per block."})
    max_train_blocks: int | None = field(default=None, metadata={"help": "Training blocks kept."})
    max_eval_blocks: int | None = field(default=64, metadata={"help": "Held-out blocks for perplexity."})

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ConfigError(f"block_size must be >= 2 tokens, got {self.block_size}")
        if not self.data_dir and not self.dataset_name:
            raise ConfigError("no text: set data_dir (embedded or a folder) or dataset_name (a Hub dataset)")
        if self.data_dir and self.dataset_name:
            raise ConfigError(f"both data_dir={self.data_dir!r} and dataset_name={self.dataset_name!r} are set: "
                              "set data_dir to '' to read the Hub dataset")


ARG_TYPES = (ModelArguments, TextDataArguments, PruneArguments, RecoveryArguments, DenseArguments, BenchArguments,
             ServeArguments, TrainingArguments)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    return parse_recipe_args(ARG_TYPES, argv, prog="hf-prune run <clm config>", recipe=RECIPE,
                             description="Prune a causal LM and recover it on text; held-out perplexity.")


def _split_file(folder: Path, names: Sequence[str]) -> Path:
    suffixes = (".txt", ".tsv", *_LOADERS)
    found = [folder / f"{n}{s}" for n in names for s in suffixes if (folder / f"{n}{s}").is_file()]
    if not found:
        raise ConfigError(f"{folder} has no {' or '.join(names)} file ({', '.join(suffixes)})")
    return found[0]


def _read_texts(path: Path, column: str) -> list[str]:
    if path.suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".tsv":
        rows = read_tsv(path, header=False)
        if column not in rows[0]:
            raise ConfigError(f"{path} has no column {column!r} (columns: {rows[0]}): set text_column")
        j = rows[0].index(column)
        return [r[j] for r in rows[1:] if len(r) > j]
    ds = datasets.load_dataset(_LOADERS[path.suffix], data_files=str(path), split="train")
    if column not in ds.column_names:
        raise ConfigError(f"{path} has no column {column!r} (columns: {ds.column_names}): set text_column")
    return [t for t in ds[column] if t and t.strip()]


def load_texts(d: TextDataArguments, cache_dir: str | None = None) -> tuple[list[str], list[str]]:
    """(training texts, validation texts) as ``d`` says (embedded SST-2, a folder, or a Hub dataset)."""
    if d.data_dir == EMBEDDED_DATA:
        folder, column = embedded_glue_dir() / "sst2", "sentence" if d.text_column == "text" else d.text_column
        return _read_texts(folder / "train.tsv", column), _read_texts(folder / "dev.tsv", column)
    if d.data_dir:
        folder = Path(d.data_dir)
        if not folder.is_dir():
            raise ConfigError(f"data_dir {d.data_dir!r} is not a folder (or 'embedded', or '' for the Hub)")
        return (_read_texts(_split_file(folder, ["train"]), d.text_column),
                _read_texts(_split_file(folder, ["validation", "dev"]), d.text_column))
    data = datasets.load_dataset(d.dataset_name, d.dataset_config_name, cache_dir=cache_dir)
    split = next((s for s in ("validation", "test") if s in data), None)
    if "train" not in data or split is None or d.text_column not in data["train"].column_names:
        raise ConfigError(f"{d.dataset_name} needs a train split, a validation or test split and a {d.text_column!r} "
                          f"column (has {list(data)} / {data[next(iter(data))].column_names})")
    return ([t for t in data["train"][d.text_column] if t.strip()],
            [t for t in data[split][d.text_column] if t.strip()])


class ClmRecipe(Recipe):
    """The causal-LM recipe's hooks: packed text blocks, the dense LM as it is, perplexity on held-out blocks."""

    name = RECIPE

    def check(self) -> None:
        if self.dense_args.dense_train == "yes":
            raise ConfigError("dense_train=yes trains a task head; the clm recipe prunes the causal LM as it is "
                              "(leave dense_train at auto)")
        if self.prune_args.max_calibration_samples is not None and self.prune_args.max_calibration_samples < 1:
            raise ConfigError("max_calibration_samples must be >= 1 block")

    @property
    def task_name(self) -> str:
        d = self.data_args
        return d.dataset_name or ("embedded SST-2 text" if d.data_dir == EMBEDDED_DATA else Path(d.data_dir).name)

    def load_data(self) -> None:
        m, d, args = self.model_args, self.data_args, self.training_args
        self.path = resolve_model_path(m.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(m.tokenizer_name or self.path, cache_dir=m.cache_dir)
        train_texts, eval_texts = load_texts(d, m.cache_dir)
        rows = text_block_rows(tokenizer, train_texts, block_size=d.block_size, max_blocks=d.max_train_blocks)
        eval_rows = text_block_rows(tokenizer, eval_texts, block_size=d.block_size, max_blocks=d.max_eval_blocks)
        bs = args.per_device_eval_batch_size
        self.eval_blocks = [default_data_collator(eval_rows[i : i + bs]) for i in range(0, len(eval_rows), bs)]
        self.train = _Blocks(rows)
        self.evals = {"validation": _Blocks(eval_rows)}
        self.collator, self.processing_class = default_data_collator, tokenizer
        self.compute_metrics, self.main_metric = None, "perplexity"
        self.log(f"text: {len(rows)} training blocks and {len(self.evals['validation'])} held-out blocks of "
                 f"{d.block_size} tokens ({self.task_name})")

    def dense_model(self) -> torch.nn.Module:
        m = self.model_args
        return AutoModelForCausalLM.from_pretrained(self.path, cache_dir=m.cache_dir,
                                                    trust_remote_code=m.trust_remote_code)

    def calibration(self) -> list[dict]:
        """The first ``max_calibration_samples`` training blocks (each process scores its own shard; the scores are
        summed over processes), batched."""
        args, n = self.training_args, self.prune_args.max_calibration_samples
        rows = self.train.rows[: n or len(self.train.rows)]
        rows = rows[args.process_index :: args.world_size]
        bs = args.per_device_train_batch_size
        return [default_data_collator(rows[i : i + bs]) for i in range(0, len(rows), bs)]

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return {"perplexity": perplexity(model, self.eval_blocks)}

    def card(self) -> dict[str, Any]:
        return {"task": "causal language modelling", "dataset": self.data_args.dataset_name}


class _Blocks(torch.utils.data.Dataset):
    """Packed blocks as a map-style dataset (what ``Trainer`` iterates), one ``{input_ids, attention_mask,
    labels}`` row each."""

    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return ClmRecipe(*parse_args(argv)).run()


if __name__ == "__main__":
    from ..distributed import exit_launched

    main()
    exit_launched()

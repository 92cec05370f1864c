"""Sentence-embedding recipe: prune a sentence-transformers model on unlabeled text → distil the dense model's
embeddings → STS and retrieval quality → encode latency → save as a sentence-transformers folder → card → (push).

    hf-prune run recipes/embeddings/minilm.yaml --eval_data_dir ../shared/data/glue   # offline: embedded MiniLM
    hf-prune run recipes/embeddings/minilm.yaml --model_name_or_path sentence-transformers/all-MiniLM-L12-v2 \\
        --eval_data_dir ""                                                          # online: Hub STS-B and QNLI

Calibration and distillation text is unlabeled (the embedded SST-2 sentences, a folder, or a Hub text dataset). The
quality measured: STS-B dev Spearman of the cosine similarity (x 100, MTEB's STS metric) and QNLI dev read as
question -> answer retrieval (MRR@10, recall@10; :mod:`hf_prune.embeddings.evaluation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments

from ..embeddings.evaluation import (
    RetrievalSet,
    StsPairs,
    read_qnli_retrieval,
    read_sts,
    retrieval_scores,
    retrieval_set,
    sts_spearman,
)
from ..formats.settings import ServeArguments
from ..resources import EMBEDDED_DATA, resolve_model_path
from .arguments import (
    BenchArguments,
    ConfigError,
    DenseArguments,
    PruneArguments,
    RecoveryArguments,
    parse_recipe_args,
)
from .clm import TextDataArguments, load_texts
from .glue import ModelArguments
from .recipe import Recipe

RECIPE = "embeddings"
#: the Hub datasets read when ``eval_data_dir`` is empty
HUB_STS, HUB_QNLI = ("sentence-transformers/stsb", None), ("nyu-mll/glue", "qnli")


@dataclass
class SentenceDataArguments:
    """The unlabeled text pruning calibrates and distillation trains on.

    Args:
        data_dir: ``embedded``: the SST-2 sentences shipped inside hf_prune (4,000; offline). A folder: a ``train``
            file in it (``.txt``, one sentence per line; ``.tsv`` with a header; ``.csv``, ``.jsonl``, ``.parquet``).
            Empty: ``dataset_name`` from the Hub.
        dataset_name: a ``datasets`` Hub dataset with a text column.
        dataset_config_name: its config.
        text_column: the column holding the sentences (embedded SST-2: ``sentence``).
    """

    data_dir: str | None = field(default=EMBEDDED_DATA, metadata={"help": "embedded, a folder, or empty (Hub)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub text dataset."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its config."})
    text_column: str = field(default="text", metadata={"help": "Text column."})

    def __post_init__(self) -> None:
        TextDataArguments(data_dir=self.data_dir, dataset_name=self.dataset_name)  # the same source rules

    def texts(self, cache_dir: str | None = None) -> list[str]:
        """The training sentences (the split clm's loader calls ``train``)."""
        source = TextDataArguments(data_dir=self.data_dir, dataset_name=self.dataset_name,
                                   dataset_config_name=self.dataset_config_name, text_column=self.text_column)
        return [t for t in load_texts(source, cache_dir)[0] if t.strip()]


@dataclass
class EmbeddingEvalArguments:
    """How the embeddings are evaluated.

    Args:
        eval_data_dir: a folder in GLUE layout holding ``stsb/dev.tsv`` and ``qnli/dev.tsv`` (offline); empty: the
            Hub's ``sentence-transformers/stsb`` validation split and GLUE's QNLI validation split.
        max_seq_length: tokens per sentence (longer sentences are truncated), for calibration, distillation and
            evaluation.
        max_train_sentences: unlabeled sentences kept for calibration and distillation (None: all).
        retrieval_queries: QNLI questions used as queries (None: all 2,702 whose sentence answers them).
        retrieval_corpus: corpus size (the queries' own sentences, then other QNLI dev sentences; None: all).
    """

    eval_data_dir: str | None = field(default=None, metadata={"help": "GLUE folder with stsb/ and qnli/; '' = Hub."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per sentence."})
    max_train_sentences: int | None = field(default=None, metadata={"help": "Unlabeled sentences kept."})
    retrieval_queries: int | None = field(default=None, metadata={"help": "Retrieval queries (None: all)."})
    retrieval_corpus: int | None = field(default=None, metadata={"help": "Retrieval corpus size (None: all)."})

    def __post_init__(self) -> None:
        if self.eval_data_dir and not (Path(self.eval_data_dir) / "stsb" / "dev.tsv").is_file():
            raise ConfigError(f"eval_data_dir {self.eval_data_dir!r} has no stsb/dev.tsv: pass a folder in GLUE "
                              "layout (stsb/dev.tsv, qnli/dev.tsv) or '' to read the Hub")


ARG_TYPES = (ModelArguments, SentenceDataArguments, EmbeddingEvalArguments, PruneArguments, RecoveryArguments,
             DenseArguments, BenchArguments, ServeArguments, TrainingArguments)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    return parse_recipe_args(ARG_TYPES, argv, prog="hf-prune run <embeddings config>", recipe=RECIPE,
                             description="Prune a sentence-transformers model, distil its embeddings; STS and "
                                         "retrieval quality.")


def load_eval_sets(e: EmbeddingEvalArguments, cache_dir: str | None = None) -> tuple[StsPairs, RetrievalSet]:
    """STS-B dev pairs and QNLI dev retrieval, from ``eval_data_dir`` or the Hub."""
    if e.eval_data_dir:
        root = Path(e.eval_data_dir)
        return (read_sts(root / "stsb" / "dev.tsv"),
                read_qnli_retrieval(root / "qnli" / "dev.tsv", e.retrieval_queries, e.retrieval_corpus))
    sts = datasets.load_dataset(*HUB_STS, split="validation", cache_dir=cache_dir)
    qnli = datasets.load_dataset(*HUB_QNLI, split="validation", cache_dir=cache_dir)
    pairs = StsPairs(list(sts["sentence1"]), list(sts["sentence2"]), [float(x) for x in sts["score"]])
    answers = [y == 0 for y in qnli["label"]]  # label 0: entailment (the sentence answers the question)
    return pairs, retrieval_set(qnli["question"], qnli["sentence"], answers, e.retrieval_queries, e.retrieval_corpus)


class EmbeddingsRecipe(Recipe):
    """The sentence-embedding recipe's hooks: unlabeled text, the SentenceTransformer as it is, STS and retrieval."""

    name = RECIPE

    def __init__(self, model_args: Any, text_args: Any, eval_args: Any, *rest: Any) -> None:
        super().__init__(model_args, text_args, *rest)
        self.eval_args = eval_args
        self.extra_args = (eval_args,)  # recorded in results.json with the others

    def check(self) -> None:
        if self.dense_args.dense_train == "yes":
            raise ConfigError("dense_train=yes trains a task head; the embeddings recipe prunes the sentence encoder "
                              "as it is (leave dense_train at auto)")
        if self.serve_args.export_formats:
            raise ConfigError("export_formats are not written for sentence-transformers folders yet: the folder "
                              "itself is what SentenceTransformer(...) loads; drop export_formats")
        if self.recovery_args.recovery == "full" and self.recovery_args.distill_alpha != 1.0:
            raise ConfigError("the embeddings recipe recovers by distilling the dense model's embeddings only (the "
                              "text has no labels): set distill_alpha to 1.0")

    @property
    def task_name(self) -> str:
        return "sentence similarity"

    def load_data(self) -> None:
        m, e = self.model_args, self.eval_args
        self.path = resolve_model_path(m.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(m.tokenizer_name or self.path, cache_dir=m.cache_dir)
        self.sentences = self.data_args.texts(m.cache_dir)[: e.max_train_sentences]
        rows = tokenizer(self.sentences, truncation=True, max_length=e.max_seq_length)
        self.train = datasets.Dataset.from_dict({k: rows[k] for k in rows.keys()})
        self.evals = {"validation": None}  # measured by evaluate(), not by Trainer
        self.collator, self.processing_class = DataCollatorWithPadding(tokenizer), None  # the folder has its own
        self.compute_metrics, self.main_metric = None, "sts_spearman"
        self.sts, self.retrieval = load_eval_sets(e, m.cache_dir)
        self.log(f"text: {len(self.sentences)} unlabeled sentences; STS-B {len(self.sts.scores)} pairs; retrieval "
                 f"{len(self.retrieval.queries)} queries over {len(self.retrieval.corpus)} sentences")

    def dense_model(self) -> torch.nn.Module:
        from sentence_transformers import SentenceTransformer

        m = self.model_args
        device = "cpu" if self.training_args.use_cpu or not torch.cuda.is_available() else "cuda"
        model = SentenceTransformer(self.path, device=device, cache_folder=m.cache_dir,
                                    trust_remote_code=m.trust_remote_code)
        model.max_seq_length = self.eval_args.max_seq_length
        return model

    def calibration(self) -> list[str]:
        """The first ``max_calibration_samples`` sentences (this process's share under DDP)."""
        args, n = self.training_args, self.prune_args.max_calibration_samples
        return self.sentences[: n or len(self.sentences)][args.process_index :: args.world_size]

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        bs = self.training_args.per_device_eval_batch_size
        return {"sts_spearman": sts_spearman(model, self.sts, bs), **retrieval_scores(model, self.retrieval, 10, bs)}

    def card(self) -> dict[str, Any]:
        return {"task": "sentence similarity", "dataset": "sentence-transformers/stsb"}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return EmbeddingsRecipe(*parse_args(argv)).run()


if __name__ == "__main__":
    from ..distributed import exit_launched

    main()
    exit_launched()

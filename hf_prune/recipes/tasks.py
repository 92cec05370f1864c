"""GLUE task registry and data loading (original GLUE TSVs, csv/jsonl/parquet exports, or the Hub).

Every loader returns a ``datasets.DatasetDict`` shaped like ``load_dataset("nyu-mll/glue", task)``: the task's
text columns, ``label`` (a ``ClassLabel``, or ``float32`` for regression) and ``idx``, with the splits ``train``
plus the task's eval splits. Bad inputs fail with an error that names the file, column or label and the fix.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ..resources import read_tsv

GLUE_HUB_PATH = "nyu-mll/glue"
TRAIN_SPLIT = "train"
#: The metric names ``evaluate.load("glue", task)`` returns; ``hf_prune.recipes.metrics`` computes each of them.
METRIC_NAMES = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")
#: Looked for in this order, so an original GLUE ``dev.tsv`` wins over an export beside it.
DATA_EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class TsvLayout:
    """Where an original GLUE TSV (as written by ``download_glue_data.py``) keeps each field.

    Args:
        columns: pairs (HF column name, TSV header name), or (HF name, column index) when ``header`` is False;
            ``"label"`` is one of the HF names.
        header: whether the first row is a header (CoLA's train/dev files have none).
        folder: the task's folder name in the GLUE download (``SST-2``), accepted besides the task name.
    """

    columns: tuple[tuple[str, str | int], ...]
    header: bool = True
    folder: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A text classification or regression task: columns, labels, metrics and splits.

    Args:
        name: registry name (``"rte"``); also the ``nyu-mll/glue`` config for GLUE tasks.
        text_fields: one column (single sentence) or two (sentence pair), in model input order.
        label_names: class names in label-id order (HF glue order); empty for regression.
        metric_names: metrics as ``evaluate.load("glue", name)`` reports them, a subset of ``METRIC_NAMES``.
        is_regression: a single float target (STS-B) instead of class ids.
        eval_splits: evaluation splits besides ``train`` (MNLI has matched and mismatched).
        label_column: the label's column in the raw data; loaders rename it to ``label``.
        hub_path: dataset to ``load_dataset`` when no ``data_dir`` is given (None: local data only).
        hub_config: the config name passed with ``hub_path``.
        tsv: layout of the task's original GLUE TSVs; None means TSVs with a header of the HF column names.
    """

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...]
    metric_names: tuple[str, ...]
    is_regression: bool = False
    eval_splits: tuple[str, ...] = ("validation",)
    label_column: str = "label"
    hub_path: str | None = None
    hub_config: str | None = None
    tsv: TsvLayout | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.text_fields) <= 2:
            raise ValueError(f"task {self.name!r}: text_fields needs one or two columns, got {self.text_fields}")
        unknown = [m for m in self.metric_names if m not in METRIC_NAMES]
        if unknown or not self.metric_names:
            raise ValueError(f"task {self.name!r}: unknown metrics {unknown or '(none)'}; choose from {METRIC_NAMES}")
        if self.is_regression == bool(self.label_names):
            raise ValueError(f"task {self.name!r}: give label_names for classification and none for regression")
        if "f1" in self.metric_names and len(self.label_names) != 2:
            raise ValueError(f"task {self.name!r}: f1 is the binary F1 of class 1 and needs exactly two labels")

    @property
    def num_labels(self) -> int:
        """What ``AutoModelForSequenceClassification`` needs: 1 for regression."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.label_names)}

    @property
    def splits(self) -> tuple[str, ...]:
        return (TRAIN_SPLIT, *self.eval_splits)

    @property
    def main_metric(self) -> str:
        """The first metric, e.g. for ``TrainingArguments(metric_for_best_model=...)``."""
        return self.metric_names[0]

    @classmethod
    def custom(
        cls,
        name: str,
        text_fields: str | Sequence[str],
        *,
        label_column: str = "label",
        label_names: Sequence[str] | None = None,
        num_labels: int | None = None,
        is_regression: bool = False,
        metric_names: Sequence[str] | None = None,
        eval_splits: Sequence[str] = ("validation",),
        hub_path: str | None = None,
        hub_config: str | None = None,
    ) -> TaskSpec:
        """A task over any ``datasets`` data with user-named columns (classes from names or a count)."""
        if is_regression:
            names: tuple[str, ...] = ()
        elif label_names is not None:
            names = tuple(label_names)
        elif num_labels:
            names = tuple(f"LABEL_{i}" for i in range(num_labels))  # transformers' default id2label names
        else:
            raise ValueError(f"custom task {name!r}: pass label_names or num_labels (or is_regression=True)")
        default_metrics = ("pearson", "spearmanr") if is_regression else ("accuracy",)
        return cls(
            name=name,
            text_fields=(text_fields,) if isinstance(text_fields, str) else tuple(text_fields),
            label_names=names,
            metric_names=tuple(metric_names or default_metrics),
            is_regression=is_regression,
            eval_splits=tuple(eval_splits),
            label_column=label_column,
            hub_path=hub_path,
            hub_config=hub_config,
        )


def _glue(name: str, text: dict[str, str | int], labels: tuple[str, ...], metrics: tuple[str, ...], folder: str,
          label_col: str | int = "label", header: bool = True, **kw: Any) -> TaskSpec:
    """A GLUE task whose original TSV keeps text ``text[hf_name]`` and the label in ``label_col``."""
    tsv_cols: tuple[tuple[str, str | int], ...] = (*text.items(), ("label", label_col))
    return TaskSpec(name, tuple(text), labels, metrics, hub_path=GLUE_HUB_PATH, hub_config=name,
                    tsv=TsvLayout(tsv_cols, header, folder), **kw)


_NLI2 = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    _glue("cola", {"sentence": 3}, ("unacceptable", "acceptable"), ("matthews_correlation",), "CoLA",
          label_col=1, header=False),
    _glue("sst2", {"sentence": "sentence"}, ("negative", "positive"), ("accuracy",), "SST-2"),
    _glue("mrpc", {"sentence1": "#1 String", "sentence2": "#2 String"}, ("not_equivalent", "equivalent"),
          ("accuracy", "f1"), "MRPC", label_col="Quality"),
    _glue("qqp", {"question1": "question1", "question2": "question2"}, ("not_duplicate", "duplicate"),
          ("accuracy", "f1"), "QQP", label_col="is_duplicate"),
    _glue("stsb", {"sentence1": "sentence1", "sentence2": "sentence2"}, (), ("pearson", "spearmanr"), "STS-B",
          label_col="score", is_regression=True),
    _glue("mnli", {"premise": "sentence1", "hypothesis": "sentence2"}, ("entailment", "neutral", "contradiction"),
          ("accuracy",), "MNLI", label_col="gold_label", eval_splits=("validation_matched", "validation_mismatched")),
    _glue("qnli", {"question": "question", "sentence": "sentence"}, _NLI2, ("accuracy",), "QNLI"),
    _glue("rte", {"sentence1": "sentence1", "sentence2": "sentence2"}, _NLI2, ("accuracy",), "RTE"),
    _glue("wnli", {"sentence1": "sentence1", "sentence2": "sentence2"}, ("not_entailment", "entailment"),
          ("accuracy",), "WNLI"),
)}


def get_task(name: str | TaskSpec) -> TaskSpec:
    """The registered GLUE task ``name`` (case-insensitive; ``SST-2``/``STS-B`` spellings work); a TaskSpec passes."""
    if isinstance(name, TaskSpec):
        return name
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(GLUE_TASKS)} (or TaskSpec.custom(...))")
    return GLUE_TASKS[key]


# ----------------------------------------------------------------------------------------------------- labels
def encode_labels(task: TaskSpec, values: Sequence[Any] | np.ndarray, where: str) -> np.ndarray:
    """Raw labels (class names, ids as ints or strings, floats for regression) -> int64 ids or float32 scores."""
    arr = values if isinstance(values, np.ndarray) else np.asarray(values, dtype=object)  # object: keep raw types
    if task.is_regression:
        try:
            out = arr.astype(np.float32)
        except (TypeError, ValueError):
            bad = next(v for v in arr if not _is_float(v))
            raise ValueError(f"{where}: regression task {task.name!r} needs numeric labels, got {bad!r}") from None
        if np.isnan(out).any():
            raise ValueError(f"{where}: task {task.name!r} has {int(np.isnan(out).sum())} missing (NaN) labels")
        return out
    lookup = task.label2id | {str(i): i for i in range(task.num_labels)}
    ids = np.fromiter((lookup.get(_label_key(v), -1) for v in arr), dtype=np.int64, count=len(arr))
    if (ids < 0).any():
        bad = arr[int(np.argmax(ids < 0))]
        bad = bad.item() if isinstance(bad, np.generic) else bad
        hint = "-1 marks unlabeled (test) rows" if bad == -1 else "is this the right task's data and label column?"
        raise ValueError(f"{where}: label {bad!r} is not a label of task {task.name!r}: expected one of "
                         f"{list(task.label_names)} or ids 0..{task.num_labels - 1} ({hint})")
    return ids


def _label_key(value: Any) -> str:
    """``1``, ``1.0``, ``"1"`` and ``np.int64(1)`` all mean id 1; names stay names."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return value.strip() if isinstance(value, str) else repr(value)


def _is_float(value: Any) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------- normalising
def _features(task: TaskSpec) -> datasets.Features:
    """The HF glue schema: string text, ClassLabel (or float32) label, int32 idx."""
    label = datasets.Value("float32") if task.is_regression else datasets.ClassLabel(names=list(task.label_names))
    return datasets.Features({**{f: datasets.Value("string") for f in task.text_fields},
                              "label": label, "idx": datasets.Value("int32")})


def prepare_split(task: TaskSpec, ds: datasets.Dataset, where: str) -> datasets.Dataset:
    """Check and reshape one raw split: keep text columns, encode ``task.label_column`` as ``label``, add ``idx``."""
    label_col = task.label_column
    table = ds.with_format("arrow")[:]  # respects select/shuffle index mappings, unlike ds.data
    for col in (*task.text_fields, label_col):
        if col not in ds.column_names:
            raise ValueError(f"{where}: missing column {col!r} for task {task.name!r}; columns found: {ds.column_names}"
                             f" (rename it, or use TaskSpec.custom(text_fields=..., label_column=...))")
    for col in task.text_fields:
        if (nulls := table.column(col).null_count) > 0:
            raise ValueError(f"{where}: column {col!r} has {nulls} empty values; drop or fill those rows first")
    labels = encode_labels(task, table.column(label_col).to_numpy(zero_copy_only=False), where)
    idx = table.column("idx").to_numpy() if "idx" in ds.column_names else np.arange(len(ds))
    columns = {f: table.column(f).to_pylist() for f in task.text_fields}
    # from_dict with features (not Dataset.cast): one in-memory table, no progress bar per split
    return datasets.Dataset.from_dict({**columns, "label": labels, "idx": np.asarray(idx, dtype=np.int32)},
                                      features=_features(task))


def prepare_task_data(task: str | TaskSpec, raw: Mapping[str, datasets.Dataset],
                      splits: Sequence[str] | None = None) -> datasets.DatasetDict:
    """Normalise already loaded splits (e.g. a ``load_dataset`` result) to the task's columns and labels."""
    task = get_task(task)
    wanted = tuple(splits or task.splits)
    missing = [s for s in wanted if s not in raw]
    if missing:
        raise ValueError(f"task {task.name!r}: data has no split {missing}; splits found: {list(raw)}")
    return datasets.DatasetDict({s: prepare_split(task, raw[s], f"task {task.name!r} split {s!r}") for s in wanted})


# ---------------------------------------------------------------------------------------------------- local files
def split_file_names(split: str) -> list[str]:
    """Accepted file names for a split, in preference order: ``dev.tsv``, ``validation.csv``, ..."""
    stems = [split.replace("validation", "dev"), split] if split.startswith("validation") else [split]
    return [stem + ext for ext in DATA_EXTENSIONS for stem in stems]


def _task_folder(task: TaskSpec, data_dir: Path, splits: Sequence[str]) -> Path:
    """``data_dir`` itself if it holds the split files, else its ``<task>``/``<GLUE folder>`` subfolder."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir {str(data_dir)!r} is not a folder: pass the folder holding the task's "
                                f"train/dev files (or a GLUE root with a {task.name}/ subfolder), --data_dir \"\" to "
                                "load it from the Hub" + (", or --data_dir embedded (shipped with hf_prune)"
                                                          if task.name == "sst2" else ""))
    if any((data_dir / n).is_file() for s in splits for n in split_file_names(s)):
        return data_dir
    names = [task.name, task.tsv.folder if task.tsv else None]
    return next((data_dir / n for n in names if n and (data_dir / n).is_dir()), data_dir)


def _find_split_file(folder: Path, split: str) -> Path:
    names = split_file_names(split)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no file for split {split!r} in {str(folder)!r}: expected one of {', '.join(names)} "
                            f"(or pass splits=[...] to load only the splits you have)")


def _tsv_columns(task: TaskSpec, first_row: list[str]) -> tuple[dict[str, int], bool]:
    """Column index of each HF field, and whether the first row is a header.

    A header that already names the HF columns (an export of nyu-mll/glue) wins over the original GLUE layout.
    """
    hf_names = (*task.text_fields, task.label_column)
    if all(n in first_row for n in hf_names):
        return {hf: first_row.index(n) for hf, n in zip((*task.text_fields, "label"), hf_names)}, True
    layout = task.tsv or TsvLayout(tuple(zip((*task.text_fields, "label"), hf_names)))
    if not layout.header:
        return {hf: int(col) for hf, col in layout.columns}, False
    for _, col in layout.columns:
        if col not in first_row:
            raise ValueError(f"missing column {col!r} for task {task.name!r}; columns found: {first_row}")
    return {hf: first_row.index(str(col)) for hf, col in layout.columns}, True


def read_glue_tsv(task: str | TaskSpec, path: str | Path) -> datasets.Dataset:
    """One GLUE TSV (quoting off, BOM tolerated) as a raw Dataset of text columns and string labels."""
    task, path = get_task(task), Path(path)
    rows = [r for r in read_tsv(path, header=False) if r]
    if not rows:
        raise ValueError(f"{str(path)!r} is empty")
    try:
        cols, header = _tsv_columns(task, rows[0])
    except ValueError as e:
        raise ValueError(f"{str(path)!r}: {e}") from None
    body = rows[1:] if header else rows
    width = max(cols.values()) + 1
    # HF glue drops rows too short to hold every field (old QQP copies have a few); keep its row count.
    if short := sum(len(r) < width for r in body):
        warnings.warn(f"{path}: skipped {short} rows with fewer than {width} tab-separated fields", stacklevel=2)
    data = {hf: [r[i] for r in body if len(r) >= width] for hf, i in cols.items()}
    data[task.label_column] = data.pop("label")
    data["idx"] = [n for n, r in enumerate(body) if len(r) >= width]
    return datasets.Dataset.from_dict(data)


def read_split_file(task: str | TaskSpec, path: str | Path, cache_dir: str | None = None) -> datasets.Dataset:
    """A raw split from ``.tsv`` (GLUE format or HF column names), ``.csv``, ``.json(l)`` or ``.parquet``."""
    task, path = get_task(task), Path(path)
    if path.suffix == ".tsv":
        return read_glue_tsv(task, path)
    if path.suffix == ".csv":  # keep_default_na=False: a sentence "NA" or "null" stays text
        return datasets.Dataset.from_csv(str(path), cache_dir=cache_dir, keep_default_na=False)
    if path.suffix in (".json", ".jsonl"):
        return datasets.Dataset.from_json(str(path), cache_dir=cache_dir)
    return datasets.Dataset.from_parquet(str(path), cache_dir=cache_dir)


# -------------------------------------------------------------------------------------------------------- loading
def _load_hub(task: TaskSpec, cache_dir: str | None) -> Mapping[str, datasets.Dataset]:
    if task.hub_path is None:
        raise ValueError(f"custom task {task.name!r} has no hub_path: pass data_dir=<folder with train/dev files>")
    try:
        return datasets.load_dataset(task.hub_path, task.hub_config, cache_dir=cache_dir)
    except Exception as e:  # offline (HF_HUB_OFFLINE=1 fails at once), no network, or not on the Hub
        raise RuntimeError(
            f"could not load {task.hub_path!r} ({task.hub_config}) from the Hugging Face Hub: {type(e).__name__}: {e}. "
            f"Pass data_dir=<folder> holding the GLUE TSVs (train.tsv, dev.tsv) or train/validation "
            f"csv/jsonl/parquet files instead."
        ) from e


def subsample(ds: datasets.Dataset, max_samples: int | None, seed: int | None = 0) -> datasets.Dataset:
    """At most ``max_samples`` rows: a seeded random subset kept in file order, or the first rows if seed is None."""
    if max_samples is None or max_samples >= len(ds):
        return ds
    if seed is None:  # run_glue.py's choice
        return ds.select(range(max_samples))
    keep = np.sort(np.random.default_rng(seed).choice(len(ds), size=max_samples, replace=False))
    return ds.select(keep)


def load_task_data(
    task: str | TaskSpec,
    data_dir: str | Path | None = None,
    *,
    splits: Sequence[str] | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int | None = 0,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Load a task's splits shaped like ``nyu-mll/glue``: text columns, ``label`` and ``idx``.

    ``data_dir`` is a folder with the task's files (``train.tsv``/``dev.tsv`` in GLUE format, or ``train.*`` /
    ``validation.*`` csv, jsonl, parquet with HF column names), or a GLUE root holding ``<task>/`` or the GLUE
    download's ``SST-2/`` style folders. Without it the data comes from the Hub (``task.hub_path``).
    ``splits`` defaults to train plus the task's eval splits; ``max_*_samples`` subsample with ``seed``.
    """
    task = get_task(task)
    wanted = tuple(splits or task.splits)
    if data_dir is None:
        data = prepare_task_data(task, _load_hub(task, cache_dir), wanted)
    else:
        folder = _task_folder(task, Path(data_dir), wanted)
        data = datasets.DatasetDict()
        for split in wanted:
            path = _find_split_file(folder, split)
            data[split] = prepare_split(task, read_split_file(task, path, cache_dir), f"{str(path)!r}")
    for split in data:
        limit = max_train_samples if split == TRAIN_SPLIT else max_eval_samples
        data[split] = subsample(data[split], limit, seed)
    return data

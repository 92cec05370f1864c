"""Image data for the image-classification recipe: Hub datasets, image folders or MNIST-style CSVs; torch-only
transforms and augmentation; the accuracy metric; tokens per image."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from ..adapters import tokens_per_input
from .arguments import ConfigError
from .metrics import hub_offline


def _read_mnist_csv(path: str) -> datasets.Dataset:
    if not Path(path).is_file():
        raise ConfigError(f"mnist_csv {path!r} does not exist")
    import pandas as pd

    rows = pd.read_csv(path, header=None).to_numpy()
    if rows.ndim != 2 or rows.shape[1] != 785:
        raise ConfigError(f"{path}: expected 785 columns (784 pixels + label), found {rows.shape[-1]}")
    # The label is the 0-9 column that is not constant (MNIST's corner pixels are always 0).
    is_label = [bool(np.isin(rows[:, c], np.arange(10)).all() and len(np.unique(rows[:, c])) > 1) for c in (0, -1)]
    if is_label[0] == is_label[1]:
        raise ConfigError(f"{path}: cannot tell whether the label is the first or last column")
    col = 0 if is_label[0] else -1
    pixels = np.delete(rows, col, axis=1).reshape(-1, 28, 28).astype(np.uint8)
    features = datasets.Features({"image": datasets.Array2D((28, 28), "uint8"),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": pixels, "label": rows[:, col].astype(np.int64)}, features=features)


def load_image_data(args: Any, seed: int, cache_dir: str | None = None) -> datasets.DatasetDict:
    """``train`` and ``validation`` splits with columns ``image`` and ``label`` (a ``ClassLabel``)."""
    sources = [n for n in ("dataset_name", "train_dir", "mnist_csv") if getattr(args, n)]
    if len(sources) != 1:
        raise ConfigError("set exactly one data source: dataset_name, train_dir (+ validation_dir) or mnist_csv"
                          + (f" (got {', '.join(sources)})" if sources else ""))
    image_col, label_col = args.image_column, args.label_column
    if args.mnist_csv:
        data, image_col, label_col = datasets.DatasetDict(train=_read_mnist_csv(args.mnist_csv)), "image", "label"
    elif args.train_dir:
        for d in filter(None, (args.train_dir, args.validation_dir)):
            if not Path(d).is_dir():
                raise ConfigError(f"image folder {d!r} does not exist")
        data, image_col, label_col = datasets.load_dataset("imagefolder", data_dir=args.train_dir), "image", "label"
        if args.validation_dir:
            data["validation"] = datasets.load_dataset("imagefolder", data_dir=args.validation_dir)["train"]
            if data["validation"].features["label"] != data["train"].features["label"]:
                raise ConfigError("train_dir and validation_dir hold different classes")
    else:
        try:
            data = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=cache_dir)
        except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError, ValueError) as e:
            raise ConfigError(f"cannot load dataset {args.dataset_name!r}: {e}") from e
    if "train" not in data:
        raise ConfigError(f"{args.source()} has no train split (splits: {', '.join(data)})")
    eval_split = next((s for s in ("validation", "val", "test") if s in data), None)
    out = datasets.DatasetDict(train=data["train"], **({"validation": data[eval_split]} if eval_split else {}))
    for split, ds in out.items():
        missing = [c for c in (image_col, label_col) if c not in ds.column_names]
        if missing:
            hint = "put the images in <class>/ subfolders" if args.train_dir else "set image_column / label_column"
            raise ConfigError(f"{args.source()} ({split} split) has no column {', '.join(map(repr, missing))} "
                              f"(columns: {', '.join(ds.column_names)}): {hint}")
    out = out.select_columns([image_col, label_col])
    if (image_col, label_col) != ("image", "label"):
        out = out.rename_columns({image_col: "image", label_col: "label"})
    if not isinstance(out["train"].features["label"], datasets.ClassLabel):
        # Class ids from the training labels, and the same ids for the eval split (encoding each split on its
        # own, as DatasetDict.class_encode_column does, can number the classes differently).
        out["train"] = out["train"].class_encode_column("label")
        classes = out["train"].features["label"]
        if "validation" in out:
            try:
                out["validation"] = out["validation"].map(
                    lambda b: {"label": [classes.str2int(str(v)) for v in b["label"]]}, batched=True
                ).cast_column("label", classes)
            except ValueError as e:
                raise ConfigError(f"{args.source()}: an evaluation label is not a training label ({e})") from e
    if "validation" not in out:
        if not 0 < args.validation_split_percentage < 100:
            raise ConfigError(f"{args.source()} has no validation split: set validation_split_percentage in (0, 100)")
        parts = out["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=seed,
                                              stratify_by_column="label")
        out = datasets.DatasetDict(train=parts["train"], validation=parts["test"])
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None and limit < len(out[split]):
            out[split] = out[split].shuffle(seed=seed).select(range(limit))
    return out


def _to_tensor(image: Any, channels: int, size: int) -> torch.Tensor:
    """One image (PIL, array or nested list; HW or HWC) as a float ``(channels, size, size)`` tensor in [0, 1]."""
    if hasattr(image, "convert"):  # PIL: let it do the colour conversion
        image = image.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(image)
    t = torch.from_numpy(arr.astype(np.float32) / (255.0 if arr.dtype.kind in "ui" else 1.0))  # 0-255 ints
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] != channels:
        t = t.mean(0, keepdim=True) if channels == 1 else t[:1].expand(channels, -1, -1)
    if t.shape[1:] != (size, size):
        t = F.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return t


def augment_batch(x: torch.Tensor, shift: float, degrees: float) -> torch.Tensor:
    """Random crop of the zero-padded image, then a small random rotation and scale (per image, zero fill).

    Plain torch instead of torchvision (not a dependency); runs before normalisation, so zero is black.
    """
    n, _, h, w = x.shape
    pad = round(shift * h)
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy, dx = torch.randint(0, 2 * pad + 1, (2, n)).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if degrees:
        angle = (torch.rand(n) * 2 - 1) * math.radians(degrees)
        scale = 1 + (torch.rand(n) * 2 - 1) * degrees / 100  # 10 degrees -> zoom in/out by up to 10%
        cos, sin = (torch.cos(angle) / scale).view(n, 1, 1), (torch.sin(angle) / scale).view(n, 1, 1)
        # The sampling grid by hand: F.affine_grid is ~100x slower here (a batched matmul on a tiny batch).
        ys, xs = torch.meshgrid(torch.linspace(-1 + 1 / h, 1 - 1 / h, h), torch.linspace(-1 + 1 / w, 1 - 1 / w, w),
                                indexing="ij")
        grid = torch.stack([cos * xs - sin * ys, sin * xs + cos * ys], -1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x


@dataclass
class ImageTransform:
    """``set_transform`` function: images -> normalised ``pixel_values``, labels -> ``labels`` (picklable for
    dataloader workers). ``augment`` is on for training sets only."""

    size: int
    channels: int
    mean: Sequence[float]
    std: Sequence[float]
    augment: bool = False
    shift: float = 0.1
    degrees: float = 10.0

    def __call__(self, batch: dict[str, list]) -> dict[str, torch.Tensor]:
        x = torch.stack([_to_tensor(im, self.channels, self.size) for im in batch["image"]])
        if self.augment:
            x = augment_batch(x, self.shift, self.degrees)
        mean, std = torch.tensor(self.mean).view(1, -1, 1, 1), torch.tensor(self.std).view(1, -1, 1, 1)
        out = {"pixel_values": (x - mean) / std}
        if "label" in batch:
            out["labels"] = torch.tensor(batch["label"], dtype=torch.long)
        return out


def data_stats(train: datasets.Dataset, channels: int, size: int, n: int = 1000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of up to ``n`` training images, for a model trained from scratch."""
    x = torch.stack([_to_tensor(im, channels, size) for im in train.select(range(min(n, len(train))))["image"]])
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-3).tolist()


def channels_of(image: Any) -> int:
    if hasattr(image, "mode"):
        return 1 if image.mode in ("L", "1", "I", "F") else 3
    arr = np.asarray(image)
    return 1 if arr.ndim == 2 else arr.shape[-1]


def accuracy_metric() -> tuple[Callable[[Any], dict[str, float]], str]:
    """``compute_metrics`` for Trainer and its source: ``evaluate.load("accuracy")`` when it loads, else numpy
    (the same number); offline environments (``HF_HUB_OFFLINE=1``) skip ``evaluate``, as in metrics.py."""
    module = None
    if not hub_offline():
        try:
            import evaluate as hf_evaluate

            module = hf_evaluate.load("accuracy")
        except Exception:  # noqa: BLE001 -- no network or no cached script: the offline number is the same
            module = None

    def compute(eval_pred: Any) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        preds, labels = np.argmax(logits, -1), np.asarray(eval_pred.label_ids)
        if module is not None:
            return {"accuracy": float(module.compute(predictions=preds, references=labels)["accuracy"])}
        return {"accuracy": float((preds == labels).mean())}

    return compute, "evaluate" if module is not None else "offline"


def num_tokens(config: Any) -> int:
    """Tokens per image: patches + CLS (+ DeiT's distillation token); the sequence length for FLOPs."""
    return tokens_per_input(config, 0)



"""Image-classification recipe: (dense train) → prune → recover → evaluate → save → report → (push), for ViT/DeiT
classifiers on a Hub image dataset, an image folder, or MNIST rows in a CSV.

    hf-prune run recipes/image/mnist_vit.yaml        # offline: small ViT trained here on 5,000 MNIST digits
    hf-prune run recipes/image/vit_hub_example.yaml  # online: a Hub ViT on the beans dataset
    accelerate launch recipes/run_image_classification.py recipes/image/mnist_vit.yaml --flops_keep 0.6 0.4

Arguments are the dataclasses below plus ``PruneArguments``, ``RecoveryArguments``, ``DenseArguments``,
``BenchArguments`` and transformers' ``TrainingArguments`` (for the recovery run); a YAML/JSON config gives
defaults and command-line flags override them. ``seq_len`` and the latency inputs follow the model: one
token per patch plus CLS (and DeiT's distillation token), images at the model's resolution.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    default_data_collator,
    set_seed,
)

from .. import report
from ..adapters import get_adapter
from ..hub import check_can_push, check_repo_id
from ..metrics import hub_offline
from ..resources import base_model_id
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
    run_budgets,
    train_dense_,
)

RECIPE = "image_classification"
#: The ViT built when no pretrained model is given (fields of ``transformers.ViTConfig``; ``vit_config`` overrides).
#: 7x7 patches (17 tokens at 28px): trained from scratch on 4,500 digits it reaches ~94% in 10 epochs on 2 CPU
#: cores, where 4x4 patches (50 tokens) are 3-4x slower per step and reach ~60% in the same time.
DEFAULT_VIT = {"image_size": 28, "patch_size": 7, "num_channels": 1, "hidden_size": 128, "num_hidden_layers": 4,
               "num_attention_heads": 4, "intermediate_size": 512}


@dataclass
class ModelArguments:
    """The model to prune.

    Args:
        model_name_or_path: Hub id or local folder of a ViT/DeiT image classifier; empty: build a ViT from
            ``vit_config`` and train it from scratch in the dense stage.
        vit_config: ``ViTConfig`` fields (a mapping, or its JSON) over :data:`DEFAULT_VIT`; ``num_channels``
            defaults to the data's.
        cache_dir: where Hub downloads are stored.
        trust_remote_code: allow a Hub model's own modeling code.
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id / folder; empty: ViT from config."})
    vit_config: str | None = field(default=None, metadata={"help": "ViTConfig fields (JSON) for a model from scratch."})
    cache_dir: str | None = field(default=None, metadata={"help": "Hub download cache."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the Hub model's own code."})

    def vit_fields(self) -> dict[str, Any]:
        """The user's ``vit_config`` as a dict; unknown ViTConfig fields are an error (ViTConfig would keep them)."""
        raw = self.vit_config or {}
        try:
            cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"vit_config is not a JSON object: {e}") from e
        if not isinstance(cfg, dict):
            raise ConfigError("vit_config must be a mapping of ViTConfig fields")
        unknown = sorted(set(cfg) - set(ViTConfig().to_dict()))
        if unknown:
            raise ConfigError(f"vit_config: {', '.join(unknown)} are not ViTConfig fields")
        return cfg


@dataclass
class DataArguments:
    """The images. Give exactly one source: ``dataset_name``, ``train_dir`` (+ ``validation_dir``) or ``mnist_csv``.

    Args:
        dataset_name: a ``datasets`` Hub image dataset (a ``train`` split; ``validation`` or ``test`` is evaluated).
        dataset_config_name: its config.
        train_dir: an image folder (``<class>/<image>``) loaded with ``load_dataset("imagefolder")``.
        validation_dir: an image folder with the same classes, for evaluation.
        mnist_csv: a csv(.gz) of MNIST rows: 784 pixels (0-255) and the label 0-9 first or last (detected).
        image_column: the image column of a Hub dataset.
        label_column: the label column of a Hub dataset.
        validation_split_percentage: share of train held out when the data has no validation split.
        max_train_samples: subsample the training set (quick runs).
        max_eval_samples: subsample the evaluation set.
        image_size: input resolution of a ViT built from config (a pretrained model keeps its own).
        augment: random crop with padding + small rotation/scale of the recovery's training images.
        augment_dense: augment the dense training too (slows the convergence of a short from-scratch run).
        augment_shift: largest crop offset, as a fraction of the image size.
        augment_degrees: largest rotation, in degrees; the zoom range is the same number in percent.
    """

    dataset_name: str | None = field(default=None, metadata={"help": "Hub image dataset."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its config."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder for training."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for evaluation."})
    mnist_csv: str | None = field(default=None, metadata={"help": "csv(.gz) of MNIST rows."})
    image_column: str = field(default="image", metadata={"help": "Image column."})
    label_column: str = field(default="label", metadata={"help": "Label column."})
    validation_split_percentage: float = field(default=10.0, metadata={"help": "% of train held out if needed."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Subsample training data."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Subsample evaluation data."})
    image_size: int | None = field(default=None, metadata={"help": "Resolution of a ViT built from config."})
    augment: bool = field(default=False, metadata={"help": "Augment training images during recovery."})
    augment_dense: bool = field(default=False, metadata={"help": "Augment during dense training too."})
    augment_shift: float = field(default=0.1, metadata={"help": "Max crop offset (fraction of size)."})
    augment_degrees: float = field(default=10.0, metadata={"help": "Max rotation in degrees."})

    def source(self) -> str:
        """A short name of the data for reports and the model card."""
        return self.dataset_name or (Path(self.mnist_csv).name if self.mnist_csv else str(self.train_dir))


ARG_TYPES = (ModelArguments, DataArguments, PruneArguments, RecoveryArguments, DenseArguments, BenchArguments,
             TrainingArguments)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    return parse_recipe_args(ARG_TYPES, argv, prog="hf-prune run <image config>", recipe=RECIPE,
                             description="Prune and recover a ViT/DeiT image classifier.")


# ------------------------------------------------------------------------------------------------------ data


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


def load_image_data(args: DataArguments, seed: int, cache_dir: str | None = None) -> datasets.DatasetDict:
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


def _data_stats(train: datasets.Dataset, channels: int, size: int, n: int = 1000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of up to ``n`` training images, for a model trained from scratch."""
    x = torch.stack([_to_tensor(im, channels, size) for im in train.select(range(min(n, len(train))))["image"]])
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-3).tolist()


def _channels_of(image: Any) -> int:
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
    return (config.image_size // config.patch_size) ** 2 + (2 if config.model_type == "deit" else 1)


# ------------------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    model_args, data_args, prune_args, rec_args, dense_args, bench_args, training_args = parse_args(argv)
    quiet_cpu_(training_args)
    main_proc = is_main_process(training_args)
    log = print if main_proc else (lambda *_: None)
    out = Path(training_args.output_dir)
    # The transform needs the raw "image" column, which Trainer would drop (the model takes no "image" input).
    training_args.remove_unused_columns = False

    # ---- everything that can be wrong is checked before any long work
    budgets = prune_args.budgets()
    vit_fields = {} if model_args.model_name_or_path else model_args.vit_fields()
    if training_args.push_to_hub:
        check_can_push(training_args.hub_model_id, training_args.hub_token)
    if training_args.hub_model_id:
        check_repo_id(training_args.hub_model_id, "hub_model_id")
    base_model = base_model_id(model_args.model_name_or_path)
    data = load_image_data(data_args, training_args.seed, model_args.cache_dir)
    names = data["train"].features["label"].names
    label_kw = {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {n: i for i, n in enumerate(names)}}
    path = model_args.model_name_or_path or None
    if path:
        config = AutoConfig.from_pretrained(path, cache_dir=model_args.cache_dir,
                                            trust_remote_code=model_args.trust_remote_code)
    else:
        fields_ = {**DEFAULT_VIT, "num_channels": _channels_of(data["train"][0]["image"]), **vit_fields}
        fields_["image_size"] = data_args.image_size or fields_["image_size"]
        config = ViTConfig(**fields_, **label_kw)
    try:
        get_adapter(config)
    except NotImplementedError as e:
        raise ConfigError(str(e)) from e
    if path and data_args.image_size and data_args.image_size != config.image_size:
        raise ConfigError(f"{path} takes {config.image_size}px images; image_size applies to models built from config")
    # FLOPs budgets are counted at the model's real sequence length, not the text default of 128 tokens.
    seq = prune_args.seq_len = num_tokens(config)
    for b in budgets:
        prune_args.pruning_config(b, seed=training_args.seed)
    size, channels = config.image_size, config.num_channels
    if path:
        processor = AutoImageProcessor.from_pretrained(path, cache_dir=model_args.cache_dir)
        normalise = getattr(processor, "do_normalize", True) and processor.image_mean is not None
        mean = list(processor.image_mean)[:channels] if normalise else [0.0] * channels
        std = list(processor.image_std)[:channels] if normalise else [1.0] * channels
    else:
        from transformers import ViTImageProcessorPil  # the torchvision-free processor, saved with the model

        mean, std = _data_stats(data["train"], channels, size)
        processor = ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=mean, image_std=std)
    tf = {"size": size, "channels": channels, "mean": mean, "std": std}
    aug = {"shift": data_args.augment_shift, "degrees": data_args.augment_degrees}
    train = data["train"].with_transform(ImageTransform(**tf, augment=data_args.augment, **aug))
    train_dense = data["train"].with_transform(ImageTransform(**tf, augment=data_args.augment_dense, **aug))
    evals = {"validation": data["validation"].with_transform(ImageTransform(**tf))}
    compute_metrics, metric_source = accuracy_metric()
    main_metric = "accuracy"
    log(f"data {data_args.source()}: {len(train)} train, {len(evals['validation'])} validation, {len(names)} classes"
        f"; {size}px, {seq} tokens; augment: recovery {data_args.augment}, dense {data_args.augment_dense}; "
        f"metrics via {metric_source}")

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        return evaluate(model, training_args, evals, compute_metrics, default_data_collator, processor)

    # ---- dense model: trained here (cached), or already fine-tuned
    model_name = path or f"ViT from config ({config.num_hidden_layers}x{config.hidden_size})"
    dense_dir = out / "dense"
    key = {"model": path, "vit_config": model_args.vit_config,
           "data": {k: v for k, v in asdict(data_args).items() if k != "augment"},  # recovery-only setting
           "dense": asdict(dense_args), "batch_size": training_args.per_device_train_batch_size,
           "seed": training_args.seed}
    if dense_cache_matches(dense_dir, key, dense_args):
        log(f"dense: reusing the trained model in {dense_dir}")
        dense = AutoModelForImageClassification.from_pretrained(dense_dir)
    else:
        if path:
            # ignore_mismatched_sizes: a head for another label set is replaced by a fresh one (then trained).
            dense, info = AutoModelForImageClassification.from_pretrained(
                path, cache_dir=model_args.cache_dir, trust_remote_code=model_args.trust_remote_code,
                ignore_mismatched_sizes=True, output_loading_info=True, **label_kw,
            )
            untrained_head = bool(info.get("missing_keys") or info.get("mismatched_keys"))
        else:
            set_seed(training_args.seed)  # the random init is part of the run, like the training order
            dense, untrained_head = ViTForImageClassification(config), True
        if dense_args.dense_train == "yes" or (dense_args.dense_train == "auto" and untrained_head):
            train_dense_(dense, dense_args=dense_args, training_args=training_args, train_dataset=train_dense,
                         data_collator=default_data_collator, processing_class=processor, dense_dir=dense_dir,
                         key=key, what=f"training {model_name}", log=log)
        elif untrained_head:
            log(f"warning: {model_name} has no trained head for these {len(names)} classes and dense_train=no: "
                "its scores will be near chance")
    dense.eval()
    dense_metrics = eval_fn(dense)
    log(f"dense: {dense_metrics}")
    results: dict[str, Any] = {
        "recipe": RECIPE, "task": data_args.source(), "model": model_name, "main_metric": main_metric,
        "environment": report.environment(), "bench_seq_len": seq,
        "args": args_dict(model_args, data_args, prune_args, rec_args, dense_args, bench_args, training_args),
        "dense": {"metrics": dense_metrics, **model_stats(dense, seq)}, "runs": [],
    }
    # Calibration sees un-augmented training images: importance should reflect the data, not the augmentation.
    calib = data["train"].shuffle(seed=training_args.seed)
    calib = calib.select(range(min(prune_args.max_calibration_samples, len(calib)))).with_transform(ImageTransform(**tf))
    if training_args.world_size > 1:  # each process scores its shard; scores are summed over processes
        calib = calib.shard(training_args.world_size, training_args.process_index)
    bs = training_args.per_device_train_batch_size
    calibration = [calib[i : i + bs] for i in range(0, len(calib), bs)]

    # ---- one prune + recover per budget, then the reports
    from ..costs import dummy_inputs

    return run_budgets(
        dense, budgets, results, prune_args=prune_args, recovery_args=rec_args, bench_args=bench_args,
        training_args=training_args, calibration=calibration, train_dataset=train, evaluate_fn=eval_fn,
        trainer_kwargs={"data_collator": default_data_collator, "processing_class": processor,
                        "eval_dataset": evals["validation"], "compute_metrics": compute_metrics},
        card={"base_model": base_model, "task": "image classification", "dataset": data_args.dataset_name},
        title=data_args.source(), main_metric=main_metric, latency_seq_len=seq,
        inputs_fn=lambda m, b: dummy_inputs(m, b, seq), log=log,
    )

if __name__ == "__main__":
    main()

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,  # the torchvision-free processor, saved with the model
    default_data_collator,
    set_seed,
)

from ..adapters import get_adapter
from ..costs import dummy_inputs
from ..formats.settings import ServeArguments
from .arguments import (
    BenchArguments,
    ConfigError,
    DenseArguments,
    PruneArguments,
    RecoveryArguments,
    parse_recipe_args,
)
from .common import dense_cache_matches, new_head_expected, train_dense_
from .image_data import (  # noqa: F401  (augment_batch: re-exported)
    ImageTransform,
    accuracy_metric,
    augment_batch,
    channels_of,
    data_stats,
    load_image_data,
    num_tokens,
)
from .recipe import Recipe

RECIPE = "image_classification"
#: The ViT built when no pretrained model is given (fields of ``transformers.ViTConfig``; ``vit_config`` overrides).
#: 7x7 patches (17 tokens at 28px): 4x4 patches (50 tokens) cost about 3x the compute per step, which a from-scratch
#: ViT trained in a few minutes on 2 CPU cores cannot afford.
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
             ServeArguments, TrainingArguments)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    return parse_recipe_args(ARG_TYPES, argv, prog="hf-prune run <image config>", recipe=RECIPE,
                             description="Prune and recover a ViT/DeiT image classifier.")


# ------------------------------------------------------------------------------------------------------ main


class ImageRecipe(Recipe):
    """The image-classification recipe's hooks: image data (Hub, image folder, MNIST csv) with torch-only
    transforms, a ViT/DeiT classifier (a Hub model, or a small ViT built from config and trained here), accuracy.
    FLOPs and latency are counted at the model's real token count (patches + special tokens)."""

    name = RECIPE

    def check(self) -> None:
        # The transform needs the raw "image" column, which Trainer would drop (the model takes no "image" input).
        self.training_args.remove_unused_columns = False
        self.vit_fields = {} if self.model_args.model_name_or_path else self.model_args.vit_fields()

    @property
    def task_name(self) -> str:
        return self.data_args.source()

    @property
    def model_name(self) -> str:
        c = self.config
        return self.path or f"ViT from config ({c.num_hidden_layers}x{c.hidden_size})"

    @property
    def latency_seq_len(self) -> int:
        return self.prune_args.seq_len

    def latency_inputs(self, model: torch.nn.Module, batch_size: int) -> dict[str, Any]:
        return dummy_inputs(model, batch_size, self.prune_args.seq_len)

    def load_data(self) -> None:
        m, d, args = self.model_args, self.data_args, self.training_args
        data = self.data = load_image_data(d, args.seed, m.cache_dir)
        names = data["train"].features["label"].names
        self.label_kw = {"num_labels": len(names), "id2label": dict(enumerate(names)),
                         "label2id": {n: i for i, n in enumerate(names)}}
        path = self.path = m.model_name_or_path or None
        if path:
            config = AutoConfig.from_pretrained(path, cache_dir=m.cache_dir, trust_remote_code=m.trust_remote_code)
        else:
            fields_ = {**DEFAULT_VIT, "num_channels": channels_of(data["train"][0]["image"]), **self.vit_fields}
            fields_["image_size"] = d.image_size or fields_["image_size"]
            config = ViTConfig(**fields_, **self.label_kw)
        self.config = config
        try:
            get_adapter(config)
        except NotImplementedError as e:
            raise ConfigError(str(e)) from e
        if path and d.image_size and d.image_size != config.image_size:
            raise ConfigError(f"{path} takes {config.image_size}px images; image_size applies to models built "
                              "from config")
        # FLOPs budgets are counted at the model's real sequence length, not the text default of 128 tokens.
        seq = self.prune_args.seq_len = num_tokens(config)
        size, channels = config.image_size, config.num_channels
        if path:
            processor = AutoImageProcessor.from_pretrained(path, cache_dir=m.cache_dir)
            normalise = getattr(processor, "do_normalize", True) and processor.image_mean is not None
            mean = list(processor.image_mean)[:channels] if normalise else [0.0] * channels
            std = list(processor.image_std)[:channels] if normalise else [1.0] * channels
        else:
            mean, std = data_stats(data["train"], channels, size)
            processor = ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=mean, image_std=std)
        self.tf = {"size": size, "channels": channels, "mean": mean, "std": std}
        aug = {"shift": d.augment_shift, "degrees": d.augment_degrees}
        self.train = data["train"].with_transform(ImageTransform(**self.tf, augment=d.augment, **aug))
        self.train_dense = data["train"].with_transform(ImageTransform(**self.tf, augment=d.augment_dense, **aug))
        self.evals = {"validation": data["validation"].with_transform(ImageTransform(**self.tf))}
        self.compute_metrics, metric_source = accuracy_metric()
        self.collator, self.processing_class, self.main_metric = default_data_collator, processor, "accuracy"
        self.log(f"data {d.source()}: {len(self.train)} train, {len(self.evals['validation'])} validation, "
                 f"{len(names)} classes; {size}px, {seq} tokens; augment: recovery {d.augment}, dense "
                 f"{d.augment_dense}; metrics via {metric_source}")

    def dense_model(self) -> torch.nn.Module:
        m, args, path = self.model_args, self.training_args, self.path
        dense_dir = self.out / "dense"
        key = {"model": path, "vit_config": m.vit_config,
               "data": {k: v for k, v in asdict(self.data_args).items() if k != "augment"},  # recovery-only setting
               "dense": asdict(self.dense_args), "batch_size": args.per_device_train_batch_size, "seed": args.seed}
        if dense_cache_matches(dense_dir, key, self.dense_args):
            self.log(f"dense: reusing the trained model in {dense_dir}")
            return AutoModelForImageClassification.from_pretrained(dense_dir)
        if path:
            # ignore_mismatched_sizes: a head for another label set is replaced by a fresh one (then trained).
            with new_head_expected():
                dense, info = AutoModelForImageClassification.from_pretrained(
                    path, cache_dir=m.cache_dir, trust_remote_code=m.trust_remote_code, ignore_mismatched_sizes=True,
                    output_loading_info=True, **self.label_kw,
                )
            untrained_head = bool(info.get("missing_keys") or info.get("mismatched_keys"))
        else:
            set_seed(args.seed)  # the random init is part of the run, like the training order
            dense, untrained_head = ViTForImageClassification(self.config), True
        if self.dense_args.dense_train == "yes" or (self.dense_args.dense_train == "auto" and untrained_head):
            train_dense_(dense, dense_args=self.dense_args, training_args=args, train_dataset=self.train_dense,
                         data_collator=default_data_collator, processing_class=self.processing_class,
                         dense_dir=dense_dir, key=key, what=f"training {self.model_name}", log=self.log)
        elif untrained_head:
            self.log(f"warning: {self.model_name} has no trained head for these {self.label_kw['num_labels']} "
                     "classes and dense_train=no: its scores will be near chance")
        return dense

    def calibration(self) -> list[dict]:
        # Calibration sees un-augmented training images: importance should reflect the data, not the augmentation.
        args = self.training_args
        calib = self.data["train"].shuffle(seed=args.seed)
        calib = calib.select(range(min(self.prune_args.max_calibration_samples, len(calib))))
        calib = calib.with_transform(ImageTransform(**self.tf))
        if args.world_size > 1:  # each process scores its shard; scores are summed over processes
            calib = calib.shard(args.world_size, args.process_index)
        bs = args.per_device_train_batch_size
        return [calib[i : i + bs] for i in range(0, len(calib), bs)]

    def card(self) -> dict[str, Any]:
        return {"task": "image classification", "dataset": self.data_args.dataset_name}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return ImageRecipe(*parse_args(argv)).run()


if __name__ == "__main__":
    from ..distributed import exit_launched

    main()
    exit_launched()

"""Pruned-model classes: the stock class plus the per-layer reshape, and the atomic save.

This file, ``shapes.py`` and ``channels.py`` are copied into every pruned checkpoint (``auto_map`` points here), so that
``AutoModelFor*.from_pretrained(path, trust_remote_code=True)`` rebuilds the per-layer shapes on a machine
without hf_prune (transformers fetches relatively imported files with the remote code). They import nothing but
the standard library, torch, transformers and each other.

How a pruned checkpoint reloads:
    1. ``config.json`` holds the *dense* global sizes, ``per_layer_config`` with the kept sizes of every
       pruned layer (transformers 5's heterogeneous-config field) and an ``hf_prune`` section with the
       architecture spec (module paths and config field names).
    2. ``Pruned<StockClass>.__init__`` builds the stock model, then slices every layer down to the
       recorded sizes (``resize_to_config_``) and the kept hidden width (``resize_hidden_to_config_``);
       ``from_pretrained`` then loads the real weights into it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import transformers
from torch import nn

from .channels import CHANNELS_FILE, resize_hidden_to_config_
from .shapes import (  # noqa: F401  (also re-exported: the shape kernel's old home)
    CONFIG_KEY,
    FORMAT_VERSION,
    MODELING_FILE,
    PLAN_FILE,
    SHAPES_FILE,
    ArchSpec,
    config_get,
    current_layer_sizes,
    dense_dims,
    get_module,
    homogeneous,
    layer_list,
    layer_sizes,
    prune_layer_,
    resize_to_config_,
    set_layer_sizes,
    slice_linear_,
    sync_layer_attrs_,
)

#: the files of a pruned checkpoint's remote code: this one and the kernels it imports relatively
REMOTE_FILES = (MODELING_FILE, SHAPES_FILE, CHANNELS_FILE)
#: kind name -> ``resize(model, count)`` of the unit kinds registered in this process (``hf_prune.unit_kinds``); empty
#: in a checkpoint's copy of this file, which therefore refuses a checkpoint that cut such a kind
UNIT_RESIZERS: dict[str, Any] = {}

# ----------------------------------------------------------------------------------------------- classes

_AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMultipleChoice",
    "AutoModelForMaskedLM",
    "AutoModelForCausalLM",
    "AutoModelForImageClassification",
)


def _auto_map(model: nn.Module) -> dict[str, str]:
    """``auto_map`` entries for every Auto class that resolves this config to the model's stock class."""
    module = Path(MODELING_FILE).stem
    stock = stock_class(type(model))
    base = stock_class(type(model.base_model))
    out = {"AutoModel": f"{module}.Pruned{base.__name__}"}
    for auto_name in _AUTO_CLASSES[1:]:
        auto = getattr(transformers, auto_name, None)
        try:
            resolved = auto._model_mapping[type(model.config)] if auto is not None else None
        except (KeyError, ValueError):
            resolved = None
        candidates = resolved if isinstance(resolved, tuple) else (resolved,)  # some map to several classes
        if any(c is not None and c.__name__ == stock.__name__ for c in candidates):
            out[auto_name] = f"{module}.Pruned{stock.__name__}"
    return out


def stock_class(cls: type) -> type:
    while getattr(cls, "_hf_prune_pruned", False):
        cls = cls.__mro__[2]  # (PrunedX, PrunedModelMixin, X, ...)
    return cls


def _readable_(folder: Path) -> None:
    """Give ``folder`` and its files the permissions of a stock ``save_pretrained`` folder under the current umask
    (``mkdtemp`` makes 0700 folders; some transformers releases write weights 0600). Kept here, not imported from
    hf_prune.io: this file is also the checkpoint's remote code and must stand alone."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for p in folder.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _commit_dir(stage: Path, target: Path) -> None:
    """Move a fully written ``stage`` folder to ``target`` so that readers never see half a checkpoint.

    A missing or empty target is replaced by one rename. A target holding other files (a Trainer
    ``output_dir`` with ``checkpoint-*`` folders, say) keeps them: each file is moved in with an atomic
    ``os.replace``, ``config.json`` last, and stale weight shards of an earlier save are removed.
    """
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        if target.exists():
            target.rmdir()
        os.replace(stage, target)
        return
    new = {p.name for p in stage.iterdir()}
    for old in target.iterdir():
        if (
            old.is_file()
            and old.name not in new
            and old.name.startswith("model")
            and (old.suffix == ".safetensors" or old.name.endswith(".safetensors.index.json"))
        ):
            old.unlink()
    for name in sorted(new, key=lambda n: n == "config.json"):
        os.replace(stage / name, target / name)
    shutil.rmtree(stage, ignore_errors=True)


class PrunedModelMixin:
    """Turns a stock transformers model class into one whose layers may have different sizes.

    ``Pruned<Stock>`` classes are made on demand (see the module-level ``__getattr__``): a pruned model is an
    instance of ``Pruned<Stock>``, so ``save_pretrained``/``push_to_hub`` write a checkpoint that reloads.
    """

    _hf_prune_pruned = True
    #: The plan that produced this model (a ``hf_prune.PrunePlan`` or its dict), saved as prune_plan.json.
    prune_plan: Any = None

    def __init__(self, config, *args, **kwargs):
        config.allow_global_per_layer_attribute_access = True
        with homogeneous(config):  # stock __init__ builds dense layers from the global (dense) sizes
            super().__init__(config, *args, **kwargs)
        spec = ArchSpec.from_dict(config_get(config, CONFIG_KEY)["arch"])
        resize_to_config_(self, spec)
        resize_hidden_to_config_(self, spec)
        _resize_units(self, config_get(config, CONFIG_KEY).get("units") or {})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        try:
            from transformers.utils import cached_file

            plan_path = cached_file(
                pretrained_model_name_or_path, PLAN_FILE, _raise_exceptions_for_missing_entries=False, **hub_kwargs
            )
        except (OSError, ValueError):
            plan_path = None
        if plan_path:
            with open(plan_path, encoding="utf-8") as f:
                model.prune_plan = json.load(f)
        return model

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, push_to_hub: bool = False, **kwargs):
        """``PreTrainedModel.save_pretrained`` plus the plan and modeling file, written atomically.

        Weights are always safetensors. Everything is written to a temporary sibling folder first and moved
        into place only once complete, so a crash never leaves a half-written checkpoint.
        """
        if not is_main_process:
            return
        kwargs.pop("safe_serialization", None)
        hub_keys = ("repo_id", "commit_message", "commit_description", "private", "create_pr", "revision", "tags")
        hub = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
        target = Path(save_directory)
        if target.exists() and not target.is_dir():
            raise ValueError(f"save_pretrained: {target} exists and is a file, expected a folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            self.config.auto_map = _auto_map(self)
            with homogeneous(self.config) as per_layer:
                super().save_pretrained(stage, True, *args, **kwargs)
            # Written by us because the stock writer, reading the dense globals, warns once per field.
            config_file = stage / "config.json"
            data = json.loads(config_file.read_text(encoding="utf-8"))
            width = len(str(max(per_layer, default=0)))
            data["per_layer_config"] = {str(i).zfill(width): per_layer[i] for i in sorted(per_layer)}
            # Saved: some configs' own validation (e.g. LlamaConfig's) reads the global head count on load.
            data["allow_global_per_layer_attribute_access"] = True
            config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            here = Path(sys.modules[PrunedModelMixin.__module__].__file__)
            for name in REMOTE_FILES:  # the remote code: this file and the kernels it imports
                shutil.copyfile(here.with_name(name), stage / name)
            plan = self.prune_plan
            if plan is not None:
                data = plan.to_dict() if hasattr(plan, "to_dict") else plan
                (stage / PLAN_FILE).write_text(json.dumps(data, indent=1), encoding="utf-8")
            _readable_(stage)
            _commit_dir(stage, target)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        if push_to_hub:
            hub.setdefault("repo_id", target.name)
            self.push_to_hub(token=kwargs.get("token"), **hub)


def _resize_units(model: nn.Module, counts: dict[str, int]) -> None:
    """Unit kinds registered with hf_prune (``hf_prune.unit_kinds``) to the counts the checkpoint kept."""
    missing = sorted(set(counts) - set(UNIT_RESIZERS))
    if missing:
        raise ValueError(f"this checkpoint cut unit kinds {missing}, which hf_prune registers at run time: load it "
                         "with hf_prune.load_pruned after importing the module that registers them")
    for name, count in sorted(counts.items()):
        UNIT_RESIZERS[name](model, int(count))


_CLASSES: dict[str, type] = {}


def pruned_class(stock: type) -> type:
    """``Pruned<Stock>``: the stock class with per-layer shapes. One class object per stock class."""
    stock = stock_class(stock)
    name = f"Pruned{stock.__name__}"
    if name not in _CLASSES:
        cls = type(name, (PrunedModelMixin, stock), {"__module__": __name__, "__qualname__": name})
        _CLASSES[name] = cls
    return _CLASSES[name]


def __getattr__(name: str) -> type:
    # ``auto_map`` names classes like ``modeling_pruned.PrunedBertForSequenceClassification``; they are made
    # here on first use from the stock transformers class of the same name.
    if name.startswith("Pruned") and not name.startswith("PrunedModel"):
        stock = getattr(transformers, name[len("Pruned") :], None)
        if isinstance(stock, type) and issubclass(stock, transformers.PreTrainedModel):
            return pruned_class(stock)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

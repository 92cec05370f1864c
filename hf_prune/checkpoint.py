"""Loading pruned checkpoints in one call (saving is ``model.save_pretrained``, see ``modeling_pruned``).

``load_pruned(path_or_hub_id, AutoModelForSequenceClassification)`` reads the config, checks the plan and the
weight shapes against it, and returns the ``Pruned<Class>`` model with the saved weights. It runs hf_prune's
own copy of the modeling code, never code from the checkpoint. Without hf_prune,
``AutoModelFor*.from_pretrained(path, trust_remote_code=True)`` loads the same checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import cached_file

from .adapters import get_adapter
from .costs import count_flops, count_params, layer_fixed_params, model_layer_sizes, plan_flops, plan_params
from .export import is_stock_export
from .io import WEIGHTS_FILE, WEIGHTS_INDEX_FILE, weight_file_names
from .modeling_pruned import pruned_class, stock_class
from .plan import PlanMismatchError, PrunePlan
from .shapes import CONFIG_KEY, PLAN_FILE, config_get, layer_sizes

#: the names save_pretrained writes (transformers 5 renames e.g. ViT's q_proj back to attention.query); releases
#: without it compare the names both sides share
_REVERT_NAMES = getattr(transformers.modeling_utils, "revert_weight_conversion", None)

#: sequence length the checkpoint statistics (and model cards) count FLOPs at
FLOPS_SEQ_LEN = 128
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "subfolder")


class CorruptCheckpointError(OSError):
    """A pruned checkpoint is incomplete or its files disagree with each other."""


def _weight_files(path: str, hub: dict[str, Any]) -> list[str]:
    index = cached_file(path, WEIGHTS_INDEX_FILE, _raise_exceptions_for_missing_entries=False, **hub)
    if index:
        return [cached_file(path, s, **hub) for s in weight_file_names(index)]
    single = cached_file(path, WEIGHTS_FILE, _raise_exceptions_for_missing_entries=False, **hub)
    if not single:
        raise CorruptCheckpointError(
            f"{path} has no model.safetensors: pruned checkpoints are saved as safetensors by save_pretrained"
        )
    return [single]


def _stored_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:  # safetensors raises its own error types for truncated / garbled files
            raise CorruptCheckpointError(f"cannot read weights {file}: {e}. Save the checkpoint again.") from e
    return shapes


def _check_weights(model_cls: type, config: Any, files: list[str]) -> None:
    """Compare stored tensor shapes with the shapes the config's per-layer sizes imply."""
    with torch.device("meta"):
        model = model_cls(config)
        state = model.state_dict()
        if _REVERT_NAMES is not None:
            try:
                state = _REVERT_NAMES(model, state)
            except Exception:  # a model it cannot map: compare the names both sides share
                pass
        expected = {k: tuple(v.shape) for k, v in state.items()}
    stored = _stored_shapes(files)
    bad = [
        f"{k}: checkpoint {stored[k]} vs config {shape}"
        for k, shape in expected.items()
        if k in stored and stored[k] != shape
    ]
    if bad:
        raise CorruptCheckpointError(
            f"the weights do not match the pruned shapes recorded in config.json/{PLAN_FILE} "
            f"({len(bad)} tensors differ, e.g. {'; '.join(bad[:3])}). The files come from different saves; "
            "save the pruned model again with save_pretrained."
        )


def load_plan(path: str, **hub_kwargs: Any) -> PrunePlan | None:
    """The plan saved with a pruned checkpoint (local folder or Hub id), or None if it has none."""
    file = cached_file(path, PLAN_FILE, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    return PrunePlan.load(file) if file else None


def load_pruned(pretrained: str | Path, auto_class: type | None = None, **kwargs: Any) -> PreTrainedModel:
    """Load a pruned checkpoint saved by hf_prune.

    Args:
        pretrained: local folder or Hub repo id.
        auto_class: e.g. ``AutoModelForSequenceClassification``; default: the class the checkpoint was
            saved from (``config.architectures``).
        **kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ``revision``, ``token``, ...).
    """
    path = str(pretrained)
    if (Path(path).is_absolute() or path.startswith((".", "~"))) and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"no checkpoint folder at {path!r} (a Hub id looks like 'user/name')")
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    config = AutoConfig.from_pretrained(path, **hub)
    section = config_get(config, CONFIG_KEY)
    plan = load_plan(path, **hub)
    if is_stock_export(config, plan):
        # a stock export (hf_prune.save_stock): the family's own config and class; the plan is provenance
        model = stock_class(resolve_class(config, auto_class)).from_pretrained(path, **kwargs)
        model.prune_plan = plan
        return model
    if not section:
        raise ValueError(
            f"{path} is not an hf_prune checkpoint (its config.json has no '{CONFIG_KEY}' section); "
            "load it with the usual from_pretrained"
        )
    config.allow_global_per_layer_attribute_access = True
    adapter = get_adapter(config)
    model_cls = resolve_class(config, auto_class)
    if plan is not None:
        plan.check_compatible(config)
        if plan.physical_sizes() != layer_sizes(config, adapter):
            raise PlanMismatchError(
                f"{PLAN_FILE} and config.json of {path} disagree on the per-layer sizes; the files come from "
                "different saves. Save the pruned model again with save_pretrained."
            )
    _check_weights(model_cls, config, _weight_files(path, hub))
    model = model_cls.from_pretrained(path, config=config, **kwargs)
    model.prune_plan = plan
    return model


def resolve_class(config: Any, auto_class: type | None) -> type:
    if auto_class is None:
        names = config.architectures or []
        stock = None
        for name in names:
            stock = getattr(transformers, name.removeprefix("Pruned"), None)
            if stock is not None:
                break
        if stock is None:
            raise ValueError(f"cannot tell the model class from config.architectures={names}; pass auto_class")
    elif issubclass(auto_class, PreTrainedModel):
        stock = auto_class
    else:
        try:
            stock = auto_class._model_mapping[type(config)]
        except KeyError as e:
            raise ValueError(f"{auto_class.__name__} has no model class for {type(config).__name__}") from e
        if isinstance(stock, tuple):  # several classes for one config: take the saved one if listed
            saved = [a.removeprefix("Pruned") for a in config.architectures or []]
            stock = next((c for c in stock if c.__name__ in saved), stock[0])
    return pruned_class(stock)


def checkpoint_stats(folder: str | Path, seq_len: int = FLOPS_SEQ_LEN) -> dict[str, Any]:
    """Dense and kept sizes, parameters and FLOPs of a pruned checkpoint folder (what its model card states),
    without reading any weights."""
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    plan_file = folder / PLAN_FILE
    saved = PrunePlan.load(plan_file) if plan_file.exists() else None
    stock = is_stock_export(raw, saved)
    if not raw.get(CONFIG_KEY) and not stock:
        raise ValueError(f"{folder}/config.json has no '{CONFIG_KEY}' section: not a checkpoint saved by hf_prune")
    config = AutoConfig.from_pretrained(str(folder))
    config.allow_global_per_layer_attribute_access = True
    # A model on the meta device has every shape and no storage. Safetensors key names are no substitute:
    # transformers 5 renames some families' keys on save (ViT's q_proj is stored as attention.query).
    cls = resolve_class(config, None)
    with torch.device("meta"):
        model = (stock_class(cls) if stock else cls)(config)
    if stock:  # the config holds the kept sizes; the dense ones are the plan's
        L = saved.num_layers
        dense_plan = replace(saved, heads=[list(range(saved.num_heads))] * L,
                             neurons=[list(range(saved.intermediate_size))] * L, meta={}, layers=None)
    else:
        dense_plan = PrunePlan.dense(config)
    sizes = model_layer_sizes(model)
    kept = saved.kept_layers if saved is not None else list(range(len(sizes)))
    dense_params = plan_params(dense_plan, model)
    if len(sizes) < dense_plan.num_layers:  # removed layers also held what width pruning cannot touch (norms, biases)
        dense_params += (dense_plan.num_layers - len(sizes)) * layer_fixed_params(model)
    return {
        "stock": stock,
        "config": raw,
        "dense": dense_plan.layer_sizes()[0],
        "dense_layers": dense_plan.num_layers,
        "kept_layers": kept,
        "sizes": sizes,
        "params": (count_params(model), dense_params),
        "flops": (count_flops(model, seq_len)["total"], plan_flops(dense_plan, model, seq_len)["total"]),
        "plan_meta": saved.meta if saved is not None else {},
    }

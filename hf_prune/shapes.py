"""The shape kernel: where a family's prunable pieces live (``ArchSpec``), per-layer sizes in a config, and the
in-place cuts (``prune_layer_``) that both surgery and checkpoint loading use.

Copied into every pruned checkpoint beside ``modeling_pruned.py`` (which imports it relatively), so it imports
nothing but the standard library, torch and transformers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

FORMAT_VERSION = 1
PLAN_FILE = "prune_plan.json"
MODELING_FILE = "modeling_pruned.py"
SHAPES_FILE = "shapes.py"  # imported by MODELING_FILE; travels with it
CONFIG_KEY = "hf_prune"


@dataclass(frozen=True)
class ArchSpec:
    """Where the prunable pieces of one transformer family live. Pure data, JSON-serialisable.

    Args:
        model_type: `config.model_type` this spec applies to (e.g. ``"bert"``).
        layers: dotted path from the *base model* (``model.base_model``) to the `nn.ModuleList` of layers.
        q, k, v, o: dotted paths inside one layer to the query/key/value/output `nn.Linear`.
        up, down: paths to the FFN input and output `nn.Linear`; ``gate``: the gate projection of a
            gated FFN (SwiGLU), or None.
        num_heads_field, num_kv_heads_field, intermediate_field, hidden_field, layers_field: names of the
            config fields (``num_kv_heads_field`` is None for plain multi-head attention).
        head_dim_field: config field holding the head size when the family has one; otherwise the head
            size is ``hidden // num_heads`` of the dense config.
        attrs: ``(attribute path inside a layer, quantity)`` pairs kept in sync by surgery; quantity is one
            of ``num_heads``, ``num_kv_heads``, ``kv_groups`` (query heads per KV head), ``all_head_size``,
            ``intermediate_size``. Attributes missing from a given transformers version are skipped.
        special_tokens: vision families: tokens besides the ``(image_size / patch_size)^2`` patches (CLS, DeiT's
            distillation token); None for text, where the sequence length is the token count.
        layer_lists: config fields holding one entry per layer (Gemma/Qwen's ``layer_types``); removing layers
            keeps the entries of the layers that stay. Fields a config lacks are skipped.
        head_inputs: per-head tensors a layer's attention is handed from outside the layer, ``(module path inside
            a layer, argument name, positional index)``; heads on dim 1. MPNet computes its relative-position bias
            ``(B, H, T, T)`` once for all layers: a layer that lost heads keeps the dense ids of the heads it has
            (a buffer saved with the weights) and a pre-hook hands its attention only their rows.
    """

    model_type: str
    layers: str
    q: str
    k: str
    v: str
    o: str
    up: str
    down: str
    gate: str | None = None
    num_heads_field: str = "num_attention_heads"
    num_kv_heads_field: str | None = None
    intermediate_field: str = "intermediate_size"
    hidden_field: str = "hidden_size"
    layers_field: str = "num_hidden_layers"
    head_dim_field: str | None = "head_dim"
    attrs: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    special_tokens: int | None = None
    layer_lists: tuple[str, ...] = ("layer_types",)
    head_inputs: tuple[tuple[str, str, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attrs"] = [list(a) for a in self.attrs]
        d["layer_lists"] = list(self.layer_lists)
        d["head_inputs"] = [list(h) for h in self.head_inputs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchSpec:
        d = dict(d)
        d["attrs"] = tuple(tuple(a) for a in d.get("attrs", ()))
        d["layer_lists"] = tuple(d.get("layer_lists", ("layer_types",)))
        d["head_inputs"] = tuple(tuple(h) for h in d.get("head_inputs", ()))
        return cls(**d)


# ----------------------------------------------------------------------------------------------- config


def config_get(config: Any, name: str, default: Any = None) -> Any:
    """Read a *global* config value even when the config is heterogeneous (no ambiguity error)."""
    getter = getattr(config, "_getattr_without_heterogeneous_validation", None)
    if getter is not None:
        return getter(name, default)
    return getattr(config, name, default)


def dense_dims(config: Any, spec: ArchSpec) -> dict[str, int]:
    """Sizes of the unpruned model: the global config values (per-layer overrides ignored); after depth pruning
    the layer count is the dense one recorded in the hf_prune section (the config's own is the layers left)."""
    section = config_get(config, CONFIG_KEY) or {}
    hidden = int(config_get(config, spec.hidden_field))
    heads = int(config_get(config, spec.num_heads_field))
    kv = int(config_get(config, spec.num_kv_heads_field) or heads) if spec.num_kv_heads_field else heads
    head_dim = config_get(config, spec.head_dim_field) if spec.head_dim_field else None
    return {
        "num_layers": int(section.get("num_layers") or config_get(config, spec.layers_field)),
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": kv,
        "head_dim": int(head_dim) if head_dim else hidden // heads,
        "intermediate_size": int(config_get(config, spec.intermediate_field)),
    }


def layer_sizes(config: Any, spec: ArchSpec) -> list[dict[str, int]]:
    """Per-layer ``num_heads``/``num_kv_heads``/``intermediate_size`` after pruning (dense where unset), for
    the layers the model has."""
    dims = dense_dims(config, spec)
    spec_h = config.__dict__.get("_heterogeneity_spec")
    overrides = spec_h.per_layer_overrides if spec_h is not None else {}
    out = []
    for i in range(int(config_get(config, spec.layers_field))):
        o = overrides.get(i, {})
        heads = int(o.get(spec.num_heads_field, dims["num_heads"]))
        kv = int(o.get(spec.num_kv_heads_field, dims["num_kv_heads"])) if spec.num_kv_heads_field else heads
        out.append(
            {
                "num_heads": heads,
                "num_kv_heads": kv,
                "intermediate_size": int(o.get(spec.intermediate_field, dims["intermediate_size"])),
            }
        )
    return out


def set_layer_sizes(config: Any, spec: ArchSpec, sizes: list[dict[str, int]]) -> None:
    """Record per-layer sizes in ``config.per_layer_config``; global fields keep the dense sizes."""
    dims = dense_dims(config, spec)
    per_layer: dict[int, dict[str, int]] = {}
    for i, s in enumerate(sizes):
        o = {}
        if s["num_heads"] != dims["num_heads"]:
            o[spec.num_heads_field] = s["num_heads"]
        if spec.num_kv_heads_field and s["num_kv_heads"] != dims["num_kv_heads"]:
            o[spec.num_kv_heads_field] = s["num_kv_heads"]
        if s["intermediate_size"] != dims["intermediate_size"]:
            o[spec.intermediate_field] = s["intermediate_size"]
        if o:
            per_layer[i] = o
    # The global fields stay the dense values and are read by stock modeling code at build time.
    config.allow_global_per_layer_attribute_access = True
    # Head size must not be re-derived per layer as hidden // heads: record it explicitly.
    if spec.head_dim_field and config_get(config, spec.head_dim_field) is None:
        setattr(config, spec.head_dim_field, dims["head_dim"])
    config.per_layer_config = per_layer or None


# ----------------------------------------------------------------------------------------------- surgery


def get_module(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def layer_list(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return get_module(model.base_model, spec.layers)


@torch.no_grad()
def slice_linear_(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep rows (``dim=0``, output features) or columns (``dim=1``, input features) ``index``, in place."""
    index = index.to(linear.weight.device)
    weight = linear.weight.index_select(dim, index).clone()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, index).clone(), linear.bias.requires_grad)
        linear.out_features = int(index.numel())
    else:
        linear.in_features = int(index.numel())


def _rows(units: list[int], size: int) -> torch.Tensor:
    """Row indices of whole heads: head u occupies rows [u * size, (u + 1) * size)."""
    if not units:
        return torch.zeros(0, dtype=torch.long)
    u = torch.tensor(units, dtype=torch.long)
    return (u[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def prune_layer_(
    layer: nn.Module,
    spec: ArchSpec,
    head_dim: int,
    heads: list[int] | None,
    neurons: list[int] | None,
) -> None:
    """Keep query heads ``heads`` and FFN neurons ``neurons`` (positions in the layer as it is now).

    Under grouped-query attention the layer's query heads come in groups that share one key/value head (read
    off the weights: Q rows / K rows); a KV head stays while any of its query heads does, and every kept KV head
    must keep the same number of query heads, because attention repeats each KV head for a fixed number of
    query heads. Kept heads stay in order, so the new groups are again contiguous. None leaves that block as is.
    """
    if heads is not None:
        heads = sorted(int(h) for h in heads)
        kv_now = get_module(layer, spec.k).out_features // head_dim
        group = get_module(layer, spec.q).out_features // head_dim // max(kv_now, 1)
        groups = sorted({h // group for h in heads})
        per_group = [sum(1 for h in heads if h // group == k) for k in groups]
        if len(set(per_group)) > 1:
            raise ValueError(
                f"query heads {heads} keep {per_group} heads in their key/value groups of {group}: every kept KV "
                "head must keep the same number of query heads"
            )
        q_rows = _rows(heads, head_dim)
        kv_rows = _rows(groups, head_dim)
        slice_linear_(get_module(layer, spec.q), q_rows, 0)
        slice_linear_(get_module(layer, spec.k), kv_rows, 0)
        slice_linear_(get_module(layer, spec.v), kv_rows, 0)
        slice_linear_(get_module(layer, spec.o), q_rows, 1)
        for path, name, index in spec.head_inputs:
            _keep_head_ids_(get_module(layer, path), heads, name, index)
    if neurons is not None:
        idx = torch.tensor(sorted(int(n) for n in neurons), dtype=torch.long)
        slice_linear_(get_module(layer, spec.up), idx, 0)
        if spec.gate:
            slice_linear_(get_module(layer, spec.gate), idx, 0)
        slice_linear_(get_module(layer, spec.down), idx, 1)
    sync_layer_attrs_(layer, spec, head_dim)


#: buffer of a layer's attention module: the dense ids of the heads it keeps (``ArchSpec.head_inputs``)
HEAD_IDS = "hf_prune_head_ids"


def _keep_head_ids_(module: nn.Module, positions: list[int], name: str, index: int) -> None:
    """Record which of its current heads ``module`` keeps, as dense ids, and slice its per-head inputs to them."""
    ids = torch.tensor(positions, dtype=torch.long)
    old = getattr(module, HEAD_IDS, None)
    if old is not None:
        ids = old.cpu()[ids]  # positions in the already cut layer -> dense ids
    else:
        module.hf_prune_head_input = (name, index)
        module.register_forward_pre_hook(_slice_head_inputs, with_kwargs=True)
    module.register_buffer(HEAD_IDS, ids, persistent=True)  # saved with the weights: reloads with the checkpoint


def _slice_head_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    ids = getattr(module, HEAD_IDS)
    name, index = module.hf_prune_head_input
    if kwargs.get(name) is not None:
        kwargs = {**kwargs, name: kwargs[name].index_select(1, ids.to(kwargs[name].device))}
    elif len(args) > index and args[index] is not None:
        args = (*args[:index], args[index].index_select(1, ids.to(args[index].device)), *args[index + 1 :])
    return args, kwargs


def current_layer_sizes(layer: nn.Module, spec: ArchSpec, head_dim: int) -> dict[str, int]:
    """Sizes read off the layer's weights (the truth, whatever the config says)."""
    return {
        "num_heads": get_module(layer, spec.q).out_features // head_dim,
        "num_kv_heads": get_module(layer, spec.k).out_features // head_dim,
        "intermediate_size": get_module(layer, spec.up).out_features,
    }


def sync_layer_attrs_(layer: nn.Module, spec: ArchSpec, head_dim: int) -> None:
    """Set the module attributes the forward pass reads (head counts etc.) from the weight shapes."""
    sizes = current_layer_sizes(layer, spec, head_dim)
    values = {**sizes, "all_head_size": sizes["num_heads"] * head_dim}
    if sizes["num_kv_heads"]:  # query heads per KV head (attention repeats each KV head that often)
        values["kv_groups"] = sizes["num_heads"] // sizes["num_kv_heads"]
    for path, quantity in spec.attrs:
        owner_path, _, attr = path.rpartition(".")
        try:
            owner = get_module(layer, owner_path) if owner_path else layer
        except AttributeError:
            continue
        if hasattr(owner, attr) and quantity in values:
            setattr(owner, attr, values[quantity])


def resize_to_config_(model: nn.Module, spec: ArchSpec) -> None:
    """Shrink a freshly built (dense) model to the per-layer sizes recorded in its config.

    Keeps the first ``k`` heads/neurons of each layer: the weights are about to be overwritten by the
    checkpoint, only the shapes matter here.
    """
    dims = dense_dims(model.config, spec)
    group = dims["num_heads"] // dims["num_kv_heads"]
    for layer, sizes in zip(layer_list(model, spec), layer_sizes(model.config, spec)):
        now = current_layer_sizes(layer, spec, dims["head_dim"])
        heads = None
        if (sizes["num_heads"], sizes["num_kv_heads"]) != (now["num_heads"], now["num_kv_heads"]):
            per = sizes["num_heads"] // max(sizes["num_kv_heads"], 1)  # query heads per kept KV head
            heads = [k * group + j for k in range(sizes["num_kv_heads"]) for j in range(per)]
        neurons = (
            list(range(sizes["intermediate_size"])) if sizes["intermediate_size"] != now["intermediate_size"] else None
        )
        if heads is not None or neurons is not None:
            prune_layer_(layer, spec, dims["head_dim"], heads, neurons)


@contextmanager
def homogeneous(config: Any) -> Iterator[dict[int, dict[str, Any]]]:
    """Hide the per-layer overrides for a moment: the config reads as the dense one, without warnings.

    Yields the overrides (``{layer: {field: value}}``).
    """
    spec = config.__dict__.pop("_heterogeneity_spec", None)
    try:
        yield {} if spec is None else {int(k): dict(v) for k, v in spec.per_layer_overrides.items()}
    finally:
        if spec is not None:
            config.__dict__["_heterogeneity_spec"] = spec

"""The hidden-channel kernel: which tensors carry the residual width (the hidden size every embedding, projection,
norm and output layer share), and the in-place cut of hidden channels that surgery and checkpoint loading use.

Copied into every pruned checkpoint beside ``modeling_pruned.py`` and ``shapes.py``; it imports nothing but the
standard library, torch, transformers and ``shapes``.

Which side of a tensor is a hidden channel is read off the model, not listed per family:

- inside a layer, the adapter's Q/K/V, FFN up and gate projections read the residual stream (their input columns),
  the attention output and FFN down projections write it (output rows and biases), and every other 1-D tensor of
  the hidden size is a norm over the stream (a per-head norm beside Q, like Gemma's ``q_norm``, is not);
- outside the layers, embeddings of the hidden width (word, position, token type), linears reading or writing it
  (pooler, classifier, ``lm_head``, ELECTRA's embedding projection), convolutions writing it (ViT's patches), norms,
  and bare parameters whose last dimension is it (ViT's CLS token and position embeddings). A linear that maps the
  hidden width to itself outside the layers (a pooler) loses the same channels on both sides, so what reads it
  stays consistent.

A tensor of the hidden size that none of these rules explains, or a tensor shared by two modules that use its
hidden channels on different sides, is refused by name: cutting it could not be right.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .shapes import CONFIG_KEY, ArchSpec, config_get, get_module, layer_list

CHANNELS_FILE = "channels.py"  # imported by MODELING_FILE; travels with it


def hidden_width(model: nn.Module, spec: ArchSpec) -> int:
    """The residual width the model has now, read off its weights (the first layer's query input)."""
    return get_module(layer_list(model, spec)[0], spec.q).in_features


def kept_hidden(config: Any) -> int | None:
    """The hidden channels a pruned config records (None: the dense width)."""
    section = config_get(config, CONFIG_KEY) or {}
    return section.get("hidden_channels")


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _layer_slots(layer: nn.Module, prefix: str, spec: ArchSpec, width: int) -> dict[str, tuple[int, ...]]:
    slots: dict[str, tuple[int, ...]] = {}
    readers = [p for p in (spec.q, spec.k, spec.v, spec.up, spec.gate) if p]
    for path in readers:
        slots[f"{prefix}{path}.weight"] = (1,)  # (out, D): input columns
    for path in (spec.o, spec.down):
        slots[f"{prefix}{path}.weight"] = (0,)  # (D, in): output rows
        if get_module(layer, path).bias is not None:
            slots[f"{prefix}{path}.bias"] = (0,)
    projections = set(readers) | {spec.o, spec.down}
    per_head = _parent(spec.q)  # norms beside Q/K act per head, not over the stream
    for name, param in layer.named_parameters():
        owner = _parent(name)
        if owner in projections or width not in param.shape:
            continue
        if param.dim() != 1 or _parent(owner) == per_head:
            raise ValueError(
                f"{prefix}{name} {tuple(param.shape)} has the hidden size, but hf_prune cannot tell how it meets the "
                "residual stream: hidden channels cannot be cut in this model (prune heads, neurons or layers instead)"
            )
        slots[f"{prefix}{name}"] = (0,)  # a norm over the stream: LayerNorm / RMSNorm weight or bias
    return slots


def _outer_slots(module: nn.Module, name: str, width: int) -> dict[str, tuple[int, ...]]:
    """Hidden sides of the parameters ``module`` owns directly (outside the layers)."""
    out: dict[str, tuple[int, ...]] = {}
    pre = f"{name}." if name else ""
    if isinstance(module, nn.Embedding):
        if module.embedding_dim == width:
            out[f"{pre}weight"] = (1,)
        return out
    if isinstance(module, nn.Linear):
        dims = tuple(d for d, size in ((0, module.out_features), (1, module.in_features)) if size == width)
        if dims:
            out[f"{pre}weight"] = dims
        if module.bias is not None and module.out_features == width:
            out[f"{pre}bias"] = (0,)
        return out
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.out_channels == width:
            out[f"{pre}weight"] = (0,)
            if module.bias is not None:
                out[f"{pre}bias"] = (0,)
        return out
    for pname, param in module.named_parameters(recurse=False):
        if param.dim() >= 1 and param.shape[-1] == width:
            out[f"{pre}{pname}"] = (param.dim() - 1,)  # norms (D,), CLS tokens (1, 1, D), position tables (1, N, D)
        elif width in param.shape:
            raise ValueError(
                f"{pre}{pname} {tuple(param.shape)} ({type(module).__name__}) has the hidden size on an inner dimension, "
                "which hf_prune does not know how to cut: hidden channels cannot be cut in this model"
            )
    return out


def hidden_slots(model: nn.Module, spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """``{parameter name: dims that are hidden channels}`` for every parameter that carries the residual width.

    Shared (tied) parameters appear once, under their first name; raises ``ValueError`` for a tensor whose role
    cannot be told, or one shared by modules that disagree on its hidden dims (say which)."""
    width = hidden_width(model, spec)
    layers = layer_list(model, spec)
    layer_prefix = {id(layer): None for layer in layers}
    slots: dict[str, tuple[int, ...]] = {}
    inside: set[str] = set()
    for name, module in model.named_modules():
        if id(module) in layer_prefix:
            inside.add(name)
            slots.update(_layer_slots(module, f"{name}.", spec, width))
    for name, module in model.named_modules():
        if name in inside or any(name.startswith(f"{p}.") for p in inside):
            continue
        slots.update(_outer_slots(module, name, width))
    # one entry per tensor: tied weights (embeddings and lm_head) must agree on their hidden dims
    first: dict[int, str] = {}
    out: dict[str, tuple[int, ...]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        dims = slots.get(name)
        if id(param) in first:
            other = first[id(param)]
            if dims != out.get(other, slots.get(other)):
                raise ValueError(
                    f"{name} shares its tensor with {other}, and the two use its hidden channels differently "
                    f"({dims} vs {slots.get(other)}): hf_prune cannot cut them together; untie them first"
                )
            continue
        first[id(param)] = name
        if dims is not None:
            out[name] = dims
    return out


def _owners(model: nn.Module, name: str) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) holding the tensor called ``name`` (several when weights are tied)."""
    target = get_module(model, name)
    out = []
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            if param is target:
                out.append((module, pname))
    return out


@torch.no_grad()
def prune_hidden_(model: nn.Module, spec: ArchSpec, keep: list[int]) -> None:
    """Keep hidden channels ``keep`` (positions in the model's current width), in place, in every tensor that carries
    them; tied tensors stay one tensor. Module attributes that size the width (``in_features``, ``embedding_dim``,
    ``normalized_shape``, ...) follow; head sizes and embedding scales do not change."""
    index = torch.tensor(sorted(int(c) for c in keep), dtype=torch.long)
    for name, dims in hidden_slots(model, spec).items():
        owners = _owners(model, name)
        old = getattr(*owners[0])
        data = old.data
        for d in dims:
            data = data.index_select(d, index.to(data.device))
        new = nn.Parameter(data.clone(), requires_grad=old.requires_grad)
        for module, pname in owners:
            setattr(module, pname, new)
    k = int(index.numel())
    for module in model.modules():
        _sync_width_attrs(module, k)


def _sync_width_attrs(module: nn.Module, k: int) -> None:
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.out_channels = module.weight.shape[0]
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1 and hasattr(module, "normalized_shape"):
        module.normalized_shape = tuple(weight.shape)


def resize_hidden_to_config_(model: nn.Module, spec: ArchSpec) -> None:
    """Shrink a freshly built model to the hidden channels its config records (the first ``k``: the weights are
    about to be overwritten by the checkpoint, only the shapes matter)."""
    k = kept_hidden(model.config)
    if k is not None and k != hidden_width(model, spec):
        prune_hidden_(model, spec, list(range(k)))

"""Head, neuron and layer masks hooked into the forward pass (transformers 5 has no ``head_mask``).

A head mask multiplies the per-head context vectors right before the attention output projection; a neuron
mask multiplies the FFN activations right before the down projection; a layer gate ``g`` mixes a whole layer's
output with its input, ``x + g * (layer(x) - x)``. Masking a unit (or gating a layer) with 0 computes exactly
what the model computes once that unit (or layer) is physically removed; a gate between 0 and 1 fades a layer out.

Each mask is ``(n,)`` (one mask for the batch) or ``(B, n)`` (one per sample: the gradient of a summed loss
with respect to a per-sample mask is that sample's gradient, which Fisher/Taylor scores need); a layer gate is
``(1,)`` or ``(B,)``. Masks are indexed by position in the model's layer list (see ``PrunePlan.kept_layers``).

A hidden-channel mask ``(D,)`` or ``(B, D)`` zeroes channels of the residual stream: the input of the first layer, the
outputs of every projection writing the stream (attention output, FFN down, a pooler), and every norm over the stream,
which computes its statistics over the kept channels only. Masked therefore equals cut: the cut model's norms run over
the channels it has (not over the dense width with zeros in it, which would rescale every normalised vector).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .adapters import get_adapter, model_dims
from .channels import hidden_slots
from .shapes import get_module, layer_list
from .unit_kinds import get_unit_kind, unit_positions


class LayerMasks:
    """Per-layer mask tensors read by the hooks at call time (swap them between batches freely).

    Args:
        num_layers: number of transformer layers.
    """

    def __init__(self, num_layers: int) -> None:
        self.heads: list[torch.Tensor | None] = [None] * num_layers
        self.neurons: list[torch.Tensor | None] = [None] * num_layers
        self.layers: list[torch.Tensor | None] = [None] * num_layers
        #: hidden-channel mask ``(D,)`` or ``(B, D)``; set it before :func:`mask_hooks` opens to get its hooks
        self.hidden: torch.Tensor | None = None
        #: per registered unit kind (:mod:`hf_prune.unit_kinds`), its mask ``(n,)``; the kinds named when
        #: :func:`mask_hooks` opens get their hooks (a value may be swapped, or set to None, later)
        self.units: dict[str, torch.Tensor | None] = {}

    @classmethod
    def of_plan(cls, plan, current, device: torch.device | None = None) -> "LayerMasks":
        """0/1 masks under which a model cut to ``current`` (a :class:`hf_prune.PrunePlan`) computes what it computes
        once cut to ``plan``: the heads and neurons ``plan`` drops masked, the layers it removes gated at 0, its
        hidden channels and registered kinds' units masked."""
        heads, neurons = plan.positions_in(current)
        kept = set(plan.kept_layers)
        masks = cls(len(current.kept_layers))
        for p, i in enumerate(current.kept_layers):
            if i not in kept:
                masks.layers[p] = torch.zeros(1, device=device)
            else:
                masks.heads[p] = _indicator(heads[i], len(current.heads[i]), device)
                masks.neurons[p] = _indicator(neurons[i], len(current.neurons[i]), device)
        if plan.hidden != current.hidden:
            masks.hidden = _indicator(plan.hidden_positions_in(current), current.hidden_channels, device)
        for name in sorted(set(plan.units) | set(current.units)):
            positions, count = unit_positions(plan.units, current.units, name)
            masks.units[name] = _indicator(positions, count, device)
        return masks


def _indicator(positions: list[int], size: int, device: torch.device | None) -> torch.Tensor:
    mask = torch.zeros(size, device=device)  # (size,)
    mask[positions] = 1.0
    return mask


def layer_io(args: tuple, kwargs: dict, output: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer call's input and output hidden states ``(B, T, D)``, from a forward hook's arguments (the layer
    returns a tensor in some families and a tuple in others)."""
    x = args[0] if args else kwargs["hidden_states"]
    y = output[0] if isinstance(output, (tuple, list)) else output
    return x, y


def _apply_layer_gate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    # x, y: (B, T, D) layer input and output; gate: (1,) or (B,)
    g = gate.view(-1, *([1] * (y.dim() - 1))).to(y.dtype)
    return x + g * (y - x)


def _apply_head_mask(x: torch.Tensor, mask: torch.Tensor, head_dim: int) -> torch.Tensor:
    # x: (B, T, H * d) context entering the output projection; mask: (H,) or (B, H)
    shape = x.shape
    x = x.view(*shape[:-1], -1, head_dim)  # (B, T, H, d)
    m = mask[:, None, :, None] if mask.dim() == 2 else mask[:, None]
    return (x * m.to(x.dtype)).view(shape)


def _apply_neuron_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # x: (B, T, I) FFN activations entering the down projection; mask: (I,) or (B, I)
    m = mask[:, None, :] if mask.dim() == 2 else mask
    return x * m.to(x.dtype)


def _channels(mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # mask (D,) or (B, D) shaped to multiply y (B, ..., D)
    m = mask if mask.dim() == 1 else mask.view(mask.shape[0], *([1] * (y.dim() - 2)), mask.shape[1])
    return m.to(y.dtype)


def _masked_norm(module: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What ``module`` computes over the kept channels only, zero on the others. ``x``: (B, ..., D)."""
    m = _channels(mask, x)
    k = m.expand_as(x).sum(-1, keepdim=True)  # kept channels, per sample
    if isinstance(module, nn.LayerNorm):
        mu = (x * m).sum(-1, keepdim=True) / k
        var = ((x - mu) * m).pow(2).sum(-1, keepdim=True) / k
        y = (x - mu) * torch.rsqrt(var + module.eps)
        y = y * module.weight if module.weight is not None else y
        return (y + module.bias if module.bias is not None else y) * m
    # an RMS norm over D channels of c * x (masked) has the mean square of x over the kept ones when c^2 = D / k, and
    # its output is linear in that rescaled input after the statistic: divide it back out (exact, eps included)
    c = (x.shape[-1] / k).sqrt()
    return module.forward(x * m * c) / c * m


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "RMSNorm" in type(module).__name__


def _hidden_hooks(model: nn.Module, masks: LayerMasks) -> list:
    """Hooks of the hidden-channel mask: the stream entering the first layer, every writer's output, every norm."""
    adapter = get_adapter(model)
    slots = hidden_slots(model, adapter)
    owners = {name.rpartition(".")[0] for name in slots}
    modules = dict(model.named_modules())
    handles = []

    def stream_in(_module, args, kwargs):
        m = masks.hidden
        if m is None:
            return None
        if args:
            return (args[0] * _channels(m, args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * _channels(m, kwargs["hidden_states"])}

    def writer(_module, _args, output):
        return None if masks.hidden is None else output * _channels(masks.hidden, output)

    def norm(module, args, _output):
        return None if masks.hidden is None else _masked_norm(module, args[0], masks.hidden)

    handles.append(layer_list(model, adapter)[0].register_forward_pre_hook(stream_in, with_kwargs=True))
    for name in sorted(owners):
        module = modules[name]
        if isinstance(module, nn.Linear) and 0 in slots.get(f"{name}.weight", ()):  # writes the stream
            handles.append(module.register_forward_hook(writer))
        elif _is_norm(module):
            handles.append(module.register_forward_hook(norm))
        elif not isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and any(
            p.dim() == 1 for p in module.parameters(recurse=False)
        ):
            raise ValueError(f"{name} ({type(module).__name__}) normalises the hidden stream in a way hf_prune cannot "
                             "mask (it knows LayerNorm and RMSNorm): hidden channels cannot be masked in this model")
    return handles


@contextmanager
def mask_hooks(model: nn.Module, masks: LayerMasks) -> Iterator[LayerMasks]:
    """Install hooks that apply ``masks`` while the context is open (the hidden-channel hooks only when
    ``masks.hidden`` is set on entry, a registered unit kind's when ``masks.units`` names it on entry)."""
    adapter = get_adapter(model)
    head_dim = model_dims(model)["head_dim"]
    handles = _hidden_hooks(model, masks) if masks.hidden is not None else []
    for name in sorted(masks.units):
        handles += get_unit_kind(name).mask(model, lambda name=name: masks.units.get(name))
    for i, layer in enumerate(layer_list(model, adapter)):

        def head_hook(_module, args, i=i):
            m = masks.heads[i]
            return None if m is None else (_apply_head_mask(args[0], m, head_dim), *args[1:])

        def neuron_hook(_module, args, i=i):
            m = masks.neurons[i]
            return None if m is None else (_apply_neuron_mask(args[0], m), *args[1:])

        def layer_hook(_module, args, kwargs, output, i=i):
            g = masks.layers[i]
            if g is None:
                return None
            x, y = layer_io(args, kwargs, output)
            y = _apply_layer_gate(x, y, g)
            return (y, *output[1:]) if isinstance(output, (tuple, list)) else y

        handles.append(get_module(layer, adapter.o).register_forward_pre_hook(head_hook))
        handles.append(get_module(layer, adapter.down).register_forward_pre_hook(neuron_hook))
        handles.append(layer.register_forward_hook(layer_hook, with_kwargs=True))
    try:
        yield masks
    finally:
        for h in handles:
            h.remove()

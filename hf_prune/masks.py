"""Head, neuron and layer masks hooked into the forward pass (transformers 5 has no ``head_mask``).

A head mask multiplies the per-head context vectors right before the attention output projection; a neuron
mask multiplies the FFN activations right before the down projection; a layer gate ``g`` mixes a whole layer's
output with its input, ``x + g * (layer(x) - x)``. Masking a unit (or gating a layer) with 0 computes exactly
what the model computes once that unit (or layer) is physically removed; a gate between 0 and 1 fades a layer out.

Each mask is ``(n,)`` (one mask for the batch) or ``(B, n)`` (one per sample: the gradient of a summed loss
with respect to a per-sample mask is that sample's gradient, which Fisher/Taylor scores need); a layer gate is
``(1,)`` or ``(B,)``. Masks are indexed by position in the model's layer list (see ``PrunePlan.kept_layers``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .adapters import get_adapter, model_dims
from .shapes import get_module, layer_list


class LayerMasks:
    """Per-layer mask tensors read by the hooks at call time (swap them between batches freely).

    Args:
        num_layers: number of transformer layers.
    """

    def __init__(self, num_layers: int) -> None:
        self.heads: list[torch.Tensor | None] = [None] * num_layers
        self.neurons: list[torch.Tensor | None] = [None] * num_layers
        self.layers: list[torch.Tensor | None] = [None] * num_layers


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


@contextmanager
def mask_hooks(model: nn.Module, masks: LayerMasks) -> Iterator[LayerMasks]:
    """Install hooks that apply ``masks`` while the context is open."""
    adapter = get_adapter(model)
    head_dim = model_dims(model)["head_dim"]
    handles = []
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

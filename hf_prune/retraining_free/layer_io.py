"""Layer inputs and outputs: how the model calls each layer, recorded from its own forward pass, replayed on
other hidden states, and the projections' inputs/outputs captured inside a layer."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..batches import Batch, model_device, to_device
from ..divergence import model_output
from ..gradients import Stop, call_layer, split_call
from ..shapes import get_module


def capture_layer_calls(
    model: nn.Module, layers: Sequence[nn.Module], inputs: Batch
) -> tuple[torch.Tensor, list[tuple[tuple, dict]], torch.Tensor]:
    """How ``model`` calls each of ``layers`` (in order) on ``inputs``, recorded in one forward pass.

    Returns the first layer's hidden-state input ``(B, T, D)``, per layer the other positional arguments and
    the keyword arguments (attention masks, position embeddings, ... exactly as this transformers release
    builds them, per layer: sliding-window layers get their own masks), and the first layer's output. The pass
    stops at the last layer's input. Replaying a layer with its recorded arguments is what the model does, so
    nothing here depends on how a release builds masks or position embeddings.
    """
    calls: list[tuple[tuple, dict] | None] = [None] * len(layers)
    first: dict[str, torch.Tensor] = {}

    def pre(_m, args, kwargs, i):
        hidden, rest, kwargs = split_call(args, kwargs)
        calls[i] = (rest, kwargs)
        if i == 0:
            first["hidden"] = hidden
        if i == len(layers) - 1:
            raise Stop

    def post(_m, _args, output):
        first["out"] = output[0] if isinstance(output, tuple) else output

    handles = [layer.register_forward_pre_hook(functools.partial(pre, i=i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    handles.append(layers[0].register_forward_hook(post))
    try:
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k != "labels"})
    except Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in calls):
        raise RuntimeError(f"{type(model).__name__} did not call every decoder/encoder layer in its forward pass")
    if "out" not in first:  # a one-layer model stops before its layer runs
        first["out"] = run_layer(layers[0], LayerInput(first["hidden"], calls, None), first["hidden"])
    return first["hidden"], calls, first["out"]  # type: ignore[return-value]


def capture_layer_call(model: nn.Module, layer: nn.Module, inputs: Batch) -> tuple[tuple, dict]:
    """The positional and keyword arguments ``layer`` receives when ``model`` runs on ``inputs``."""
    hidden, calls, _ = capture_layer_calls(model, [layer], inputs)
    rest, kwargs = calls[0]
    return (hidden, *rest), kwargs


@dataclass
class LayerInput:
    """What the layers receive for one calibration batch: the first layer's hidden states, and per layer the
    other arguments the model passes it; ``layer`` selects whose arguments ``args``/``kwargs`` are."""

    hidden: torch.Tensor  # (B, T, D) input of the first layer
    calls: list[tuple[tuple, dict]]  # per layer: (positional args after the hidden states, keyword args)
    tokens: torch.Tensor | None  # (B, T) bool, real (non-padding) tokens; None = all
    layer: int = 0

    @property
    def args(self) -> tuple:
        return self.calls[self.layer][0]

    @property
    def kwargs(self) -> dict:
        return self.calls[self.layer][1]

    def at(self, layer: int) -> "LayerInput":
        return replace(self, layer=layer)


def layer_inputs(model: nn.Module, layers: Sequence[nn.Module], batches: Sequence[Batch]) -> list[LayerInput]:
    """Every batch's layer calls, recorded from the model's own forward pass (one per batch). The first batch's
    replay of the first layer is checked against the model's own output, so a transformers release that calls
    its layers differently fails here, in seconds, not after the long passes."""
    device = model_device(model)
    out = []
    for b, raw in enumerate(batches):
        batch = to_device(raw, device)
        hidden, calls, first_out = capture_layer_calls(model, layers, batch)
        mask = batch.get("attention_mask")
        tokens = mask.bool() if mask is not None and tuple(mask.shape) == tuple(hidden.shape[:2]) else None
        x = LayerInput(hidden, calls, tokens)
        if b == 0:
            replay = run_layer(layers[0], x, hidden)
            if replay.shape != first_out.shape or not torch.allclose(replay, first_out, rtol=1e-4, atol=1e-5):
                raise RuntimeError(
                    f"replaying {type(layers[0]).__name__} with the arguments {type(model).__name__} passed it does "
                    "not reproduce the model's own output (this transformers release calls its layers in a way "
                    "hf_prune does not handle); please report it with your transformers version"
                )
        out.append(x)
    return out


def read_positions(
    model: nn.Module, layer: nn.Module, batches: Sequence[Batch], inputs: Sequence[LayerInput]
) -> list[torch.Tensor | None]:
    """Per batch, the ``(B, T)`` bool positions of ``layer``'s output (the last layer) that the model's output
    depends on; None = every real token (``inputs[b].tokens``).

    A sequence classifier reads one token of the last layer (BERT/ViT pool the first, decoder classifiers the
    last real one), so only those positions need reconstructing there; fitting all tokens spends the last
    layer's few degrees of freedom on outputs nobody reads. Found by autograd, not by architecture name: the
    gradient of a random projection of the output is exactly zero at positions the model does not read. One
    batch decides; if it reads only the first token, every batch does (no more backward passes), otherwise each
    batch is checked.
    """
    device = model_device(model)

    def read(raw: Batch, x: LayerInput) -> torch.Tensor:
        batch = to_device({k: v for k, v in raw.items() if k != "labels"}, device)
        grabbed: dict[str, torch.Tensor] = {}

        def hook(_m, _args, output):
            torch.set_grad_enabled(True)  # from here on (the head), autograd records; the context below restores
            out = output[0] if isinstance(output, tuple) else output
            out = out.detach().requires_grad_(True)
            grabbed["h"] = out
            return (out, *output[1:]) if isinstance(output, tuple) else out

        handle = layer.register_forward_hook(hook)
        try:
            # the layers run without autograd: with it, their graph (every layer's activations, the memory of a
            # training step) would be built only to be dropped at the hook
            with torch.no_grad():
                y, _ = model_output(model(**batch))
                gen = torch.Generator().manual_seed(0)
                proj = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
                (grad,) = torch.autograd.grad((y * proj).sum(), grabbed["h"])
        finally:
            handle.remove()
        pos = grad.abs().sum(-1) > 0  # (B, T)
        return pos & x.tokens if x.tokens is not None else pos

    first = read(batches[0], inputs[0])
    real = inputs[0].tokens if inputs[0].tokens is not None else torch.ones_like(first)
    if bool((first == real).all()):
        return [None] * len(batches)
    if first[:, 0].all() and not first[:, 1:].any():
        return [_first_position(x.hidden) for x in inputs]
    return [first] + [read(b, x) for b, x in zip(batches[1:], inputs[1:])]


def _first_position(hidden: torch.Tensor) -> torch.Tensor:
    pos = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)  # (B, T)
    pos[:, 0] = True
    return pos


def run_layer(layer: nn.Module, x: LayerInput, hidden: torch.Tensor) -> torch.Tensor:
    return call_layer(layer, hidden, x.args, x.kwargs)


def real_tokens(t: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """``(B, T, ...)`` -> ``(N, ...)`` over real tokens."""
    return t[tokens] if tokens is not None else t.reshape(-1, *t.shape[2:])


@contextmanager
def capture_projections(layer: nn.Module, adapter, stop_at: str | None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the inputs and outputs of the O, up and down projections; raise ``Stop`` at the input of
    ``stop_at`` ("o" or "down") to skip the rest of the layer."""
    rec: dict[str, torch.Tensor] = {}
    handles = []
    for name in ("o", "up", "down"):
        mod = get_module(layer, getattr(adapter, name))

        def pre(_m, args, name=name):
            rec[f"{name}_in"] = args[0]
            if name == stop_at:
                raise Stop

        def post(_m, _args, output, name=name):
            rec[f"{name}_out"] = output

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def run_until(layer: nn.Module, adapter, x: LayerInput, hidden: torch.Tensor, stop_at: str) -> dict:
    """Run ``layer`` up to the input of projection ``stop_at`` and return the captured tensors."""
    with capture_projections(layer, adapter, stop_at) as rec:
        try:
            run_layer(layer, x, hidden)
        except Stop:
            pass
    return rec

"""Per-sample gradients of mask leaves: the loss every gradient score differentiates, and its gradients with respect to
the masks, in memory or one layer at a time (``PruningConfig(offload=True)``).

In memory, one backward pass holds the autograd graph of the whole model: every layer's activations for the batch.
Layer-streamed (:func:`streamed_mask_grads`), a batch goes through three steps, and the pass holds one layer's graph
plus the layer boundaries ``(B, T, D)`` of the batch (kept on the CPU):

1. a forward pass without autograd records each layer's input and the arguments the model passes it (attention
   masks, position embeddings: exactly as this transformers release builds them);
2. the model's head and loss run on the last layer's recorded output, every layer's computation replaced by a lookup,
   which gives the gradient with respect to that output;
3. from the last layer to the first, the layer runs again on its recorded input with its masks as leaves; its
   backward gives the masks' gradients and the gradient with respect to its input, which the layer before receives.

This is gradient checkpointing at layer boundaries: the same arithmetic, one more forward pass. A layer called this
way also passes through any hook accelerate attached to it (``cpu_offload`` moves its weights to the execution device
for the call), so only the called layer's weights need to be there.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.hooks import remove_hook_from_module
from torch import nn
from transformers.cache_utils import Cache

from .adapters import get_adapter
from .masks import LayerMasks, mask_hooks
from .shapes import layer_list


def offloaded(model: nn.Module) -> list[str]:
    """Parameters whose weights accelerate keeps off the model (``cpu_offload``, ``disk_offload``, a ``device_map``
    with "cpu"/"disk" entries): they wait on the meta device and are loaded for each call."""
    return [name for name, p in model.named_parameters() if p.device.type == "meta"]


def refuse_offloaded(model: nn.Module, what: str) -> None:
    """The one-line error of a step that copies or cuts weights, on a model whose weights accelerate offloads."""
    names = offloaded(model)
    if names:
        raise ValueError(
            f"{what} copies or cuts weights, but accelerate offloads {len(names)} of this model's parameters (e.g. "
            f"{names[0]}): on the offloaded model compute the plan only (hp.compute_importance + hp.build_plan, or "
            "hp.retraining_free_plan with offload=True, whose mask tuning and selection load one layer at a "
            "time), then fold_tuning_ and hp.apply_plan_ it on the model loaded whole (device_map=None)")


def _refuse_split_layers(model: nn.Module, layers: Sequence[nn.Module]) -> None:
    """A ``device_map`` (``model.hf_device_map``, set by ``from_pretrained``) must keep each layer on one device:
    the streamed pass reruns a layer on its recorded input as one unit."""
    device_map = getattr(model, "hf_device_map", None) or {}
    names = {id(m): n for n, m in model.named_modules()}
    for layer in layers:
        prefix = names[id(layer)] + "."
        devices = sorted({str(d) for key, d in device_map.items() if key.startswith(prefix)})
        if len(devices) > 1:
            raise ValueError(
                f"offload=True streams one layer at a time, but the device_map splits {prefix[:-1]} across "
                f"{' and '.join(devices)}: map each layer whole (device_map='auto' keeps the model's _no_split_modules "
                "whole; with infer_auto_device_map pass no_split_module_classes)")


def real_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with real weights and no accelerate hooks, on the device its forward runs on. For a
    module whose weights accelerate offloads, only its own weights are loaded (from the offload store, which the
    copy shares rather than copies); anything else is deep-copied."""
    hooks = [h for m in module.modules() for h in _offload_hooks(m)]
    if not hooks:
        return copy.deepcopy(module)
    shared = {id(store): store for h in hooks for store in (h.weights_map, h.tied_params_map) if store is not None}
    copied = copy.deepcopy(module, shared)
    remove_hook_from_module(copied, recurse=True)  # detaching loads each tensor where it was before offloading
    return copied.to(hooks[0].execution_device)


def _offload_hooks(module: nn.Module) -> list:
    """The accelerate hooks that keep ``module``'s own weights off it (inside a SequentialHook too)."""
    hook = module.__dict__.get("_hf_hook")
    return [h for h in getattr(hook, "hooks", [hook]) if getattr(h, "offload", False)]


def per_sample_loss(model: nn.Module, batch: dict[str, Any], seed: int) -> torch.Tensor:
    """Sum over samples of a loss whose per-sample gradients the Fisher/Taylor scores accumulate."""
    labels = batch.get("labels")
    out = model(**batch)
    logits = getattr(out, "logits", None)
    if logits is not None and labels is not None and logits.dim() == 2:
        if logits.shape[-1] == 1 or labels.is_floating_point():
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1), reduction="sum")
        return F.cross_entropy(logits.float(), labels.view(-1), reduction="sum")
    if labels is not None and getattr(out, "loss", None) is not None:
        return out.loss * labels.shape[0]  # the model's mean loss, rescaled to a sum
    if logits is not None and logits.dim() == 2 and logits.shape[-1] > 1:
        return F.cross_entropy(logits.float(), logits.argmax(-1).detach(), reduction="sum")
    target = logits if logits is not None else out.last_hidden_state  # (B, ..., C)
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = torch.randn(target.shape, generator=g).to(target.device, target.dtype)
    if target.dim() == 3 and "attention_mask" in batch:
        r = r * batch["attention_mask"][..., None].to(r.dtype)  # padding tokens carry no signal
    return (target * r).sum()


def mask_grads(model: nn.Module, batch: dict[str, Any], masks: LayerMasks, leaves: Sequence[torch.Tensor],
               seed: int, *, streamed: bool = False) -> tuple[torch.Tensor | None, ...]:
    """``d per_sample_loss / d leaf`` for each of ``leaves`` (mask tensors held by ``masks``; None where a leaf does
    not reach the loss), in memory or, with ``streamed``, one layer at a time (per-layer masks only: heads, neurons,
    layer gates)."""
    if streamed:
        return streamed_mask_grads(model, batch, masks, leaves, seed)
    with mask_hooks(model, masks):
        loss = per_sample_loss(model, batch, seed)
    return torch.autograd.grad(loss, list(leaves), allow_unused=True)


def _without_caches(values: Any) -> Any:
    """``values`` (a layer call's args tuple or kwargs dict) with every KV cache replaced by None.

    A cache would grow on every replay of the layer. Found by type, not by argument name: transformers has
    renamed the argument (``past_key_value``, ``past_key_values``, ``cache``) across 5.x releases.
    """
    if isinstance(values, dict):
        return {k: None if isinstance(v, Cache) else v for k, v in values.items()}
    return tuple(None if isinstance(v, Cache) else v for v in values)


def split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """A layer call's hidden states and its other arguments (caches removed)."""
    args, kwargs = _without_caches(args), _without_caches(dict(kwargs))
    if args:
        return args[0], tuple(args[1:]), kwargs
    return kwargs.pop("hidden_states"), (), kwargs


def call_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """``layer``'s output hidden states on ``hidden`` with the other arguments the model passed it."""
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def streamed_mask_grads(model: nn.Module, batch: dict[str, Any], masks: LayerMasks, leaves: Sequence[torch.Tensor],
                        seed: int) -> tuple[torch.Tensor | None, ...]:
    """:func:`mask_grads` one layer at a time (see the module docstring). ``leaves`` must be per-layer masks of
    ``masks`` (``heads``, ``neurons`` or ``layers`` entries)."""
    if masks.hidden is not None or masks.units:
        raise ValueError("layer-streamed gradients cover per-layer masks (heads, neurons, layer gates); a "
                         "hidden-channel or unit-kind mask spans the whole model: use offload=False for it")
    layers = layer_list(model, get_adapter(model))
    _refuse_split_layers(model, layers)
    layer_of = {id(m): p for kind in ("heads", "neurons", "layers")  # each leaf's layer position
                for p, m in enumerate(getattr(masks, kind)) if m is not None}
    if any(id(leaf) not in layer_of for leaf in leaves):
        raise ValueError("every leaf must be a per-layer mask held by `masks` (heads, neurons or layers)")
    with mask_hooks(model, masks):  # the masks' values act as in memory (a layer gate of one is not a no-op)
        inputs, calls, tuples, last = _record(model, layers, batch)
    out = last.detach().requires_grad_(True)
    with _lookups(layers, tuples, out), torch.enable_grad():  # the head alone: no layer computes, no mask acts
        (g,) = torch.autograd.grad(per_sample_loss(model, batch, seed), [out])  # (B, T, D)
    grads: dict[int, torch.Tensor | None] = {}
    with mask_hooks(model, masks), torch.enable_grad():
        for p in reversed(range(len(layers))):
            mine = [leaf for leaf in leaves if layer_of[id(leaf)] == p]
            x = inputs[p].to(g.device).requires_grad_(p > 0)
            y = call_layer(layers[p], x, *calls[p])  # only this layer's graph is alive
            wanted = mine + ([x] if p > 0 else [])
            got = torch.autograd.grad(y, wanted, grad_outputs=g, allow_unused=True) if wanted else ()
            grads.update((id(leaf), grad) for leaf, grad in zip(mine, got))
            if p > 0:
                g = got[-1]
    return tuple(grads[id(leaf)] for leaf in leaves)


class Stop(Exception):
    """Raised by a capture hook to skip the rest of a forward pass whose remainder is not needed."""


@torch.no_grad()
def _record(model: nn.Module, layers: Sequence[nn.Module], batch: dict[str, Any]
            ) -> tuple[list[torch.Tensor], list[tuple[tuple, dict]], list[bool], torch.Tensor]:
    """Step 1: every layer's input ``(B, T, D)`` (on the CPU) and other arguments, whether it returns a tuple, and
    the last layer's output."""
    inputs: list[Any] = [None] * len(layers)
    calls: list[Any] = [None] * len(layers)
    tuples = [False] * len(layers)
    last: dict[str, torch.Tensor] = {}

    def pre(_m, args, kwargs, p):
        hidden, rest, kw = split_call(args, kwargs)
        inputs[p], calls[p] = hidden.to("cpu", copy=True), (rest, kw)

    def post(_m, _args, output, p):
        tuples[p] = isinstance(output, tuple)
        last["out"] = output[0] if tuples[p] else output
        if p == len(layers) - 1:
            raise Stop  # the head runs in step 2, where its gradient is taken

    handles = [layer.register_forward_pre_hook(lambda m, a, k, p=p: pre(m, a, k, p), with_kwargs=True)
               for p, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(lambda m, a, o, p=p: post(m, a, o, p)) for p, layer in enumerate(layers)]
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"})
    except Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in calls) or "out" not in last:
        raise RuntimeError(f"{type(model).__name__} did not call every layer in its forward pass")
    return inputs, calls, tuples, last["out"]


@contextmanager
def _lookups(layers: Sequence[nn.Module], tuples: list[bool], out: torch.Tensor) -> Iterator[None]:
    """Step 2: each layer returns without computing (its input passed on; the last one returns ``out``), in the form
    the model expects back from it (a tensor, or a tuple led by the hidden states)."""
    def lookup(p: int, tuple_out: bool):
        def forward(*args, **kwargs):
            hidden = out if p == len(layers) - 1 else (args[0] if args else kwargs["hidden_states"])
            return (hidden,) if tuple_out else hidden
        return forward

    # an instance attribute: nn.Module.__call__ finds it first. accelerate's hooks (cpu_offload, device maps) are
    # instance attributes too: each is put back as it was
    before = [layer.__dict__.get("forward") for layer in layers]
    for p, layer in enumerate(layers):
        layer.forward = lookup(p, tuples[p])
    try:
        yield
    finally:
        for layer, old in zip(layers, before):
            if old is None:
                del layer.forward
            else:
                layer.forward = old

"""Depth pruning: how much each whole layer matters (``(L,)`` scores the ``layers_keep`` budget ranks).

Layer criteria (pick by name, see :data:`LAYER_CRITERIA`; add one with :func:`register_layer_criterion`):

- ``block_influence``: mean over tokens of ``1 - cos(layer input, layer output)`` (ShortGPT's "block influence",
  Men et al. 2024): a layer that barely turns the residual stream can go. One forward pass, no labels.
- ``fisher``: sum over samples of the squared gradient of the loss w.r.t. a per-sample gate on the layer's residual
  branch (the gate is 1; ``x + g * (layer(x) - x)``): the diagonal Fisher of the layer's gate, on the scale of the
  head and neuron Fisher scores.
- ``skip_divergence``: the measured divergence of the model's outputs when the layer alone is skipped (KL of the
  logits, squared error for hidden states and regression heads); one forward pass per layer and batch.

Scores are indexed by *dense* layer id; layers already removed are NaN. Higher = more important. Under
``torch.distributed`` they are summed over processes, so every rank removes the same layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import layers_of
from .batches import CalibrationPass, model_device
from .distributed import all_reduce_sum_
from .divergence import model_output, sample_divergence
from .gradients import mask_grads
from .masks import LayerMasks, layer_io, mask_hooks
from .plan import PrunePlan

#: per-sample statistic of one layer call: (x, y, token mask or None) -> (B,), x/y: (B, T, D)
LayerStat = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class LayerCriterion:
    """One whole-layer importance criterion. Set exactly one of ``stat``, ``gradient`` and ``skip``.

    Args:
        name: what ``PruningConfig(layer_importance=...)`` calls it.
        description: one line for docs and errors.
        stat: forward statistic of the layer's input and output, per sample, averaged over samples.
        gradient: the Fisher of a per-sample gate on the layer's residual branch (needs a loss; labels optional).
        skip: the divergence of the model's outputs with the layer skipped, averaged over samples.
    """

    name: str
    description: str
    stat: LayerStat | None = None
    gradient: bool = False
    skip: bool = False

    def __post_init__(self) -> None:
        if (self.stat is not None) + self.gradient + self.skip != 1:
            raise ValueError(f"layer criterion {self.name!r}: set exactly one of stat, gradient and skip")


LAYER_CRITERIA: dict[str, LayerCriterion] = {}


def register_layer_criterion(criterion: LayerCriterion) -> LayerCriterion:
    """Make ``criterion`` available as ``PruningConfig(layer_importance=criterion.name)``."""
    if criterion.name in LAYER_CRITERIA:
        raise ValueError(f"a layer criterion named {criterion.name!r} is already registered")
    LAYER_CRITERIA[criterion.name] = criterion
    return criterion


def get_layer_criterion(name: str) -> LayerCriterion:
    if name not in LAYER_CRITERIA:
        raise ValueError(f"unknown layer_importance {name!r}; choose one of {', '.join(LAYER_CRITERIA)}")
    return LAYER_CRITERIA[name]


def _token_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # values: (B, T); mask: (B, T) or None -> (B,)
    if mask is None or mask.shape != values.shape:
        return values.mean(-1)
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp_min(1)


def _block_influence(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return _token_mean(1 - F.cosine_similarity(x.float(), y.float(), dim=-1), mask)


def layer_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    criterion: str = "block_influence",
    *,
    max_samples: int | None = None,
    seed: int = 0,
    progress: bool = True,
    offload: bool = False,
) -> torch.Tensor:
    """Score every layer ``model`` has: ``(L,)`` over the dense layer ids, NaN for layers already removed.

    Args:
        model: a supported transformers model (may already be pruned).
        dataloader: calibration batches (``labels`` are used by ``fisher`` when present).
        criterion: one of :data:`LAYER_CRITERIA`.
        max_samples: stop after this many samples (whole batches).
        seed: for the label-free random projections of ``fisher``.
        progress: show a progress bar.
        offload: the ``fisher`` criterion backpropagates one layer at a time (:mod:`hf_prune.gradients`); the others
            run no backward.
    """
    crit = get_layer_criterion(criterion)
    current = PrunePlan.of(model)
    layers = layers_of(model)
    n = len(layers)
    device = model_device(model)
    acc = torch.zeros(n, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    data = CalibrationPass(dataloader, device, max_samples, f"{crit.name} layer scores", progress)
    try:
        for step, batch, bsz in data:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            mask = batch.get("attention_mask")
            if crit.stat is not None:
                _add_stats_(layers, inputs, model, crit.stat, mask, acc)
            elif crit.gradient:
                masks = LayerMasks(n)
                masks.layers = [torch.ones(bsz, device=device, requires_grad=True) for _ in range(n)]  # (B,)
                grads = mask_grads(model, batch, masks, masks.layers, seed + step, streamed=offload)
                for p, g in enumerate(grads):
                    if g is not None:
                        acc[p] += g.double().pow(2).sum()
            else:
                with torch.no_grad():
                    ref, kl = model_output(model(**inputs))
                    masks = LayerMasks(n)
                    with mask_hooks(model, masks):
                        for p in range(n):
                            masks.layers = [None] * n
                            masks.layers[p] = torch.zeros(1, device=device)
                            out, _ = model_output(model(**inputs))
                            acc[p] += sample_divergence(ref, out, kl, mask).double().sum()
    finally:
        model.train(was_training)
    if data.seen == 0:
        raise ValueError("the calibration dataloader yielded no batches: layer scores need at least one batch")
    counts = torch.tensor([float(data.seen)], dtype=torch.float64, device=device)
    all_reduce_sum_([acc, counts])
    if not crit.gradient:
        acc = acc / counts
    scores = torch.full((current.num_layers,), float("nan"))
    scores[current.kept_layers] = acc.float().cpu()
    return scores


@torch.no_grad()
def _add_stats_(layers: nn.ModuleList, inputs: dict, model: nn.Module, stat: LayerStat,
                mask: torch.Tensor | None, acc: torch.Tensor) -> None:
    """One forward pass with a hook on every layer adding ``stat``'s per-sample values to ``acc[p]``."""

    def hook(_module, args, kwargs, output, p):
        x, y = layer_io(args, kwargs, output)
        acc[p] += stat(x, y, mask).double().sum()

    with ExitStack() as stack:
        for p, layer in enumerate(layers):
            h = layer.register_forward_hook(lambda *a, p=p: hook(*a, p), with_kwargs=True)
            stack.callback(h.remove)
        model(**inputs)


def layers_to_keep(scores: torch.Tensor, value: float, current: PrunePlan) -> list[int]:
    """Dense ids of the layers a ``layers_keep`` budget keeps: the ``n`` best-scoring layers the model still has.

    ``value`` in (0, 1] is a fraction of the dense model's layers (rounded to the nearest count); above 1, a count.
    """
    dense = current.num_layers
    n = round(value * dense) if value <= 1 else int(value)
    if n < 1:
        raise ValueError(f"layers_keep={value} keeps no layer of {dense}: keep at least one (a fraction >= "
                         f"{0.5 / dense:.3g} or a count >= 1)")
    if tuple(scores.shape) != (dense,):
        raise ValueError(f"layer scores of shape {tuple(scores.shape)} do not fit this model's {dense} dense layers; "
                         "compute them with hf_prune.layer_importance(model, ...)")
    # the layers still there that are not masked out already (NaN: removed, or gated off by an earlier event)
    have = [i for i in current.kept_layers if not torch.isnan(scores[i])]
    if n > len(have):
        raise ValueError(f"layers_keep={value} keeps {n} layers but the model has {len(have)} (of {dense} dense); "
                         f"use a count <= {len(have)} or a smaller fraction")
    order = sorted(have, key=lambda i: -float(scores[i]))
    return sorted(order[:n])


def depth_candidates(num_layers: int, dense_layers: int, keep: float) -> list[float]:
    """``layers_keep`` values (fractions of the dense layers) that ``depth_search`` tries for a cost budget keeping
    ``keep`` of the dense model: every count from the ``num_layers`` the model has down to the budget's share of
    the dense layers (one below it too: a little slack can beat thinner layers)."""
    low = max(1, min(num_layers, math.floor(keep * dense_layers)))
    return [n / dense_layers for n in range(num_layers, low - 1, -1)]


register_layer_criterion(LayerCriterion(
    "block_influence", "mean 1 - cos(layer input, layer output) over tokens (ShortGPT)", stat=_block_influence))
register_layer_criterion(LayerCriterion(
    "fisher", "squared loss gradient of a per-sample gate on the layer's residual branch", gradient=True))
register_layer_criterion(LayerCriterion(
    "skip_divergence", "divergence of the outputs when the layer alone is skipped", skip=True))

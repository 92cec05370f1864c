"""Importance criteria as registered objects: what a criterion needs and how its scores are made.

A criterion is one of three kinds, by which field it sets:

- ``score`` (data-free): ``score(model, seed) -> (heads, neurons)``, per layer a ``(H_l,)`` and an ``(I_l,)``
  tensor over the units the layers have now (``magnitude``, ``random``).
- ``reduce`` (gradient): how each sample's gradient of the loss w.r.t. a unit's mask, ``(B, n)``, sums into that
  unit's score ``(n,)`` (``fisher``: squares, ``taylor``: absolute values). The same reduction turns the batch
  gradients of real training steps into scores in :class:`hf_prune.PruningCallback`.
- ``stats`` (forward statistics): a context manager ``stats(model, batch, head_acc, neuron_acc)`` that adds one
  batch's statistics to the accumulators while the model runs; scores are averaged over samples
  (``activation``).

Adding one is one :func:`register_criterion` call; ``PruningConfig(importance=...)`` then accepts its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import get_adapter, model_dims
from .plan import PrunePlan
from .shapes import get_module, layer_list


@dataclass(frozen=True)
class Criterion:
    """One importance criterion. Set exactly one of ``score``, ``reduce`` and ``stats``.

    Args:
        name: what ``PruningConfig(importance=...)`` calls it.
        description: one line for docs and errors.
        score: data-free scores, ``score(model, seed) -> (heads, neurons)`` (lists of per-layer tensors).
        reduce: gradient criterion: per-sample mask gradients ``(B, n)`` -> scores ``(n,)``, summed over samples.
        stats: forward-statistics criterion: ``stats(model, batch, head_acc, neuron_acc)``, a context manager
            that accumulates while the model runs on ``batch``; averaged over samples.
    """

    name: str
    description: str
    score: Callable[[nn.Module, int], tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    stats: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.score, self.reduce, self.stats)) != 1:
            raise ValueError(f"criterion {self.name!r}: set exactly one of score, reduce and stats")

    @property
    def needs_data(self) -> bool:
        return self.score is None

    @property
    def gradient(self) -> bool:
        """Scores are sums of loss gradients: heads and neurons share one scale, and training gradients serve."""
        return self.reduce is not None


CRITERIA: dict[str, Criterion] = {}


def register_criterion(criterion: Criterion) -> Criterion:
    """Make ``criterion`` available by name everywhere (``PruningConfig``, recipes, the CLI, callbacks)."""
    if criterion.name in CRITERIA:
        raise ValueError(f"a criterion named {criterion.name!r} is already registered")
    CRITERIA[criterion.name] = criterion
    return criterion


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise ValueError(f"unknown importance criterion {name!r}; choose one of {', '.join(CRITERIA)}")
    return CRITERIA[name]


def _random(model: nn.Module, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    current = PrunePlan.of(model)
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(len(h), generator=g) for h in current.heads], [torch.rand(len(n), generator=g)
                                                                       for n in current.neurons]


def _magnitude_scores(model: nn.Module, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    adapter = get_adapter(model)
    return _magnitude(layer_list(model, adapter), adapter, model_dims(model)["head_dim"])

@torch.no_grad()
def _magnitude(layers: nn.ModuleList, adapter, head_dim: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    heads, neurons = [], []
    for layer in layers:
        q = get_module(layer, adapter.q).weight.float()  # (H * d, D)
        o = get_module(layer, adapter.o).weight.float()  # (D, H * d)
        h = q.pow(2).view(-1, head_dim, q.shape[1]).sum((1, 2)) + o.pow(2).view(o.shape[0], -1, head_dim).sum((0, 2))
        heads.append(h)
        up = get_module(layer, adapter.up).weight.float()  # (I, D)
        down = get_module(layer, adapter.down).weight.float()  # (D, I)
        n = up.pow(2).sum(1) + down.pow(2).sum(0)
        if adapter.gate:
            n = n + get_module(layer, adapter.gate).weight.float().pow(2).sum(1)
        neurons.append(n)
    return heads, neurons


class _ActivationStats:
    """Hooks accumulating per-sample mean activation magnitudes (padding tokens excluded)."""

    def __init__(self, model, batch, head_acc, neuron_acc):
        self.model, self.head_acc, self.neuron_acc = model, head_acc, neuron_acc
        self.head_dim = model_dims(model)["head_dim"]
        mask = batch.get("attention_mask")
        self.token_w = None if mask is None else mask.to(torch.float32)  # (B, T)
        self.handles: list[Any] = []

    def _mean_tokens(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, n) -> (n,) summed over samples of each sample's token mean
        if self.token_w is not None and x.dim() == 3 and x.shape[1] == self.token_w.shape[1]:
            w = self.token_w / self.token_w.sum(1, keepdim=True).clamp_min(1)
            return (x * w[..., None]).sum((0, 1))
        return x.mean(1).sum(0) if x.dim() == 3 else x.sum(0)

    def __enter__(self):
        adapter = get_adapter(self.model)
        for i, layer in enumerate(layer_list(self.model, adapter)):

            def head_hook(_m, args, i=i):
                x = args[0].float()
                norms = x.view(*x.shape[:-1], -1, self.head_dim).norm(dim=-1)  # (B, T, H)
                self.head_acc[i] += self._mean_tokens(norms)

            def neuron_hook(_m, args, i=i):
                self.neuron_acc[i] += self._mean_tokens(args[0].float().abs())  # (B, T, I)

            self.handles.append(get_module(layer, adapter.o).register_forward_pre_hook(head_hook))
            self.handles.append(get_module(layer, adapter.down).register_forward_pre_hook(neuron_hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


register_criterion(Criterion("magnitude", "squared L2 norm of the weights that exist only for the unit",
                             score=_magnitude_scores))
register_criterion(Criterion("taylor", "sum over samples of |dL/dm| for the unit's mask m (Michel et al. 2019)",
                             reduce=lambda g: g.abs().sum(0)))
register_criterion(Criterion("fisher", "sum over samples of (dL/dm)^2, the empirical Fisher of the masks "
                             "(Kwon et al. 2022)", reduce=lambda g: g.pow(2).sum(0)))
register_criterion(Criterion("activation", "mean L2 norm of the head's context / mean |activation| of the neuron "
                             "(padding excluded)", stats=_ActivationStats))
register_criterion(Criterion("random", "seeded noise, a baseline", score=_random))

"""Importance scores per attention head ``(L, H)`` and per FFN neuron ``(L, I)``.

Criteria (pick by name, see :data:`CRITERIA`):

- ``magnitude``: squared L2 norm of the weights that exist only for that unit (no data needed).
- ``taylor``: sum over samples of ``|dL/dm|`` for the unit's mask ``m`` (Michel et al., 2019).
- ``fisher``: sum over samples of ``(dL/dm)^2``, the diagonal empirical Fisher of the masks (Kwon et al., 2022).
- ``activation``: mean L2 norm of the head's context vector / mean ``|activation|`` of the neuron over tokens.
- ``random``: seeded uniform noise (a baseline).

Gradient criteria need a loss. With labels in the batch it is the task loss. Without labels it is the
cross-entropy against the model's own predicted class for classifiers (the gradient of a KL to the model's own
predictions is zero at the current weights, so it cannot rank anything), and for regression heads and
headless encoders a random projection of the output (``sum(r * out)``, ``r ~ N(0, 1)``), whose squared
gradient estimates the output-sensitivity (Gauss-Newton) Fisher without labels.

Scores are indexed by ids of the *dense* model; units an earlier cut already removed are NaN.
Under ``torch.distributed`` scores are summed over processes, so every rank builds the same plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import get_adapter, model_dims
from .batches import CalibrationPass, batch_size, model_device
from .criteria import CRITERIA, Criterion, get_criterion
from .distributed import all_reduce_sum_
from .gradients import mask_grads
from .masks import LayerMasks
from .plan import PrunePlan
from .shapes import get_module, layer_list


@dataclass
class ImportanceScores:
    """Per-unit scores, higher = more important.

    Args:
        heads: ``(L, H)`` query-head scores, ids of the dense model; NaN for heads already removed.
        neurons: ``(L, I)`` FFN neuron scores, likewise.
        criterion: the criterion that produced them.
        num_samples: calibration samples seen (0 for data-free criteria).
        layers: ``(L,)`` whole-layer scores (:func:`hf_prune.depth.layer_importance`), NaN for layers already
            removed; None when depth is not pruned.
        hidden: ``(D,)`` hidden-channel scores (:func:`hf_prune.hidden.hidden_importance`), NaN for channels already
            removed; None when the hidden width is not pruned.
    """

    heads: torch.Tensor
    neurons: torch.Tensor
    criterion: str
    num_samples: int = 0
    layers: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    @classmethod
    def scatter(
        cls, current: PrunePlan, heads: list[torch.Tensor], neurons: list[torch.Tensor], criterion: str,
        num_samples: int = 0,
    ) -> "ImportanceScores":
        """Scores of the units a model cut to ``current`` still has (per layer it has, ``(H_l,)`` and ``(I_l,)``)
        placed at their dense ids in ``(L, H)`` / ``(L, I)`` tensors; removed units and layers are NaN."""
        h = torch.full((current.num_layers, current.num_heads), float("nan"))
        n = torch.full((current.num_layers, current.intermediate_size), float("nan"))
        for p, i in enumerate(current.kept_layers):
            h[i, current.heads[i]] = heads[p].detach().float().cpu()
            n[i, current.neurons[i]] = neurons[p].detach().float().cpu()
        return cls(h, n, criterion, num_samples)

    def only_layers(self, keep: list[int]) -> "ImportanceScores":
        """These scores with every unit of the layers not in ``keep`` (dense ids) marked removed (NaN)."""
        gone = [i for i in range(self.heads.shape[0]) if i not in set(keep)]
        h, n = self.heads.clone(), self.neurons.clone()
        h[gone] = float("nan")
        n[gone] = float("nan")
        return dataclasses.replace(self, heads=h, neurons=n)

    @property
    def comparable(self) -> bool:
        """Head and neuron scores share one scale (both measure the same loss's sensitivity)."""
        return self.criterion in CRITERIA and CRITERIA[self.criterion].gradient


def compute_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]] | None = None,
    criterion: str = "fisher",
    *,
    max_samples: int | None = None,
    seed: int = 0,
    progress: bool = True,
    offload: bool = False,
) -> ImportanceScores:
    """Score every head and FFN neuron of ``model``.

    Args:
        model: a supported transformers model (task head or base model; may already be pruned).
        dataloader: calibration batches (dicts of tensors as a ``Trainer`` would feed them); required by all
            criteria except ``magnitude`` and ``random``. ``labels`` are used when present.
        criterion: one of :data:`CRITERIA`.
        max_samples: stop after this many samples (whole batches).
        seed: for ``random`` and the label-free random projections.
        progress: show a progress bar.
        offload: gradient criteria backpropagate one layer at a time (:mod:`hf_prune.gradients`).
    """
    crit = get_criterion(criterion)
    current = PrunePlan.of(model)
    if crit.score is not None:
        local_h, local_n = crit.score(model, seed)
        n_samples = 0
    else:
        if dataloader is None:
            raise ValueError(f"criterion {criterion!r} needs calibration data: pass a dataloader")
        local_h, local_n, n_samples = _data_scores(model, dataloader, crit, max_samples, seed, progress, offload)
    return ImportanceScores.scatter(current, local_h, local_n, criterion, n_samples)


def per_sample_mask_grads(
    model: nn.Module, batch: dict[str, Any], n_heads: list[int], n_neurons: list[int], seed: int,
    streamed: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """Each sample's gradient of the loss w.r.t. every head and neuron mask: ``(B, H_l)`` tensors for the
    layers' heads, then ``(B, I_l)`` for their neurons (None where a mask does not reach the loss); ``streamed``: one
    layer at a time (:mod:`hf_prune.gradients`)."""
    bsz = batch_size(batch)
    device = model_device(model)
    masks = LayerMasks(len(n_heads))
    masks.heads = [torch.ones(bsz, h, device=device, requires_grad=True) for h in n_heads]  # (B, H_l)
    masks.neurons = [torch.ones(bsz, n, device=device, requires_grad=True) for n in n_neurons]  # (B, I_l)
    return mask_grads(model, batch, masks, masks.heads + masks.neurons, seed, streamed=streamed)


def _data_scores(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    crit: Criterion,
    max_samples: int | None,
    seed: int,
    progress: bool,
    offload: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    adapter = get_adapter(model)
    head_dim = model_dims(model)["head_dim"]
    layers = layer_list(model, adapter)
    device = model_device(model)
    n_heads = [get_module(l, adapter.q).out_features // head_dim for l in layers]
    n_neurons = [get_module(l, adapter.up).out_features for l in layers]
    head_acc = [torch.zeros(h, device=device) for h in n_heads]
    neuron_acc = [torch.zeros(n, device=device) for n in n_neurons]
    was_training = model.training
    model.eval()  # dropout off: scores must not depend on dropout noise
    data = CalibrationPass(dataloader, device, max_samples, f"{crit.name} scores", progress)
    try:
        for step, batch, _ in data:
            if crit.stats is not None:
                with torch.no_grad(), crit.stats(model, batch, head_acc, neuron_acc):
                    model(**{k: v for k, v in batch.items() if k != "labels"})
            else:
                grads = per_sample_mask_grads(model, batch, n_heads, n_neurons, seed + step, offload)
                for acc, g in zip(head_acc + neuron_acc, grads):
                    if g is not None:
                        acc += crit.reduce(g)
    finally:
        model.train(was_training)
    if data.seen == 0:
        raise ValueError(
            "the calibration dataloader yielded no batches: pass a non-empty dataloader "
            f"(got {data.total if data.total is not None else 'an empty iterable'})"
        )
    counts = torch.tensor([float(data.seen)], device=device)
    all_reduce_sum_(head_acc + neuron_acc + [counts])
    if crit.stats is not None:  # forward statistics are means over samples
        head_acc = [a / counts for a in head_acc]
        neuron_acc = [a / counts for a in neuron_acc]
    return head_acc, neuron_acc, int(counts.item())



"""Selection, a step every method can use: compare candidate cut models on held-out calibration samples, by how far
their outputs are from the dense model's (:func:`output_divergence`) or by their own task loss
(:func:`held_out_loss`); :func:`choose_depth` is ``depth_search`` (one candidate per layer count), :func:`choose_hidden`
``hidden_search`` (one candidate per hidden width)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .batches import Batch, batch_size, model_device, to_device
from .budget_kinds import BUDGETS
from .depth import depth_candidates
from .distributed import is_distributed
from .divergence import FidelitySums, model_output
from .masks import LayerMasks, mask_hooks
from .plan import PrunePlan
from .surgery import apply_plan_

#: Prepares a candidate's copy of the model before its cut (e.g. folds a refit into the kept weights), in place.
Prepare = Callable[[nn.Module], Any]
#: A context a masked candidate runs under besides its masks (e.g. refitted projections as hooks).
Patch = Callable[[nn.Module], contextlib.AbstractContextManager]


@torch.no_grad()
def output_divergence(
    model: nn.Module, batches: Sequence[Batch], candidates: Mapping[str, Callable[[], nn.Module]],
    details: dict[str, dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Mean per-sample divergence of each candidate model's outputs from ``model``'s.

    ``candidates`` maps names to functions that build the candidate (e.g. a cut copy, which runs at its kept
    FLOPs); they are built one at a time, so at most one copy of the model exists besides ``model``. The
    reference outputs are computed once and kept on the CPU. ``details``, when given, receives each candidate's
    label-free fidelity (:meth:`FidelitySums.result`: top-1 agreement, correlation or cosine beside the divergence).
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    inputs = [{k: v for k, v in raw.items() if k != "labels"} for raw in batches]
    refs, kl = [], False
    try:
        for x in inputs:
            ref, kl = model_output(model(**to_device(x, device)))
            refs.append(ref.cpu())
    finally:
        model.train(was_training)
    totals = {}
    for name, build in candidates.items():
        net = build().eval()
        sums = FidelitySums()
        for x, ref in zip(inputs, refs):
            out, _ = model_output(net(**to_device(x, device)))
            mask = x.get("attention_mask")
            sums.add(ref, out.cpu(), kl, None if mask is None else mask.cpu())
        del net
        if is_distributed():  # each rank holds out its own samples: add them up, so every rank keeps the same stage
            t = sums.as_tensor().to(device)
            torch.distributed.all_reduce(t)
            sums.load(t.cpu())
        result = sums.result()
        totals[name] = result["divergence"]
        if details is not None:
            details[name] = result
    return totals


@torch.no_grad()
def held_out_loss(
    model: nn.Module, batches: Sequence[Batch], candidates: Mapping[str, Callable[[], nn.Module]]
) -> dict[str, float]:
    """Each candidate's task loss (the model's ``loss`` on the batches' ``labels``), averaged over ``batches``
    weighted by their sizes; built one at a time as in :func:`output_divergence`. ``model`` only gives the device."""
    require_labels(batches)
    device = model_device(model)
    count = sum(batch_size(b) for b in batches)
    totals = {}
    for name, build in candidates.items():
        net = build().eval()
        totals[name] = sum(float(net(**to_device(b, device)).loss) * batch_size(b) for b in batches) / max(count, 1)
        del net
    return _rank_mean(totals, device)


def require_labels(batches: Sequence[Batch]) -> None:
    """Refuse batches without ``labels`` for ``selection_metric="task_loss"`` (before any long work)."""
    missing = sum("labels" not in b for b in batches)
    if missing:
        raise ValueError(f"selection_metric='task_loss' needs labels in the calibration batches ({missing} of "
                         f"{len(batches)} have none): add them (the task's labels, or labels=input_ids for a causal "
                         f"LM) or use selection_metric='divergence'")


#: ``selection_metric`` -> how candidates are scored (lower is better)
SELECTION_SCORES: dict[str, Callable[..., dict[str, float]]] = {"divergence": output_divergence,
                                                               "task_loss": held_out_loss}


def _rank_mean(totals: dict[str, float], device: torch.device) -> dict[str, float]:
    if is_distributed():  # each rank holds out its own samples: average, so every rank keeps the same stage
        t = torch.tensor(list(totals.values()), dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        totals = dict(zip(totals, (t / torch.distributed.get_world_size()).tolist()))
    return totals


def cut_candidate(model: nn.Module, plan: PrunePlan, prepare: Prepare | None = None) -> nn.Module:
    """A copy of ``model``, prepared (``prepare(copy)``, e.g. a refit folded in) and cut to ``plan``."""
    copied = copy.deepcopy(model)
    if prepare is not None:
        prepare(copied)
    return apply_plan_(copied, plan)


def masked_candidate(model: nn.Module, plan: PrunePlan, scales: LayerMasks | None = None,
                     patch: Patch | None = None) -> nn.Module:
    """``model`` itself under ``plan``'s masks (masked computes what cut computes): the candidate of a model whose
    weights cannot be copied, because accelerate offloads them, or should not be (``offload=True``). ``scales`` (a
    scales tuning's :meth:`~hf_prune.retraining_free.MaskTuning.layer_masks`) replace the 0/1 head and neuron
    masks of kept layers; ``patch(model)``, a context the candidate also runs under (a weights tuning's
    :func:`~hf_prune.retraining_free.fitted_projections`)."""
    masks = LayerMasks.of_plan(plan, PrunePlan.of(model), model_device(model))
    if scales is not None:
        for kind in ("heads", "neurons"):
            ours, theirs = getattr(masks, kind), getattr(scales, kind)
            setattr(masks, kind, [m if m is None else s.to(m) for m, s in zip(ours, theirs)])
    return _Masked(model, masks, patch)


class _Masked(nn.Module):
    def __init__(self, model: nn.Module, masks: LayerMasks, patch: Patch | None) -> None:
        super().__init__()
        self.model, self.masks, self.patch = model, masks, patch

    def train(self, mode: bool = True) -> "_Masked":  # the wrapped model's mode stays its owner's
        self.training = mode
        return self

    def forward(self, **inputs: Any) -> Any:
        was_training = self.model.training
        self.model.eval()
        try:
            patched = self.patch(self.model) if self.patch else contextlib.nullcontext()
            with patched, mask_hooks(self.model, self.masks):
                return self.model(**inputs)
        finally:
            self.model.train(was_training)


def choose_depth(
    model: nn.Module, held_out: Sequence[Batch], config: Any, make_plan: Callable[[Any], PrunePlan],
    dense_layers: int, tune: Callable[[PrunePlan], Prepare] | None = None,
) -> PrunePlan:
    """``config.depth_search``: one plan per number of layers kept (``make_plan(config with that layers_keep)``;
    counts whose width budget is unreachable are skipped), and the one whose cut model is closest to ``model``'s
    outputs on ``held_out`` (or, with ``config.selection_metric="task_loss"``, has the lowest loss there); its
    ``meta["depth_search"]`` records every candidate's score under ``divergence``.

    ``tune(plan)``: fit each candidate before it is compared, returning what prepares its copy (retraining-free: the
    refit recovers far more of a width cut than of a depth cut, so untuned candidates would be judged on what the
    pipeline does not deliver)."""
    keep = next(v for k, v in config.budget().items() if BUDGETS[k].trades_depth)
    plans: dict[str, PrunePlan] = {}
    have = len(PrunePlan.of(model).kept_layers)
    for frac in depth_candidates(have, dense_layers, keep):
        try:
            plan = make_plan(dataclasses.replace(config, layers_keep=frac, depth_search=False))
        except ValueError:  # this many layers cannot hold the width budget's floor
            continue
        plans[str(len(plan.kept_layers))] = plan
    if not plans:
        raise ValueError(f"depth_search found no layer count that meets {config.budget()}: raise the budget")
    def build(plan: PrunePlan) -> nn.Module:
        return cut_candidate(model, plan, tune(plan) if tune is not None else None)

    score = SELECTION_SCORES[config.selection_metric]
    divergence = score(model, held_out, {n: functools.partial(build, p) for n, p in plans.items()})
    chosen = min(divergence, key=divergence.get)
    plan = plans[chosen]
    plan.meta["depth_search"] = {"divergence": divergence, "chosen": int(chosen), "tuned": tune is not None,
                                 "samples": sum(batch_size(b) for b in held_out),
                                 "metric": config.selection_metric}
    return plan


#: hidden widths ``hidden_search`` tries, as fractions of the dense hidden size
HIDDEN_CANDIDATES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def choose_hidden(model: nn.Module, held_out: Sequence[Batch], config: Any,
                  make_plan: Callable[[Any], PrunePlan]) -> PrunePlan:
    """``config.hidden_search``: one plan per hidden width in :data:`HIDDEN_CANDIDATES` (``make_plan(config with that
    hidden_keep)``: the cost budget is then spent on heads and neurons at that width; widths the budget cannot reach
    are skipped), and the one whose cut model is closest to ``model``'s outputs on ``held_out`` (or with the lowest
    task loss); its ``meta["hidden_search"]`` records every candidate's score."""
    plans: dict[str, PrunePlan] = {}
    for frac in HIDDEN_CANDIDATES:
        try:
            plan = make_plan(dataclasses.replace(config, hidden_keep=frac, hidden_search=False))
        except ValueError:  # the width's embeddings alone exceed the budget, or it leaves no unit
            continue
        plans.setdefault(str(plan.hidden_channels), plan)
    if not plans:
        raise ValueError(f"hidden_search found no hidden width that meets {config.budget()}: raise the budget")
    score = SELECTION_SCORES[config.selection_metric]
    divergence = score(model, held_out, {n: functools.partial(cut_candidate, model, p) for n, p in plans.items()})
    chosen = min(divergence, key=divergence.get)
    plan = plans[chosen]
    plan.meta["hidden_search"] = {"divergence": divergence, "chosen": int(chosen),
                                  "samples": sum(batch_size(b) for b in held_out), "metric": config.selection_metric}
    return plan

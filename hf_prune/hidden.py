"""Hidden-channel importance ``(D,)`` and the channels a ``hidden_keep`` budget keeps.

The residual stream is one width shared by every layer, so a hidden channel is scored once for the whole model:

- ``activation``: per channel, the mean magnitude of every norm's output over calibration tokens, summed over the
  norms (Minitron, Muralidharan et al. 2024, rank embedding channels by their LayerNorm activations);
- ``fisher`` / ``taylor``: squared / absolute gradient of the loss with respect to a per-sample channel mask
  (:mod:`hf_prune.masks`: the mask zeroes the channel everywhere in the stream and the norms run over the kept
  channels, so the mask's gradient is the sensitivity of the cut the budget will make);
- ``magnitude``: the channel's share of every tensor carrying it (squared weights, each tensor normalised), no data;
- ``random``: seeded noise, a baseline.

Scores are indexed by dense channel ids; channels an earlier cut removed are NaN. Under ``torch.distributed`` they
are summed over processes. Add a criterion with :func:`register_hidden_criterion`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import get_adapter
from .batches import CalibrationPass, batch_size, model_device
from .channels import hidden_slots, hidden_width
from .distributed import all_reduce_sum_
from .gradients import per_sample_loss
from .masks import LayerMasks, mask_hooks
from .plan import PrunePlan
from .shapes import get_module, layer_list

#: (model, calibration batches or None, max samples, seed, progress) -> per-channel scores (D_now,), and samples seen
HiddenScore = Callable[[nn.Module, Any, "int | None", int, bool], "tuple[torch.Tensor, int]"]


@dataclass(frozen=True)
class HiddenCriterion:
    """A way to score hidden channels.

    Args:
        name: the ``PruningConfig(hidden_importance=...)`` value.
        description: one line for help and errors.
        score: computes the scores of the channels the model has now.
        needs_data: whether it reads calibration batches.
        whole_model_gradient: it backpropagates through the whole model at once (a channel mask spans every layer),
            so it cannot run one layer at a time (``PruningConfig(offload=True)`` refuses it).
    """

    name: str
    description: str
    score: HiddenScore
    needs_data: bool = True
    whole_model_gradient: bool = False


HIDDEN_CRITERIA: dict[str, HiddenCriterion] = {}


def register_hidden_criterion(criterion: HiddenCriterion) -> HiddenCriterion:
    """Make ``criterion`` usable as ``PruningConfig(hidden_importance=criterion.name)``."""
    if criterion.name in HIDDEN_CRITERIA:
        raise ValueError(f"a hidden-channel criterion named {criterion.name!r} is already registered")
    HIDDEN_CRITERIA[criterion.name] = criterion
    return criterion


def hidden_importance(model: nn.Module, dataloader: Iterable[Mapping[str, Any]] | None, criterion: str = "activation",
                      *, max_samples: int | None = None, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Scores ``(D,)`` of the dense model's hidden channels (NaN for channels already removed), higher = keep."""
    crit = HIDDEN_CRITERIA.get(criterion)
    if crit is None:
        raise ValueError(f"unknown hidden_importance {criterion!r}; choose one of {', '.join(HIDDEN_CRITERIA)}")
    if crit.needs_data and dataloader is None:
        raise ValueError(f"hidden_importance={criterion!r} scores channels on calibration data: pass a dataloader "
                         "(or use 'magnitude')")
    current = PrunePlan.of(model)
    local, seen = crit.score(model, dataloader, max_samples, seed, progress)
    if crit.needs_data:
        if seen == 0:
            raise ValueError("the calibration dataloader yielded no batches: pass a non-empty dataloader")
        count = torch.tensor([float(seen)], device=local.device)
        all_reduce_sum_([local, count])
        local = local / count
    out = torch.full((current.hidden_size,), float("nan"))
    out[current.kept_hidden] = local.detach().float().cpu()
    return out


#: a fraction of a hidden size that is a multiple of this (and at least 8 times it) keeps a multiple of it too:
#: llama.cpp quantizes a row in whole 32-element blocks (a row of 518 stays f16 in a q4_k_m file) and its matmul
#: kernels take a slow path on such widths (measured: prompt processing at 0.70x of dense for 518 channels of 576)
CHANNEL_MULTIPLE = 32


def hidden_count(value: float, hidden_size: int) -> int:
    """The channels a ``hidden_keep`` of ``value`` keeps: a count above 1 as given; a fraction of ``hidden_size``
    rounded to the nearest multiple of :data:`CHANNEL_MULTIPLE` where the size is one (tiny test models are not)."""
    if value > 1:
        return int(value)
    q = CHANNEL_MULTIPLE if hidden_size % CHANNEL_MULTIPLE == 0 and hidden_size >= 8 * CHANNEL_MULTIPLE else 1
    return max(q, round(value * hidden_size / q) * q)


def channels_to_keep(scores: torch.Tensor, value: float, current: PrunePlan) -> list[int]:
    """Dense ids of the channels a ``hidden_keep`` of ``value`` keeps (:func:`hidden_count`): the best-scored of
    those ``current`` has."""
    n = hidden_count(value, current.hidden_size)
    have = current.kept_hidden
    if not 1 <= n <= len(have):
        raise ValueError(f"hidden_keep={value} keeps {n} hidden channels, but the model has {len(have)}: keep between "
                         f"1 and {len(have)}")
    order = sorted(have, key=lambda c: -float(torch.nan_to_num(scores[c], nan=-float("inf"))))
    return sorted(order[:n])


# ------------------------------------------------------------------------------------------------ criteria


def _norm_modules(model: nn.Module) -> list[nn.Module]:
    """Every module normalising the stream: owners of a 1-D hidden-channel tensor that are not projections."""
    names = {n.rpartition(".")[0] for n, dims in hidden_slots(model, get_adapter(model)).items()}
    out = []
    for name in sorted(names):
        module = get_module(model, name) if name else model
        if not isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and any(
            p.dim() == 1 for p in module.parameters(recurse=False)
        ):
            out.append(module)
    return out


@torch.no_grad()
def _activation(model: nn.Module, dataloader: Any, max_samples: int | None, seed: int, progress: bool):
    device = model_device(model)
    acc = torch.zeros(hidden_width(model, get_adapter(model)), device=device)
    state: dict[str, Any] = {}

    def hook(_module, _args, output):
        y = output[0] if isinstance(output, tuple) else output  # (B, ..., D)
        keep = state.get("tokens")
        flat = y.reshape(-1, y.shape[-1]).abs().float()
        if keep is not None and keep.numel() == flat.shape[0]:  # padding tokens say nothing about the channels
            flat = flat[keep]
        acc.add_(flat.mean(0) * state["bsz"])

    handles = [m.register_forward_hook(hook) for m in _norm_modules(model)]
    was_training = model.training
    model.eval()
    data = CalibrationPass(dataloader, device, max_samples, "hidden activation scores", progress)
    try:
        for _, batch, bsz in data:
            mask = batch.get("attention_mask")
            state.update(bsz=bsz, tokens=mask.reshape(-1).bool() if mask is not None else None)
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return acc, data.seen


def _gradient(reduce: Callable[[torch.Tensor], torch.Tensor]):
    def score(model: nn.Module, dataloader: Any, max_samples: int | None, seed: int, progress: bool):
        device = model_device(model)
        width = hidden_width(model, get_adapter(model))
        acc = torch.zeros(width, device=device)
        n_layers = len(layer_list(model, get_adapter(model)))
        was_training = model.training
        model.eval()  # dropout off: scores must not depend on dropout noise
        data = CalibrationPass(dataloader, device, max_samples, "hidden gradient scores", progress)
        try:
            for step, batch, _ in data:
                masks = LayerMasks(n_layers)
                masks.hidden = torch.ones(batch_size(batch), width, device=device, requires_grad=True)  # (B, D)
                with mask_hooks(model, masks):
                    loss = per_sample_loss(model, batch, seed + step)
                (grad,) = torch.autograd.grad(loss, [masks.hidden])
                acc += reduce(grad.float()).sum(0)
        finally:
            model.train(was_training)
        return acc, data.seen

    return score


@torch.no_grad()
def _magnitude(model: nn.Module, dataloader: Any, max_samples: int | None, seed: int, progress: bool):
    adapter = get_adapter(model)
    width = hidden_width(model, adapter)
    acc = torch.zeros(width)
    params = dict(model.named_parameters())
    for name, dims in hidden_slots(model, adapter).items():
        w = params[name].detach().float().cpu().pow(2)
        for d in dims:  # a channel's share of the tensor, on each side it carries channels
            rest = [i for i in range(w.dim()) if i != d]
            per = w.sum(rest) if rest else w
            acc += per / per.sum().clamp_min(1e-12)
    return acc, 0


def _random(model: nn.Module, dataloader: Any, max_samples: int | None, seed: int, progress: bool):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(hidden_width(model, get_adapter(model)), generator=g), 0


for _crit in (
    HiddenCriterion("activation", "mean |norm output| per channel over calibration tokens (Minitron)", _activation),
    HiddenCriterion("fisher", "squared gradient of a per-sample channel mask", _gradient(lambda g: g.pow(2)),
                    whole_model_gradient=True),
    HiddenCriterion("taylor", "absolute gradient of a per-sample channel mask", _gradient(torch.abs),
                    whole_model_gradient=True),
    HiddenCriterion("magnitude", "the channel's share of the weights carrying it (no data)", _magnitude,
                    needs_data=False),
    HiddenCriterion("random", "seeded uniform noise (a baseline)", _random, needs_data=False),
):
    register_hidden_criterion(_crit)

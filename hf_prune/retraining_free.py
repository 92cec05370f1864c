"""Retraining-free structured pruning, after Kwon et al. (2022), "A Fast Post-Training Pruning Framework for
Transformers". No gradient step touches the weights; one calibration pass gives mask gradients, and a few
layer-by-layer forward passes fit, by least squares, what the cut layers need to reconstruct the dense ones;
the fit is folded into the kept weights.

Stages (one function each, chained by :func:`prune_retraining_free`):

1. :func:`fisher_information`: per-sample gradients of head and neuron masks (one forward+backward over the
   calibration set) give, per layer, the full Fisher matrix of its head masks ``(H, H)`` and of its neuron
   masks ``(I, I)``. Its diagonal is the ``fisher`` importance score.
2. :func:`search_masks`: how many heads/neurons each layer keeps, maximising the kept diagonal Fisher under a
   budget. FLOPs (and the other :class:`PruningConfig` budgets) go through :func:`hf_prune.build_plan`, which
   is the paper's search: try every total number of kept heads, fill the rest with the best neurons. A
   latency budget uses a per-layer latency lookup table (:class:`LatencyTable`, measured on the user's
   device) and an exact knapsack over per-layer kept counts (:func:`search_latency`).
3. :func:`rearrange_masks`: with each layer's counts fixed, swap kept/removed units to minimise the
   second-order loss estimate ``1/2 (1 - m)^T F (1 - m)`` with the layer's full Fisher block ``F``.
4. :func:`tune_masks`: layer by layer, least squares make the cut layer's residual sums reconstruct the dense
   model's on the calibration set. ``fit="scales"`` is the paper's one scale per kept head/neuron;
   ``fit="weights"`` (the default) refits the whole attention-output and FFN down projections (weights and
   biases; ridge towards the cut weights), same passes, far closer to the dense model. :func:`fold_tuning_`
   writes either into the kept weights, so the cut model has no extra parameters. In the last layer only
   the positions the model's output reads are fitted (a classifier's [CLS]).
5. Selection (:func:`prune_retraining_free`, ``config.select_stages``): each stage optimises a proxy, so the
   searched, rearranged and tuned candidates (the search plan tuned too when rearrangement changed it, and the
   final plan with scales as well when the fit is weights) are compared on held-out calibration samples by how
   far their outputs are from the dense model's, and the closest is cut.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterator, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from transformers.cache_utils import Cache

from .adapters import get_adapter, model_dims
from .config import TUNING_FITS
from .costs import _time_once, dummy_inputs
from .distributed import all_reduce_sum_, is_distributed
from .importance import ImportanceScores, _batch_size, _to_device, per_sample_mask_grads
from .masks import LayerMasks
from .modeling_pruned import get_module, layer_list, prune_layer_
from .plan import PrunePlan, build_plan
from .surgery import apply_plan_

if TYPE_CHECKING:
    from .config import PruningConfig

M = TypeVar("M", bound=nn.Module)
Batch = dict[str, Any]

# ----------------------------------------------------------------------------------------------- data


def collect_batches(dataloader: Iterable[Mapping[str, Any]], max_samples: int | None) -> list[Batch]:
    """The calibration batches, up to ``max_samples`` samples (whole batches), held so that every stage
    sees the same samples (a dataloader may reshuffle or be a one-shot iterator)."""
    batches: list[Batch] = []
    seen = 0
    for raw in dataloader:
        batches.append(dict(raw))
        seen += _batch_size(raw)
        if max_samples is not None and seen >= max_samples:
            break
    if not batches:
        raise ValueError("the calibration dataloader yielded no batches: retraining-free pruning needs data")
    return batches


def by_length(batches: Sequence[Batch]) -> list[Batch]:
    """The same samples re-batched shortest first, each batch trimmed to its longest sample.

    Random batches of sentences are padded to their longest one (SST-2 phrases: about half the tokens are
    padding); sorted, the padding nearly vanishes and so does its compute. Per-sample quantities (the Fisher
    sums of ``g g^T``, reconstruction errors over real tokens, per-sample divergences) do not depend on the
    batching. Applies only when that is safe: every batch a dict of tensors with the same keys, an
    ``attention_mask`` padded on the right, and every other tensor either per token ``(B, T, ...)`` or per
    sample ``(B, ...)``; otherwise (images, left padding) the batches are returned as they are.
    """
    batches = list(batches)
    if not batches or not all(_right_padded(b) and b.keys() == batches[0].keys() for b in batches):
        return batches
    rows = []  # (length, batch, row)
    for b in batches:
        for r, n in enumerate(b["attention_mask"].sum(1).tolist()):
            rows.append((int(n), b, r))
    rows.sort(key=lambda x: x[0])  # stable: equal lengths keep their order
    size = max(_batch_size(b) for b in batches)
    pads = {key: _pad_value(batches, key) for key in batches[0]}
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        width = max(1, chunk[-1][0])
        new = {}
        for key in batches[0]:
            # per token: (B, T, ...) like the mask, trimmed (or padded) to ``width``; else per sample (B, ...)
            try:
                picked = [_fit(b[key][r], width, pads[key]) if _per_token(b, key) else b[key][r] for _, b, r in chunk]
                new[key] = torch.stack(picked)
            except RuntimeError:  # per-sample shapes differ between batches, or a pad value is unknown
                return batches
        out.append(new)
    return out


def _per_token(batch: Mapping[str, Any], key: str) -> bool:
    value, mask = batch[key], batch["attention_mask"]
    return value.dim() >= 2 and tuple(value.shape[:2]) == tuple(mask.shape)


def _pad_value(batches: Sequence[Batch], key: str) -> torch.Tensor | None:
    """What ``key`` holds at padded positions (the tokenizer's pad id for ``input_ids``); None if never padded
    (then it is unknown: decoder classifiers find the last token by the pad id, so guessing one is unsafe)."""
    for b in batches:
        if _per_token(b, key):
            pad = b["attention_mask"] == 0  # (B, T)
            if pad.any():
                return b[key][pad][0]
    return None


def _fit(row: torch.Tensor, width: int, pad: torch.Tensor | None) -> torch.Tensor:
    """One sample's ``(T, ...)`` per-token row cut or right-padded with ``pad`` to ``width``."""
    if row.shape[0] >= width:
        return row[:width]
    if pad is None:
        raise RuntimeError("no pad value seen for this key")
    filler = torch.as_tensor(pad, dtype=row.dtype, device=row.device).expand(width - row.shape[0], *row.shape[1:])
    return torch.cat([row, filler])


def _right_padded(batch: Mapping[str, Any]) -> bool:
    """A dict of tensors with a leading batch axis and a ``(B, T)`` attention mask padded on the right."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return False
    if not all(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == mask.shape[0] for v in batch.values()):
        return False
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _current_positions(plan: PrunePlan, current: PrunePlan) -> tuple[list[list[int]], list[list[int]]]:
    """Positions, in the layers as they are now, of the heads/neurons ``plan`` keeps (dense ids)."""
    heads = [[cur.index(h) for h in kept] for cur, kept in zip(current.heads, plan.heads)]
    neurons = [[{n: p for p, n in enumerate(cur)}[n] for n in kept] for cur, kept in zip(current.neurons, plan.neurons)]
    return heads, neurons


# ----------------------------------------------------------------------------------------------- 1. Fisher


@dataclass
class FisherInfo:
    """Empirical Fisher of the head and neuron masks, one block per layer (positions in the layer as it is
    now; ids of the dense model via ``current``).

    Args:
        heads: per layer, ``(H_l, H_l)`` sum over samples of ``g g^T``, ``g`` the head-mask gradient.
        neurons: per layer, ``(I_l, I_l)`` likewise for the FFN neuron masks.
        current: the plan the model carried when the Fisher was computed.
        num_samples: calibration samples seen.
    """

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    current: PrunePlan
    num_samples: int

    def scores(self) -> ImportanceScores:
        """The diagonal as ``fisher`` importance scores ``(L, H)`` / ``(L, I)`` in dense ids (NaN = removed)."""
        c = self.current
        heads = torch.full((c.num_layers, c.num_heads), float("nan"))
        neurons = torch.full((c.num_layers, c.intermediate_size), float("nan"))
        for i in range(c.num_layers):
            heads[i, c.heads[i]] = self.heads[i].diagonal().float().cpu()
            neurons[i, c.neurons[i]] = self.neurons[i].diagonal().float().cpu()
        return ImportanceScores(heads, neurons, "fisher", self.num_samples)


def fisher_information(
    model: nn.Module, batches: Sequence[Batch], *, seed: int = 0, progress: bool = True
) -> FisherInfo:
    """Per-layer Fisher blocks of the head and neuron masks from per-sample mask gradients.

    The loss is the one :func:`hf_prune.compute_importance` uses: the task loss with labels, the model's own
    predicted class (classifiers) or a random output projection (regression / headless) without.
    """
    adapter = get_adapter(model)
    head_dim = model_dims(model)["head_dim"]
    layers = layer_list(model, adapter)
    device = _device(model)
    n_heads = [get_module(l, adapter.q).out_features // head_dim for l in layers]
    n_neurons = [get_module(l, adapter.up).out_features for l in layers]
    f_heads = [torch.zeros(h, h, device=device) for h in n_heads]
    f_neurons = [torch.zeros(n, n, device=device) for n in n_neurons]
    seen = 0
    was_training = model.training
    model.eval()  # dropout off: the Fisher must not depend on dropout noise
    try:
        for step, raw in enumerate(tqdm(batches, desc="fisher", unit="batch", disable=not progress)):
            batch = _to_device(raw, device)
            bsz = _batch_size(batch)
            grads = per_sample_mask_grads(model, batch, n_heads, n_neurons, seed + step)
            for acc, g in zip(f_heads + f_neurons, grads):
                if g is not None:
                    g = g.float()  # (B, n): row s is sample s's gradient
                    acc += g.T @ g  # (n, n)
            seen += bsz
    finally:
        model.train(was_training)
    counts = torch.tensor([float(seen)], device=device)
    all_reduce_sum_(f_heads + f_neurons + [counts])
    seen = int(counts.item())
    return FisherInfo(f_heads, f_neurons, PrunePlan.of(model), seen)


# ----------------------------------------------------------------------------------------------- latency LUT


@dataclass
class LatencyTable:
    """Measured latency of one transformer layer on one device, as a function of its kept sizes:
    ``layer(k, n) = fixed_ms + attention(k) + ffn(n)``, each term interpolated piecewise-linearly between
    measured points. ``attention(0) = ffn(0) = 0``: norms, residuals and output biases are in ``fixed_ms``.

    Args:
        head_points: query-head counts measured (ascending, from 0).
        head_ms: ``attention(k)`` at those counts, milliseconds.
        neuron_points: FFN neuron counts measured (ascending, from 0).
        neuron_ms: ``ffn(n)`` at those counts.
        fixed_ms: the rest of one layer.
        num_layers: layers of the model (all share one table: they have the same shapes).
        batch_size, seq_len: input shape of the measurement.
        device: where it was measured.
    """

    head_points: list[int]
    head_ms: list[float]
    neuron_points: list[int]
    neuron_ms: list[float]
    fixed_ms: float
    num_layers: int
    batch_size: int = 1
    seq_len: int = 128
    device: str = "cpu"

    def attention(self, k: float | np.ndarray) -> np.ndarray:
        return np.interp(k, self.head_points, self.head_ms)

    def ffn(self, n: float | np.ndarray) -> np.ndarray:
        return np.interp(n, self.neuron_points, self.neuron_ms)

    def layer_ms(self, num_heads: int, intermediate_size: int) -> float:
        return float(self.fixed_ms + self.attention(num_heads) + self.ffn(intermediate_size))

    def dense_ms(self) -> float:
        """Encoder latency of the dense model predicted by the table."""
        return self.num_layers * self.layer_ms(self.head_points[-1], self.neuron_points[-1])

    def plan_ms(self, plan: PrunePlan) -> float:
        """Encoder latency of the model ``plan`` gives, predicted by the table."""
        return sum(self.layer_ms(s["num_heads"], s["intermediate_size"]) for s in plan.layer_sizes())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatencyTable":
        return cls(**data)


def _points(full: int, step: int, fractions: Sequence[float]) -> list[int]:
    """Counts ``fraction * full`` rounded to multiples of ``step``, with 0 and ``full``."""
    pts = {0, full} | {min(full, max(step, round(f * full / step) * step)) for f in fractions}
    return sorted(pts)


def _without_caches(values: Any) -> Any:
    """``values`` (a layer call's args tuple or kwargs dict) with every KV cache replaced by None.

    A cache would grow on every replay of the layer. Found by type, not by argument name: transformers has
    renamed the argument (``past_key_value``, ``past_key_values``, ``cache``) across 5.x releases.
    """
    if isinstance(values, dict):
        return {k: None if isinstance(v, Cache) else v for k, v in values.items()}
    return tuple(None if isinstance(v, Cache) else v for v in values)


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
        args, kwargs = _without_caches(args), _without_caches(dict(kwargs))
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        calls[i] = (rest, kwargs)
        if i == 0:
            first["hidden"] = hidden
        if i == len(layers) - 1:
            raise _Stop

    def post(_m, _args, output):
        first["out"] = output[0] if isinstance(output, tuple) else output

    handles = [layer.register_forward_pre_hook(functools.partial(pre, i=i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    handles.append(layers[0].register_forward_hook(post))
    try:
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k != "labels"})
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in calls):
        raise RuntimeError(f"{type(model).__name__} did not call every decoder/encoder layer in its forward pass")
    if "out" not in first:  # a one-layer model stops before its layer runs
        first["out"] = _run_layer(layers[0], _LayerInput(first["hidden"], calls, None), first["hidden"])
    return first["hidden"], calls, first["out"]  # type: ignore[return-value]


def _capture_layer_call(model: nn.Module, layer: nn.Module, inputs: Batch) -> tuple[tuple, dict]:
    """The positional and keyword arguments ``layer`` receives when ``model`` runs on ``inputs``."""
    hidden, calls, _ = capture_layer_calls(model, [layer], inputs)
    rest, kwargs = calls[0]
    return (hidden, *rest), kwargs


def measure_latency_table(
    model: nn.Module,
    batch_size: int = 1,
    seq_len: int = 128,
    *,
    head_fractions: Sequence[float] = (0.25, 0.5, 0.75),
    neuron_fractions: Sequence[float] = (0.125, 0.25, 0.5, 0.75),
    round_to: int = 1,
    warmup: int = 2,
    repeats: int = 20,
    progress: bool = True,
) -> LatencyTable:
    """Time one layer of ``model`` (a dense model) cut to a few head counts (full FFN) and neuron counts
    (all heads), on this device, and build a :class:`LatencyTable`.

    All variants are timed interleaved, run by run, so machine noise hits them alike. Each variant's
    fastest run is used: on a shared machine, interference only ever adds time, so the minimum is the most
    repeatable estimate. Differences are then made non-decreasing in the kept count (a smaller block is never
    slower; noise can say otherwise).
    """
    dense = PrunePlan.dense(model)
    if PrunePlan.of(model).layer_sizes() != dense.layer_sizes():
        raise ValueError("measure the latency table on the dense model (it is the reference of latency_keep)")
    adapter = get_adapter(model)
    dims = model_dims(model)
    layer = layer_list(model, adapter)[0]
    args, kwargs = _capture_layer_call(model, layer, dummy_inputs(model, batch_size, seq_len))
    group = dense.group_size
    head_points = _points(dims["num_heads"], group, head_fractions)
    neuron_points = _points(dims["intermediate_size"], round_to, neuron_fractions)
    variants: dict[tuple[int, int], nn.Module] = {}
    for k in head_points:
        variants[(k, dims["intermediate_size"])] = _cut_copy(layer, adapter, dims["head_dim"], group, k, None)
    for n in neuron_points:
        variants[(dims["num_heads"], n)] = _cut_copy(layer, adapter, dims["head_dim"], group, None, n)
    times: dict[tuple[int, int], list[float]] = {key: [] for key in variants}
    calls = {key: _LayerCall(v, args, kwargs).eval() for key, v in variants.items()}  # copies: no dropout
    with torch.inference_mode():
        for r in tqdm(range(warmup + repeats), desc="latency table", disable=not progress):
            for key, call in calls.items():
                ms = _time_once(call, {})
                if r >= warmup:
                    times[key].append(ms)
    med = {key: min(t) for key, t in times.items()}
    full = (dims["num_heads"], dims["intermediate_size"])
    head_ms = _monotone([med[(k, full[1])] - med[(0, full[1])] for k in head_points])
    neuron_ms = _monotone([med[(full[0], n)] - med[(full[0], 0)] for n in neuron_points])
    fixed = max(0.0, med[full] - head_ms[-1] - neuron_ms[-1])
    return LatencyTable(
        head_points, head_ms, neuron_points, neuron_ms, fixed, dims["num_layers"], batch_size, seq_len,
        str(_device(model)),
    )


class _LayerCall(nn.Module):
    """A layer bound to captured arguments, callable with no inputs (for ``_time_once``)."""

    def __init__(self, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.layer, self.args, self.kwargs = layer, args, kwargs

    def forward(self) -> Any:
        return self.layer(*self.args, **self.kwargs)


def _cut_copy(layer: nn.Module, adapter, head_dim: int, group: int, heads: int | None, neurons: int | None):
    c = copy.deepcopy(layer)
    prune_layer_(
        c, adapter, head_dim, group,
        None if heads is None else list(range(heads)),
        None if neurons is None else list(range(neurons)),
    )
    return c


def _monotone(ms: list[float]) -> list[float]:
    """Clip at 0 (the empty block) and make non-decreasing."""
    return np.maximum.accumulate(np.maximum(0.0, np.asarray(ms))).tolist()


# ----------------------------------------------------------------------------------------------- 2. search


def search_masks(
    fisher: FisherInfo, model: nn.Module, config: "PruningConfig", latency_table: LatencyTable | None = None
) -> PrunePlan:
    """Kept heads and neurons per layer maximising the kept diagonal Fisher under ``config``'s budget.

    ``config.latency_keep`` uses ``latency_table`` (measured on ``model`` if None); every other budget is
    :func:`hf_prune.build_plan` on the diagonal Fisher.
    """
    scores = fisher.scores()
    if getattr(config, "latency_keep", None) is None:
        plan = build_plan(scores, model, config)
    else:
        if latency_table is None:
            latency_table = measure_latency_table(
                model, config.latency_batch_size, config.seq_len, round_to=config.round_to, progress=config.progress
            )
        plan = search_latency(
            scores, model, latency_table, config.latency_keep,
            round_to=config.round_to, allow_empty_layers=config.allow_empty_layers,
        )
        plan.meta.update({"budget": config.budget(), "latency_table": latency_table.to_dict()})
    plan.meta["search"] = "fisher"
    return plan


@dataclass
class _Choice:
    """Options for one block (one layer's attention or FFN): keep the first ``counts[j]`` ranked ids."""

    layer: int
    kind: str  # "heads" or "neurons"
    ranked: list[int]  # ids, best first
    counts: np.ndarray  # (K,) ids kept by option j
    value: np.ndarray  # (K,) kept diagonal Fisher
    cost: np.ndarray  # (K,) milliseconds


def _head_choices(row: torch.Tensor, layer: int, group: int, floor: int, table: LatencyTable) -> _Choice:
    # row: (H,) diagonal Fisher of one layer's heads, NaN = already removed; whole KV groups go together.
    g = row.view(-1, group)  # (KV, group)
    avail = [k for k in range(g.shape[0]) if not torch.isnan(g[k]).any()]
    ranked_groups = sorted(avail, key=lambda k: -float(g[k].sum()))
    ranked = [k * group + j for k in ranked_groups for j in range(group)]
    n = np.arange(min(floor, len(ranked_groups)), len(ranked_groups) + 1)  # groups kept
    prefix = np.concatenate([[0.0], np.cumsum([float(g[k].sum()) for k in ranked_groups])])
    return _Choice(layer, "heads", ranked, n * group, prefix[n], table.attention(n * group))


def _neuron_choices(row: torch.Tensor, layer: int, round_to: int, floor: int, table: LatencyTable) -> _Choice:
    # row: (I,) diagonal Fisher of one layer's neurons, NaN = already removed.
    avail = (~torch.isnan(row)).nonzero().view(-1)
    ranked = avail[torch.argsort(row[avail], descending=True, stable=True)].tolist()
    counts = sorted({min(len(ranked), b * round_to) for b in range(floor, math.ceil(len(ranked) / round_to) + 1)})
    counts_a = np.asarray(counts)
    prefix = np.concatenate([[0.0], np.cumsum(row[ranked].double().numpy())])
    return _Choice(layer, "neurons", ranked, counts_a, prefix[counts_a], table.ffn(counts_a))


def _knapsack(choices: list[_Choice], budget: float, bins: int) -> list[int]:
    """Pick one option per block maximising total value with total cost <= ``budget`` (exact up to the cost
    grid). Costs are rounded *up* to the grid, so the chosen options never exceed the true budget."""
    unit = budget / bins
    dp = np.zeros(bins + 1)  # (bins + 1,) best value with cost <= b grid units
    picks = []
    for c in choices:
        cost = np.ceil(c.cost / unit).astype(np.int64)  # (K,)
        idx = np.arange(bins + 1)[None, :] - cost[:, None]  # (K, bins + 1)
        cand = np.where(idx >= 0, dp[np.clip(idx, 0, None)] + c.value[:, None], -np.inf)
        picks.append(cand.argmax(0))  # (bins + 1,)
        dp = cand.max(0)
    if not np.isfinite(dp[bins]):
        raise ValueError(
            "latency budget unreachable: even the smallest allowed layers (one head group and one neuron block "
            "each) are slower than it; raise latency_keep or set allow_empty_layers=True"
        )
    chosen, b = [], bins
    for c, pick in zip(reversed(choices), reversed(picks)):
        j = int(pick[b])
        chosen.append(j)
        b -= int(np.ceil(c.cost[j] / unit))
    return chosen[::-1]


def search_latency(
    scores: ImportanceScores,
    model: nn.Module,
    table: LatencyTable,
    latency_keep: float,
    *,
    round_to: int = 1,
    allow_empty_layers: bool = False,
    bins: int = 4000,
) -> PrunePlan:
    """Kept heads/neurons per layer maximising the kept diagonal Fisher with the table's predicted encoder
    latency at most ``latency_keep`` of the dense model's.

    Within a layer the best-scored units are kept; across layers the number kept per block is an exact
    multiple-choice knapsack (dynamic programming over a grid of ``bins`` latency steps), which handles a
    latency that is not proportional to the kept count (fixed overheads, kernel-size steps).
    """
    current = PrunePlan.of(model)
    floor = 0 if allow_empty_layers else 1
    L = current.num_layers
    choices = []
    for i in range(L):
        choices.append(_head_choices(scores.heads[i], i, current.group_size, floor, table))
        choices.append(_neuron_choices(scores.neurons[i], i, round_to, floor, table))
    budget = latency_keep * table.dense_ms() - L * table.fixed_ms
    if budget <= 0:
        raise ValueError(
            f"latency_keep={latency_keep} is unreachable: the parts of a layer pruning cannot remove (norms, "
            f"residuals) already take {L * table.fixed_ms:.3g} of {table.dense_ms():.3g} ms"
        )
    picked = _knapsack(choices, budget, bins)
    heads: list[list[int]] = [[] for _ in range(L)]
    neurons: list[list[int]] = [[] for _ in range(L)]
    for c, j in zip(choices, picked):
        (heads if c.kind == "heads" else neurons)[c.layer] = c.ranked[: int(c.counts[j])]
    return PrunePlan(
        model_type=current.model_type, num_heads=current.num_heads, num_kv_heads=current.num_kv_heads,
        intermediate_size=current.intermediate_size, hidden_size=current.hidden_size, heads=heads,
        neurons=neurons, meta={**current.meta, "criterion": "fisher", "calibration_samples": scores.num_samples},
    )


# ----------------------------------------------------------------------------------------------- 3. rearrange


def quadratic_loss(fisher: torch.Tensor, keep: torch.Tensor) -> float:
    """Second-order loss estimate ``1/2 (1 - m)^T F (1 - m)`` of keeping ``keep`` (bool ``(n,)``)."""
    z = (~keep).double()
    return 0.5 * float(z @ fisher.double() @ z)


def swap_descent(fisher: torch.Tensor, keep: torch.Tensor, max_swaps: int | None = None) -> torch.Tensor:
    """Local search over single swaps (one removed unit restored, one kept unit removed), which keeps the
    count; stops when no swap strictly lowers ``1/2 z^T F z`` (``z = 1 - m``). Never increases it.

    Each step first tries the cheap greedy pair, O(n): restore the unit whose return lowers the loss most,
    then remove the unit whose removal then raises it least. Only when that pair does not help is the best
    of all pairs searched, O(n^2), so the search ends at a point no single swap improves.

    Args:
        fisher: ``(n, n)`` Fisher block of one layer's units.
        keep: ``(n,)`` bool, the starting mask.
        max_swaps: cap on swaps (default ``n``).
    """
    F = fisher.double()
    keep = keep.clone()
    g = F @ (~keep).double()  # (n,) gradient of 1/2 z^T F z at z = 1 - m
    d = F.diagonal()
    tol = 1e-12 * max(float(d.sum()), 1e-30)
    inf = torch.tensor(math.inf, dtype=F.dtype)
    for _ in range(max_swaps if max_swaps is not None else len(keep)):
        if keep.all() or not keep.any():
            break
        # restoring i changes the loss by -g_i + F_ii / 2; then removing j by g'_j + F_jj / 2, g' = g - F[:, i]
        restore = torch.where(~keep, 0.5 * d - g, inf)  # (n,)
        i = int(restore.argmin())
        remove = torch.where(keep, g - F[:, i] + 0.5 * d, inf)  # (n,)
        j = int(remove.argmin())
        if float(restore[i] + remove[j]) >= -tol:
            out, inn = (~keep).nonzero().view(-1), keep.nonzero().view(-1)
            # all pairs: g_j - g_i + (F_ii + F_jj) / 2 - F_ij
            delta = (g[inn] + 0.5 * d[inn])[None, :] - (g[out] - 0.5 * d[out])[:, None] - F[out][:, inn]
            best = int(delta.argmin())
            if float(delta.view(-1)[best]) >= -tol:
                break
            i, j = int(out[best // len(inn)]), int(inn[best % len(inn)])
        keep[i], keep[j] = True, False
        g += F[:, j] - F[:, i]
    return keep


def rearrange_masks(
    plan: PrunePlan, fisher: FisherInfo, *, max_swaps: int | None = None, progress: bool = True
) -> tuple[PrunePlan, list[dict[str, float]]]:
    """Within each layer, re-choose which heads (whole KV groups) and neurons ``plan`` keeps, same counts,
    minimising ``1/2 (1 - m)^T F (1 - m)`` with the layer's Fisher blocks.

    Returns the new plan and, per layer, the loss estimate before and after for heads and neurons.
    """
    current = fisher.current
    group = current.group_size
    heads, neurons, stats = [], [], []
    for i in tqdm(range(current.num_layers), desc="rearrange", disable=not progress):
        # Heads: a KV group is removed whole, so its loss term is the group-summed block P^T F P.
        ids = current.heads[i]
        groups = sorted({h // group for h in ids})
        P = torch.tensor([[float(h // group == k) for k in groups] for h in ids], dtype=torch.float64)
        P = P.view(len(ids), len(groups))  # (H_l, G) membership
        Fg = P.T @ fisher.heads[i].double().cpu() @ P  # (G, G)
        keep_g = torch.tensor([k * group in plan.heads[i] for k in groups], dtype=torch.bool)
        new_g = swap_descent(Fg, keep_g, max_swaps)
        heads.append([k * group + j for k, kept in zip(groups, new_g.tolist()) if kept for j in range(group)])
        # Neurons.
        Fn = fisher.neurons[i].double().cpu()  # (I_l, I_l)
        kept_set = set(plan.neurons[i])
        keep_n = torch.tensor([n in kept_set for n in current.neurons[i]], dtype=torch.bool)
        new_n = swap_descent(Fn, keep_n, max_swaps)
        neurons.append([n for n, kept in zip(current.neurons[i], new_n.tolist()) if kept])
        stats.append({
            "heads_before": quadratic_loss(Fg, keep_g), "heads_after": quadratic_loss(Fg, new_g),
            "neurons_before": quadratic_loss(Fn, keep_n), "neurons_after": quadratic_loss(Fn, new_n),
        })
    new = PrunePlan(**{**asdict(plan), "heads": heads, "neurons": neurons, "meta": {**plan.meta, "rearranged": True}})
    return new, stats


# ----------------------------------------------------------------------------------------------- 4. tuning


class _Stop(Exception):
    """Raised by a capture hook to skip the rest of a forward pass whose remainder is not needed."""


@dataclass
class MaskTuning:
    """What :func:`tune_masks` fitted (positions in the layers as they are now).

    Args:
        heads: per layer, ``(H_l,)`` scale of each head (0 = removed). With ``fit="weights"`` the kept ones
            are 1: the refitted weights carry the fit.
        neurons: per layer, ``(I_l,)`` scale of each neuron (0 = removed), likewise.
        errors: per layer, mean squared reconstruction error per token of the attention and FFN residual sums
            with the plain 0/1 mask (``*_before``) and after the fit (``*_after``).
        fit: ``"scales"`` or ``"weights"``.
        weights: ``fit="weights"`` only: per layer, the refitted output projections at their kept size:
            ``o_weight`` ``(D, k_h * d)``, ``down_weight`` ``(D, k_n)``, ``o_bias``/``down_bias`` ``(D,)`` where
            the layer has biases, and the kept positions ``heads``/``neurons`` they belong to.
    """

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    errors: list[dict[str, float]] = field(default_factory=list)
    fit: str = "scales"
    weights: list[dict[str, Any]] = field(default_factory=list)

    def layer_masks(self) -> LayerMasks:
        """Scaled masks for :func:`hf_prune.mask_hooks`: under them the unfolded model computes what the folded,
        cut model computes. ``fit="scales"`` only: a weights fit is not a mask (fold it with
        :func:`fold_tuning_`, then the plan's 0/1 masks give the cut model's outputs)."""
        if self.fit != "scales":
            raise ValueError(f"a fit={self.fit!r} tuning is not expressible as masks: fold it with fold_tuning_")
        masks = LayerMasks(len(self.heads))
        masks.heads, masks.neurons = list(self.heads), list(self.neurons)
        return masks


@dataclass
class _LayerInput:
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

    def at(self, layer: int) -> "_LayerInput":
        return replace(self, layer=layer)


def _layer_inputs(model: nn.Module, layers: Sequence[nn.Module], batches: Sequence[Batch]) -> list[_LayerInput]:
    """Every batch's layer calls, recorded from the model's own forward pass (one per batch). The first batch's
    replay of the first layer is checked against the model's own output, so a transformers release that calls
    its layers differently fails here, in seconds, not after the long passes."""
    device = _device(model)
    out = []
    for b, raw in enumerate(batches):
        batch = _to_device(raw, device)
        hidden, calls, first_out = capture_layer_calls(model, layers, batch)
        mask = batch.get("attention_mask")
        tokens = mask.bool() if mask is not None and tuple(mask.shape) == tuple(hidden.shape[:2]) else None
        x = _LayerInput(hidden, calls, tokens)
        if b == 0:
            replay = _run_layer(layers[0], x, hidden)
            if replay.shape != first_out.shape or not torch.allclose(replay, first_out, rtol=1e-4, atol=1e-5):
                raise RuntimeError(
                    f"replaying {type(layers[0]).__name__} with the arguments {type(model).__name__} passed it does "
                    "not reproduce the model's own output (this transformers release calls its layers in a way "
                    "hf_prune does not handle); please report it with your transformers version"
                )
        out.append(x)
    return out


def _read_positions(
    model: nn.Module, layer: nn.Module, batches: Sequence[Batch], inputs: Sequence[_LayerInput]
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
    device = _device(model)

    def read(raw: Batch, x: _LayerInput) -> torch.Tensor:
        batch = _to_device({k: v for k, v in raw.items() if k != "labels"}, device)
        grabbed: dict[str, torch.Tensor] = {}

        def hook(_m, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            out = out.detach().requires_grad_(True)
            grabbed["h"] = out
            return (out, *output[1:]) if isinstance(output, tuple) else out

        handle = layer.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                y, _ = _model_output(model(**batch))
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


def _run_layer(layer: nn.Module, x: _LayerInput, hidden: torch.Tensor) -> torch.Tensor:
    out = layer(hidden, *x.args, **x.kwargs)
    return out[0] if isinstance(out, tuple) else out


def _real(t: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """``(B, T, ...)`` -> ``(N, ...)`` over real tokens."""
    return t[tokens] if tokens is not None else t.reshape(-1, *t.shape[2:])


@contextmanager
def _capture(layer: nn.Module, adapter, stop_at: str | None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the inputs and outputs of the O, up and down projections; raise ``_Stop`` at the input of
    ``stop_at`` ("o" or "down") to skip the rest of the layer."""
    rec: dict[str, torch.Tensor] = {}
    handles = []
    for name in ("o", "up", "down"):
        mod = get_module(layer, getattr(adapter, name))

        def pre(_m, args, name=name):
            rec[f"{name}_in"] = args[0]
            if name == stop_at:
                raise _Stop

        def post(_m, _args, output, name=name):
            rec[f"{name}_out"] = output

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def _solve_scales(
    G: torch.Tensor, rhs: torch.Tensor, rr: float, damping: float, scale_range: tuple[float, float]
) -> tuple[torch.Tensor, float, float]:
    """Minimise ``err(s) = s^T G s - 2 s^T rhs + rr`` (the summed squared reconstruction error).

    Damping: the contributions of kept units are often nearly collinear (G ill-conditioned), and the exact
    solution then has huge opposite-signed scales that fit the calibration set but not new data. So solve
    ``(G + lam I) s = rhs + lam 1``, a ridge pulled towards the plain mask ``s = 1`` rather than 0, which keeps
    ``err(s) <= err(1)``. Range: if a scale still leaves ``scale_range``, move back along the segment from
    1 to the solution until all are inside; err is convex in that step and not above err(1) at either end,
    so the guarantee holds, unlike clamping each scale on its own.

    Returns the scales, err(1) and err(s).
    """
    k = G.shape[0]
    ones = torch.ones(k, dtype=G.dtype)
    if k == 0:  # an emptied block: nothing to scale
        return ones, rr, rr

    def err(s: torch.Tensor) -> float:
        return float(s @ G @ s - 2 * s @ rhs + rr)

    lam = damping * float(G.diagonal().mean()) + 1e-12
    s = torch.linalg.solve(G + lam * torch.eye(k, dtype=G.dtype), rhs + lam * ones)
    lo, hi = scale_range
    step = s - 1
    with torch.no_grad():
        t_hi = torch.where(step > 0, (hi - 1) / step.clamp_min(1e-30), torch.full_like(step, math.inf))
        t_lo = torch.where(step < 0, (lo - 1) / step.clamp_max(-1e-30), torch.full_like(step, math.inf))
    t = min(1.0, float(torch.minimum(t_hi, t_lo).min())) if k else 1.0
    s = ones + t * step
    before, after = err(ones), err(s)
    if after > before:  # only rounding can get here; the plain mask is then the answer
        s, after = ones, before
    return s, before, after


def _solve_weights(
    XtX: torch.Tensor, XtR: torch.Tensor, rr: float, W0: torch.Tensor, damping: float
) -> tuple[torch.Tensor, float, float]:
    """Minimise ``err(W) = || X W - R ||^2`` over a projection's weights ``W`` ``(k, D)`` (transposed, a bias
    row last where there is one), from ``XtX = X^T X``, ``XtR = X^T R`` and ``rr = ||R||^2``.

    Ridge pulled towards the current weights ``W0`` (the plain cut), ``(XtX + lam I) W = XtR + lam W0``: in
    the last layer of a classifier only the read positions are fitted (a few hundred rows for up to ``I``
    unknowns), and the pull keeps what the data does not determine where it was. Minimising
    ``err(W) + lam ||W - W0||^2`` gives ``err(W) <= err(W0)``.

    Returns ``W``, err(W0) and err(W).
    """

    def err(W: torch.Tensor) -> float:
        return float((W * (XtX @ W)).sum() - 2 * (W * XtR).sum() + rr)

    lam = damping * float(XtX.diagonal().mean()) + 1e-12
    W = torch.linalg.solve(XtX + lam * torch.eye(XtX.shape[0], dtype=XtX.dtype), XtR + lam * W0)
    before, after = err(W0), err(W)
    if after > before:  # only rounding can get here; the plain cut is then the answer
        W, after = W0, before
    return W, before, after


class _Normal:
    """Running normal equations of one least-squares fit ``min || X W - R ||^2``: ``X^T X`` ``(k, k)``, ``X^T R``
    ``(k, m)`` and ``||R||^2`` in float64 on the CPU, summed over calibration batches."""

    def __init__(self, k: int, m: int) -> None:
        self.XtX = torch.zeros(k, k, dtype=torch.float64)
        self.XtR = torch.zeros(k, m, dtype=torch.float64)
        self.rr = 0.0

    def add(self, X: torch.Tensor, R: torch.Tensor) -> None:
        """One batch: ``X`` ``(N, k)``, ``R`` ``(N, m)``."""
        self.XtX += (X.T @ X).double().cpu()
        self.XtR += (X.T @ R).double().cpu()
        self.rr += float(R.double().pow(2).sum())


def _with_bias(X: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``X`` with a column of ones appended when ``linear`` has a bias (fitted as one more weight row)."""
    return torch.cat([X, X.new_ones(X.shape[0], 1)], 1) if linear.bias is not None else X


@torch.no_grad()
def _refit_(linear: nn.Linear, normal: _Normal, damping: float) -> tuple[float, float]:
    """Replace ``linear``'s weight (and bias) by the ridge least-squares fit; returns err before and after."""
    W0 = linear.weight.T if linear.bias is None else torch.cat([linear.weight.T, linear.bias[None]], 0)
    W, before, after = _solve_weights(normal.XtX, normal.XtR, normal.rr, W0.double().cpu(), damping)
    W = W.to(linear.weight.device, linear.weight.dtype)
    linear.weight.copy_(W[: linear.in_features].T)
    if linear.bias is not None:
        linear.bias.copy_(W[-1])
    return before, after


def tune_masks(
    model: nn.Module,
    batches: Sequence[Batch],
    plan: PrunePlan,
    *,
    fit: str = "weights",
    damping: float | None = None,
    scale_range: tuple[float, float] = (-1.0, 3.0),
    read_positions_only: bool = True,
    progress: bool = True,
) -> MaskTuning:
    """Layer by layer, least squares that make the layers cut to ``plan`` reconstruct the dense layers.

    The model is not modified. Two streams of hidden states run through the layers: the dense model's and
    the pruned one's (layers before the current one already cut and tuned, run as cut copies, so the pruned
    passes cost only the kept FLOPs). For layer ``l`` the attention block is fitted so that, over the
    calibration tokens (padding excluded), the residual sum that feeds the next norm, ``x_p + O(ctx_p)`` on the
    pruned input ``x_p``, matches the dense layer's ``x_d + O_d`` on the dense input. Then, with that
    attention, the FFN is fitted the same way on its residual sum. Fitting against the dense stream lets each
    layer also correct the error the layers before it left. What is fitted (``fit``):

    - ``"scales"`` (Kwon et al.): one scale per kept head (``sum_h s_h W_O^h ctx_h``) and per kept neuron,
      folded into the O / down-projection input columns; damped towards 1 and kept in ``scale_range``.
    - ``"weights"``: the whole O and down projections of the cut layer (weights and biases), a ridge fit pulled
      towards the cut weights. Same passes and about the same time; the scales are its diagonal special case,
      and on all-MiniLM-L6-v2 (SST-2, MRPC, STS-B at 75-40% of FLOPs) its dev outputs were 4x (SST-2 at 40%)
      to 50x (STS-B at 50%) closer to the dense model's than with scales.

    ``damping`` is the ridge strength relative to the mean diagonal of the normal equations (default 0.1 for
    weights, 0.01 for scales: on MiniLM, dev divergence from the dense model was lowest there, and within 20%
    over 0.01-1 for weights).

    Either way the result folds into an ordinary smaller model (:func:`fold_tuning_`, then
    :func:`hf_prune.apply_plan_`), and each fit never raises its layer's calibration error.

    In the last layer, with ``read_positions_only``, only the positions the model's output reads are fitted
    (the first token of a BERT/ViT classifier; found by autograd, see :func:`_read_positions`), as Kwon et al.
    do for classification; a model that reads every token (a base model, token classification) is unaffected.

    Residual of the FFN sum: in pre-norm models (residual stream, detected per layer from the first batch:
    ``out = x + O + down``) it is ``x + O``; otherwise (post-norm BERT-style encoders) it is the FFN input.
    """
    if fit not in TUNING_FITS:
        raise ValueError(f"unknown fit {fit!r}; choose one of {', '.join(TUNING_FITS)}")
    if damping is None:
        damping = 0.1 if fit == "weights" else 0.01
    adapter = get_adapter(model)
    head_dim = model_dims(model)["head_dim"]
    layers = layer_list(model, adapter)
    current = PrunePlan.of(model)
    keep_h, keep_n = _current_positions(plan, current)
    was_training = model.training
    model.eval()
    result = MaskTuning([], [], [], fit=fit)
    try:
        with torch.no_grad():
            all_inputs = _layer_inputs(model, layers, batches)
            dense_x = [x.hidden for x in all_inputs]  # per batch (B, T, D)
            pruned_x = list(dense_x)  # the embeddings are not pruned: both streams start equal
            last_read = _read_positions(model, layers[-1], batches, all_inputs) if read_positions_only else None
            for i in tqdm(range(len(layers)), desc="mask tuning", disable=not progress):
                inputs = [x.at(i) for x in all_inputs]
                if i == len(layers) - 1 and last_read is not None:
                    inputs = [x if r is None else replace(x, tokens=r) for x, r in zip(inputs, last_read)]
                targets, pre_norm, dense_x = _dense_targets(layers[i], adapter, inputs, dense_x)
                cut = copy.deepcopy(layers[i]).eval()
                prune_layer_(cut, adapter, head_dim, current.group_size, keep_h[i], keep_n[i])
                h_scale, h_err = _tune_heads_(cut, adapter, head_dim, inputs, pruned_x, targets, fit, damping,
                                              scale_range)
                n_scale, n_err = _tune_neurons_(cut, adapter, inputs, pruned_x, targets, pre_norm, fit, damping,
                                                scale_range)
                pruned_x = [_run_layer(cut, x, h) for x, h in zip(inputs, pruned_x)]
                result.heads.append(_scatter(h_scale, keep_h[i], len(current.heads[i])))
                result.neurons.append(_scatter(n_scale, keep_n[i], len(current.neurons[i])))
                result.errors.append({**h_err, **n_err, "pre_norm": float(pre_norm)})
                if fit == "weights":
                    result.weights.append(_output_weights(cut, adapter, keep_h[i], keep_n[i]))
                del cut
    finally:
        model.train(was_training)
    return result


def _scatter(values: torch.Tensor, positions: list[int], size: int) -> torch.Tensor:
    out = torch.zeros(size)
    out[positions] = values.float().cpu()
    return out


def _scale_columns_(linear: nn.Linear, scale: torch.Tensor) -> None:
    """Multiply input column ``j`` of ``linear`` by ``scale[j]`` (what a mask of ``scale`` does before it)."""
    linear.weight.mul_(scale.to(linear.weight.device, linear.weight.dtype)[None, :])


def _output_weights(cut: nn.Module, adapter, heads: list[int], neurons: list[int]) -> dict[str, Any]:
    """The refitted O and down projections of a cut layer (CPU copies) and the positions they keep."""
    out: dict[str, Any] = {"heads": list(heads), "neurons": list(neurons)}
    for name in ("o", "down"):
        lin = get_module(cut, getattr(adapter, name))
        out[f"{name}_weight"] = lin.weight.detach().cpu().clone()
        if lin.bias is not None:
            out[f"{name}_bias"] = lin.bias.detach().cpu().clone()
    return out


def _dense_targets(
    layer: nn.Module, adapter, inputs: list[_LayerInput], dense_x: list[torch.Tensor]
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], bool, list[torch.Tensor]]:
    """Dense residual sums ``(x + O, FFN residual + down)`` over real tokens, per batch ``((N, D), (N, D))``,
    whether the layer is pre-norm, and the dense stream's next hidden states."""
    targets, nxt, pre_norm = [], [], None
    for x, h in zip(inputs, dense_x):
        with _capture(layer, adapter, None) as rec:
            out = _run_layer(layer, x, h)
        attn_sum = h + rec["o_out"]  # (B, T, D)
        if pre_norm is None:
            stream = attn_sum + rec["down_out"]
            pre_norm = bool(torch.allclose(stream, out, rtol=1e-4, atol=1e-4 * float(out.abs().mean())))
        ffn_res = attn_sum if pre_norm else rec["up_in"]
        targets.append((_real(attn_sum, x.tokens), _real(ffn_res + rec["down_out"], x.tokens)))
        nxt.append(out)
    return targets, bool(pre_norm), nxt


def _run_until(layer: nn.Module, adapter, x: _LayerInput, hidden: torch.Tensor, stop_at: str) -> dict:
    """Run ``layer`` up to the input of projection ``stop_at`` and return the captured tensors."""
    with _capture(layer, adapter, stop_at) as rec:
        try:
            _run_layer(layer, x, hidden)
        except _Stop:
            pass
    return rec


def _tune_heads_(cut, adapter, head_dim, inputs, pruned_x, targets, fit, damping, scale_range):
    """Fit the O projection of ``cut`` (a layer cut to its kept units) in place; returns the head scales
    ``(k,)`` (ones for ``fit="weights"``) and the errors."""
    o = get_module(cut, adapter.o)
    k = o.in_features // head_dim
    W = o.weight.view(o.out_features, k, head_dim)  # (D, k, d)
    bias = o.bias if o.bias is not None else 0.0
    # weights: rows are tokens, unknowns O's input columns (+ bias); scales: rows are (token, output dim)
    # pairs, unknowns one scale per head multiplying that head's output W_O^h ctx_h
    normal = _Normal(o.in_features + (o.bias is not None), o.out_features) if fit == "weights" else _Normal(k, 1)
    tokens = 0
    for x, h, (t_attn, _) in zip(inputs, pruned_x, targets):
        ctx = _real(_run_until(cut, adapter, x, h, "o")["o_in"], x.tokens)  # (N, k * d)
        r = t_attn - _real(h, x.tokens)  # (N, D) what O (weights and bias) must supply
        tokens += r.shape[0]
        if fit == "weights":
            normal.add(_with_bias(ctx, o), r)
        else:
            C = torch.einsum("nkd,Dkd->nDk", ctx.view(ctx.shape[0], k, head_dim), W)  # (N, D, k) per-head outputs
            normal.add(C.reshape(-1, k), (r - bias).reshape(-1, 1))
    if fit == "weights":
        before, after = _refit_(o, normal, damping)
        s = torch.ones(k)
    else:
        s, before, after = _solve_scales(normal.XtX, normal.XtR[:, 0], normal.rr, damping, scale_range)
        _scale_columns_(o, s.repeat_interleave(head_dim))
    tokens = max(tokens, 1)
    return s, {"attention_before": before / tokens, "attention_after": after / tokens}


def _tune_neurons_(cut, adapter, inputs, pruned_x, targets, pre_norm, fit, damping, scale_range):
    """Fit the down projection of ``cut`` (its attention already fitted) in place; returns the neuron scales
    ``(k,)`` (ones for ``fit="weights"``) and the errors."""
    down = get_module(cut, adapter.down)
    W = down.weight  # (D, k)
    bias = down.bias if down.bias is not None else 0.0
    k = down.in_features
    if fit == "weights":
        normal = _Normal(k + (down.bias is not None), down.out_features)
    else:  # scales: the (token, output dim) rows a_nk w_k would be (N * D, k); their normal equations factor
        AtA, rhs, rr = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), 0.0
    tokens = 0
    for x, h, (_, t_ffn) in zip(inputs, pruned_x, targets):
        rec = _run_until(cut, adapter, x, h, "down")
        A = _real(rec["down_in"], x.tokens)  # (N, k) activations of the kept neurons
        res = (h + rec["o_out"]) if pre_norm else rec["up_in"]  # (B, T, D) FFN residual
        r = t_ffn - _real(res, x.tokens)  # (N, D) what down (weights and bias) must supply
        tokens += r.shape[0]
        if fit == "weights":
            normal.add(_with_bias(A, down), r)
            continue
        r = r - bias
        AtA += (A.T @ A).double().cpu()
        rhs += ((r @ W) * A).sum(0).double().cpu()  # sum_n a_nk (w_k . r_n)
        rr += float(r.double().pow(2).sum())
    if fit == "weights":
        before, after = _refit_(down, normal, damping)
        s = torch.ones(k)
    else:
        G = AtA * (W.T @ W).double().cpu()  # (k, k): <a_j w_j, a_k w_k> summed over tokens
        s, before, after = _solve_scales(G, rhs, rr, damping, scale_range)
        _scale_columns_(down, s)
    tokens = max(tokens, 1)
    return s, {"ffn_before": before / tokens, "ffn_after": after / tokens}


@torch.no_grad()
def fold_tuning_(model: M, tuning: MaskTuning) -> M:
    """Fold :func:`tune_masks`' fit into ``model``, in place: each head's scale into its O-projection input
    columns and each neuron's into its down-projection input column (``fit="scales"``), or the refitted O and
    down weights and biases into the kept columns, removed columns zeroed (``fit="weights"``). The model then
    computes what the cut model computes, except that removed units still run until
    :func:`hf_prune.apply_plan_` cuts them."""
    adapter = get_adapter(model)
    head_dim = model_dims(model)["head_dim"]
    layers = layer_list(model, adapter)
    current = PrunePlan.of(model)
    shapes = [(len(h), len(n)) for h, n in zip(current.heads, current.neurons)]
    tuned = [(len(h), len(n)) for h, n in zip(tuning.heads, tuning.neurons)]
    if shapes != tuned or (tuning.fit == "weights" and len(tuning.weights) != len(layers)):
        raise ValueError(
            f"the tuning was computed on a model with a different structure (heads, neurons per layer: {tuned}); "
            f"this model has {shapes}. Fold it into the model tune_masks ran on, before apply_plan_ cuts it."
        )
    if tuning.fit == "weights":
        for layer, w in zip(layers, tuning.weights):
            cols = [p * head_dim + j for p in w["heads"] for j in range(head_dim)]
            _set_columns_(get_module(layer, adapter.o), cols, w["o_weight"], w.get("o_bias"))
            _set_columns_(get_module(layer, adapter.down), w["neurons"], w["down_weight"], w.get("down_bias"))
        return model
    for layer, hs, ns in zip(layers, tuning.heads, tuning.neurons):
        o = get_module(layer, adapter.o).weight  # (D, H_l * d)
        o.mul_(hs.to(o.device, o.dtype).repeat_interleave(head_dim)[None, :])
        down = get_module(layer, adapter.down).weight  # (D, I_l)
        down.mul_(ns.to(down.device, down.dtype)[None, :])
    return model


def _set_columns_(linear: nn.Linear, cols: list[int], weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    w = linear.weight
    w.zero_()
    w[:, cols] = weight.to(w.device, w.dtype)
    if bias is not None:
        linear.bias.copy_(bias.to(linear.bias.device, linear.bias.dtype))


# ------------------------------------------------------------------------------------------- selection


def split_batches(
    batches: Sequence[Batch], tuning_samples: int | None, held_out_samples: int
) -> tuple[list[Batch], list[Batch]]:
    """The first whole batches up to ``tuning_samples`` samples (all if None) for mask tuning, and up to
    ``held_out_samples`` samples of the batches after them for stage selection (empty if none are left)."""
    tune: list[Batch] = []
    seen = 0
    for b in batches:
        if tuning_samples is not None and seen >= tuning_samples:
            break
        tune.append(b)
        seen += _batch_size(b)
    held: list[Batch] = []
    seen = 0
    for b in batches[len(tune):]:
        if seen >= held_out_samples:
            break
        held.append(b)
        seen += _batch_size(b)
    return tune, held


def _model_output(out: Any) -> tuple[torch.Tensor, bool]:
    """The output compared across candidates, and whether it is logits over classes/tokens (KL) or not (MSE)."""
    logits = getattr(out, "logits", None)
    if logits is None:
        return out.last_hidden_state.float(), False
    return logits.float(), logits.shape[-1] > 1


def sample_divergence(
    ref: torch.Tensor, out: torch.Tensor, kl: bool, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Per-sample ``(B,)`` divergence: KL(ref || out) of the softmax over the last axis for logits, squared
    error otherwise (regression heads, hidden states); token outputs are averaged over ``attention_mask``."""
    if kl:
        d = (ref.softmax(-1) * (ref.log_softmax(-1) - out.log_softmax(-1))).sum(-1)
    else:
        d = (ref - out).pow(2).sum(-1)
    if d.dim() == 2:  # (B, T): per-token outputs
        m = attention_mask.to(d.dtype) if attention_mask is not None else torch.ones_like(d)
        d = (d * m).sum(-1) / m.sum(-1).clamp_min(1)
    return d


@torch.no_grad()
def output_divergence(
    model: nn.Module, batches: Sequence[Batch], candidates: Mapping[str, Callable[[], nn.Module]]
) -> dict[str, float]:
    """Mean per-sample divergence of each candidate model's outputs from ``model``'s.

    ``candidates`` maps names to functions that build the candidate (e.g. a cut copy, which runs at its kept
    FLOPs); they are built one at a time, so at most one copy of the model exists besides ``model``. The
    reference outputs are computed once and kept on the CPU.
    """
    device = _device(model)
    was_training = model.training
    model.eval()
    inputs = [{k: v for k, v in raw.items() if k != "labels"} for raw in batches]
    refs, kl = [], False
    try:
        for x in inputs:
            ref, kl = _model_output(model(**_to_device(x, device)))
            refs.append(ref.cpu())
    finally:
        model.train(was_training)
    count = sum(int(r.shape[0]) for r in refs)
    totals = {}
    for name, build in candidates.items():
        net = build().eval()
        total = 0.0
        for x, ref in zip(inputs, refs):
            out, _ = _model_output(net(**_to_device(x, device)))
            mask = x.get("attention_mask")
            total += float(sample_divergence(ref, out.cpu(), kl, None if mask is None else mask.cpu()).sum())
        totals[name] = total / max(count, 1)
        del net
    if is_distributed():  # each rank holds out its own samples: average, so every rank keeps the same stage
        t = torch.tensor(list(totals.values()), dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        totals = dict(zip(totals, (t / torch.distributed.get_world_size()).tolist()))
    return totals


# ----------------------------------------------------------------------------------------------- entry


def _cut_candidate(model: nn.Module, plan: PrunePlan, tuning: MaskTuning | None) -> nn.Module:
    """A copy of ``model`` with ``tuning``'s scales folded in (if any), cut to ``plan``."""
    copied = copy.deepcopy(model)
    return apply_plan_(fold_tuning_(copied, tuning) if tuning is not None else copied, plan)


def retraining_free_plan(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    config: "PruningConfig",
    *,
    latency_table: LatencyTable | None = None,
) -> tuple[PrunePlan, MaskTuning | None]:
    """Everything :func:`prune_retraining_free` does except changing ``model``: the plan (with
    ``plan.meta["retraining_free"]``) and the tuning to fold into the dense weights (None when the chosen
    stage is untuned). ``fold_tuning_`` then masks or ``apply_plan_`` reproduce the cut model exactly, which is
    how :class:`hf_prune.PruningCallback` applies it without reshaping parameters."""
    times: dict[str, float] = {}
    start = time.perf_counter()
    batches = collect_batches(dataloader, config.max_calibration_samples)
    # which samples tune and which select is decided in the data's order; each pass then runs them sorted by
    # length (same samples, little padding)
    tune_batches, held_out = split_batches(batches, config.tuning_samples, config.selection_samples)
    tune_batches, held_out = by_length(tune_batches), by_length(held_out)
    fisher = fisher_information(model, by_length(batches), seed=config.seed, progress=config.progress)
    times["fisher_s"] = time.perf_counter() - start
    t = time.perf_counter()
    plan = search_masks(fisher, model, config, latency_table)
    times["search_s"] = time.perf_counter() - t
    stages = {"search": plan}
    info: dict[str, Any] = {"calibration_samples": fisher.num_samples}
    if config.rearrange:
        t = time.perf_counter()
        plan, info["rearrangement"] = rearrange_masks(plan, fisher, progress=config.progress)
        stages["rearranged"] = plan
        times["rearrange_s"] = time.perf_counter() - t
    del fisher
    selecting = config.select_stages and bool(held_out)
    # Tuned candidates (name -> plan, fit): the final plan; with selection on, also the search plan when
    # rearrangement changed it (which of the two tunes better differs by model and budget), and, for the weights
    # fit, the final plan with the paper's scales: the weights fit has ~D unknowns per kept unit and can overfit
    # few calibration tokens (real MiniLM as a sentence encoder, 64 tuning sentences: held-out hidden-state error
    # above the untuned plan's, scales below). The held-out check is cheap next to a tuning.
    to_tune = {"tuned": (plan, config.tuning_fit)}
    search, rearranged = stages["search"], stages.get("rearranged")
    if selecting and rearranged is not None and (rearranged.heads, rearranged.neurons) != (
        search.heads, search.neurons
    ):
        to_tune["tuned_search"] = (search, config.tuning_fit)
    if selecting and config.tuning_fit == "weights":
        to_tune["tuned_scales"] = (plan, "scales")
    tuned: dict[str, MaskTuning] = {}
    if config.mask_tuning:
        t = time.perf_counter()
        for name, (p, fit) in to_tune.items():
            tuned[name] = tune_masks(model, tune_batches, p, fit=fit, progress=config.progress)
        info["mask_tuning"] = tuned["tuned"].errors
        if "tuned_search" in tuned:
            info["mask_tuning_search"] = tuned["tuned_search"].errors
        info["tuning_samples"] = sum(_batch_size(b) for b in tune_batches)
        info["tuning_fit"] = config.tuning_fit
        times["tuning_s"] = time.perf_counter() - t
    tuning = tuned.get("tuned")
    if selecting and (len(stages) > 1 or tuned):
        # The search, the rearrangement and the tuning each optimise a proxy (diagonal Fisher, block Fisher,
        # layer-wise reconstruction); keep the stage whose masked model stays closest to the dense model's
        # outputs on calibration samples none of them was fitted to. Each candidate runs as a cut copy, at its
        # kept FLOPs (about half the time of the full model under masks).
        t = time.perf_counter()
        candidates = {name: functools.partial(_cut_candidate, model, p, None) for name, p in stages.items()}
        candidates.update({name: functools.partial(_cut_candidate, model, to_tune[name][0], tn)
                           for name, tn in tuned.items()})
        divergence = output_divergence(model, held_out, candidates)
        chosen = min(divergence, key=divergence.get)
        info["selection"] = {"divergence": divergence, "chosen": chosen,
                             "samples": sum(_batch_size(b) for b in held_out)}
        if chosen in tuned:
            plan, tuning = to_tune[chosen][0], tuned[chosen]
        else:
            plan, tuning = stages[chosen], None
        times["selection_s"] = time.perf_counter() - t
    plan.meta["retraining_free"] = info
    info["times"] = {**times, "total_s": time.perf_counter() - start}
    return plan, tuning


def prune_retraining_free(
    model: M,
    dataloader: Iterable[Mapping[str, Any]],
    config: "PruningConfig",
    *,
    latency_table: LatencyTable | None = None,
) -> tuple[M, PrunePlan]:
    """Fisher mask search, rearrangement (``config.rearrange``), mask tuning (``config.mask_tuning``),
    folding and cut, in place. Returns the smaller model and its plan; ``plan.meta["retraining_free"]``
    holds per-stage wall times, the rearrangement's loss estimates and the tuning's reconstruction errors.
    """
    start = time.perf_counter()
    plan, tuning = retraining_free_plan(model, dataloader, config, latency_table=latency_table)
    times = plan.meta["retraining_free"]["times"]
    if tuning is not None:
        fold_tuning_(model, tuning)
    t = time.perf_counter()
    apply_plan_(model, plan)
    times["cut_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - start
    return model, plan

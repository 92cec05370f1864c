"""The ``latency_keep`` budget: a per-layer latency lookup table measured on the device, and an exact knapsack over
it (the kind's own search, registered at the bottom; :func:`hf_prune.build_plan` calls it)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import get_adapter, model_dims
from ..batches import model_device
from ..budget_kinds import BudgetKind, register_budget
from ..costs import dummy_inputs, time_once
from ..importance import ImportanceScores
from ..plan import PrunePlan
from ..shapes import layer_list, prune_layer_
from .layer_io import capture_layer_call

if TYPE_CHECKING:
    from ..config import PruningConfig


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
        """Encoder latency of the model ``plan`` gives, predicted by the table (removed layers cost nothing)."""
        return sum(self.layer_ms(s["num_heads"], s["intermediate_size"]) for s in plan.physical_sizes())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatencyTable":
        return cls(**data)


def _points(full: int, step: int, fractions: Sequence[float]) -> list[int]:
    """Counts ``fraction * full`` rounded to multiples of ``step``, with 0 and ``full``."""
    pts = {0, full} | {min(full, max(step, round(f * full / step) * step)) for f in fractions}
    return sorted(pts)


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
    args, kwargs = capture_layer_call(model, layer, dummy_inputs(model, batch_size, seq_len))
    group = dense.group_size
    head_points = _points(dims["num_heads"], group, head_fractions)
    neuron_points = _points(dims["intermediate_size"], round_to, neuron_fractions)
    variants: dict[tuple[int, int], nn.Module] = {}
    for k in head_points:
        variants[(k, dims["intermediate_size"])] = _cut_copy(layer, adapter, dims["head_dim"], k, None)
    for n in neuron_points:
        variants[(dims["num_heads"], n)] = _cut_copy(layer, adapter, dims["head_dim"], None, n)
    times: dict[tuple[int, int], list[float]] = {key: [] for key in variants}
    calls = {key: _LayerCall(v, args, kwargs).eval() for key, v in variants.items()}  # copies: no dropout
    with torch.inference_mode():
        for r in tqdm(range(warmup + repeats), desc="latency table", disable=not progress):
            for key, call in calls.items():
                ms = time_once(call, {})
                if r >= warmup:
                    times[key].append(ms)
    med = {key: min(t) for key, t in times.items()}
    full = (dims["num_heads"], dims["intermediate_size"])
    head_ms = _monotone([med[(k, full[1])] - med[(0, full[1])] for k in head_points])
    neuron_ms = _monotone([med[(full[0], n)] - med[(full[0], 0)] for n in neuron_points])
    fixed = max(0.0, med[full] - head_ms[-1] - neuron_ms[-1])
    return LatencyTable(
        head_points, head_ms, neuron_points, neuron_ms, fixed, dims["num_layers"], batch_size, seq_len,
        str(model_device(model)),
    )


class _LayerCall(nn.Module):
    """A layer bound to captured arguments, callable with no inputs (for ``time_once``)."""

    def __init__(self, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.layer, self.args, self.kwargs = layer, args, kwargs

    def forward(self) -> Any:
        return self.layer(*self.args, **self.kwargs)


def _cut_copy(layer: nn.Module, adapter, head_dim: int, heads: int | None, neurons: int | None):
    # heads: a multiple of the group size (whole KV groups, the first ones)
    c = copy.deepcopy(layer)
    prune_layer_(
        c, adapter, head_dim,
        None if heads is None else list(range(heads)),
        None if neurons is None else list(range(neurons)),
    )
    return c


def _monotone(ms: list[float]) -> list[float]:
    """Clip at 0 (the empty block) and make non-decreasing."""
    return np.maximum.accumulate(np.maximum(0.0, np.asarray(ms))).tolist()


def _search(
    scores: ImportanceScores, model: nn.Module, config: PruningConfig, layers: list[int] | None,
    context: Mapping[str, Any],
) -> PrunePlan:
    """``latency_keep``'s own allocation (:attr:`BudgetKind.search`): the table passed in ``context`` (or measured on
    ``model`` now), then the knapsack over it, on the ``layers`` the depth budget kept."""
    table = context.get("latency_table")
    if table is None:
        table = measure_latency_table(
            model, config.latency_batch_size, config.seq_len, round_to=config.round_to, progress=config.progress
        )
    plan = search_latency(scores, model, table, config.latency_keep, round_to=config.round_to,
                          allow_empty_layers=config.allow_empty_layers, layers=layers)
    plan.meta["latency_table"] = table.to_dict()
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
    counts = counts or [0]  # a removed layer: nothing left to keep
    counts_a = np.asarray(counts)
    prefix = np.concatenate([[0.0], np.cumsum(row[ranked].double().numpy())])
    return _Choice(layer, "neurons", ranked, counts_a, prefix[counts_a], table.ffn(counts_a))


def _knapsack(choices: list[_Choice], budget: float, bins: int) -> list[int]:
    """Pick one option per block maximising total value with total cost <= ``budget`` (exact up to the cost
    grid). Every block pays its cheapest option first and the grid spans only what is left, so the check that the
    cheapest layers fit is exact (no rounding); the costs above the cheapest are rounded *up* to the grid, so the
    chosen options never exceed the true budget."""
    base = np.array([float(c.cost.min()) for c in choices])  # (blocks,) ms every block pays at least
    spare = budget - float(base.sum())
    if spare < -1e-9 * max(abs(budget), 1.0):
        raise ValueError(
            "latency budget unreachable: even the smallest allowed layers (one head group and one neuron block "
            "each) are slower than it; raise latency_keep or set allow_empty_layers=True"
        )
    if spare <= 0.0:  # exactly the cheapest layers: a grid of zero width, only options at their block's minimum
        unit, bins = 1.0, 0
    else:
        unit = spare / bins
    dp = np.zeros(bins + 1)  # (bins + 1,) best value with extra cost <= b grid units
    picks, extra = [], []
    for c, b0 in zip(choices, base):
        cost = np.ceil(np.maximum(c.cost - b0, 0.0) / unit).astype(np.int64)  # (K,) grid units above the minimum
        idx = np.arange(bins + 1)[None, :] - cost[:, None]  # (K, bins + 1)
        cand = np.where(idx >= 0, dp[np.clip(idx, 0, None)] + c.value[:, None], -np.inf)
        picks.append(cand.argmax(0))  # (bins + 1,)
        extra.append(cost)
        dp = cand.max(0)
    chosen, b = [], bins
    for pick, cost in zip(reversed(picks), reversed(extra)):
        j = int(pick[b])
        chosen.append(j)
        b -= int(cost[j])
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
    layers: list[int] | None = None,
) -> PrunePlan:
    """Kept heads/neurons per layer maximising the kept diagonal Fisher with the table's predicted encoder
    latency at most ``latency_keep`` of the dense model's.

    Within a layer the best-scored units are kept; across layers the number kept per block is an exact
    multiple-choice knapsack (dynamic programming over a grid of ``bins`` latency steps), which handles a
    latency that is not proportional to the kept count (fixed overheads, kernel-size steps). ``layers``: the dense
    layers kept (None: all); a removed layer costs nothing, not even its fixed overhead (its scores must be NaN).
    """
    current = PrunePlan.of(model)
    floor = 0 if allow_empty_layers else 1
    L = current.num_layers
    choices = []
    for i in range(L):
        choices.append(_head_choices(scores.heads[i], i, current.group_size, floor, table))
        choices.append(_neuron_choices(scores.neurons[i], i, round_to, floor, table))
    n_kept = L if layers is None else len(layers)
    budget = latency_keep * table.dense_ms() - n_kept * table.fixed_ms
    if budget <= 0:
        raise ValueError(
            f"latency_keep={latency_keep} is unreachable: the parts of a layer pruning cannot remove (norms, "
            f"residuals) already take {n_kept * table.fixed_ms:.3g} of {table.dense_ms():.3g} ms"
        )
    picked = _knapsack(choices, budget, bins)
    heads: list[list[int]] = [[] for _ in range(L)]
    neurons: list[list[int]] = [[] for _ in range(L)]
    for c, j in zip(choices, picked):
        (heads if c.kind == "heads" else neurons)[c.layer] = c.ranked[: int(c.counts[j])]
    return PrunePlan(
        model_type=current.model_type, num_heads=current.num_heads, num_kv_heads=current.num_kv_heads,
        intermediate_size=current.intermediate_size, hidden_size=current.hidden_size, heads=heads,
        neurons=neurons, layers=layers,
        meta={**current.meta, "criterion": "fisher", "calibration_samples": scores.num_samples},
    )


register_budget(BudgetKind("latency_keep", "latency", "fraction", "one", "fraction of the layers' measured latency to keep",
                           method="retraining_free", search=_search, trades_depth=True))

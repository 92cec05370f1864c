"""Budgets: the table of budget kinds (the one place config validation, schedules, recipes and the CLI read) and
the allocation that chooses the units to keep under one.

A budget says how much of the dense model a plan may keep. Built-in kinds are :class:`PruningConfig` fields
(``heads_keep`` and ``neurons_keep`` form one budget, every other kind stands alone, except that ``layers_keep``,
the depth budget, combines with any one width budget); a kind added with
:func:`register_budget` is set by name with ``PruningConfig(custom_budget={name: value})``. A cost kind
(``unit_costs`` + ``limit``) is allocated by :func:`build_plan` with no other change: units are ranked by score and
kept while their summed cost fits the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from .adapters import model_dims
from .depth import layers_to_keep
from .plan import PlanMismatchError, PrunePlan
from .units import Unit, kv_group_units, neuron_units, normalise_, query_head_units

if TYPE_CHECKING:
    from .config import PruningConfig
    from .costs import CostModel
    from .importance import ImportanceScores

#: (per query head, per KV head, per FFN neuron) cost of a unit at a sequence length
UnitCosts = Callable[["CostModel", int], tuple[float, float, float]]
#: how much the kept layers may cost in total: (value, model, cost model, seq_len) -> limit
Limit = Callable[[float, nn.Module, "CostModel", int], float]


@dataclass(frozen=True)
class BudgetKind:
    """One kind of budget.

    Args:
        name: the config field or ``custom_budget`` key (and recipe key / CLI flag for built-ins).
        group: kinds of one group are one budget and may be set together.
        value: ``fraction`` of the dense model, in (0, 1]; ``count``, a positive number; or ``layers``, a
            fraction in (0, 1] or a whole count above 1.
        scheduled_from: what a gradual/iterative schedule moves the value from: ``one`` (keep everything),
            ``dense_params`` (the dense model's parameter count) or ``layers`` (every layer: iterative schedules
            remove layers round by round; gradual schedules choose them at the first event and fade them out).
        help: one line for ``--help`` and errors.
        method: the only pruning method that supports it (None: every method).
        unit_costs: for a cost budget, each unit's cost; None for count budgets and kinds searched elsewhere.
        limit: for a cost budget, the total the kept units may cost.
        combines: may be set together with one budget of another group (the depth budget).
    """

    name: str
    group: str
    value: Literal["fraction", "count", "layers"]
    scheduled_from: Literal["one", "dense_params", "layers"]
    help: str
    method: str | None = None
    unit_costs: UnitCosts | None = None
    limit: Limit | None = None
    combines: bool = False

    def check(self, value: Any) -> None:
        if self.value == "layers" and not (0 < value <= 1 or (value > 1 and float(value).is_integer())):
            raise ValueError(f"{self.name}={value} must be a fraction in (0, 1] of the layers or a whole count of "
                             "layers above 1")
        if self.value == "fraction" and not 0 < value <= 1:
            raise ValueError(f"{self.name}={value} is outside (0, 1]: it is the fraction of the dense model to keep")
        if self.value == "count" and value <= 0:
            raise ValueError(f"{self.name}={value} must be positive")


BUDGETS: dict[str, BudgetKind] = {}
#: Kinds that are PruningConfig fields (the rest are set through ``custom_budget``).
FIELD_BUDGETS = ("heads_keep", "neurons_keep", "flops_keep", "target_params", "latency_keep", "layers_keep")
#: The budget a command line or recipe uses when none is given: half the layer FLOPs.
DEFAULT_BUDGET = {"flops_keep": 0.5}


def register_budget(kind: BudgetKind) -> BudgetKind:
    """Make ``kind`` settable as ``PruningConfig(custom_budget={kind.name: value})`` and allocated by build_plan."""
    if kind.name in BUDGETS:
        raise ValueError(f"a budget kind named {kind.name!r} is already registered")
    BUDGETS[kind.name] = kind
    return kind


def set_budget(config: Any) -> dict[str, Any]:
    """Every budget ``config`` sets (fields that are not None, then ``custom_budget``), by kind name."""
    out = {name: getattr(config, name) for name in FIELD_BUDGETS if getattr(config, name, None) is not None}
    out.update(getattr(config, "custom_budget", None) or {})
    return out


def check_budget(config: Any) -> None:
    """Exactly one budget group set, each value in range, and supported by ``config.method``."""
    custom = getattr(config, "custom_budget", None) or {}
    unknown = sorted(set(custom) - set(BUDGETS))
    if unknown:
        raise ValueError(f"unknown budget kinds {unknown} in custom_budget; registered: {', '.join(BUDGETS)}")
    twice = sorted(k for k in custom if getattr(config, k, None) is not None)
    if twice:
        raise ValueError(f"{twice} set both as a field and in custom_budget: set each budget once")
    given = set_budget(config)
    for name, value in given.items():
        BUDGETS[name].check(value)
    groups = {BUDGETS[name].group for name in given if not BUDGETS[name].combines}
    if len(groups) > 1 or not given:
        listing = "; ".join(f"{b.name} ({b.help})" for b in BUDGETS.values())
        raise ValueError(f"set exactly one budget (heads_keep and neurons_keep count as one; layers_keep may be "
                         f"added to any): {listing}")
    for name in given:
        method = BUDGETS[name].method
        if method is not None and config.method != method:
            raise ValueError(f"{name} needs method={method!r} (got method={config.method!r})")


def _flops_costs(cost: "CostModel", seq: int) -> tuple[float, float, float]:
    return cost.head_flops(seq), cost.kv_flops(seq), cost.neuron_flops(seq)


def _params_costs(cost: "CostModel", seq: int) -> tuple[float, float, float]:
    return cost.head_params, cost.kv_params, cost.neuron_params


def _flops_limit(value: float, model: nn.Module, cost: "CostModel", seq: int) -> float:
    return value * cost.total(PrunePlan.dense(model).layer_sizes(), seq)["total"]


def _params_limit(value: float, model: nn.Module, cost: "CostModel", seq: int) -> float:
    from .costs import count_params, model_layer_sizes

    fixed = count_params(model) - cost.total(model_layer_sizes(model))["total"]
    if value - fixed < 0:
        raise ValueError(f"target_params={value} is unreachable: the parts pruning cannot touch (embeddings, norms, "
                         f"task head, output biases) already hold {fixed} parameters")
    return value - fixed


for _kind in (
    BudgetKind("heads_keep", "units", "fraction", "one", "fraction of attention heads to keep"),
    BudgetKind("neurons_keep", "units", "fraction", "one", "fraction of FFN neurons to keep"),
    BudgetKind("flops_keep", "flops", "fraction", "one", "fraction of the layers' FLOPs to keep",
               unit_costs=_flops_costs, limit=_flops_limit),
    BudgetKind("target_params", "params", "count", "dense_params", "total parameter count of the pruned model",
               unit_costs=_params_costs, limit=_params_limit),
    BudgetKind("latency_keep", "latency", "fraction", "one", "fraction of the layers' measured latency to keep",
               method="retraining_free"),
    BudgetKind("layers_keep", "depth", "layers", "layers", "fraction (<= 1) or count (> 1) of the layers to keep",
               combines=True),
):
    register_budget(_kind)


# -------------------------------------------------------------------------------------------- allocation


def _take_count(
    units: list[list[Unit]], n_keep: int, allocation: str, floor: int, per_id: bool = False
) -> list[list[Unit]]:
    """Keep ``n_keep`` units' worth of ids (per layer for uniform, in total for global), never more."""
    if allocation == "uniform":
        kept = []
        for layer in units:
            chosen, n = [], 0
            for u in layer:
                if n + len(u.ids) > n_keep and len(chosen) >= min(floor, len(layer)):
                    break
                chosen.append(u)
                n += len(u.ids)
            kept.append(chosen)
        return kept
    kept = [layer[: min(floor, len(layer))] for layer in units]
    n = sum(len(u.ids) for layer in kept for u in layer)
    nxt = [len(k) for k in kept]
    # By score per id: query-head units differ in size (KV groups and neuron blocks are equal, but for the last)
    key = (lambda u: -u.score / len(u.ids)) if per_id else (lambda u: -u.score)
    pool = sorted((u for i, layer in enumerate(units) for u in layer[nxt[i] :]), key=key)
    for u in pool:
        # Within a layer units are taken in order, so ids stay the layer's best.
        if n + len(u.ids) > n_keep or units[u.layer][nxt[u.layer]] is not u:
            continue
        kept[u.layer].append(u)
        nxt[u.layer] += 1
        n += len(u.ids)
    return kept


def _take_budget(
    heads: list[list[Unit]], neurons: list[list[Unit]], budget: float, allocation: str, floor: int
) -> tuple[list[list[Unit]], list[list[Unit]]]:
    """Maximise kept score under a cost budget. Tries every number of head units (per layer for uniform,
    in total for global) and fills what is left with the best neuron blocks."""
    L = len(heads)
    h_floor = [min(floor, len(x)) for x in heads]
    n_floor = [min(floor, len(x)) for x in neurons]
    fixed = sum(u.cost for i in range(L) for u in heads[i][: h_floor[i]] + neurons[i][: n_floor[i]])
    if fixed > budget:
        raise ValueError(
            f"budget unreachable: it allows {budget:.4g} but keeping one head group and one neuron block per "
            f"layer already costs {fixed:.4g}; raise the budget or set allow_empty_layers=True"
        )

    neuron_pool = sorted((u for i, x in enumerate(neurons) for u in x[n_floor[i] :]), key=lambda u: -u.score)

    def fill(kept: list[list[Unit]], units: list[list[Unit]], left: float) -> float:
        """Add neuron blocks best-first (each layer in its own order) while they fit; return what is left."""
        nxt = [len(k) for k in kept]
        for u in neuron_pool:
            if u.cost <= left + 1e-9 and units[u.layer][nxt[u.layer]] is u:
                kept[u.layer].append(u)
                nxt[u.layer] += 1
                left -= u.cost
        return left

    best: tuple[float, list[list[Unit]], list[list[Unit]]] | None = None
    if allocation == "uniform":
        max_h = max((len(x) for x in heads), default=0)
        for k in range(min(h_floor or [0]), max_h + 1):
            kh = [x[: max(k, h_floor[i])] for i, x in enumerate(heads)]
            left = budget - sum(u.cost for x in kh for u in x) - sum(
                u.cost for i in range(L) for u in neurons[i][: n_floor[i]]
            )
            if left < -1e-9:
                break
            kn = [x[: n_floor[i]] for i, x in enumerate(neurons)]
            # Same number of neuron blocks in every layer: add block rounds while a whole round fits.
            depth = max(n_floor or [0])
            while True:
                extra = [x[depth] for i, x in enumerate(neurons) if depth < len(x) and depth >= n_floor[i]]
                cost = sum(u.cost for u in extra)
                if not extra or cost > left + 1e-9:
                    break
                for u in extra:
                    kn[u.layer].append(u)
                left -= cost
                depth += 1
            score = sum(u.score for x in kh + kn for u in x)
            if best is None or score > best[0]:
                best = (score, kh, kn)
    else:
        base_h = [x[: h_floor[i]] for i, x in enumerate(heads)]
        # By score per cost: query-head units differ in cost (whole KV groups all cost the same); a layer's units
        # come in falling score per cost, so every prefix of the pool takes each layer's units in order.
        pool = sorted((u for i, x in enumerate(heads) for u in x[h_floor[i] :]), key=lambda u: -u.score / u.cost)
        for n_h in range(len(pool) + 1):
            kh = [list(x) for x in base_h]
            for u in pool[:n_h]:
                kh[u.layer].append(u)
            left = budget - fixed - sum(u.cost for u in pool[:n_h])
            if left < -1e-9:
                break
            kn = [x[: n_floor[i]] for i, x in enumerate(neurons)]
            fill(kn, neurons, left)
            score = sum(u.score for x in kh + kn for u in x)
            if best is None or score > best[0]:
                best = (score, kh, kn)
    assert best is not None
    return best[1], best[2]


def build_plan(scores: "ImportanceScores", model: nn.Module, config: "PruningConfig") -> PrunePlan:
    """Choose the heads and neurons to keep from ``scores`` under ``config``'s budget.

    Heads of a grouped-query-attention model are chosen a whole key/value group at a time, or with
    ``config.head_unit="query_head"`` one query head at a time with the same number per kept KV head; neurons in
    blocks of ``config.round_to``. Unless ``config.allow_empty_layers``, each layer keeps at least one
    head group and one neuron block. Never exceeds the budget; raises ``ValueError`` if it cannot be met.
    """
    from .costs import CostModel

    current = PrunePlan.of(model)
    d = model_dims(model)
    L = d["num_layers"]
    if tuple(scores.heads.shape) != (L, d["num_heads"]) or tuple(scores.neurons.shape) != (
        L,
        d["intermediate_size"],
    ):
        raise PlanMismatchError(
            f"scores of shape heads {tuple(scores.heads.shape)} / neurons {tuple(scores.neurons.shape)} do not "
            f"fit this model ({L} layers, {d['num_heads']} heads, {d['intermediate_size']} neurons)"
        )
    cost = CostModel.for_model(model)
    group = current.group_size
    floor = 0 if config.allow_empty_layers else 1
    budget = config.budget()  # {kind: value}: one width group, and/or the depth budget
    layers = None
    if "layers_keep" in budget:
        if scores.layers is None:
            raise ValueError("layers_keep needs whole-layer scores: pass ImportanceScores(layers=hf_prune."
                             "layer_importance(model, data)) (hf_prune.prune computes them)")
        layers = layers_to_keep(scores.layers, budget["layers_keep"], current)
        scores = scores.only_layers(layers)  # the width budget is spent on the layers that stay
    kinds = [BUDGETS[name] for name in budget if not BUDGETS[name].combines]
    costed = [k for k in kinds if k.unit_costs is not None]
    if kinds and not costed and kinds[0].group != "units":
        raise ValueError(f"{kinds[0].name} is not allocated by build_plan: it needs method={kinds[0].method!r}")
    seq = config.seq_len
    per_head, per_kv, per_neuron = costed[0].unit_costs(cost, seq) if costed else (1.0, 0.0, 1.0)
    head_cost = group * per_head + per_kv  # a unit is a KV group: its query heads and its K/V head
    by_query = config.head_unit == "query_head" and group > 1
    if by_query:
        heads = query_head_units(scores.heads, group, per_head, per_kv, config.allocation == "uniform")
    else:
        heads = kv_group_units(scores.heads, group, head_cost)
    neurons = neuron_units(scores.neurons, config.round_to, per_neuron)

    if not costed:  # count budgets: so many heads / neurons
        kh = heads
        if config.heads_keep is not None:
            units = d["num_heads"] if by_query else d["num_kv_heads"]  # per layer: query heads or KV groups
            n = round(config.heads_keep * (L if config.allocation == "global" else 1) * units)
            kh = _take_count(heads, n if by_query else n * group, config.allocation, floor, per_id=by_query)
        kn = neurons
        if config.neurons_keep is not None:
            per = config.neurons_keep * d["intermediate_size"]
            n = int(per * L) if config.allocation == "global" else int(per) // config.round_to * config.round_to
            kn = _take_count(neurons, n, config.allocation, floor)
    else:
        if not scores.comparable:
            normalise_(heads, head_cost)
            normalise_(neurons, per_neuron)
        kind = costed[0]
        limit = kind.limit(budget[kind.name], model, cost, seq)
        kh, kn = _take_budget(heads, neurons, limit, config.allocation, floor)

    plan = PrunePlan(
        model_type=current.model_type,
        num_heads=current.num_heads,
        num_kv_heads=current.num_kv_heads,
        intermediate_size=current.intermediate_size,
        hidden_size=current.hidden_size,
        heads=[[h for u in x for h in u.ids] for x in kh],
        neurons=[[n for u in x for n in u.ids] for x in kn],
        layers=layers,
        meta={
            **current.meta,
            "criterion": scores.criterion,
            "calibration_samples": scores.num_samples,
            "budget": budget,
            "allocation": config.allocation,
            "round_to": config.round_to,
            "seq_len": config.seq_len,
            **({"layer_importance": config.layer_importance} if layers is not None else {}),
            **({"head_unit": config.head_unit} if by_query else {}),
        },
    )
    return plan

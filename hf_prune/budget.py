"""Allocation: :func:`build_plan` chooses the units to keep under one budget (the kinds: :mod:`hf_prune.budget_kinds`,
re-exported here). Units are ranked by score and kept while their count or summed cost fits; a layer keeps at least
one head group and one neuron block unless ``allow_empty_layers``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from .adapters import model_dims
from .budget_kinds import BUDGETS, DEFAULT_BUDGET, FIELD_BUDGETS, BudgetKind, check_budget, register_budget, set_budget
from .costs import CostModel
from .depth import layers_to_keep
from .hidden import channels_to_keep
from .plan import PlanMismatchError, PrunePlan
from .units import Unit, kv_group_units, neuron_units, normalise_, query_head_units

if TYPE_CHECKING:
    from .config import PruningConfig
    from .importance import ImportanceScores

__all__ = ["BUDGETS", "DEFAULT_BUDGET", "FIELD_BUDGETS", "BudgetKind", "build_plan", "check_budget",
           "register_budget", "set_budget"]


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


def build_plan(
    scores: "ImportanceScores", model: nn.Module, config: "PruningConfig", context: Mapping[str, Any] | None = None
) -> PrunePlan:
    """Choose the heads and neurons to keep from ``scores`` under ``config``'s budget.

    The depth budget (a kind of ``value="layers"``) is applied first, here only: its lowest-scored layers go and the
    width budget is spent on the rest. The hidden-width budget (``value="channels"``) comes next: the best-scored
    channels stay, and every unit is costed at the kept width. A width kind with a ``search`` of its own allocates with it (``context`` is
    passed on: what the caller measured for it, e.g. ``latency_table``); every other kind ranks units by score.

    Heads of a grouped-query-attention model are chosen a whole key/value group at a time, or with
    ``config.head_unit="query_head"`` one query head at a time with the same number per kept KV head; neurons in
    blocks of ``config.round_to``. Unless ``config.allow_empty_layers``, each layer keeps at least one
    head group and one neuron block. Never exceeds the budget; raises ``ValueError`` if it cannot be met.
    """
    current = PrunePlan.of(model)
    d = model_dims(model)
    _check_scores_fit(scores, d)
    cost = CostModel.for_model(model)
    group = current.group_size
    floor = 0 if config.allow_empty_layers else 1
    budget = config.budget()  # {kind: value}: one width group, and/or the depth budget
    layers = None
    for name in (n for n in budget if BUDGETS[n].value == "layers"):  # the depth budget
        if scores.layers is None:
            raise ValueError(f"{name} needs whole-layer scores: pass ImportanceScores(layers=hf_prune."
                             "layer_importance(model, data)) (hf_prune.prune computes them)")
        layers = layers_to_keep(scores.layers, budget[name], current)
        scores = scores.only_layers(layers)  # the width budget is spent on the layers that stay
    hidden = None
    for name in (n for n in budget if BUDGETS[n].value == "channels"):  # the hidden-width budget
        if scores.hidden is None:
            raise ValueError(f"{name} needs hidden-channel scores: pass ImportanceScores(hidden=hf_prune."
                             "hidden_importance(model, data)) (hf_prune.prune computes them)")
        hidden = channels_to_keep(scores.hidden, budget[name], current)
        cost = cost.with_hidden(len(hidden))  # every unit costs less at the kept width
    kinds = [BUDGETS[name] for name in budget if not BUDGETS[name].combines]
    searched = [k for k in kinds if k.search is not None]
    if searched:
        plan = searched[0].search(scores, model, config, layers, context or {})
        plan.meta.update({"budget": budget, **({"layer_importance": config.layer_importance} if layers is not None else {})})
        return plan
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
        kh, kn = _take_counts(heads, neurons, config, d, group, by_query, floor)
    else:
        if not scores.comparable:
            normalise_(heads, head_cost)
            normalise_(neurons, per_neuron)
        kind = costed[0]
        limit = kind.limit(budget[kind.name], model, cost, seq)
        kh, kn = _take_budget(heads, neurons, limit, config.allocation, floor)

    meta = {
        **current.meta, "criterion": scores.criterion, "calibration_samples": scores.num_samples, "budget": budget,
        "allocation": config.allocation, "round_to": config.round_to, "seq_len": config.seq_len,
        **({"layer_importance": config.layer_importance} if layers is not None else {}),
        **({"hidden_importance": config.hidden_importance} if hidden is not None else {}),
        **({"head_unit": config.head_unit} if by_query else {}),
    }
    return PrunePlan(
        model_type=current.model_type, num_heads=current.num_heads, num_kv_heads=current.num_kv_heads,
        intermediate_size=current.intermediate_size, hidden_size=current.hidden_size,
        heads=[[h for u in x for h in u.ids] for x in kh], neurons=[[n for u in x for n in u.ids] for x in kn],
        layers=layers, meta=meta, hidden=hidden if hidden is not None else current.hidden,
    )


def _check_scores_fit(scores: "ImportanceScores", d: dict[str, int]) -> None:
    L = d["num_layers"]
    if tuple(scores.heads.shape) != (L, d["num_heads"]) or tuple(scores.neurons.shape) != (L, d["intermediate_size"]):
        raise PlanMismatchError(
            f"scores of shape heads {tuple(scores.heads.shape)} / neurons {tuple(scores.neurons.shape)} do not "
            f"fit this model ({L} layers, {d['num_heads']} heads, {d['intermediate_size']} neurons)"
        )


def _take_counts(heads: list, neurons: list, config: "PruningConfig", d: dict[str, int], group: int, by_query: bool,
                 floor: int) -> tuple[list, list]:
    """``heads_keep`` / ``neurons_keep``: so many query heads (or KV groups) and neurons, globally or per layer."""
    L = d["num_layers"]
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
    return kh, kn

"""Units of allocation: what a budget keeps or removes as one, per layer, in the order a layer gives them up.

Attention heads are whole key/value groups (``kv_group_units``) or single query heads in balanced steps
(``query_head_units``: every kept KV head keeps the same number of query heads); FFN neurons come in blocks of
``round_to`` (``neuron_units``). :func:`hf_prune.budget.build_plan` allocates them under a budget: within a layer
units are always taken in order, so each layer's kept ids are a prefix of its units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Unit:
    """A prunable unit of one layer: a KV group, a balanced step of query heads, or a block of ``round_to``
    neurons; ``ids`` are dense ids, ``score`` what keeping it is worth, ``cost`` what it costs under the budget."""

    layer: int
    ids: list[int]
    score: float
    cost: float


def kv_group_units(scores: torch.Tensor, group: int, cost: float) -> list[list[Unit]]:
    """Per layer, available head groups sorted best first. ``scores``: (L, H), NaN = already removed."""
    out = []
    for i, row in enumerate(scores):
        g = row.view(-1, group)  # (KV, group)
        units = [
            Unit(i, list(range(k * group, (k + 1) * group)), float(g[k].sum()), cost)
            for k in range(g.shape[0])
            if not torch.isnan(g[k]).any()
        ]
        out.append(sorted(units, key=lambda u: -u.score))
    return out


def _ranked_groups(row: torch.Tensor, group: int) -> list[list[int]]:
    """A layer's KV groups, best first (summed score), each as its available query heads, best first; the
    groups of a balanced layer all hold the same number. ``row``: (H,), NaN = already removed."""
    g = row.view(-1, group)  # (KV, group)
    out = []
    for k in sorted(range(g.shape[0]), key=lambda k: -float(torch.nan_to_num(g[k]).sum())):
        avail = [j for j in range(group) if not torch.isnan(g[k, j])]
        if avail:
            out.append([k * group + j for j in sorted(avail, key=lambda j: -float(g[k, j]))])
    return out


def _lattice_steps(value: torch.Tensor, per_head: float, per_kv: float) -> list[list[tuple[int, int]]]:
    """The order in which a layer grows from one query head to all: ``value[k, j]`` is the score of the j-th best
    query head of the k-th best KV group, ``(K, G)``. A balanced layer keeps the first ``g`` heads of its first
    ``k`` groups, so every step adds a group (its first ``g`` heads and its K/V head) or a level (the next head of
    every kept group) and every prefix of steps is balanced and nested. The order is found from the full layer
    down (budgets keep most of a model, so the first cuts matter most): each time the group or the level worth
    least per cost goes. Steps whose score per cost rises are merged by the caller."""
    K, G = value.shape
    removed: list[list[tuple[int, int]]] = []
    k, g = K, G
    while (k, g) != (1, 1):
        drop_k = (sum(float(value[k - 1, j]) for j in range(g)), g * per_head + per_kv) if k > 1 else None
        drop_g = (sum(float(value[i, g - 1]) for i in range(k)), k * per_head) if g > 1 else None
        if drop_g is None or (drop_k is not None and drop_k[0] * drop_g[1] <= drop_g[0] * drop_k[1]):
            removed.append([(k - 1, j) for j in range(g)])
            k -= 1
        else:
            removed.append([(i, g - 1) for i in range(k)])
            g -= 1
    return [[(0, 0)], *reversed(removed)]


def query_head_units(
    scores: torch.Tensor, group: int, per_head: float, per_kv: float, uniform: bool
) -> list[list[Unit]]:
    """Per layer, single query heads as units in balanced steps (see :func:`_lattice_steps`), merged where their
    score per cost rises. ``uniform``: one order for all layers, from their summed scores (a uniform cut keeps the
    same shape everywhere). ``scores``: (L, H), NaN = already removed."""
    ranked = [_ranked_groups(row, group) for row in scores]
    values = [
        torch.tensor([[float(scores[i, h]) for h in heads] for heads in r]) if r else torch.zeros(0, 0)
        for i, r in enumerate(ranked)
    ]
    shared = None
    live = [v for v in values if v.numel()]  # removed layers have no heads left
    if uniform and live and len({tuple(v.shape) for v in live}) == 1:
        shared = _lattice_steps(sum(live), per_head, per_kv)
    out = []
    for i, (r, v) in enumerate(zip(ranked, values)):
        steps = (shared if shared is not None else _lattice_steps(v, per_head, per_kv)) if r else []
        units: list[Unit] = []
        for cells in steps:
            u = Unit(i, [r[k][j] for k, j in cells], sum(float(v[k, j]) for k, j in cells),
                      sum(per_head for _ in cells) + sum(per_kv for k, j in cells if j == 0))
            units.append(u)
            if shared is None:  # merge while the new unit is worth more per cost than the one before
                while len(units) > 1 and units[-1].score * units[-2].cost > units[-2].score * units[-1].cost:
                    last = units.pop()
                    units[-1] = Unit(i, units[-1].ids + last.ids, units[-1].score + last.score,
                                      units[-1].cost + last.cost)
        out.append(units)
    return out


def neuron_units(scores: torch.Tensor, round_to: int, cost: float) -> list[list[Unit]]:
    """Per layer, blocks of ``round_to`` neurons, best neurons first. ``scores``: (L, I)."""
    out = []
    for i, row in enumerate(scores):
        avail = (~torch.isnan(row)).nonzero().view(-1)
        order = avail[torch.argsort(row[avail], descending=True, stable=True)].tolist()
        blocks = [order[j : j + round_to] for j in range(0, len(order), round_to)]
        out.append([Unit(i, b, float(row[b].sum()), cost * len(b)) for b in blocks])
    return out


def normalise_(units: list[list[Unit]], unit_cost: float) -> None:
    """Put a criterion whose heads and neurons are on unrelated scales on one scale: a unit of average
    score is worth its cost, so uniform scores give a uniform cut."""
    flat = [u for layer in units for u in layer]
    mean = sum(u.score for u in flat) / max(1, sum(u.cost for u in flat) / unit_cost)
    for u in flat:
        u.score = u.score / mean * unit_cost if mean > 0 else u.cost

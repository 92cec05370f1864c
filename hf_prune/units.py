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
    ``k`` groups; each step adds a group (its first ``g`` heads and its K/V head) or a level (the next head of
    every kept group), whichever adds more score per cost, so every prefix of steps is balanced and nested.
    Steps whose score per cost rises are merged with the step before, so a greedy allocation taking units in
    order of score per cost always takes a layer's steps in order."""
    K, G = value.shape
    steps, k, g = [[(0, 0)]], 1, 1
    while k < K or g < G:
        grow_k = (sum(float(value[k, j]) for j in range(g)), g * per_head + per_kv) if k < K else None
        grow_g = (sum(float(value[i, g]) for i in range(k)), k * per_head) if g < G else None
        if grow_g is None or (grow_k is not None and grow_k[0] * grow_g[1] >= grow_g[0] * grow_k[1]):
            steps.append([(k, j) for j in range(g)])
            k += 1
        else:
            steps.append([(i, g) for i in range(k)])
            g += 1
    return steps


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
    if uniform and len({tuple(v.shape) for v in values}) == 1 and values[0].numel():
        shared = _lattice_steps(sum(values), per_head, per_kv)
    out = []
    for i, (r, v) in enumerate(zip(ranked, values)):
        steps = shared if shared is not None else (_lattice_steps(v, per_head, per_kv) if r else [])
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

"""Stage 3: mask rearrangement: with each layer's counts fixed, swap kept/removed units to lower the second-order
loss estimate with the layer's full Fisher block."""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from ..plan import PrunePlan
from .fisher import FisherInfo


def quadratic_loss(fisher: torch.Tensor, keep: torch.Tensor) -> float:
    """Second-order loss estimate ``1/2 (1 - m)^T F (1 - m)`` of keeping ``keep`` (bool ``(n,)``)."""
    z = (~keep).double()
    return 0.5 * float(z @ fisher.double() @ z)


def swap_descent(fisher: torch.Tensor, keep: torch.Tensor, max_swaps: int | None = None,
                 groups: torch.Tensor | None = None, segments: torch.Tensor | None = None, floor: int = 0,
                 movable: torch.Tensor | None = None) -> torch.Tensor:
    """Local search over single swaps (one removed unit restored, one kept unit removed), which keeps the
    count; stops when no swap strictly lowers ``1/2 z^T F z`` (``z = 1 - m``). Never increases it.

    Each step first tries the cheap greedy pair, O(n): restore the unit whose return lowers the loss most,
    then remove the unit whose removal then raises it least. Only when that pair does not help is the best
    of all pairs searched, O(n^2), so the search ends at a point no single swap improves.

    Args:
        fisher: ``(n, n)`` Fisher block of the units.
        keep: ``(n,)`` bool, the starting mask.
        max_swaps: cap on swaps (default ``n``).
        groups: ``(n,)`` group ids: swap only inside a group, so every group keeps its count (query heads of one
            KV head: each kept KV head keeps the same number of query heads).
        segments: ``(n,)`` segment ids (a layer's heads, a layer's neurons): no swap leaves a segment with
            fewer than ``floor`` kept units.
        movable: ``(n,)`` bool: only these units are swapped (the others keep their state; their terms still
            count).
    """
    F = fisher.double()
    keep = keep.to(F.device, copy=True)
    n = len(keep)
    same = None if groups is None else (groups[:, None] == groups[None, :]).to(F.device)  # (n, n) swaps allowed
    movable = torch.ones(n, dtype=torch.bool, device=F.device) if movable is None else movable.to(F.device)
    if segments is not None:
        seg = torch.unique(segments.to(F.device), return_inverse=True)[1]  # (n,) segment index
        count = torch.zeros(int(seg.max()) + 1 if n else 0, dtype=torch.long, device=F.device)  # (S,)
        count.index_add_(0, seg, keep.long())
    g = F @ (~keep).double()  # (n,) gradient of 1/2 z^T F z at z = 1 - m
    d = F.diagonal()
    tol = 1e-12 * max(float(d.sum()), 1e-30)
    inf = torch.tensor(math.inf, dtype=F.dtype, device=F.device)
    for _ in range(max_swaps if max_swaps is not None else n):
        if (keep | ~movable).all() or not (keep & movable).any():
            break
        # restoring i changes the loss by -g_i + F_ii / 2; then removing j by g'_j + F_jj / 2, g' = g - F[:, i]
        restore = torch.where(~keep & movable, 0.5 * d - g, inf)  # (n,)
        i = int(restore.argmin())
        ok = keep & movable if same is None else keep & movable & same[i]
        if segments is not None:  # j may go if its segment, after i's return, keeps more than the floor
            ok &= count[seg] + (seg == seg[i]).long() > floor  # (n,)
        remove = torch.where(ok, g - F[:, i] + 0.5 * d, inf)  # (n,)
        j = int(remove.argmin())
        if float(restore[i] + remove[j]) >= -tol:
            out, inn = (~keep & movable).nonzero().view(-1), (keep & movable).nonzero().view(-1)
            # all pairs: g_j - g_i + (F_ii + F_jj) / 2 - F_ij
            delta = (g[inn] + 0.5 * d[inn])[None, :] - (g[out] - 0.5 * d[out])[:, None] - F[out][:, inn]
            if same is not None:
                delta = torch.where(same[out][:, inn], delta, inf)
            if segments is not None:
                left = count[seg[inn]][None, :] + (seg[out][:, None] == seg[inn][None, :]).long()  # (out, in)
                delta = torch.where(left > floor, delta, inf)
            best = int(delta.argmin())  # out and inn are non-empty: the loop's first check
            if float(delta.view(-1)[best]) >= -tol:
                break
            i, j = int(out[best // len(inn)]), int(inn[best % len(inn)])
        keep[i], keep[j] = True, False
        if segments is not None:
            count[seg[i]] += 1
            count[seg[j]] -= 1
        g += F[:, j] - F[:, i]
    return keep


def rearrange_masks(
    plan: PrunePlan, fisher: FisherInfo, *, max_swaps: int | None = None, progress: bool = True
) -> tuple[PrunePlan, list[dict[str, float]]]:
    """Within each layer, re-choose which heads and neurons ``plan`` keeps, same counts, minimising
    ``1/2 (1 - m)^T F (1 - m)`` with the layer's Fisher blocks. Heads move as whole KV groups; where ``plan`` keeps
    part of each kept group (``head_unit="query_head"``), the kept groups stay and query heads move inside them.

    Returns the new plan and, per layer, the loss estimate before and after for heads and neurons.
    """
    if fisher.diagonal_only:
        raise ValueError("the rearrangement needs the Fisher blocks, and this Fisher kept only their diagonal: "
                         "fisher_information(..., diagonal=False)")
    current = fisher.current
    group = current.group_size
    heads: list[list[int]] = [[] for _ in range(current.num_layers)]  # dense rows; removed layers stay empty
    neurons: list[list[int]] = [[] for _ in range(current.num_layers)]
    stats = []
    for p, i in enumerate(tqdm(current.kept_layers, desc="rearrange", disable=not progress)):
        ids = current.heads[i]
        if len(plan.heads[i]) != len(plan.kv_heads(i)) * group:
            # Part of each kept group stays: swap query heads inside their group (the counts stay balanced).
            Fg = fisher.heads[p].double().cpu()  # (H_l, H_l)
            kept_set = set(plan.heads[i])
            keep_g = torch.tensor([h in kept_set for h in ids], dtype=torch.bool)
            new_g = swap_descent(Fg, keep_g, max_swaps, groups=torch.tensor([h // group for h in ids]))
            heads[i] = [h for h, kept in zip(ids, new_g.tolist()) if kept]
        else:
            # A KV group is removed whole, so its loss term is the group-summed block P^T F P.
            groups = sorted({h // group for h in ids})
            P = torch.tensor([[float(h // group == k) for k in groups] for h in ids], dtype=torch.float64)
            P = P.view(len(ids), len(groups))  # (H_l, G) membership
            Fg = P.T @ fisher.heads[p].double().cpu() @ P  # (G, G)
            keep_g = torch.tensor([k * group in plan.heads[i] for k in groups], dtype=torch.bool)
            new_g = swap_descent(Fg, keep_g, max_swaps)
            heads[i] = [k * group + j for k, kept in zip(groups, new_g.tolist()) if kept for j in range(group)]
        # Neurons.
        Fn = fisher.neurons[p].double().cpu()  # (I_l, I_l)
        kept_set = set(plan.neurons[i])
        keep_n = torch.tensor([n in kept_set for n in current.neurons[i]], dtype=torch.bool)
        new_n = swap_descent(Fn, keep_n, max_swaps)
        neurons[i] = [n for n, kept in zip(current.neurons[i], new_n.tolist()) if kept]
        stats.append({
            "heads_before": quadratic_loss(Fg, keep_g), "heads_after": quadratic_loss(Fg, new_g),
            "neurons_before": quadratic_loss(Fn, keep_n), "neurons_after": quadratic_loss(Fn, new_n),
        })
    new = PrunePlan(**{**asdict(plan), "heads": heads, "neurons": neurons, "meta": {**plan.meta, "rearranged": True}})
    return new, stats


def rearrange_across_layers(
    plan: PrunePlan, fisher: FisherInfo, *, floor: int = 1, max_swaps: int | None = None
) -> tuple[PrunePlan, dict[str, float]]:
    """Re-choose which heads (whole KV groups) and neurons ``plan`` keeps in the whole model, same total counts
    of each, minimising ``1/2 (1 - m)^T F (1 - m)`` with the cross-layer Fisher ``fisher.joint``: a swap may move a
    head or neuron to another layer (every head costs the same FLOPs and parameters in every layer, and so does
    every neuron, so the budget holds), and the terms between layers and between heads and neurons count.

    Args:
        floor: every layer keeps at least this many head groups and neurons (1; 0 with ``allow_empty_layers``).
            Layers ``plan`` removes whole stay removed.

    Returns the new plan and ``{"before", "after"}`` loss estimates and ``moved``, how many (query) heads and
    neurons changed layer.
    """
    if fisher.joint is None:
        raise ValueError("rearrange_across_layers needs the cross-layer Fisher: fisher_information(cross_layer=True)")
    current, group = fisher.current, fisher.current.group_size
    kept = set(plan.kept_layers)
    col: list[int] = []  # (N,) joint position -> swap unit; a KV group's query heads share one unit
    units: list[tuple[int, str, list[int]]] = []  # (dense layer, kind, dense ids) per swap unit
    for kind in ("heads", "neurons"):
        for i in current.kept_layers:
            ids = getattr(current, kind)[i]
            if kind == "heads":
                kv = sorted({h // group for h in ids})
                col += [len(units) + kv.index(h // group) for h in ids]
                units += [(i, kind, [h for h in ids if h // group == k]) for k in kv]
            else:
                col += range(len(units), len(units) + len(ids))
                units += [(i, kind, [x]) for x in ids]
    planned = {k: [set(v) for v in getattr(plan, k)] for k in ("heads", "neurons")}
    keep = torch.tensor([ids[0] in planned[kind][i] for i, kind, ids in units], dtype=torch.bool)  # (M,)
    col_t = torch.tensor(col)
    F = fisher.joint.double().cpu()  # (N, N)
    F = torch.zeros(len(units), len(col), dtype=F.dtype).index_add_(0, col_t, F)  # (M, N)
    F = torch.zeros(len(units), len(units), dtype=F.dtype).index_add_(1, col_t, F)  # (M, M)
    layer_of = {i: p for p, i in enumerate(current.kept_layers)}
    segments = torch.tensor([2 * layer_of[i] + (kind == "neurons") for i, kind, _ in units])
    new = swap_descent(F, keep, max_swaps, groups=torch.tensor([kind == "neurons" for _, kind, _ in units]),
                       segments=segments, floor=floor, movable=torch.tensor([i in kept for i, _, _ in units]))
    chosen: dict[str, list[list[int]]] = {"heads": [[] for _ in range(current.num_layers)],
                                         "neurons": [[] for _ in range(current.num_layers)]}
    for (i, kind, ids), k in zip(units, new.tolist()):
        if k:
            chosen[kind][i] += ids
    moved = sum(abs(len(chosen[k][i]) - len(getattr(plan, k)[i])) for k in chosen for i in range(current.num_layers))
    stats = {"before": quadratic_loss(F, keep), "after": quadratic_loss(F, new), "moved": moved // 2}
    out = PrunePlan(**{**asdict(plan), **{k: [sorted(v) for v in chosen[k]] for k in chosen},
                       "meta": {**plan.meta, "rearranged": "across_layers"}})
    return out, stats

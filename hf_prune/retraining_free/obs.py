"""OBS reselection (a variant of stage 4): with each layer's counts fixed, re-choose *which* heads and neurons
stay by the layer's own reconstruction, the optimal-brain-surgeon criterion of ZipLM / FLAP, instead of the
Fisher blocks of stage 3.

The least-squares problem the weights fit solves for an output projection, ``min ||X W - R||^2`` over all of
its input columns, is solved once; then units are removed greedily, each time the one whose removal (with the
remaining weights re-solved, the OBS update) raises the error least. The removal cost of a column group ``S``
is ``tr(W_S^T (H^-1)_SS^-1 W_S)`` with ``H = X^T X + lam I``; after each removal ``W`` and ``H^-1`` are updated
in closed form, so one solve serves the whole elimination. It runs inside :func:`hf_prune.tune_masks`
(``reselect=True``) on the same streams: each layer's choice sees the layers before it already cut and refitted,
and the chosen units are then refitted exactly as any other plan's.

Where the Fisher rearrangement asks which units the *task loss* needs, this asks which units the *next layer's
input* needs, with the compensation of the kept ones taken into account (correlated units are not both kept
for the same job). Which is better differs by model; the retraining-free selection compares the two on
held-out samples.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..shapes import get_module
from .layer_io import LayerInput, real_tokens, run_until


class NormalEquations:
    """Running normal equations of one least-squares fit ``min || X W - R ||^2``: ``X^T X`` ``(k, k)``, ``X^T R``
    ``(k, m)`` and ``||R||^2`` in float64 on the CPU, summed over calibration batches."""

    def __init__(self, k: int, m: int) -> None:
        self.XtX = torch.zeros(k, k, dtype=torch.float64)
        self.XtR = torch.zeros(k, m, dtype=torch.float64)
        self.rr = 0.0

    def add(self, X: torch.Tensor, R: torch.Tensor) -> None:
        """One batch: ``X`` ``(N, k)``, ``R`` ``(N, m)``."""
        # the products are cast as they are added: a float64 copy of the (k, k) product first would hold one
        # more matrix the size of the sum, the largest thing a refit holds
        self.XtX.add_((X.T @ X).cpu())
        self.XtR.add_((X.T @ R).cpu())
        self.rr += float(R.double().pow(2).sum())


def with_bias(X: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``X`` with a column of ones appended when ``linear`` has a bias (fitted as one more weight row)."""
    return torch.cat([X, X.new_ones(X.shape[0], 1)], 1) if linear.bias is not None else X


@torch.no_grad()
def backward_eliminate(
    normal: NormalEquations, groups: list[list[int]], keep: int, damping: float, max_steps: int = 2048
) -> list[int]:
    """Which ``keep`` of ``groups`` (lists of rows of ``normal``'s unknowns) to keep: greedy OBS elimination.

    Rows in no group (a bias) always stay. Each round costs an ``O(k^2)`` update, so at most ``max_steps`` rounds:
    when more groups must go (FFNs wider than MiniLM's or SmolLM2's 1536), each round removes the
    ``ceil(to_remove / max_steps)`` cheapest at once, on costs taken before the round, which is coarser (two
    near-duplicates can go together). Returns the kept group indices, sorted.
    """
    n = len(groups)
    if keep >= n:
        return list(range(n))
    H = normal.XtX
    lam = damping * float(H.diagonal().mean()) + 1e-12
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H + lam * torch.eye(H.shape[0], dtype=H.dtype)))
    W = Hinv @ normal.XtR  # (k, m) the ridge solution with every unit kept
    alive = list(range(n))
    per_round = max(1, math.ceil((n - keep) / max_steps))
    singles = all(len(g) == 1 for g in groups)
    pos = {r: r for r in range(H.shape[0])}  # row of the unknowns -> its index in Hinv and W now
    while len(alive) > keep:
        if singles:  # a neuron: ||W_j||^2 / (H^-1)_jj, all at once
            rows = torch.tensor([pos[groups[g][0]] for g in alive])
            costs = W[rows].pow(2).sum(1) / Hinv.diagonal()[rows].clamp_min(1e-30)
        else:  # a head or KV group: tr(W_S^T (H^-1)_SS^-1 W_S)
            costs = torch.stack([_group_cost(Hinv, W, [pos[r] for r in groups[g]]) for g in alive])
        take = min(per_round, len(alive) - keep)
        drop = {alive[int(j)] for j in costs.argsort()[:take]}
        S = torch.tensor([pos[r] for g in sorted(drop) for r in groups[g]])
        # OBS update for removing S: W -= H^-1[:, S] (H^-1_SS)^-1 W_S, and H^-1 downdated the same way
        inv_SS = torch.linalg.pinv(Hinv[S][:, S], hermitian=True)
        HS = Hinv[:, S]  # (k, |S|)
        W -= HS @ (inv_SS @ W[S])
        Hinv -= HS @ inv_SS @ HS.T
        alive = [g for g in alive if g not in drop]
        for g in drop:
            for r in groups[g]:
                del pos[r]
        if len(pos) < 0.8 * Hinv.shape[0]:
            # the removed rows and columns of Hinv are now zero: drop them, so each later update touches only
            # what is left (the updates are memory-bound; this halves the elimination's time on a wide FFN)
            rows = sorted(pos, key=pos.get)
            sel = torch.tensor([pos[r] for r in rows])
            Hinv, W = Hinv[sel][:, sel].contiguous(), W[sel]
            pos = {r: i for i, r in enumerate(rows)}
    return alive


def _group_cost(Hinv: torch.Tensor, W: torch.Tensor, rows: list[int]) -> torch.Tensor:
    S = torch.tensor(rows)
    WS = W[S]  # (|S|, m)
    return (WS * torch.linalg.solve(Hinv[S][:, S], WS)).sum()


def choose_heads(
    cut: nn.Module, adapter, head_dim: int, inputs: list[LayerInput], pruned_x: list[torch.Tensor],
    targets: list[tuple[torch.Tensor, torch.Tensor]], heads: list[int], group: int, damping: float,
) -> list[int]:
    """Positions of the query heads to keep in ``cut`` (a layer whose heads are all still there), as many as
    ``heads``, moved as whole key/value groups of ``group`` query heads; ``heads`` unchanged when it keeps part of
    a group (those stay where the search put them) or every head."""
    o = get_module(cut, adapter.o)
    n_heads = o.in_features // head_dim
    kept_groups = sorted({h // group for h in heads})
    if len(heads) == n_heads or len(kept_groups) * group != len(heads):
        return list(heads)
    normal = NormalEquations(o.in_features + (o.bias is not None), o.out_features)
    for x, h, (t_attn, _) in zip(inputs, pruned_x, targets):
        ctx = real_tokens(run_until(cut, adapter, x, h, "o")["o_in"], x.tokens)  # (N, H * d)
        normal.add(with_bias(ctx, o), t_attn - real_tokens(h, x.tokens))
    width = group * head_dim
    cols = [list(range(g * width, (g + 1) * width)) for g in range(n_heads // group)]
    kept = backward_eliminate(normal, cols, len(kept_groups), damping)
    return [g * group + j for g in kept for j in range(group)]


def choose_neurons(
    cut: nn.Module, adapter, inputs: list[LayerInput], pruned_x: list[torch.Tensor],
    targets: list[tuple[torch.Tensor, torch.Tensor]], pre_norm: bool, count: int, damping: float,
) -> list[int]:
    """Positions of the ``count`` FFN neurons to keep in ``cut`` (its attention already cut and fitted, its
    neurons all still there)."""
    down = get_module(cut, adapter.down)
    if count >= down.in_features:  # nothing to choose: skip the pass
        return list(range(down.in_features))
    normal = NormalEquations(down.in_features + (down.bias is not None), down.out_features)
    for x, h, (_, t_ffn) in zip(inputs, pruned_x, targets):
        rec = run_until(cut, adapter, x, h, "down")
        res = (h + rec["o_out"]) if pre_norm else rec["up_in"]  # (B, T, D) the FFN residual
        normal.add(with_bias(real_tokens(rec["down_in"], x.tokens), down), t_ffn - real_tokens(res, x.tokens))
    return backward_eliminate(normal, [[j] for j in range(down.in_features)], count, damping)

"""The least-squares solves of mask tuning: per-unit output scales, or a projection's whole weight, each a ridge
pulled towards the plain cut so that the fitted error is never above the cut's."""

from __future__ import annotations

import math

import torch
from torch import nn

from .obs import NormalEquations


def solve_scales(
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


def solve_weights_(
    XtX: torch.Tensor, XtR: torch.Tensor, rr: float, W0: torch.Tensor, damping: float
) -> tuple[torch.Tensor, float, float]:
    """Minimise ``err(W) = || X W - R ||^2`` over a projection's weights ``W`` ``(k, D)`` (transposed, a bias
    row last where there is one), from ``XtX = X^T X``, ``XtR = X^T R`` and ``rr = ||R||^2``.

    Ridge pulled towards the current weights ``W0`` (the plain cut), ``(XtX + lam I) W = XtR + lam W0``: in
    the last layer of a classifier only the read positions are fitted (a few hundred rows for up to ``I``
    unknowns), and the pull keeps what the data does not determine where it was. Minimising
    ``err(W) + lam ||W - W0||^2`` gives ``err(W) <= err(W0)``.

    In place: ``XtX`` is overwritten by the Cholesky factor ``L`` of ``XtX + lam I``. A float64 ``(k, k)`` matrix is
    the largest thing a refit holds (0.5 GB for an 8192-wide FFN, 6.6 GB for a 70B model's 28672), and a solve
    that kept ``XtX`` would hold two more beside it; ``err(W)`` then comes from the factor,
    ``W^T XtX W = ||L^T W||^2 - lam ||W||^2``.

    Returns ``W``, err(W0) and err(W).
    """
    before = float((W0 * (XtX @ W0)).sum() - 2 * (W0 * XtR).sum() + rr)
    if XtX.shape[0] == 0:  # an emptied block without a bias: nothing to fit
        return W0, before, before
    lam = damping * float(XtX.diagonal().mean()) + 1e-12
    XtX.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(XtX, out=(XtX, torch.empty(0, dtype=torch.int32)))  # (k, k) lower
    if int(info) != 0:  # not positive definite: only non-finite statistics get here; the plain cut is the answer
        return W0, before, before
    W = torch.cholesky_solve(XtR + lam * W0, L)
    after = float((L.mT @ W).pow(2).sum() - lam * W.pow(2).sum() - 2 * (W * XtR).sum() + rr)
    if after > before:  # only rounding can get here; the plain cut is then the answer
        W, after = W0, before
    return W, before, after


@torch.no_grad()
def refit_(linear: nn.Linear, normal: NormalEquations, damping: float) -> tuple[float, float]:
    """Replace ``linear``'s weight (and bias) by the ridge least-squares fit; returns err before and after.
    ``normal`` is used up (its ``XtX`` becomes the solve's factor: :func:`solve_weights_`)."""
    W0 = linear.weight.T if linear.bias is None else torch.cat([linear.weight.T, linear.bias[None]], 0)
    W, before, after = solve_weights_(normal.XtX, normal.XtR, normal.rr, W0.double().cpu(), damping)
    W = W.to(linear.weight.device, linear.weight.dtype)
    linear.weight.copy_(W[: linear.in_features].T)
    if linear.bias is not None:
        linear.bias.copy_(W[-1])
    return before, after

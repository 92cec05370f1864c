"""How far a model's outputs are from a reference's, per sample: what stage selection, depth search and the
``skip_divergence`` layer criterion compare (a leaf: imports only torch)."""

from __future__ import annotations

from typing import Any

import torch


def model_output(out: Any) -> tuple[torch.Tensor, bool]:
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

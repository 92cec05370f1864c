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


class FidelitySums:
    """Running sums, over held-out samples, of how closely a cut model follows the dense one without labels: the
    mean divergence (:func:`sample_divergence`) and, by output kind, top-1 agreement (logits over classes or tokens),
    Pearson correlation (one regression output) or cosine similarity (hidden states). Sums, so ranks can add theirs
    (:meth:`as_tensor`) before :meth:`result`."""

    #: the sums, in :meth:`as_tensor`'s order
    FIELDS = ("samples", "divergence", "positions", "agree", "cosine", "x", "y", "xx", "yy", "xy")

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.FIELDS, 0.0)
        self.kind = ""

    def add(self, ref: torch.Tensor, out: torch.Tensor, kl: bool, attention_mask: torch.Tensor | None) -> None:
        s = self.sums
        s["samples"] += ref.shape[0]
        s["divergence"] += float(sample_divergence(ref, out, kl, attention_mask).sum())
        if kl or ref.shape[-1] > 1:
            # (B,) or (B, T) per position; padding positions do not count
            hit = (ref.argmax(-1) == out.argmax(-1)).double() if kl else \
                torch.nn.functional.cosine_similarity(ref.double(), out.double(), dim=-1)
            m = attention_mask.to(hit.dtype) if hit.dim() == 2 and attention_mask is not None else torch.ones_like(hit)
            s["positions"] += float(m.sum())
            s["agree" if kl else "cosine"] += float((hit * m).sum())
            self.kind = "agreement" if kl else "cosine"
        else:  # one regression output per sample
            x, y = ref.reshape(-1).double(), out.reshape(-1).double()
            for k, v in {"x": x, "y": y, "xx": x * x, "yy": y * y, "xy": x * y}.items():
                s[k] += float(v.sum())
            self.kind = "correlation"

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.sums[k] for k in self.FIELDS], dtype=torch.float64)

    def load(self, t: torch.Tensor) -> None:
        self.sums = dict(zip(self.FIELDS, t.tolist()))

    def result(self) -> dict[str, Any]:
        """``samples``, ``divergence`` (mean; ``divergence_kind`` KL or squared error) and the kind's statistic."""
        s = self.sums
        n = max(s["samples"], 1.0)
        out: dict[str, Any] = {"samples": int(s["samples"]), "divergence": s["divergence"] / n,
                               "divergence_kind": "kl" if self.kind == "agreement" else "squared_error"}
        if self.kind == "correlation":
            cov = s["xy"] / n - s["x"] * s["y"] / n**2
            var = (s["xx"] / n - (s["x"] / n) ** 2) * (s["yy"] / n - (s["y"] / n) ** 2)
            out["correlation"] = cov / var**0.5 if var > 0 else float("nan")
        elif self.kind:
            out[self.kind] = s["agree" if self.kind == "agreement" else "cosine"] / max(s["positions"], 1.0)
            out["positions"] = int(s["positions"])
        return out


def describe_fidelity(fidelity: dict[str, Any]) -> str:
    """One line for a user: how the cut model follows the dense one on held-out calibration inputs."""
    n, div = fidelity["samples"], fidelity["divergence"]
    where = f"{n} held-out calibration samples"
    if "agreement" in fidelity:
        tokens = fidelity.get("positions", n) > n
        what = f"{fidelity['positions']} held-out tokens of {n} calibration samples" if tokens else where
        return f"agrees with the dense model's top-1 on {fidelity['agreement']:.1%} of {what} (KL {div:.4f})"
    if "correlation" in fidelity:
        return f"correlates {fidelity['correlation']:.4f} with the dense model's outputs on {where} (MSE {div:.4g})"
    if "cosine" in fidelity:
        return f"cosine {fidelity['cosine']:.4f} with the dense model's outputs on {where}"
    return f"divergence {div:.4g} from the dense model on {where}"


def fidelity_line(meta: dict[str, Any]) -> str | None:
    """What to tell the user about a plan's fidelity (its ``meta``): the estimate, or, when a retraining-free cut
    had no held-out samples to estimate it on, how to get one; None for plans that have neither."""
    if "fidelity" in meta:
        return f"the cut model {describe_fidelity(meta['fidelity'])}"
    rf = meta.get("retraining_free")
    if rf is None:
        return None
    return (f"no fidelity estimate: the mask tuning used all {rf['calibration_samples']} calibration samples; give "
            f"more than tuning_samples ({rf.get('tuning_samples', 'all')}) to hold samples out for it")

"""Where the variance of retraining-free pruning comes from (issue 37), from ``bench_robustness.py``'s cells: every
cell holds each candidate stage's cut on the dev set (``stages``: search, rearranged, tuned, ...), the units it kept,
the stage the held-out selection chose, and the label-free fidelity the user was shown (``fidelity``).

- :func:`stage_rows`: per (task, budget, method, stage): the drop over every (dense model, draw), its largest spread
  between the draws of one model, how often the selection chose the stage, and how much the draws agree on the
  units the stage keeps (Jaccard of the kept heads and of the kept neurons, mean over pairs of draws).
- :func:`spread_rows`: per (task, budget, method): the largest drop spread between draws of one dense model, the
  selection's regret (the chosen stage's drop minus the best stage's, on dev) and how often its choice differs
  between the draws of one model.
- :func:`fidelity_rows`: per (task, method): the correlation of the held-out fidelity estimate with the dev drop.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from typing import Any

Row = dict[str, Any]


def _groups(rows: Sequence[Row], *keys: str) -> dict[tuple, list[Row]]:
    out: dict[tuple, list[Row]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _jaccard(a: list[list[int]], b: list[list[int]]) -> float:
    """Overlap of two per-layer kept-unit lists (``plan.heads`` / ``plan.neurons``)."""
    sa = {(i, u) for i, units in enumerate(a) for u in units}
    sb = {(i, u) for i, units in enumerate(b) for u in units}
    return len(sa & sb) / max(len(sa | sb), 1)


def _pair_overlap(units: Sequence[list]) -> tuple[float, float]:
    """Mean Jaccard over pairs of draws: (heads, neurons); NaN with fewer than two draws."""
    pairs = list(itertools.combinations(units, 2))
    if not pairs:
        return float("nan"), float("nan")
    return (statistics.fmean(_jaccard(a[0], b[0]) for a, b in pairs),
            statistics.fmean(_jaccard(a[1], b[1]) for a, b in pairs))


def _spread(drops_by_model: dict[str, list[float]]) -> float:
    return max((max(d) - min(d) for d in drops_by_model.values() if len(d) > 1), default=float("nan"))


def stage_rows(rows: Sequence[Row]) -> list[Row]:
    out = []
    for (task, keep, method), group in _groups(rows, "task", "flops_keep", "method").items():
        names = list(dict.fromkeys(n for r in group for n in r.get("stages", {})))
        for name in names:
            cells = [r for r in group if name in r.get("stages", {})]
            drops = [r["dense_value"] - r["stages"][name][r["metric"]] for r in cells]
            by_model: dict[str, list] = {}
            units: dict[str, list] = {}
            for r, d in zip(cells, drops):
                by_model.setdefault(r["dense"], []).append(d)
                units.setdefault(r["dense"], []).append(r["stages"][name]["units"])
            overlaps = [_pair_overlap(u) for u in units.values() if len(u) > 1]
            out.append({"task": task, "flops_keep": keep, "method": method, "stage": name, "runs": len(cells),
                        "drop_mean": statistics.fmean(drops), "drop_min": min(drops), "drop_max": max(drops),
                        "draw_spread_max": _spread(by_model),
                        "dev_agreement_mean": _mean_of(r["stages"][name].get("dev_agreement") for r in cells),
                        "chosen": sum(r["chosen"] == name for r in cells),
                        "heads_overlap": statistics.fmean(o[0] for o in overlaps) if overlaps else float("nan"),
                        "neurons_overlap": statistics.fmean(o[1] for o in overlaps) if overlaps else float("nan")})
    return out


def spread_rows(rows: Sequence[Row]) -> list[Row]:
    out = []
    for (task, keep, method), group in _groups(rows, "task", "flops_keep", "method").items():
        by_model: dict[str, list] = {}
        choices: dict[str, set] = {}
        regret = []
        for r in group:
            by_model.setdefault(r["dense"], []).append(r["drop"])
            choices.setdefault(r["dense"], set()).add(r.get("chosen", ""))
            stages = r.get("stages") or {}
            if stages:
                best = max(s[r["metric"]] for s in stages.values())
                regret.append(best - r["pruned_value"])
        # if each flipped dev prediction were a coin toss between right and wrong, the drop's standard deviation
        # would be sqrt(flips) examples: the spread that the number of flips alone explains
        flips = [((1 - r["dev_agreement"]) * r["dev_size"], r["dev_size"]) for r in group if "dev_agreement" in r]
        out.append({"task": task, "flops_keep": keep, "method": method, "runs": len(group),
                    "dev_flips_mean": _mean_of(f for f, _ in flips),
                    "flip_noise_sd": _mean_of(100 * f**0.5 / n for f, n in flips),
                    "draw_spread_max": _spread(by_model),
                    "draw_spread_mean": statistics.fmean(max(d) - min(d) for d in by_model.values()),
                    "selection_regret_mean": statistics.fmean(regret) if regret else float("nan"),
                    "models_choice_flips": sum(len(c) > 1 for c in choices.values()), "models": len(by_model)})
    return out


def _mean_of(values: Any) -> float:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else float("nan")


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    for r, i in enumerate(order):
        ranks[i] = float(r)
    return ranks


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3 or statistics.pstdev(x) == 0 or statistics.pstdev(y) == 0:
        return float("nan")
    return statistics.correlation(x, y)


def fidelity_rows(rows: Sequence[Row]) -> list[Row]:
    """Across (dense, draw, budget) cells of one method: does the label-free estimate predict the dev drop? Pearson
    and Spearman correlation of the drop with the held-out disagreement (1 - top-1 agreement) and with the held-out
    divergence; a useful estimate correlates positively with the drop."""
    out = []
    for (task, method), group in _groups(rows, "task", "method").items():
        cells = [r for r in group if r.get("fidelity")]
        if not cells:
            continue
        drop = [r["drop"] for r in cells]
        div = [r["fidelity"]["divergence"] for r in cells]
        row = {"task": task, "method": method, "runs": len(cells),
               "divergence_pearson": _pearson(div, drop), "divergence_spearman": _pearson(_ranks(div), _ranks(drop))}
        if all("agreement" in r["fidelity"] for r in cells):
            dis = [1 - r["fidelity"]["agreement"] for r in cells]
            row.update(disagreement_pearson=_pearson(dis, drop), disagreement_spearman=_pearson(_ranks(dis),
                                                                                              _ranks(drop)),
                       agreement_vs_dev_pearson=_pearson([r["fidelity"]["agreement"] for r in cells],
                                                         [r.get("dev_agreement", float("nan")) for r in cells]),
                       agreement_min=min(r["fidelity"]["agreement"] for r in cells),
                       agreement_max=max(r["fidelity"]["agreement"] for r in cells))
        out.append(row)
    return out

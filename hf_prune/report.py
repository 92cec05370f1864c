"""Reports: ``results.json``, markdown tables and PNG plots, shared by the recipes, the CLI and the benchmarks.

Everything here formats numbers that were measured elsewhere; nothing is computed or typed in by hand.
Plots use matplotlib's non-interactive ``Agg`` backend, so they work on a headless machine.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from .io import write_text_atomic
from .plan import PrunePlan


def environment() -> dict[str, Any]:
    """Where and when a number was measured: versions, CPU, torch threads, UTC time."""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically (temp file + rename), creating parent folders."""
    return write_text_atomic(path, json.dumps(payload, indent=2, default=_jsonable) + "\n")


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically, creating parent folders."""
    return write_text_atomic(path, text)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def format_value(value: Any, fmt: str | None = None) -> str:
    """One table cell: ``None`` -> ``-``, floats with ``fmt`` (default 4 significant digits), ints with commas."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if fmt is not None:
        return format(value, fmt)
    if isinstance(value, int):
        return f"{value:,d}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    formats: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    cell: Callable[[Any, str | None], str] | None = None,
) -> str:
    """A GitHub markdown table of ``rows`` (dicts); ``columns`` picks and orders keys (default: all, first-seen).

    Args:
        rows: one dict per table row; missing keys render as ``-``.
        columns: keys to show, in order.
        formats: per-column format spec, e.g. ``{"speedup": ".2f", "flops_kept": ".1%"}``.
        headers: per-column header text (default: the key).
        cell: how a value is written, ``cell(value, format)``; default :func:`format_value`.
    """
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    formats, headers, cell = formats or {}, headers or {}, cell or format_value
    lines = [
        "| " + " | ".join(headers.get(c, c) for c in columns) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c), formats.get(c)) for c in columns) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # a declared dependency; a clear message if an environment lacks it
        raise ImportError("plots need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _line_plot(
    series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, *, xlabel: str, ylabel: str,
    dense: float | None = None, title: str | None = None, flops_axis: bool = False, ideal: bool = False,
    log_y: bool = False,
) -> Path:
    """One line per series (points sorted by x). ``dense``: a horizontal reference line; ``flops_axis``: x is the
    fraction of FLOPs kept, drawn right to left (left to right = more pruning); ``ideal``: the FLOPs-ideal speedup
    1/x; ``log_y``: a logarithmic y axis (perplexities that span orders of magnitude)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = sorted({p[0] for points in series.values() for p in points})
    if ideal and xs:
        grid = [min(xs) + (max(xs) - min(xs)) * i / 50 for i in range(51)]
        ax.plot(grid, [1 / x for x in grid], color="black", linestyle="--", linewidth=1, label="FLOPs-ideal")
    for name, points in series.items():
        pts = sorted(points)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if dense is not None:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if flops_axis:
        ax.invert_xaxis()
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_metric_vs_flops(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    metric: str = "metric",
    dense: float | None = None,
    title: str | None = None,
) -> Path:
    """Line plot of the metric against the fraction of FLOPs kept, one line per method.

    Args:
        series: ``{method: [(flops_kept, metric), ...]}``; points are sorted by FLOPs.
        path: PNG file to write.
        metric: y-axis label.
        dense: the dense model's metric, drawn as a horizontal reference line.
    """
    return _line_plot(series, path, xlabel="fraction of encoder FLOPs kept", ylabel=metric, dense=dense,
                      title=title, flops_axis=True)


def plot_speedup_vs_flops(
    series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, *, title: str | None = None
) -> Path:
    """Measured speedup against FLOPs kept, one line per setting (e.g. batch size), with the ideal 1/kept line."""
    return _line_plot(series, path, xlabel="fraction of encoder FLOPs kept", ylabel="speedup vs dense", title=title,
                      flops_axis=True, ideal=True)


def plot_metric_vs_speedup(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    metric: str = "metric",
    dense: float | None = None,
    title: str | None = None,
    log_y: bool = False,
) -> Path:
    """The trade-off a user buys: the metric against the *measured* speedup, one line per method.

    Args:
        series: ``{method: [(speedup, metric), ...]}``.
        path: PNG file to write.
        metric: y-axis label.
        dense: the dense model's metric (at speedup 1), drawn as a horizontal reference line.
        log_y: a logarithmic y axis (perplexity).
    """
    return _line_plot(series, path, xlabel="measured speedup vs dense", ylabel=metric, dense=dense, title=title,
                      log_y=log_y)


def plot_layer_heatmap(plan: PrunePlan, dense_plan: PrunePlan, path: str | Path, *, title: str | None = None) -> Path:
    """Per-layer picture of a plan: kept heads as a (layers x heads) grid, kept FFN neurons as a fraction per layer
    (removed layers say so)."""
    plt = _pyplot()
    layers = plan.num_layers
    n_heads = max((len(h) for h in dense_plan.heads), default=1)
    heads = np.zeros((layers, n_heads))  # (L, H): 1 = kept
    for i, kept in enumerate(plan.heads):
        heads[i, list(kept)] = 1.0
    neurons = np.array(
        [[len(plan.neurons[i]) / max(len(dense_plan.neurons[i]), 1)] for i in range(layers)]
    )  # (L, 1)
    fig, (ax_h, ax_n) = plt.subplots(
        1, 2, figsize=(2 + 0.35 * n_heads + 1.5, 1 + 0.4 * layers), dpi=120,
        gridspec_kw={"width_ratios": [max(n_heads, 1), 2]},
    )
    ax_h.imshow(heads, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    ax_h.set_xlabel("head")
    ax_h.set_ylabel("layer")
    ax_h.set_xticks(range(n_heads))
    ax_h.set_yticks(range(layers))
    ax_h.set_title("heads kept")
    ax_n.imshow(neurons, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    kept_layers = set(plan.kept_layers)
    for i in range(layers):
        text = f"{len(plan.neurons[i])}/{len(dense_plan.neurons[i])}" if i in kept_layers else "removed"
        ax_n.text(0, i, text, ha="center", va="center", fontsize=7)
    ax_n.set_xticks([])
    ax_n.set_yticks(range(layers))
    ax_n.set_title("FFN kept")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path

"""bench_compare's methods table and its report: markdown tables, the across-dense-models summary and the plots, built
from cached cells only (``bench_compare.py --report_only`` rebuilds them without measuring anything)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import HERE, MAIN_METRIC, TASKS, Task, omp_env

import hf_prune as hp
from hf_prune import report

if TYPE_CHECKING:
    from bench_compare import TaskRun

RESULTS = HERE / "results"


# ----------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A pruner (``base`` None) or a recovery of another method's pruned model."""

    label: str
    base: str | None = None
    recovery: str | None = None  # "full" | "lora"


METHODS: dict[str, Method] = {
    "retraining_free": Method("hf_prune retraining-free"),
    "fisher": Method("hf_prune Fisher one-shot"),
    "retraining_free+kd_full": Method("hf_prune retraining-free + KD full", "retraining_free", "full"),
    "fisher+kd_full": Method("hf_prune Fisher + KD full", "fisher", "full"),
    "fisher+kd_lora": Method("hf_prune Fisher + KD LoRA", "fisher", "lora"),
    "tp_taylor": Method("Torch-Pruning Taylor"),
    "tp_taylor+kd_full": Method("Torch-Pruning Taylor + KD full", "tp_taylor", "full"),
    "tp_magnitude": Method("Torch-Pruning magnitude"),
    "tp_magnitude+kd_full": Method("Torch-Pruning magnitude + KD full", "tp_magnitude", "full"),
    "magnitude": Method("hf_prune magnitude"),
    "magnitude+kd_full": Method("hf_prune magnitude + KD full", "magnitude", "full"),
    "random": Method("random"),
    "random+kd_full": Method("random + KD full", "random", "full"),
}
QUICK_METHODS = ["retraining_free", "fisher", "fisher+kd_full", "fisher+kd_lora", "tp_taylor", "tp_taylor+kd_full",
                   "tp_magnitude", "tp_magnitude+kd_full", "magnitude", "random"]
BASELINE_RECOVERY = ["magnitude+kd_full", "random+kd_full"]


def expand(methods: list[str]) -> list[str]:
    """Methods in table order, each recovered method's pruner included (its latency/params are the pruner's)."""
    wanted = set(methods) | {METHODS[m].base for m in methods if METHODS[m].base}
    return [m for m in METHODS if m in wanted]


# ----------------------------------------------------------------------------------------------- report


def shape_cell(cell: dict, by: dict[tuple, dict]) -> dict | None:
    """The cell whose pruned model has ``cell``'s shapes (``by``: cells by (budget, method)): a recovery keeps its
    pruner's shapes, hence its parameters' layout and latency."""
    base = METHODS[cell["method"]].base
    return by.get((cell["budget"], base)) if base else cell


def table_rows(run_dense: dict, cells: list[dict], task: Task, budgets: list[float], methods: list[str]) -> list[dict]:
    """Markdown rows of one task: dense, then every (budget, method), measured or ``missing``."""
    main = MAIN_METRIC[task.name]
    by = {(c["budget"], c["method"]): c for c in cells}
    d = run_dense

    def row(c: dict, budget: float | None, method: str) -> dict:
        m = METHODS.get(method)
        r: dict[str, Any] = {"budget": budget, "method": m.label if m else "dense"}
        if c is None:
            r["status"] = "missing"
            return r
        shape = shape_cell(c, by) if m else c
        r.update({k: c["metrics"].get(k) for k in task.metrics})
        r["delta"] = c["metrics"][main] - d["metrics"][main] if c is not d else None
        r["flops_kept"] = c["flops_kept"]
        r["params_m"] = c["params"] / 1e6
        lat = (shape or {}).get("latency", {})
        for bs in ("b1", "b32"):
            b = lat.get(bs, {})
            r[f"{bs}_ms"] = b.get("pruned_ms", b.get("dense_ms") if c is d else None)
            r[f"{bs}_x"] = b.get("speedup")
            r[f"{bs}_ideal"] = b.get("of_ideal")
        if c is not d:
            r["prune_s"] = (shape or {}).get("prune_s")
            r["recovery_s"] = c.get("recovery_s")
            r["peak_mb"] = c.get("recovery_peak_rss_mb", c.get("peak_rss_mb"))
        return r

    rows = [row(d, None, "dense")]
    for k in budgets:
        rows += [row(by.get((k, m)), k, m) for m in methods]
    return rows


def table(rows: list[dict], task: Task) -> str:
    cols = ["budget", "method", *task.metrics, "delta", "flops_kept", "params_m", "b1_ms", "b1_x", "b1_ideal",
            "b32_ms", "b32_x", "b32_ideal", "prune_s", "recovery_s", "peak_mb"]
    if any("status" in r for r in rows):
        cols.append("status")
    formats = {"budget": ".0%", **{m: ".2f" for m in task.metrics}, "delta": "+.2f", "flops_kept": ".1%",
               "params_m": ".2f", "b1_ms": ".1f", "b1_x": ".2f", "b1_ideal": ".0%", "b32_ms": ".1f", "b32_x": ".2f",
               "b32_ideal": ".0%", "prune_s": ".1f", "recovery_s": ".1f", "peak_mb": ".0f"}
    headers = {"budget": "FLOPs target", "delta": f"Δ {MAIN_METRIC[task.name]}", "flops_kept": "FLOPs kept",
               "params_m": "params (M)", "b1_ms": "b1 ms", "b1_x": "b1 speedup", "b1_ideal": "b1 % of ideal",
               "b32_ms": "b32 ms", "b32_x": "b32 speedup", "b32_ideal": "b32 % of ideal",
               "prune_s": "pruning (s)", "recovery_s": "recovery (s)", "peak_mb": "peak RSS (MB)"}
    return report.markdown_table(rows, cols, formats, headers)


def b1_speedups(cells: list[dict]) -> list[float | None]:
    """Measured batch-1 speedup of each cell's model (a recovered model's is its pruner's), None where unmeasured."""
    by = {(c["budget"], c["method"]): c for c in cells}
    return [(shape_cell(c, by) or {}).get("latency", {}).get("b1", {}).get("speedup") for c in cells]


def pareto_plot(path: Path, task: Task, dense: float, points: list[tuple[str, float | None, float]],
                title: str) -> Path:
    """The metric against the measured batch-1 speedup, one line per method (the trade-off a user buys);
    ``points``: (method label, speedup or None = unmeasured, metric)."""
    series: dict[str, list] = {}
    for label, x, y in points:
        if x is not None:
            series.setdefault(label, []).append((x, y))
    return report.plot_metric_vs_speedup(series, path, metric=MAIN_METRIC[task.name], dense=dense, title=title)


def plots(mode: str, task: Task, dense: dict, cells: list[dict], tag: str) -> list[Path]:
    """PNGs ``compare_<mode>_<tag>_*.png`` (``tag``: the task's name, with the dense model's index when there are
    several)."""
    main = MAIN_METRIC[task.name]
    series: dict[str, list] = {}
    for c in cells:
        series.setdefault(c["label"], []).append((c["flops_kept"], c["metrics"][main]))
    # matplotlib's default cycle has 10 colours: with more lines, one plot without and one with recovery
    recovered = {METHODS[c["method"]].label for c in cells if METHODS[c["method"]].base}
    parts = {"metric": series} if len(series) <= 10 else {
        "metric_pruned": {k: v for k, v in series.items() if k not in recovered},
        "metric_recovered": {k: v for k, v in series.items() if k in recovered}}
    out = [report.plot_metric_vs_flops(s, RESULTS / f"compare_{mode}_{tag}_{name}.png", metric=main,
                                       dense=dense["metrics"][main], title=f"all-MiniLM-L6-v2, {task.name} dev")
           for name, s in parts.items()]
    for bs in ("b1", "b32"):
        speed: dict[str, list] = {}
        for c in cells:
            if "latency" in c:
                speed.setdefault(c["label"], []).append((c["flops_kept"], c["latency"][bs]["speedup"]))
        if speed:
            out.append(report.plot_speedup_vs_flops(
                speed, RESULTS / f"compare_{mode}_{tag}_speedup_{bs}.png",
                title=f"{task.name}: CPU speedup, batch {bs[1:]}, seq 128"))
    points = [(c["label"], x, c["metrics"][main]) for c, x in zip(cells, b1_speedups(cells))]
    out.append(pareto_plot(RESULTS / f"compare_{mode}_{tag}_pareto_b1.png", task, dense["metrics"][main], points,
                           f"{task.name} dev vs measured batch-1 CPU speedup"))
    return out


def dense_summary(mode: str, per_dense: dict[str, list[tuple[dict, list[dict]]]], report_path: str
                  ) -> tuple[list[dict], list[dict], list[str]]:
    """``{task: [(dense record, cells) per dense model]}`` -> rows of mean [min, max] over the dense models per
    (budget, method), :func:`lead_over_tp`'s rows, and markdown (tables, plus the mean metric against the mean
    batch-1 speedup per task)."""
    rows, leads, md = [], [], ["## Across dense models", "",
                    ("Per (task, budget, method), over the dense models that have the cell: the main dev metric and "
                     "its change from that dense model's own (mean [min, max]); batch-1 speedup mean."), ""]
    for name, runs in per_dense.items():
        main = MAIN_METRIC[name]
        groups: dict[tuple, list] = {}
        for dense, cells in runs:
            for c, x in zip(cells, b1_speedups(cells)):
                groups.setdefault((c["budget"], c["method"]), []).append(
                    (c["metrics"][main], c["metrics"][main] - dense["metrics"][main], x))
        task_rows = []
        for (budget, method), vals in groups.items():
            metric, delta, speed = zip(*vals)
            speed = [x for x in speed if x is not None]
            task_rows.append({"task": name, "budget": budget, "method": method, "label": METHODS[method].label,
                              "runs": len(vals), "metric": main, "mean": sum(metric) / len(metric),
                              "min": min(metric), "max": max(metric), "delta_mean": sum(delta) / len(delta),
                              "delta_min": min(delta), "delta_max": max(delta),
                              "b1_speedup": sum(speed) / len(speed) if speed else None})
        dense_mean = sum(d["metrics"][main] for d, _ in runs) / len(runs)
        md += [f"### {name} ({main}; dense mean {dense_mean:.2f} over {len(runs)} models)", "",
               report.markdown_table(task_rows, ["budget", "label", "runs", "mean", "min", "max", "delta_mean",
                                                 "delta_min", "delta_max", "b1_speedup"],
                                     formats={"budget": ".0%", "mean": ".2f", "min": ".2f", "max": ".2f",
                                              "delta_mean": "+.2f", "delta_min": "+.2f", "delta_max": "+.2f",
                                              "b1_speedup": ".2f"},
                                     headers={"label": "method", "delta_mean": "Δ mean", "delta_min": "Δ min",
                                              "delta_max": "Δ max", "b1_speedup": "b1 speedup (mean)"}), ""]
        task_leads, lead_md = lead_over_tp(name, runs)
        md += lead_md
        leads += task_leads
        means = [(r["label"], r["b1_speedup"], r["mean"]) for r in task_rows]
        p = pareto_plot(RESULTS / f"compare_{mode}_{name}_pareto_b1_mean.png", TASKS[name], dense_mean, means,
                        f"{name} dev (mean over {len(runs)} dense models) vs batch-1 CPU speedup")
        md += [f"![{p.stem}]({os.path.relpath(p, Path(report_path).parent)})", ""]
        rows += task_rows
    return rows, leads, md


def lead_over_tp(name: str, runs: list[tuple[dict, list[dict]]]) -> tuple[list[dict], list[str]]:
    """Each hf_prune method against the best Torch-Pruning method (highest mean metric) with the same recovery
    (none, or the same KD), per budget: the paired difference on each dense model, mean [min, max], and whether the
    lead exceeds the seed spread (ahead on every dense model and the mean lead above half the range of either
    method's change from dense). Empty when the run has no Torch-Pruning cells."""
    main = MAIN_METRIC[name]
    by: dict[tuple, dict[int, float]] = {}  # (budget, method) -> {dense index: metric - dense metric}
    for i, (dense, cells) in enumerate(runs):
        for c in cells:
            by.setdefault((c["budget"], c["method"]), {})[i] = c["metrics"][main] - dense["metrics"][main]
    rows = []
    for (budget, method), ours in sorted(by.items(), key=lambda kv: (-kv[0][0], list(METHODS).index(kv[0][1]))):
        if method.startswith("tp_"):
            continue
        rival = [(sum(v.values()) / len(v), m) for (b, m), v in by.items()
                 if b == budget and m.startswith("tp_") and METHODS[m].recovery == METHODS[method].recovery]
        if not rival:
            continue
        best = max(rival)[1]  # by mean change from dense, i.e. by mean metric
        theirs = by[(budget, best)]
        common = sorted(set(ours) & set(theirs))
        if not common:
            continue
        diff = [ours[i] - theirs[i] for i in common]  # the dense metric cancels: metric(ours) - metric(theirs)
        half_range = max((max(v[i] for i in common) - min(v[i] for i in common)) / 2 for v in (ours, theirs))
        mean = sum(diff) / len(diff)
        rows.append({"task": name, "budget": budget, "method": method, "label": METHODS[method].label,
                     "vs": METHODS[best].label, "runs": len(diff), "lead_mean": mean,
                     "lead_min": min(diff), "lead_max": max(diff), "half_range": half_range,
                     "beyond_spread": min(diff) > 0 and mean > half_range})
    if not rows:
        return [], []
    intro = (f"Lead over the best Torch-Pruning method with the same recovery ({main}, paired by dense model; beyond "
             "spread = ahead on every dense model and the mean lead above half the range of either method's change):")
    return rows, [
        intro, "",
        report.markdown_table(rows, ["budget", "label", "vs", "runs", "lead_mean", "lead_min", "lead_max",
                                     "half_range", "beyond_spread"],
                              formats={"budget": ".0%", "lead_mean": "+.2f", "lead_min": "+.2f", "lead_max": "+.2f",
                                       "half_range": ".2f"},
                              headers={"label": "method", "vs": "best Torch-Pruning", "lead_mean": "lead mean",
                                       "lead_min": "lead min", "lead_max": "lead max",
                                       "half_range": "spread (half range)",
                                       "beyond_spread": "beyond spread"}), ""]


NOTES = """\
How each number is measured:

- **metric**: the GLUE dev metric(s) in percent (`hf_prune.metrics.compute_glue_metrics`); Δ is the main metric
  minus the dense model's. Dense models are fine-tuned once per task and cached (`benchmarks/cache/`).
- **FLOPs kept**: `hf_prune.count_flops(model, seq_len=128)` of the result over the dense model's (encoder layers'
  matrix products; embeddings and task head excluded). Every method targets the same budget; Torch-Pruning's
  counts are set so that it lands on the budget too (see `benchmarks/tp_baseline.py`).
- **latency**: median forward time over the repeats at batch 1 and 32, sequence 128, random tokens, CPU, dense and
  pruned model timed interleaved in one loop (`hf_prune.compare_latency`); speedup = dense ms / pruned ms from that
  loop; "% of ideal" = speedup / (1 / FLOPs kept). A recovered model has its pruner's shapes, hence its latency.
  Latency means something only on otherwise idle cores: with another busy process on the 2 cores, torch's spinning
  OpenMP threads made a batch-1 forward take ~900 ms instead of ~50 ms (`OMP_WAIT_POLICY=PASSIVE` avoids that, but
  its sleeping threads add a wake-up to every op: at batch 1 a fixed cost that lowers "% of ideal", see README).
  Each cell records the 1-minute load average when it finished (`loadavg_1min` in the JSON); newer cells also the
  OpenMP variables they ran under (`omp`, absent from older cells; the header's line is the report-building
  process's).
- **pruning (s)**: wall time of the pruning call alone (scoring, search, cut; for Torch-Pruning also the Taylor
  gradient pass and the ratio search). **recovery (s)**: wall time of `PruningTrainer.train()`.
- **peak RSS (MB)**: peak resident memory of the process above its level at the start of the pruning call
  (recovery call for recovered rows), sampled every 2 ms from `/proc/self/statm` after `gc.collect()` and
  `malloc_trim(0)`; tracemalloc is not used because it does not see PyTorch's tensor allocations.
- **recovery**: `hf_prune.trainer.PruningTrainer` on the already pruned model, KD from the dense model
  (`DistillationConfig(alpha, temperature)`), identical steps, batch, training samples and order for every
  recovered method; full fine-tuning at the recovery learning rate, LoRA (rank 8, merged) at the LoRA rate.
"""


def _omp_text(omp: dict[str, str | None]) -> str:
    return ", ".join(f"{k}={v}" for k, v in omp.items() if v) or "defaults"


def build_report(args: argparse.Namespace, runs: dict[tuple[str, str], TaskRun], command: str
                 ) -> tuple[dict, str]:
    env = report.environment()
    try:  # the distribution's version: not every torch-pruning build sets ``torch_pruning.__version__``
        env["torch_pruning"] = importlib.metadata.version("torch-pruning")
    except importlib.metadata.PackageNotFoundError:
        env["torch_pruning"] = None
    env["platform"] = platform.platform()
    env["omp"] = omp_env()
    specs: dict[str, list[str]] = {}  # task -> its dense models, in run order
    for name, spec in runs:
        specs.setdefault(name, []).append(spec)
    steps = {name: run.args.recovery_steps for (name, _), run in runs.items()}  # per task unless --recovery_steps
    settings = {k: v for k, v in vars(args).items() if k not in ("report",)}
    settings.update(dense=args.dense or specs, recovery_steps=args.recovery_steps or steps)
    methods = expand(args.methods)
    payload: dict[str, Any] = {"meta": {**env, "command": command, "mode": args.mode, "settings": settings},
                               "dense": {}, "cells": [], "missing": []}
    md = [
        "# Pruning benchmarks: hf_prune vs Torch-Pruning and baselines",
        "",
        "> Generated by `benchmarks/bench_compare.py` from its cached cells; do not edit by hand, re-run the command.",
        "",
        f"- command: `{command}`",
        f"- date: {env['date']}",
        (f"- machine: {env['platform']}, {env['machine']}, {env['cpu_count']} CPUs, "
        f"torch threads {env['torch_threads']}"),
        (f"- versions: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"torch-pruning {env['torch_pruning']}, hf_prune {hp.__version__}"),
        (f"- model: all-MiniLM-L6-v2 (6 layers, 12 heads, FFN 1536); mode `{args.mode}`; budgets "
        f"{', '.join(f'{k:.0%}' for k in args.budgets)} of encoder FLOPs at seq {args.seq_len}"
        + (f"; hf_prune FFN widths in multiples of {args.round_to}" if getattr(args, "round_to", 1) != 1 else "")),
        (f"- calibration: {args.rf_samples} samples for retraining-free, {args.oneshot_samples} for Fisher one-shot "
        f"and Torch-Pruning Taylor; Torch-Pruning scope `{args.tp_scope}`"),
        (f"- recovery: {args.recovery_steps or ', '.join(f'{n} {k}' for n, k in steps.items())} steps x batch "
         f"{args.recovery_batch}, lr {args.recovery_lr} (full) / "
        f"{args.lora_lr} (LoRA), KD alpha {args.kd_alpha}, T {args.kd_temperature}"),
        "",
    ]
    header_end = len(md) - 1  # the latency line goes here once the cells are read
    several = any(len(v) > 1 for v in specs.values())
    per_dense: dict[str, list[tuple[dict, list[dict]]]] = {}
    for (name, spec), run in runs.items():
        task = run.task
        # one dense model keeps the single-run names (``dense[task]``, ``## task``, ``compare_<mode>_<task>_*.png``)
        i = specs[name].index(spec)
        tag, title = (f"{name}_dense{i}", f"{name}, dense {spec}") if several else (name, name)
        if run.dense_rec is None:
            md += [f"## {title}", "", "missing: no cached dense model results for these settings", ""]
            payload["missing"].append({"task": name, "dense": spec, "method": "dense"})
            continue
        cells, missing = [], []
        for k in args.budgets:
            for m in methods:
                c = run.load(k, m)
                (cells.append(c) if c is not None else
                 missing.append({"task": name, "dense": spec, "budget": k, "method": m}))
        payload["dense"][tag] = run.dense_rec
        payload["cells"] += cells
        payload["missing"] += missing
        per_dense.setdefault(name, []).append((run.dense_rec, cells))
        rows = table_rows(run.dense_rec, cells, task, args.budgets, methods)
        md += [f"## {title} (dev, {run.dense_rec['dev_examples']} examples; main metric {MAIN_METRIC[name]})", "",
               (f"Dense model: fine-tuned {run.finetune_steps} steps x 32 at lr {run.args.finetune_lr:g}, seed "
                f"{run.args.seed}, max length {task.max_len}."), "", table(rows, task), ""]
        tp = [c for c in cells if "max_abs_logit_diff_vs_masked_dense" in c]
        if tp:
            worst = max(c["max_abs_logit_diff_vs_masked_dense"] for c in tp)
            md += [(f"Torch-Pruning models vs the dense model with the same units masked (hf_prune mask hooks): "
                   f"max |logit difference| {worst:.2e} over {len(tp)} models."), ""]
        if cells:
            for p in plots(args.mode, task, run.dense_rec, cells, tag):
                md.append(f"![{p.stem}]({os.path.relpath(p, Path(args.report).parent)})")
            md.append("")
    if several:
        payload["across_dense"], leads, summary = dense_summary(args.mode, per_dense, args.report)
        if leads:
            payload["lead_over_tp"] = leads
        md += summary
    # The OpenMP env the cells were measured under (a --report_only run's own env says nothing about them).
    envs = sorted({_omp_text(c["omp"]) for c in payload["cells"] if "omp" in c} or {_omp_text(env["omp"])})
    md.insert(header_end, f"- latency: median of {args.repeats} repeats at batch 1, {args.repeats_b32} at batch 32; "
              f"OpenMP env of the cells: {' | '.join(envs)}")
    md += ["## Method notes", "", NOTES]
    return payload, "\n".join(md)

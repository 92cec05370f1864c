"""hf_prune side by side with Torch-Pruning and simple baselines on all-MiniLM-L6-v2: dev metric, params, layer
FLOPs, CPU latency and speedup, pruning wall time and peak memory, at several fractions of encoder FLOPs kept.

For every task the dense model is fine-tuned once and cached under ``benchmarks/cache/``. Then, for every
FLOPs budget, on the same data in the same run:

=========================  ===========================================================================
``retraining_free``        ``hf_prune.prune(..., PruningConfig(method="retraining_free", flops_keep=k))``
``retraining_free+kd_full`` the retraining-free model + full fine-tuning with KD (not in the default grid)
``fisher``                 hf_prune one-shot, Fisher scores, global FLOPs search (no recovery)
``fisher+kd_full``         the same pruned model + full fine-tuning with KD from the dense model
``fisher+kd_lora``         the same pruned model + LoRA (merged afterwards) with KD
``tp_taylor``              Torch-Pruning, Taylor importance, whole heads + FFN neurons (benchmarks/tp_baseline.py)
``tp_taylor+kd_full``      + the same full KD recovery
``tp_magnitude``           Torch-Pruning, L2 magnitude importance (``+kd_full``: with recovery)
``magnitude``, ``random``  hf_prune one-shot with those criteria (``+kd_full`` with ``--recover_baselines``)
=========================  ===========================================================================

Every recovered method runs the same ``PruningTrainer`` recovery: same steps, batch, samples, order and KD
loss; full fine-tuning uses ``--recovery_lr``, LoRA ``--lora_lr`` (adapters need a ~10x larger step).

Each (task, budget, method) cell is written to ``benchmarks/cache/compare/<task>/`` as soon as it finishes
(the file name carries a hash of the settings it depends on), so an interrupted run continues where it stopped;
the report is built from the cached cells only, missing ones are listed as missing. ``--dense`` repeats everything
per dense model ``seed:lr:epochs_factor`` (the robustness protocol's independently fine-tuned models; the seed also
draws the calibration samples and orders the recovery data) and adds a table of mean [min, max] over them and a plot
of the mean metric against the mean batch-1 speedup. Outputs:
``benchmarks/results/compare_<mode>.json``, PNG plots ``benchmarks/results/compare_<mode>_*.png`` and a markdown
report (``benchmarks/RESULTS.md`` for the full run, ``benchmarks/results/compare_quick.md`` for ``--quick``).

    .venv/bin/python benchmarks/bench_compare.py --quick        # smoke run: SST-2, 50%, tiny settings, ~5 min
    .venv/bin/python benchmarks/bench_compare.py                # SST-2, MRPC, STS-B x 75/60/50/40% (~1.5 h, 2 cores)
    .venv/bin/python benchmarks/bench_compare.py --tasks rte cola --methods retraining_free fisher tp_taylor
    .venv/bin/python benchmarks/bench_compare.py --name protocol --dense 0:5e-5:1 1:3e-5:1 2:5e-5:0.5 --tasks mrpc \
        --budgets 0.5 --methods retraining_free+kd_full fisher+kd_full   # per dense model, then mean [min, max]

    .venv/bin/python benchmarks/bench_compare.py --report_only  # tables/plots from whatever cells are cached

Sizing (full defaults): the MRPC and STS-B dense fine-tunes (2 epochs; SST-2's 300 steps are usually cached) take
~15 min, the 120 cells ~70 min on an idle 2-core machine; other processes on the same cores slow it down a lot
(torch's threads wait on each other). Every cell prints its estimated and actual time; the start of each task
prints the estimate for all its cells.

Needs ``pip install torch-pruning==1.6.1`` for the ``tp_*`` methods.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shlex
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers as T
from common import (
    CACHE,
    HERE,
    MAIN_METRIC,
    PeakRSS,
    TASKS,
    Task,
    calibration,
    dev_batches,
    epochs_to_steps,
    evaluate,
    finetune,
    forward_backward_s,
    parse_dense,
)
from transformers.utils import logging as hf_logging

import hf_prune as hp
from hf_prune import report
from hf_prune.costs import model_layer_sizes
from hf_prune.resources import embedded_model_path
from hf_prune.trainer import DistillationConfig, PruningTrainer

CELLS = CACHE / "compare"
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
DEFAULT_METHODS = ["retraining_free", "fisher", "fisher+kd_full", "fisher+kd_lora", "tp_taylor", "tp_taylor+kd_full",
                   "tp_magnitude", "tp_magnitude+kd_full", "magnitude", "random"]
BASELINE_RECOVERY = ["magnitude+kd_full", "random+kd_full"]


def expand(methods: list[str]) -> list[str]:
    """Methods in table order, each recovered method's pruner included (its latency/params are the pruner's)."""
    wanted = set(methods) | {METHODS[m].base for m in methods if METHODS[m].base}
    return [m for m in METHODS if m in wanted]


# ----------------------------------------------------------------------------------------------- measurements


def latency(dense: torch.nn.Module, model: torch.nn.Module | None, seq_len: int, repeats: dict[int, int]
            ) -> dict[str, Any]:
    """Median forward ms at each batch size (``{batch: repeats}``), dense and pruned interleaved in one loop;
    speedups from that loop. Batch 32 at seq 128 takes seconds per forward on 2 cores: one warm-up run there."""
    out = {}
    for bs, n in repeats.items():
        models = {"dense": dense} if model is None else {"dense": dense, "pruned": model}
        lat = hp.compare_latency(models, bs, seq_len, repeats=n, warmup=2 if bs == 1 else 1)
        rec = {"dense_ms": lat["dense"].median_ms, "repeats": n}
        if model is not None:
            rec["pruned_ms"] = lat["pruned"].median_ms
            rec["speedup"] = lat["dense"].median_ms / lat["pruned"].median_ms
        out[f"b{bs}"] = rec
    return out


def layer_summary(model: torch.nn.Module) -> dict[str, list[int]]:
    sizes = model_layer_sizes(model)
    return {"heads": [s["num_heads"] for s in sizes], "neurons": [s["intermediate_size"] for s in sizes]}


# ----------------------------------------------------------------------------------------------- per task


@dataclass
class TaskRun:
    """Everything a task's cells share: the dense model, data, settings and the pruned models made so far."""

    task: Task
    args: argparse.Namespace
    tok: Any
    finetune_steps: int
    dense: torch.nn.Module | None = None
    teacher: torch.nn.Module | None = None
    dev: list | None = None
    labels: list | None = None
    calib_rf: list | None = None
    calib_os: list | None = None
    train: datasets.Dataset | None = None
    dense_rec: dict | None = None
    fb_per_sample: float = 0.0
    pruned: dict = field(default_factory=dict)  # (budget, method) -> pruned model, reused by recoveries
    actual: dict = field(default_factory=dict)  # method -> seconds its last cell took in this run
    finetune_s: float | None = None

    # settings each kind of cell depends on (their hash is in the cell's file name) -----------------
    def settings(self, method: str) -> dict[str, Any]:
        a = self.args
        s: dict[str, Any] = {"task": self.task.name, "max_len": self.task.max_len,
                             "finetune_steps": self.finetune_steps, "finetune_lr": a.finetune_lr, "seed": a.seed,
                             "seq_len": a.seq_len, "threads": a.threads}
        if method == "dense":
            return {**s, "repeats": a.repeats, "repeats_b32": a.repeats_b32}
        m = METHODS[method]
        if m.base is not None:
            return {**self.settings(m.base), "recovery": m.recovery, "steps": a.recovery_steps,
                    "batch": a.recovery_batch, "lr": a.lora_lr if m.recovery == "lora" else a.recovery_lr,
                    "kd_alpha": a.kd_alpha, "kd_temperature": a.kd_temperature}
        s["repeats"], s["repeats_b32"] = a.repeats, a.repeats_b32
        if method == "retraining_free":
            s["samples"] = a.rf_samples
            s["tuning_fit"] = hp.PruningConfig.tuning_fit  # the default; cells cut with the older scales fit are stale
        if method in ("fisher", "tp_taylor"):
            s["samples"] = a.oneshot_samples
        if method.startswith("tp_"):
            s["tp_scope"] = a.tp_scope
        return s

    @property
    def repeats(self) -> dict[int, int]:
        return {1: self.args.repeats, 32: self.args.repeats_b32}

    def path(self, budget: float | None, method: str) -> Path:
        sig = hashlib.sha1(json.dumps(self.settings(method), sort_keys=True).encode()).hexdigest()[:10]
        name = "dense" if budget is None else f"k{budget:.2f}-{method}"
        return CELLS / self.task.name / f"{name}-{sig}.json"

    def load(self, budget: float | None, method: str) -> dict | None:
        p = self.path(budget, method)
        return json.loads(p.read_text()) if p.exists() else None

    def save(self, budget: float | None, method: str, rec: dict) -> None:
        rec["settings"] = self.settings(method)
        report.write_json(self.path(budget, method), rec)

    # setup -------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        a, task = self.args, self.task
        start = time.perf_counter()
        path = finetune(task, self.tok, self.finetune_steps, 32, a.finetune_lr, a.seed)
        if time.perf_counter() - start > 5:
            self.finetune_s = time.perf_counter() - start
        self.dense = T.AutoModelForSequenceClassification.from_pretrained(path).eval()
        self.teacher = copy.deepcopy(self.dense)  # PruningTrainer freezes its teacher; keep self.dense trainable
        self.dev, self.labels = dev_batches(task, self.tok)
        self.calib_rf = calibration(task, self.tok, a.rf_samples, a.seed)
        self.calib_os = calibration(task, self.tok, a.oneshot_samples, a.seed)
        texts, labels = task.read("train")
        n = min(len(texts), a.recovery_steps * a.recovery_batch)
        idx = torch.randperm(len(texts), generator=torch.Generator().manual_seed(a.seed + 2))[:n].tolist()
        pick = [texts[i] for i in idx]
        pair = isinstance(pick[0], tuple)
        enc = self.tok([t[0] for t in pick] if pair else pick, [t[1] for t in pick] if pair else None,
                       truncation=True, max_length=task.max_len)
        self.train = datasets.Dataset.from_dict({**enc, "labels": [labels[i] for i in idx]})
        probe = self.calib_os[:2]  # time per training sample, for the estimates (best of 2: a busy machine is noisy)
        n = sum(len(b["input_ids"]) for b in probe)
        self.fb_per_sample = min(forward_backward_s(self.dense, probe) for _ in range(2)) / n
        self.dense_rec = self.load(None, "dense")
        if self.dense_rec is None:
            self.dense_rec = self.run_dense()
            self.save(None, "dense", self.dense_rec)

    def run_dense(self) -> dict:
        start = time.perf_counter()
        metrics = evaluate(self.dense, self.task, self.dev, self.labels)
        eval_s = time.perf_counter() - start
        start = time.perf_counter()
        lat = latency(self.dense, None, self.args.seq_len, self.repeats)
        return {"task": self.task.name, "method": "dense", "label": "dense", "metrics": metrics,
                "params": hp.count_params(self.dense), "flops": hp.count_flops(self.dense, self.args.seq_len)["total"],
                "flops_kept": 1.0, "latency": lat, "eval_s": eval_s, "latency_s": time.perf_counter() - start,
                "finetune_steps": self.finetune_steps, "finetune_s": self.finetune_s,
                "dev_examples": len(self.labels)}

    # estimates ------------------------------------------------------------------------------------------
    def estimate(self, method: str) -> float:
        """Seconds a cell should take: the last actual of the same method in this run, else a cost model."""
        if method in self.actual:
            return self.actual[method]
        a, fb = self.args, self.fb_per_sample
        eval_s = 0.8 * self.dense_rec["eval_s"]
        lat_s = 1.6 * self.dense_rec["latency_s"]  # dense alone was timed; a cell times dense + pruned
        search = 12.0 if a.tp_scope == "global" else 1.0  # Torch-Pruning: up to 16 dry runs of its pruner
        m = METHODS[method]
        if m.base is not None:  # constants from idle runs on 2 cores (cost per sample ~ one forward+backward)
            train = a.recovery_steps * a.recovery_batch * fb * (1.3 if m.recovery == "lora" else 1.0) + 4.0
            base = 0.0 if any(k[1] == m.base for k in self.pruned) else self.estimate(m.base) - lat_s - eval_s
            return train + eval_s + max(0.0, base)
        prune = {"retraining_free": 1.5 * fb * a.rf_samples + 8.0, "fisher": 1.1 * fb * a.oneshot_samples + 1.0,
                 "tp_taylor": 1.0 * fb * a.oneshot_samples + search, "tp_magnitude": search}.get(method, 1.0)
        return prune + eval_s + lat_s

    # cells ------------------------------------------------------------------------------------------------
    def prune(self, budget: float, method: str) -> tuple[torch.nn.Module, dict]:
        """A fresh pruned copy of the dense model, with pruning wall time and peak memory."""
        a = self.args
        model = copy.deepcopy(self.dense)
        torch.manual_seed(a.seed)
        extra: dict[str, Any] = {}
        with PeakRSS() as mem:
            start = time.perf_counter()
            if method == "retraining_free":
                cfg = hp.PruningConfig(method="retraining_free", flops_keep=budget, seq_len=a.seq_len,
                                       max_calibration_samples=a.rf_samples, seed=a.seed, progress=False)
                model, plan = hp.prune(model, self.calib_rf, cfg)
            elif method in ("fisher", "magnitude", "random"):
                cfg = hp.PruningConfig(importance=method, flops_keep=budget, seq_len=a.seq_len,
                                       max_calibration_samples=a.oneshot_samples, seed=a.seed, progress=False)
                model, plan = hp.prune(model, self.calib_os if method == "fisher" else None, cfg)
            elif method in ("tp_taylor", "tp_magnitude"):
                from tp_baseline import tp_prune

                model, extra = tp_prune(model, budget, method.removeprefix("tp_"), self.calib_os,
                                        scope=a.tp_scope, seq_len=a.seq_len)
            else:
                raise ValueError(method)
            prune_s = time.perf_counter() - start
        if method.startswith("tp_"):
            from tp_baseline import kept_units, max_diff_vs_masked

            plan = kept_units(model, self.dense)
            # Same outputs as the dense model with the dropped units masked to 0 (hf_prune.mask_hooks)?
            extra["max_abs_logit_diff_vs_masked_dense"] = max_diff_vs_masked(model, self.dense, plan, self.dev[:2])
            model.prune_plan = plan  # PruningTrainer then sees an already pruned model and does not prune again
        return model.eval(), {"prune_s": prune_s, "peak_rss_mb": mem.peak_mb, **extra}

    def run_cell(self, budget: float, method: str) -> dict:
        a, m = self.args, METHODS[method]
        dense_flops = self.dense_rec["flops"]
        rec: dict[str, Any] = {"task": self.task.name, "budget": budget, "method": method, "label": m.label}
        if m.base is None:
            model, info = self.prune(budget, method)
            self.pruned[(budget, method)] = model
            start = time.perf_counter()
            rec["metrics"] = evaluate(model, self.task, self.dev, self.labels)
            rec["eval_s"] = time.perf_counter() - start
            flops = hp.count_flops(model, a.seq_len)["total"]
            rec.update(info, params=hp.count_params(model), flops=flops, flops_kept=flops / dense_flops,
                       layers=layer_summary(model))
            start = time.perf_counter()
            rec["latency"] = latency(self.dense, model, a.seq_len, self.repeats)
            rec["latency_s"] = time.perf_counter() - start
            for r in rec["latency"].values():
                r["of_ideal"] = r["speedup"] * rec["flops_kept"]  # measured / FLOPs-ideal (1 / kept) speedup
            return rec
        base = self.pruned.get((budget, m.base))
        if base is None:  # resumed run: the pruner's cell is cached but its model is not in memory
            base, info = self.prune(budget, m.base)
            self.pruned[(budget, m.base)] = base
            rec["reprune_s"] = info["prune_s"]
        student = copy.deepcopy(base).train()
        with PeakRSS() as mem:
            start = time.perf_counter()
            model = self.recover(student, budget, m.recovery)
            rec["recovery_s"] = time.perf_counter() - start
        rec["recovery_peak_rss_mb"] = mem.peak_mb
        rec["metrics"] = evaluate(model, self.task, self.dev, self.labels)
        flops = hp.count_flops(model, a.seq_len)["total"]
        rec.update(params=hp.count_params(model), flops=flops, flops_kept=flops / dense_flops,
                   recovery={"kind": m.recovery, "steps": a.recovery_steps, "batch": a.recovery_batch,
                             "lr": a.lora_lr if m.recovery == "lora" else a.recovery_lr,
                             "kd_alpha": a.kd_alpha, "kd_temperature": a.kd_temperature})
        return rec

    def recover(self, model: torch.nn.Module, budget: float, kind: str) -> torch.nn.Module:
        a = self.args
        args = T.TrainingArguments(
            output_dir=str(CELLS / "trainer_tmp"), max_steps=a.recovery_steps,
            per_device_train_batch_size=a.recovery_batch,
            learning_rate=a.lora_lr if kind == "lora" else a.recovery_lr, warmup_steps=int(0.06 * a.recovery_steps),
            weight_decay=0.01, lr_scheduler_type="linear", logging_strategy="no", save_strategy="no", report_to=[],
            use_cpu=True, seed=a.seed, data_seed=a.seed, disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = PruningTrainer(
            model=model, args=args, train_dataset=self.train, data_collator=T.DataCollatorWithPadding(self.tok),
            # the model is already pruned: this config is not used to prune again, it documents the budget
            pruning_config=hp.PruningConfig(flops_keep=budget, seq_len=a.seq_len, progress=False),
            distillation=DistillationConfig(alpha=a.kd_alpha, temperature=a.kd_temperature),
            teacher_model=self.teacher, recovery=kind,
        )
        trainer.remove_callback(T.trainer_callback.PrinterCallback)  # no per-run metrics dict on stdout
        trainer.train()
        return trainer.model.eval()


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
                  ) -> tuple[list[dict], list[str]]:
    """``{task: [(dense record, cells) per dense model]}`` -> rows of mean [min, max] over the dense models per
    (budget, method), and markdown (table, plus the mean metric against the mean batch-1 speedup per task)."""
    rows, md = [], ["## Across dense models", "",
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
        means = [(r["label"], r["b1_speedup"], r["mean"]) for r in task_rows]
        p = pareto_plot(RESULTS / f"compare_{mode}_{name}_pareto_b1_mean.png", TASKS[name], dense_mean, means,
                        f"{name} dev (mean over {len(runs)} dense models) vs batch-1 CPU speedup")
        md += [f"![{p.stem}]({os.path.relpath(p, Path(report_path).parent)})", ""]
        rows += task_rows
    return rows, md


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
  OpenMP threads made a batch-1 forward take ~900 ms instead of ~50 ms (`OMP_WAIT_POLICY=PASSIVE` avoids that).
  Each cell records the 1-minute load average when it finished (`loadavg_1min` in the JSON).
- **pruning (s)**: wall time of the pruning call alone (scoring, search, cut; for Torch-Pruning also the Taylor
  gradient pass and the ratio search). **recovery (s)**: wall time of `PruningTrainer.train()`.
- **peak RSS (MB)**: peak resident memory of the process above its level at the start of the pruning call
  (recovery call for recovered rows), sampled every 2 ms from `/proc/self/statm` after `gc.collect()` and
  `malloc_trim(0)`; tracemalloc is not used because it does not see PyTorch's tensor allocations.
- **recovery**: `hf_prune.trainer.PruningTrainer` on the already pruned model, KD from the dense model
  (`DistillationConfig(alpha, temperature)`), identical steps, batch, training samples and order for every
  recovered method; full fine-tuning at the recovery learning rate, LoRA (rank 8, merged) at the LoRA rate.
"""


def build_report(args: argparse.Namespace, runs: dict[tuple[str, str], TaskRun], command: str
                 ) -> tuple[dict, str]:
    env = report.environment()
    try:
        import torch_pruning

        env["torch_pruning"] = torch_pruning.__version__
    except ImportError:
        env["torch_pruning"] = None
    env["platform"] = platform.platform()
    env["omp"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    settings = {k: v for k, v in vars(args).items() if k not in ("report",)}
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
        f"{', '.join(f'{k:.0%}' for k in args.budgets)} of encoder FLOPs at seq {args.seq_len}"),
        (f"- calibration: {args.rf_samples} samples for retraining-free, {args.oneshot_samples} for Fisher one-shot "
        f"and Torch-Pruning Taylor; Torch-Pruning scope `{args.tp_scope}`"),
        (f"- recovery: {args.recovery_steps} steps x batch {args.recovery_batch}, lr {args.recovery_lr} (full) / "
        f"{args.lora_lr} (LoRA), KD alpha {args.kd_alpha}, T {args.kd_temperature}"),
        (f"- latency: median of {args.repeats} repeats at batch 1, {args.repeats_b32} at batch 32; OpenMP env: "
        f"{', '.join(f'{k}={v}' for k, v in env['omp'].items() if v) or 'defaults'}"),
        "",
    ]
    several = len(args.dense) > 1
    per_dense: dict[str, list[tuple[dict, list[dict]]]] = {}
    for (name, spec), run in runs.items():
        task = run.task
        # one dense model keeps the single-run names (``dense[task]``, ``## task``, ``compare_<mode>_<task>_*.png``)
        i = args.dense.index(spec)
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
        payload["across_dense"], summary = dense_summary(args.mode, per_dense, args.report)
        md += summary
    md += ["## Method notes", "", NOTES]
    return payload, "\n".join(md)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: SST-2, budget 50%%, 256/128 calibration samples, 8 recovery steps, "
                         "2 latency repeats")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=["sst2", "mrpc", "stsb"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.6, 0.5, 0.4], help="fractions of FLOPs kept")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                    help=f"default: {' '.join(DEFAULT_METHODS)} (+ {' '.join(BASELINE_RECOVERY)} with "
                         "--recover_baselines)")
    ap.add_argument("--recover_baselines", action="store_true", help="also recover the magnitude and random models")
    ap.add_argument("--rf_samples", type=int, default=1024, help="calibration samples, retraining-free")
    ap.add_argument("--oneshot_samples", type=int, default=512,
                    help="calibration samples, Fisher one-shot and Torch-Pruning Taylor")
    ap.add_argument("--recovery_steps", type=int, default=40, help="recovery optimizer steps, every recovered method")
    ap.add_argument("--recovery_batch", type=int, default=16)
    ap.add_argument("--recovery_lr", type=float, default=5e-5, help="learning rate of full recovery")
    ap.add_argument("--lora_lr", type=float, default=5e-4, help="learning rate of LoRA recovery")
    ap.add_argument("--kd_alpha", type=float, default=0.5)
    ap.add_argument("--kd_temperature", type=float, default=2.0)
    ap.add_argument("--tp_scope", choices=["global", "local"], default="global",
                    help="Torch-Pruning ranking: global (global_pruning=True, as its HF BERT example) or local "
                         "(uniform per layer)")
    ap.add_argument("--sst2_finetune_steps", type=int, default=300,
                    help="SST-2 dense fine-tuning steps (batch 32, max length 64)")
    ap.add_argument("--finetune_epochs", type=float, default=2.0,
                    help="dense fine-tuning epochs (batch 32) of the tasks other than SST-2")
    ap.add_argument("--finetune_lr", type=float, default=5e-5)
    ap.add_argument("--repeats", type=int, default=10, help="latency repeats at batch 1 (median reported)")
    ap.add_argument("--repeats_b32", type=int, default=3, help="latency repeats at batch 32 (seconds each)")
    ap.add_argument("--seq_len", type=int, default=128, help="sequence length of FLOPs counts and latency")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the dense fine-tune, calibration draw, recovery data order and pruning")
    ap.add_argument("--dense", nargs="+", default=None,
                    help="several dense models seed:lr:epochs_factor instead of --seed/--finetune_lr (the factor "
                         "multiplies --finetune_epochs, on SST-2 --sst2_finetune_steps): one run each, then mean "
                         "[min, max] over them")
    ap.add_argument("--report_only", action="store_true",
                    help="run nothing: rebuild the JSON, tables and plots from the cached cells (missing ones listed)")
    ap.add_argument("--name", default=None,
                    help="results stem compare_<name> and report compare_<name>.md (default: quick / full, whose "
                         "report is benchmarks/RESULTS.md): a subset of methods or tasks then leaves those alone")
    ap.add_argument("--report", default=None,
                    help="markdown report (default: benchmarks/RESULTS.md, quick: benchmarks/results/compare_quick.md)")
    args = ap.parse_args(argv)
    given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    if args.quick:  # quick defaults, unless given explicitly
        quick = {"tasks": ["sst2"], "budgets": [0.5], "rf_samples": 256, "oneshot_samples": 128,
                 "recovery_steps": 8, "repeats": 2, "repeats_b32": 2}
        for k, v in quick.items():
            if f"--{k}" not in given:
                setattr(args, k, v)
    if args.dense is None:
        args.dense = [f"{args.seed}:{args.finetune_lr:g}:1"]
    for spec in args.dense:
        parse_dense(spec)
    if len(set(args.dense)) != len(args.dense):
        ap.error(f"--dense {args.dense}: give each dense model once")
    if args.methods is None:
        args.methods = DEFAULT_METHODS + (BASELINE_RECOVERY if args.recover_baselines else [])
    args.mode = args.name or ("quick" if args.quick else "full")
    if args.report is None:
        args.report = str(RESULTS / f"compare_{args.mode}.md") if args.mode != "full" else str(HERE / "RESULTS.md")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = ".venv/bin/python benchmarks/bench_compare.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tok = T.AutoTokenizer.from_pretrained(embedded_model_path())
    methods = expand(args.methods)
    runs: dict[tuple[str, str], TaskRun] = {}
    failed: list[str] = []
    t0 = time.perf_counter()
    for name, spec in [(n, d) for n in args.tasks for d in args.dense]:
        task = TASKS[name]
        seed, lr, factor = parse_dense(spec)
        steps = (round(args.sst2_finetune_steps * factor) if name == "sst2"
                 else epochs_to_steps(task, args.finetune_epochs * factor, 32))
        run_args = argparse.Namespace(**{**vars(args), "seed": seed, "finetune_lr": lr})
        run = runs[(name, spec)] = TaskRun(task, run_args, tok, steps)
        if args.report_only:
            run.dense_rec = run.load(None, "dense")
            continue
        print(f"[{name}] dense {spec}: {steps} fine-tuning steps at lr {lr:g} (cached after the first run)",
              flush=True)
        start = time.perf_counter()
        run.prepare()
        d = run.dense_rec
        print(f"[{name}] ready in {time.perf_counter() - start:.0f}s: dense {fmt_metrics(d['metrics'])}, "
              f"b1 {d['latency']['b1']['dense_ms']:.1f} ms, b32 {d['latency']['b32']['dense_ms']:.0f} ms; "
              f"fwd+bwd {1000 * run.fb_per_sample:.1f} ms/sample", flush=True)
        todo = [(k, m) for k in args.budgets for m in methods if run.load(k, m) is None]
        print(f"[{name}] {len(args.budgets) * len(methods) - len(todo)} cells cached, {len(todo)} to run, estimated "
              f"{sum(run.estimate(m) for _, m in todo) / 60:.1f} min", flush=True)
        for i, (k, m) in enumerate(todo):
            est = run.estimate(m)
            print(f"[{name} {k:.0%} {m}] estimated {est:.0f}s ...", flush=True)
            start = time.perf_counter()
            try:
                rec = run.run_cell(k, m)
            except Exception:  # noqa: BLE001 -- one broken cell must not lose the others; it stays missing
                traceback.print_exc()
                failed.append(f"{name} {k:.0%} {m} dense {spec}")
                print(f"[{name} {k:.0%} {m}] FAILED after {time.perf_counter() - start:.0f}s", flush=True)
                continue
            rec["cell_s"] = time.perf_counter() - start
            rec["estimated_s"] = est
            rec["loadavg_1min"] = os.getloadavg()[0]  # > threads: other processes shared the cores
            run.actual[m] = rec["cell_s"] - rec.get("reprune_s", 0.0)
            run.save(k, m, rec)
            extra = f", b32 speedup {rec['latency']['b32']['speedup']:.2f}x" if "latency" in rec else ""
            print(f"[{name} {k:.0%} {m}] done in {rec['cell_s']:.0f}s (estimated {est:.0f}s): "
                  f"{fmt_metrics(rec['metrics'])}, FLOPs kept {rec['flops_kept']:.1%}{extra}", flush=True)
            if all(kk != k for kk, _ in todo[i + 1:]):  # this budget is done: free its pruned models
                run.pruned = {key: v for key, v in run.pruned.items() if key[0] != k}
    payload, md = build_report(args, runs, command)
    payload["meta"]["run_s"] = time.perf_counter() - t0
    out = report.write_json(RESULTS / f"compare_{args.mode}.json", payload)
    report.write_text(args.report, md + "\n")
    print("\n" + md)
    print(f"\nwrote {out} and {args.report} ({(time.perf_counter() - t0) / 60:.1f} min)")
    if payload["missing"]:
        print(f"{len(payload['missing'])} cells missing (not run yet, or failed): re-run the same command to fill them")
    if failed:
        sys.exit(f"{len(failed)} cells failed: {', '.join(failed)}")


def fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())


if __name__ == "__main__":
    main()

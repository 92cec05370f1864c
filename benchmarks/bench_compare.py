"""hf_prune side by side with Torch-Pruning and simple baselines on all-MiniLM-L6-v2: dev metric, params, layer
FLOPs, CPU latency and speedup, pruning wall time and peak memory, at several fractions of encoder FLOPs kept.

The default run is the robustness protocol: for every task three dense models fine-tuned independently (seed,
learning rate, epochs; ``PROTOCOL_DENSE``), each cached under ``benchmarks/cache/``; then, for every FLOPs budget
(75/60/50/40/25%) and every dense model, on the same data in the same run (default methods: ``PROTOCOL_METHODS``;
recovery: one epoch of the task, SST-2 a fixed 300 x 32 sentences):

=========================  ===========================================================================
``retraining_free``        ``hf_prune.prune(..., PruningConfig(method="retraining_free", flops_keep=k))``
``retraining_free+kd_full`` the retraining-free model + full fine-tuning with KD from the dense model
``fisher``                 hf_prune one-shot, Fisher scores, global FLOPs search (no recovery; not default)
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
per dense model ``seed:lr:epochs_factor[:batch]`` instead of the protocol's (the seed also draws the
calibration samples and orders the recovery data); with several dense models the report adds a table of mean
[min, max] over them, each hf_prune method's lead over the best Torch-Pruning method with the same recovery, and a
plot of the mean metric against the mean batch-1 speedup. Outputs:
``benchmarks/results/compare_<mode>.json``, PNG plots ``benchmarks/results/compare_<mode>_*.png`` and a markdown
report (``benchmarks/RESULTS.md`` for the full run, ``benchmarks/results/compare_quick.md`` for ``--quick``).

    .venv/bin/python benchmarks/bench_compare.py --quick        # smoke run: SST-2, 50%, tiny settings, ~5 min
    .venv/bin/python benchmarks/bench_compare.py                # the protocol: SST-2, MRPC, STS-B x 5 budgets x 3
    .venv/bin/python benchmarks/bench_compare.py --name rf_then_kd_50_sst2 --tasks sst2 --budgets 0.5  # one slice
    .venv/bin/python benchmarks/bench_compare.py --name mrpc_fisher --tasks mrpc --budgets 0.5 \
        --methods retraining_free+kd_full fisher+kd_full   # other methods on the protocol's dense models
    .venv/bin/python benchmarks/bench_compare.py --name one --seed 0 --tasks rte cola   # one dense model per task

    .venv/bin/python benchmarks/bench_compare.py --report_only  # tables/plots from whatever cells are cached

Sizing (the protocol, 2-core machine): the 9 dense fine-tunes ~1.5 h (SST-2: 2105 + 2 x 1052 steps), the 270
cells ~10 h (7 s to 6 min each, the recoveries longest; 247 of them took 8.0 h in the committed run); a slice (one task, one budget) ~30 min once its dense
models are cached. Other processes on the same cores slow it down a lot (torch's threads wait on each other). Every
cell prints its estimated and actual time; the start of each task prints the estimate for all its cells.

Needs ``pip install torch-pruning==1.6.1`` for the ``tp_*`` methods. The methods table and the report (tables,
summary across dense models, plots) are in ``compare_report.py``; this file measures and caches cells.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
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
    PROTOCOL_EPOCHS,
    TASKS,
    PeakRSS,
    Task,
    calibration,
    dev_batches,
    epochs_to_steps,
    evaluate,
    finetune,
    forward_backward_s,
    omp_env,
    parse_dense,
)
from compare_report import BASELINE_RECOVERY, METHODS, QUICK_METHODS, RESULTS, build_report, expand
from transformers.utils import logging as hf_logging

import hf_prune as hp
from hf_prune import report
from hf_prune.costs import model_layer_sizes
from hf_prune.resources import embedded_model_path
from hf_prune.trainer import DistillationConfig, PruningTrainer

CELLS = CACHE / "compare"
# The robustness protocol (issue 16), the default run: three independently fine-tuned dense models per task (seed,
# learning rate, epochs), one epoch of KD recovery (SST-2: 300 x 32 = 9,600 sentences, 14% of an epoch), hf_prune
# against Torch-Pruning's two criteria with the same recovery.
PROTOCOL_DENSE = {"sst2": ["0:5e-5:1", "1:3e-5:0.5", "2:1e-4:0.5"], None: ["0:5e-5:1", "1:3e-5:1", "2:5e-5:0.5"]}
PROTOCOL_METHODS = ["retraining_free", "retraining_free+kd_full", "tp_taylor", "tp_taylor+kd_full", "tp_magnitude",
                    "tp_magnitude+kd_full"]
SST2_RECOVERY_STEPS = 300


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
        if a.finetune_batch != 32:  # only when set: the batch-32 cells keep their hashes
            s["finetune_batch"] = a.finetune_batch
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
        if a.round_to != 1 and not method.startswith("tp_"):  # only when set: older cells keep their hashes
            s["round_to"] = a.round_to
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
        path = finetune(task, self.tok, self.finetune_steps, a.finetune_batch, a.finetune_lr, a.seed)
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
                                       max_calibration_samples=a.rf_samples, round_to=a.round_to, seed=a.seed,
                                       progress=False)
                model, plan = hp.prune(model, self.calib_rf, cfg)
            elif method in ("fisher", "magnitude", "random"):
                cfg = hp.PruningConfig(importance=method, flops_keep=budget, seq_len=a.seq_len,
                                       max_calibration_samples=a.oneshot_samples, round_to=a.round_to, seed=a.seed,
                                       progress=False)
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


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: SST-2, budget 50%%, 256/128 calibration samples, 8 recovery steps, "
                         "2 latency repeats")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=["sst2", "mrpc", "stsb"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.6, 0.5, 0.4, 0.25],
                    help="fractions of FLOPs kept")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                    help=f"default: {' '.join(PROTOCOL_METHODS)} (+ {' '.join(BASELINE_RECOVERY)} with "
                         f"--recover_baselines; --quick: {' '.join(QUICK_METHODS)})")
    ap.add_argument("--recover_baselines", action="store_true", help="also recover the magnitude and random models")
    ap.add_argument("--rf_samples", type=int, default=1024, help="calibration samples, retraining-free")
    ap.add_argument("--oneshot_samples", type=int, default=512,
                    help="calibration samples, Fisher one-shot and Torch-Pruning Taylor")
    ap.add_argument("--recovery_steps", type=int, default=None,
                    help="recovery optimizer steps, every recovered method (default: one epoch of the task's training "
                         f"set at --recovery_batch; SST-2 a fixed {SST2_RECOVERY_STEPS} steps)")
    ap.add_argument("--recovery_batch", type=int, default=32)
    ap.add_argument("--recovery_lr", type=float, default=5e-5, help="learning rate of full recovery")
    ap.add_argument("--lora_lr", type=float, default=5e-4, help="learning rate of LoRA recovery")
    ap.add_argument("--kd_alpha", type=float, default=0.5)
    ap.add_argument("--kd_temperature", type=float, default=2.0)
    ap.add_argument("--tp_scope", choices=["global", "local"], default="global",
                    help="Torch-Pruning ranking: global (global_pruning=True, as its HF BERT example) or local "
                         "(uniform per layer)")
    ap.add_argument("--sst2_finetune_steps", type=int, default=None,
                    help="SST-2 dense fine-tuning steps at batch 32, max length 64 (default: PROTOCOL_EPOCHS' one "
                         "epoch, 2105 steps)")
    ap.add_argument("--finetune_epochs", type=float, default=None,
                    help="dense fine-tuning epochs of the tasks other than SST-2 (default: PROTOCOL_EPOCHS', the "
                         "robustness and dense benchmarks' count: 3)")
    ap.add_argument("--finetune_lr", type=float, default=5e-5)
    ap.add_argument("--repeats", type=int, default=5, help="latency repeats at batch 1 (median reported)")
    ap.add_argument("--repeats_b32", type=int, default=1, help="latency repeats at batch 32 (seconds each)")
    ap.add_argument("--seq_len", type=int, default=128, help="sequence length of FLOPs counts and latency")
    ap.add_argument("--round_to", type=int, default=1,
                    help="PruningConfig.round_to of the hf_prune methods (FFN widths in multiples of it)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the dense fine-tune, calibration draw, recovery data order and pruning")
    ap.add_argument("--dense", nargs="+", default=None,
                    help="dense models seed:lr:epochs_factor[:batch] (the factor multiplies the task's epochs, "
                         "PROTOCOL_EPOCHS unless --finetune_epochs / --sst2_finetune_steps; batch 32 unless "
                         "given): one run each, then mean [min, max] over them. Default: the "
                         f"protocol's three per task ({PROTOCOL_DENSE['sst2']} on SST-2, {PROTOCOL_DENSE[None]} "
                         "elsewhere); one model from --seed/--finetune_lr when either is given or with --quick")
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
        quick = {"tasks": ["sst2"], "budgets": [0.5], "rf_samples": 256, "oneshot_samples": 128, "recovery_steps": 8,
                 "recovery_batch": 16, "repeats": 2, "repeats_b32": 2, "sst2_finetune_steps": 300,
                 "finetune_epochs": 2.0, "methods": QUICK_METHODS}
        for k, v in quick.items():
            if f"--{k}" not in given:
                setattr(args, k, v)
    if args.dense is None and (args.quick or given & {"--seed", "--finetune_lr"}):
        args.dense = [f"{args.seed}:{args.finetune_lr:g}:1"]
    for spec in args.dense or []:
        parse_dense(spec)
    if args.dense is not None and len(set(args.dense)) != len(args.dense):
        ap.error(f"--dense {args.dense}: give each dense model once")
    if args.methods is None:
        args.methods = PROTOCOL_METHODS + (BASELINE_RECOVERY if args.recover_baselines else [])
    args.mode = args.name or ("quick" if args.quick else "full")
    if args.report is None:
        args.report = str(RESULTS / f"compare_{args.mode}.md") if args.mode != "full" else str(HERE / "RESULTS.md")
    return args


def dense_steps(args: argparse.Namespace, task: Task, factor: float, batch: int) -> int:
    """Fine-tuning steps of a dense model ``factor`` x the task's epochs at ``batch``: ``PROTOCOL_EPOCHS`` (the
    robustness and dense benchmarks' one definition) unless ``--finetune_epochs`` / ``--sst2_finetune_steps`` say
    otherwise, so the same ``--dense`` spec is the same cached model in all three benchmarks."""
    if task.name == "sst2" and args.sst2_finetune_steps is not None:
        return round(args.sst2_finetune_steps * factor * 32 / batch)
    epochs = PROTOCOL_EPOCHS[task.name]
    if task.name != "sst2" and args.finetune_epochs is not None:
        epochs = args.finetune_epochs
    return epochs_to_steps(task, epochs * factor, batch)


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
    for name, spec in [(n, d) for n in args.tasks for d in dense_specs(args, n)]:
        task = TASKS[name]
        seed, lr, factor, batch = parse_dense(spec)
        steps = dense_steps(args, task, factor, batch)
        run_args = argparse.Namespace(**{**vars(args), "seed": seed, "finetune_lr": lr, "finetune_batch": batch,
                                         "recovery_steps": recovery_steps(args, task)})
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
            rec["omp"] = omp_env()  # the report's header shows the env of whichever process built the report
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


def dense_specs(args: argparse.Namespace, task: str) -> list[str]:
    """The dense models of ``task``: ``--dense``, else the protocol's."""
    return args.dense if args.dense is not None else PROTOCOL_DENSE.get(task, PROTOCOL_DENSE[None])


def recovery_steps(args: argparse.Namespace, task: Task) -> int:
    """``--recovery_steps``, else one epoch of ``task`` (SST-2: the fixed budget; an epoch is 67k sentences)."""
    if args.recovery_steps is not None:
        return args.recovery_steps
    return SST2_RECOVERY_STEPS if task.name == "sst2" else epochs_to_steps(task, 1.0, args.recovery_batch)


def fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())


if __name__ == "__main__":
    main()

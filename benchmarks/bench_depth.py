"""Depth vs width vs both at equal layer FLOPs, with measured latency.

- **MiniLM / SST-2** (all-MiniLM-L6-v2, 6 layers, fine-tuned on SST-2 once and cached): at each FLOPs target, the
  retraining-free cut (``PruningConfig(method="retraining_free", ...)``) removing heads and neurons only (width),
  whole layers only (depth, ``layers_keep``), or both (a fixed layer count, or ``depth_search=True``: the library
  picks it, "auto"), then KD recovery with ``PruningTrainer`` (teacher = the dense
  model, a fixed number of steps): dev accuracy before and after recovery, measured batch-1 and batch-32 speedups
  (dense and pruned interleaved, seq 128).
- **SmolLM2-135M-Instruct** (Llama, 30 layers): the same kinds of cut, retraining-free on packed QNLI (Wikipedia)
  sentences (the first 2,000 of the dev file), held-out perplexity on later ones (from the 3,000th), decode
  ms/token at batch 1 with the KV cache and prefill latency (``hp.compare_decode``, models interleaved).

Cells are cached (``benchmarks/cache/depth/``), so a rerun only computes what is missing; the dense fine-tune is
cached too. Writes ``benchmarks/results/depth{_quick}.json`` / ``.md`` and the plots.

    .venv/bin/python benchmarks/bench_depth.py --quick          # MiniLM 50%/33%, short recovery; SmolLM2 80%
    .venv/bin/python benchmarks/bench_depth.py                  # the full grid
"""

from __future__ import annotations

import copy
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
import torch
import transformers as T
from common import CACHE, HERE, TASKS, cached_cell, calibration, dev_batches, evaluate, finetune, lm_measure, qnli_text

import hf_prune as hp
from hf_prune import report
from hf_prune.lm import pack_text_blocks, perplexity
from hf_prune.resources import embedded_model_path

CELLS = CACHE / "depth"

#: MiniLM cells: (name, FLOPs target, budget). Depth-only cells keep a whole number of the 6 layers.
MINILM_GRID = [
    ("width", 0.50, {"flops_keep": 0.50}),
    ("depth", 0.50, {"layers_keep": 3}),
    ("both", 0.50, {"layers_keep": 4, "flops_keep": 0.50}),
    ("width", 1 / 3, {"flops_keep": 1 / 3}),
    ("depth", 1 / 3, {"layers_keep": 2}),
    ("both", 1 / 3, {"layers_keep": 3, "flops_keep": 1 / 3}),
    ("both", 0.25, {"layers_keep": 2, "flops_keep": 0.25}),
    # depth_search: the budget alone, the layer count chosen by the library
    ("auto", 1 / 3, {"flops_keep": 1 / 3, "depth_search": True}),
    ("auto", 0.25, {"flops_keep": 0.25, "depth_search": True}),
]
QUICK_MINILM = MINILM_GRID[:6]

#: SmolLM2 cells: 30 layers, so depth-only targets are multiples of 1/30.
SMOL_GRID = [
    ("width", 0.8, {"flops_keep": 0.8}),
    ("depth", 0.8, {"layers_keep": 24}),
    ("both", 0.8, {"layers_keep": 27, "flops_keep": 0.8}),
    ("auto", 0.8, {"flops_keep": 0.8, "depth_search": True}),
]
QUICK_SMOL = SMOL_GRID[:3]


@dataclass
class DepthArguments:
    """Arguments of ``bench_depth.py``.

    Args:
        models: which parts to run: ``minilm`` and/or ``smollm2``.
        quick: a small grid (two MiniLM targets, one SmolLM2 target) and short recovery.
        dense_steps: MiniLM SST-2 fine-tuning steps (batch 32; 2,105 = one epoch).
        recovery_steps: KD recovery steps (batch 32) after each MiniLM cut.
        recovery_lr: learning rate of the recovery.
        calibration_samples: SST-2 training sentences the retraining-free cut scores and tunes on.
        lm_calibration_blocks: SmolLM2 calibration blocks of 128 tokens (QNLI dev sentences 0-1999).
        lm_eval_blocks: held-out blocks of 128 tokens (QNLI dev sentences from 3000) for perplexity.
        repeats: timed runs per latency measurement (median reported).
        seed: calibration draw and recovery seed.
    """

    models: list[str] = field(default_factory=lambda: ["minilm", "smollm2"])
    quick: bool = False
    dense_steps: int = 1000
    recovery_steps: int = 150
    recovery_lr: float = 5e-5
    calibration_samples: int = 1024
    lm_calibration_blocks: int = 32
    lm_eval_blocks: int = 32
    repeats: int = 10
    seed: int = 0


def _cell(key: dict[str, Any], compute) -> dict[str, Any]:
    return cached_cell(CELLS, key, compute)


# ----------------------------------------------------------------------------------------------- MiniLM / SST-2


def _train_dataset(tok, n: int, seed: int) -> datasets.Dataset:
    texts, labels = TASKS["sst2"].read("train")
    idx = random.Random(seed + 7).sample(range(len(texts)), min(n, len(texts)))
    enc = tok([texts[i] for i in idx], truncation=True, max_length=TASKS["sst2"].max_len)
    return datasets.Dataset.from_dict({**enc, "labels": [labels[i] for i in idx]})


def _recover(model, dense, tok, cfg, args: DepthArguments, steps: int) -> float:
    """KD recovery of the cut ``model`` with PruningTrainer (the teacher is ``dense``); returns seconds."""
    with tempfile.TemporaryDirectory() as out:
        targs = T.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=32, learning_rate=args.recovery_lr,
            warmup_steps=max(1, steps // 10), lr_scheduler_type="linear", weight_decay=0.01,
            logging_steps=max(1, steps // 5),
            save_strategy="no", report_to=[], use_cpu=True, seed=args.seed, disable_tqdm=True,
        )
        trainer = hp.PruningTrainer(
            model=model, args=targs, train_dataset=_train_dataset(tok, steps * 32, args.seed),
            data_collator=T.DataCollatorWithPadding(tok), pruning_config=cfg, teacher_model=dense,
            distillation=hp.DistillationConfig(alpha=1.0, temperature=2.0),
        )
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def minilm(args: DepthArguments) -> dict[str, Any]:
    task = TASKS["sst2"]
    tok = T.AutoTokenizer.from_pretrained(embedded_model_path())
    dense_dir = finetune(task, tok, args.dense_steps, 32, 5e-5, args.seed)
    dense = T.AutoModelForSequenceClassification.from_pretrained(dense_dir).eval()
    dev, labels = dev_batches(task, tok)
    dense_acc = evaluate(dense, task, dev, labels)["accuracy"]
    calib = calibration(task, tok, args.calibration_samples, args.seed)
    steps = 100 if args.quick else args.recovery_steps
    rows = []
    for kind, target, budget in QUICK_MINILM if args.quick else MINILM_GRID:
        key = {"model": "minilm", "kind": kind, "target": target, **budget, "dense_steps": args.dense_steps,
               "recovery_steps": steps, "lr": args.recovery_lr, "calib": args.calibration_samples,
               "seed": args.seed}

        def compute(budget=budget):
            cfg = hp.PruningConfig(method="retraining_free", progress=False, **budget)
            model = copy.deepcopy(dense).requires_grad_(True)  # PruningTrainer froze ``dense`` as a teacher
            start = time.perf_counter()
            hp.prune(model, calib, cfg)
            prune_s = time.perf_counter() - start
            pruned_acc = evaluate(model, task, dev, labels)["accuracy"]
            lat = {}
            for bs, reps in ((1, args.repeats), (32, max(3, args.repeats // 3))):
                m = hp.compare_latency({"dense": dense, "pruned": model}, bs, 128, repeats=reps)
                lat[f"b{bs}_ms"] = m["pruned"].median_ms
                lat[f"b{bs}_dense_ms"] = m["dense"].median_ms
                lat[f"b{bs}_speedup"] = m["dense"].median_ms / m["pruned"].median_ms
            recovery_s = _recover(model, dense, tok, cfg, args, steps)
            return {
                "layers_kept": len(hp.PrunePlan.of(model).kept_layers),
                "flops_kept": hp.count_flops(model, 128)["total"] / hp.count_flops(dense, 128)["total"],
                "params_m": hp.count_params(model) / 1e6, "pruned": pruned_acc,
                "recovered": evaluate(model, task, dev, labels)["accuracy"],
                "prune_s": prune_s, "recovery_s": recovery_s, **lat,
            }

        row = _cell(key, compute)
        print(f"[minilm] {kind:<5} {target:.0%} {budget}: acc {row['pruned']:.2f} -> {row['recovered']:.2f} "
              f"(dense {dense_acc:.2f}), b1 {row['b1_speedup']:.2f}x, b32 {row['b32_speedup']:.2f}x", flush=True)
        rows.append(row)
    return {"dense_accuracy": dense_acc, "dense_steps": args.dense_steps, "recovery_steps": steps, "rows": rows}


# ----------------------------------------------------------------------------------------------- SmolLM2


def smollm2(args: DepthArguments) -> dict[str, Any]:
    path = embedded_model_path("smollm2")
    tok = T.AutoTokenizer.from_pretrained(path)
    dense = T.AutoModelForCausalLM.from_pretrained(path).eval()
    sentences = qnli_text("dev")  # the only QNLI split in ../shared: calibration first, held-out text after
    calib = pack_text_blocks(tok, sentences[:2000], block_size=128, batch_size=4, max_blocks=args.lm_calibration_blocks)
    held_out = pack_text_blocks(tok, sentences[3000:], block_size=128, batch_size=4, max_blocks=args.lm_eval_blocks)
    dense_ppl = perplexity(dense, held_out)
    rows = []
    for kind, target, budget in QUICK_SMOL if args.quick else SMOL_GRID:
        key = {"model": "smollm2", "kind": kind, "target": target, **budget, "calib": args.lm_calibration_blocks,
               "eval": args.lm_eval_blocks, "seed": args.seed}

        def compute(budget=budget):
            n = sum(b["input_ids"].shape[0] for b in calib)
            cfg = hp.PruningConfig(method="retraining_free", progress=False, tuning_samples=n // 2,
                                   selection_samples=n // 2, **budget)
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            hp.prune(model, calib, cfg)
            prune_s = time.perf_counter() - start
            return {**lm_measure(dense, model, held_out, max(3, args.repeats // 2)), "prune_s": prune_s}

        row = _cell(key, compute)
        print(f"[smollm2] {kind:<5} {target:.0%} {budget}: ppl {row['ppl']:.2f} (dense {dense_ppl:.2f}), decode "
              f"{row['decode_speedup']:.2f}x, prefill {row['prefill_speedup']:.2f}x", flush=True)
        rows.append(row)
    return {"dense_ppl": dense_ppl, "rows": rows}


# ----------------------------------------------------------------------------------------------- report


def _budget_text(row: dict[str, Any]) -> str:
    parts = [f"layers_keep={row['layers_keep']}" if "layers_keep" in row else None,
             f"flops_keep={row['flops_keep']:.3g}" if "flops_keep" in row else None,
             "depth_search" if row.get("depth_search") else None]
    return ", ".join(p for p in parts if p)


def write(results: dict[str, Any], args: DepthArguments) -> None:
    stem = "depth_quick" if args.quick else "depth"
    out = HERE / "results"
    lines = ["# Depth vs width vs both at equal layer FLOPs\n",
             f"> Written by `benchmarks/bench_depth.py{' --quick' if args.quick else ''}`; do not edit by hand.\n",
             f"- command: `.venv/bin/python benchmarks/bench_depth.py {' '.join(sys.argv[1:])}`".rstrip() + "\n",
             f"- environment: {json.dumps(report.environment())}\n"]
    if "minilm" in results:
        r = results["minilm"]
        lines.append(f"\n## all-MiniLM-L6-v2 / SST-2 (dev accuracy, 872 sentences)\n\nDense: {r['dense_accuracy']:.2f} "
                     f"after {r['dense_steps']} fine-tuning steps x 32. Cut: retraining-free on "
                     f"{args.calibration_samples} training sentences; recovery: {r['recovery_steps']} steps x 32 of KD "
                     f"(alpha 1, T 2) from the dense model, lr {args.recovery_lr}. Latency: seq 128, CPU, dense and "
                     "pruned interleaved, median.\n")
        rows = [{**x, "budget": _budget_text(x), "drop_pruned": x["pruned"] - r["dense_accuracy"],
                 "drop_recovered": x["recovered"] - r["dense_accuracy"],
                 "b1_of_ideal": x["b1_speedup"] * x["flops_kept"], "b32_of_ideal": x["b32_speedup"] * x["flops_kept"]}
                for x in r["rows"]]
        lines.append(report.markdown_table(
            rows, ["target", "kind", "budget", "layers_kept", "flops_kept", "params_m", "pruned", "drop_pruned",
                   "recovered", "drop_recovered", "b1_ms", "b1_speedup", "b1_of_ideal", "b32_ms", "b32_speedup",
                   "b32_of_ideal", "prune_s", "recovery_s"],
            formats={"target": ".0%", "flops_kept": ".1%", "params_m": ".2f", "pruned": ".2f", "drop_pruned": "+.2f",
                     "recovered": ".2f", "drop_recovered": "+.2f", "b1_ms": ".1f", "b1_speedup": ".2f",
                     "b1_of_ideal": ".0%", "b32_ms": ".0f", "b32_speedup": ".2f", "b32_of_ideal": ".0%",
                     "prune_s": ".0f", "recovery_s": ".0f"},
            headers={"flops_kept": "FLOPs kept", "params_m": "params (M)", "drop_pruned": "Δ", "drop_recovered": "Δ",
                     "b1_of_ideal": "b1 % of ideal", "b32_of_ideal": "b32 % of ideal", "layers_kept": "layers"}))
        series = {kind: [(x["b1_speedup"], x["recovered"]) for x in r["rows"] if x["kind"] == kind]
                  for kind in ("width", "depth", "both", "auto")}
        report.plot_metric_vs_speedup(series, out / f"{stem}_minilm_sst2.png", metric="SST-2 dev accuracy (recovered)",
                                      dense=r["dense_accuracy"], title="MiniLM / SST-2: accuracy vs batch-1 speedup")
        lines.append(f"\n![accuracy vs batch-1 speedup]({stem}_minilm_sst2.png)\n")
    if "smollm2" in results:
        r = results["smollm2"]
        lines.append(f"\n## SmolLM2-135M-Instruct (held-out perplexity, QNLI dev text)\n\nDense perplexity "
                     f"{r['dense_ppl']:.2f} on {args.lm_eval_blocks} blocks of 128 tokens (QNLI sentences from the "
                     f"3,000th); retraining-free on {args.lm_calibration_blocks} blocks of earlier ones, no recovery. "
                     "Decode: batch 1, prompt 128, 32 new tokens with the KV cache, CPU, dense and pruned interleaved.\n")
        rows = [{**x, "budget": _budget_text(x), "ppl_ratio": x["ppl"] / r["dense_ppl"]} for x in r["rows"]]
        lines.append(report.markdown_table(
            rows, ["target", "kind", "budget", "layers_kept", "flops_kept", "params_m", "ppl", "ppl_ratio",
                   "decode_ms", "decode_speedup", "prefill_ms", "prefill_speedup", "prune_s"],
            formats={"target": ".0%", "flops_kept": ".1%", "params_m": ".1f", "ppl": ".2f", "ppl_ratio": ".3f",
                     "decode_ms": ".1f", "decode_speedup": ".2f", "prefill_ms": ".0f", "prefill_speedup": ".2f",
                     "prune_s": ".0f"},
            headers={"flops_kept": "FLOPs kept", "params_m": "params (M)", "ppl_ratio": "ppl / dense",
                     "decode_ms": "decode ms/token", "layers_kept": "layers"}))
        series = {kind: [(x["decode_speedup"], x["ppl"]) for x in r["rows"] if x["kind"] == kind]
                  for kind in ("width", "depth", "both", "auto")}
        report.plot_metric_vs_speedup(series, out / f"{stem}_smollm2.png", metric="held-out perplexity",
                                      dense=r["dense_ppl"], title="SmolLM2-135M: perplexity vs decode speedup (b1)")
        lines.append(f"\n![perplexity vs decode speedup]({stem}_smollm2.png)\n")
    report.write_json(out / f"{stem}.json", {"args": asdict(args), "environment": report.environment(), **results})
    report.write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    (args,) = T.HfArgumentParser(DepthArguments).parse_args_into_dataclasses()
    unknown = sorted(set(args.models) - {"minilm", "smollm2"})
    if unknown:
        raise SystemExit(f"unknown --models {unknown}: choose from minilm, smollm2")
    torch.manual_seed(args.seed)
    results: dict[str, Any] = {}
    if "minilm" in args.models:
        results["minilm"] = minilm(args)
    if "smollm2" in args.models:
        results["smollm2"] = smollm2(args)
    write(results, args)


if __name__ == "__main__":
    main()

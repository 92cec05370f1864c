"""Recovery on real data: all-MiniLM-L6-v2 on SST-2, dense vs pruned vs recovered (full + KD, LoRA + KD).

1. Fine-tune the dense model once (cached under benchmarks/cache/, reused by later runs).
2. Prune it to 50% of encoder FLOPs (Fisher scores on training sentences, global allocation).
3. Recover for a fixed number of steps with PruningTrainer: full fine-tuning + KD, and LoRA + KD.
Prints a markdown table (dev accuracy, params, FLOPs kept, wall time) and writes JSON.

    .venv/bin/python benchmarks/bench_recovery.py                   # data from ../shared/data/glue/sst2
    .venv/bin/python benchmarks/bench_recovery.py --recovery-steps 50 --eval-samples 300   # quicker
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers as T

import hf_prune as hp
from hf_prune.resources import embedded_model_path, read_tsv
from hf_prune.trainer import DistillationConfig, PruningTrainer

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "glue" / "sst2"


def load_split(data_dir: Path, split: str, tok, max_length: int, limit: int | None, seed: int = 0):
    rows = read_tsv(data_dir / f"{split}.tsv")
    if limit is not None and limit < len(rows):
        rng = np.random.default_rng(seed)
        rows = [rows[i] for i in sorted(rng.choice(len(rows), limit, replace=False))]
    enc = tok([r[0] for r in rows], truncation=True, max_length=max_length)
    return datasets.Dataset.from_dict({**enc, "labels": [int(r[1]) for r in rows]})


def accuracy(model, ds, tok, batch_size: int = 64) -> float:
    model.eval()
    collate = T.DataCollatorWithPadding(tok)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(ds), batch_size):
            batch = collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(ds)


def args_for(out: Path, steps: int, lr: float, batch: int) -> T.TrainingArguments:
    return T.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        warmup_steps=int(0.06 * steps), weight_decay=0.01, logging_steps=max(1, steps // 10),
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--dense-steps", type=int, default=250)
    ap.add_argument("--recovery-steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--train-samples", type=int, default=8000)
    ap.add_argument("--eval-samples", type=int, default=None, help="default: the whole dev set (872)")
    ap.add_argument("--flops-keep", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "recovery_sst2.json")
    args = ap.parse_args()
    torch.manual_seed(0)

    base = embedded_model_path()
    tok = T.AutoTokenizer.from_pretrained(base)
    train = load_split(args.data_dir, "train", tok, args.max_length, args.train_samples)
    dev = load_split(args.data_dir, "dev", tok, args.max_length, args.eval_samples)
    collate = T.DataCollatorWithPadding(tok)
    rows, timings = {}, {}

    cache = HERE / "cache" / f"minilm-sst2-{args.dense_steps}steps"
    if (cache / "config.json").exists():
        dense = T.AutoModelForSequenceClassification.from_pretrained(cache)
        timings["dense fine-tune"] = None
    else:
        dense = T.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
        start = time.perf_counter()
        T.Trainer(model=dense, args=args_for(HERE / "cache" / "tmp", args.dense_steps, 5e-5, args.batch_size),
                  train_dataset=train, data_collator=collate).train()
        timings["dense fine-tune"] = time.perf_counter() - start
        dense.save_pretrained(cache)
    rows["dense"] = {"accuracy": accuracy(dense, dev, tok), "model": dense, "seconds": timings["dense fine-tune"]}

    cfg = hp.PruningConfig(importance="fisher", flops_keep=args.flops_keep, max_calibration_samples=512, progress=False)
    calib = torch.utils.data.DataLoader(train.select(range(min(512, len(train)))), batch_size=32, collate_fn=collate)
    start = time.perf_counter()
    pruned, plan = hp.prune(copy.deepcopy(dense), calib, cfg)
    rows["pruned (no recovery)"] = {"accuracy": accuracy(pruned, dev, tok), "model": pruned,
                                   "seconds": time.perf_counter() - start}

    for name, recovery, lr in (("recovered: full + KD", "full", 5e-5), ("recovered: LoRA + KD", "lora", 5e-4)):
        trainer = PruningTrainer(
            model=copy.deepcopy(dense), args=args_for(HERE / "cache" / "tmp", args.recovery_steps, lr, args.batch_size),
            train_dataset=train, data_collator=collate, pruning_config=cfg, calibration_dataloader=calib,
            distillation=DistillationConfig(alpha=0.5, temperature=2.0), recovery=recovery,
        )
        start = time.perf_counter()
        trainer.train()
        rows[name] = {"accuracy": accuracy(trainer.model, dev, tok), "model": trainer.model,
                      "seconds": time.perf_counter() - start}

    flops0 = hp.count_flops(dense, 128)["total"]
    print(f"all-MiniLM-L6-v2 on SST-2 dev ({len(dev)} sentences), {args.flops_keep:.0%} encoder FLOPs kept, "
          f"recovery {args.recovery_steps} steps x {args.batch_size}")
    print("| model | dev accuracy | params | FLOPs kept | wall time (s) |\n|---|---|---|---|---|")
    out_rows = []
    for name, r in rows.items():
        m = r["model"]
        flops = hp.count_flops(m, 128)["total"] / flops0
        secs = "cached" if r["seconds"] is None else f"{r['seconds']:.0f}"
        print(f"| {name} | {r['accuracy']:.4f} | {hp.count_params(m):,} | {flops:.1%} | {secs} |")
        out_rows.append({"model": name, "accuracy": r["accuracy"], "params": hp.count_params(m), "flops_kept": flops,
                         "seconds": r["seconds"]})
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__, "transformers": T.__version__, **{k: str(v) for k, v in vars(args).items()},
        "plan": plan.summary(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": out_rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

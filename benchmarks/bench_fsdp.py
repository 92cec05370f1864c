"""Per-rank memory of KD recovery under FSDP2 vs DDP: two CPU processes (gloo), real decoder shapes (SmolLM2-135M and
-360M by default; names from ``bench_scale.SHAPES``) with random weights (fine for memory, never for accuracy), cut
one-shot to 80% of layer FLOPs before wrapping, then KD steps from
the dense teacher (full fine-tuning, AdamW, fp32).

Under DDP each rank holds the whole cut model, its gradients, both Adam moments and the whole teacher; under FSDP2
each rank holds its shard of each, plus one layer gathered at a time. Measured per rank: peak resident memory of the
training steps (from the Trainer's ``on_train_begin``, after the cut and the wrapping, to ``on_train_end``; sampled
every 5 ms from ``/proc/self/statm`` by ``common.PeakRSS``, after a garbage collection and ``malloc_trim``), and the
same above the level at ``on_train_begin`` (optimizer state, gradients, activations, gathered layers). FSDP2 runs on
CPU through the shim in ``tests/fsdp_cpu.py`` (accelerate selects FSDP only on accelerator devices; the shim sets the
state it sets on a GPU). Writes ``benchmarks/results/fsdp.{json,md}``.

Also per rank: the bytes of the parameters, the teacher and the optimizer state it holds (after the last step), and
the level at ``on_train_begin`` less the parameters and the teacher (what does not shard: the interpreter and the
libraries it imported). Each process holds its own copy of that and of the activations, so with two ranks the peak
cannot fall to half; the ``ideal`` column is the DDP peak with exactly half of the state it holds (parameters,
teacher, optimizer state, gradients and DDP's gradient buckets, each the size of the parameters).

Each shape runs twice: with glibc's default allocator, whose dynamic mmap threshold keeps freed large blocks in the
heap (so the buffers FSDP2 gathers and frees layer by layer stay resident), and with ``MALLOC_MMAP_THRESHOLD_=131072``,
which returns every freed large block to the OS, so RSS follows the live tensors (what a GPU's allocator is measured
by).

    .venv/bin/python benchmarks/bench_fsdp.py
    .venv/bin/python benchmarks/bench_fsdp.py --shapes smollm2-135m --mmap_thresholds 0
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import PeakRSS

HERE = Path(__file__).resolve().parent


@dataclass
class FsdpArguments:
    """Arguments of ``bench_fsdp.py``.

    Args:
        shapes: model shapes (names in ``bench_scale.SHAPES``), each measured under DDP and FSDP2.
        mmap_thresholds: glibc ``MALLOC_MMAP_THRESHOLD_`` of each run, in bytes (0: glibc's default, dynamic).
        steps: KD steps per run.
        batch_size: sequences of ``seq_len`` tokens per rank and step.
        seq_len: tokens per sequence.
        flops_keep: the one-shot cut before training.
    """

    shapes: list[str] = field(default_factory=lambda: ["smollm2-135m", "smollm2-360m"])
    mmap_thresholds: list[int] = field(default_factory=lambda: [0, 131072])
    steps: int = 4
    batch_size: int = 2
    seq_len: int = 128
    flops_keep: float = 0.8


def worker(out: Path, shape: str, mode: str, args: FsdpArguments) -> None:
    import datasets
    import torch
    import transformers as T

    sys.path.insert(0, str(HERE.parent / "tests"))
    from bench_scale import config_of
    from fsdp_cpu import CpuFsdp2Trainer
    from torch.distributed.tensor import DTensor

    import hf_prune as hp
    from hf_prune.distributed import exit_launched
    from hf_prune.trainer import DistillationConfig, PruningTrainer

    torch.manual_seed(0)
    config = config_of(shape)
    model = T.AutoModelForCausalLM.from_config(config)  # random weights of the real shapes
    n = args.steps * args.batch_size * 2
    ids = torch.randint(0, config.vocab_size, (n, args.seq_len), generator=torch.Generator().manual_seed(0))
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * args.seq_len] * n})
    targs = T.TrainingArguments(output_dir=str(out / mode), max_steps=args.steps,
                                per_device_train_batch_size=args.batch_size, learning_rate=1e-4, logging_steps=1,
                                save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    cls = CpuFsdp2Trainer if mode == "fsdp2" else PruningTrainer
    trainer = cls(model=model, args=targs, train_dataset=ds, data_collator=T.default_data_collator,
                  pruning_config=hp.PruningConfig(flops_keep=args.flops_keep, importance="magnitude", progress=False),
                  distillation=DistillationConfig(alpha=1.0, temperature=1.0))

    class Sample(T.TrainerCallback):  # the training steps only: after the cut and the wrapping, to the last step
        def on_train_begin(self, *a, **k):
            self.mem = PeakRSS(interval=0.005).__enter__()

        def on_train_end(self, *a, **k):
            self.mem.__exit__()

    sample = Sample()
    trainer.add_callback(sample)
    trainer.train()
    peak_mb, above_mb = sample.mem.total_mb, sample.mem.peak_mb
    rank = trainer.args.process_index

    def held_mb(tensors) -> float:  # the bytes this rank holds (its shard of a DTensor)
        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
        return sum(t.numel() * t.element_size() for t in local) / 2**20

    optimizer = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    params, teacher = held_mb(trainer.model.parameters()), held_mb(trainer.teacher.parameters())
    (out / f"{shape}-{mode}-rank{rank}.json").write_text(json.dumps({
        "shape": shape, "mode": mode, "rank": rank, "peak_rss_mb": peak_mb, "above_entry_mb": above_mb,
        "params_mb": params, "teacher_mb": teacher, "optimizer_mb": held_mb(optimizer),
        "runtime_mb": sample.mem.base_mb - params - teacher,
        "params_m": hp.count_params(trainer.model) / 1e6,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}))
    exit_launched()


def main() -> None:
    import transformers as T

    from hf_prune import report

    (args,) = T.HfArgumentParser(FsdpArguments).parse_args_into_dataclasses()
    from bench_scale import SHAPES

    if unknown := sorted(set(args.shapes) - set(SHAPES)):
        raise SystemExit(f"unknown shapes {unknown}: choose from {', '.join(SHAPES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            for threshold in args.mmap_thresholds:
                allocator = f"mmap threshold {threshold}" if threshold else "glibc default"
                for mode in ("ddp", "fsdp2"):
                    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__,
                           "--worker", tmp, shape, mode, json.dumps(asdict(args))]
                    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
                    env.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
                    if threshold:
                        env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
                    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if r.returncode != 0:
                        raise SystemExit(f"{shape} {mode} ({allocator}) run failed:\n{r.stderr[-3000:]}")
                    rows += [{**json.loads((Path(tmp) / f"{shape}-{mode}-rank{i}.json").read_text()),
                              "allocator": allocator} for i in range(2)]
    ddp = {(r["shape"], r["allocator"], r["rank"]): r for r in rows if r["mode"] == "ddp"}
    for r in rows:
        base = ddp[r["shape"], r["allocator"], r["rank"]]
        r["vs_ddp"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        r["above_vs_ddp"] = r["above_entry_mb"] / base["above_entry_mb"]
        # DDP's state halved: parameters, teacher, optimizer state, gradients and buckets (each the parameters' size)
        state = 3 * base["params_mb"] + base["teacher_mb"] + base["optimizer_mb"]
        r["ideal_vs_ddp"] = (base["peak_rss_mb"] - state / 2) / base["peak_rss_mb"]
    lines = ["# KD recovery under FSDP2 vs DDP: memory per rank\n",
             "> Written by `benchmarks/bench_fsdp.py`; do not edit by hand.\n",
             f"- command: `.venv/bin/python benchmarks/bench_fsdp.py {' '.join(sys.argv[1:])}`".rstrip() + "\n",
             f"- environment: {json.dumps(report.environment())}\n",
             f"\nTwo CPU processes (gloo), random weights of each shape, cut one-shot to "
             f"{args.flops_keep:.0%} of layer FLOPs before wrapping, {args.steps} KD steps of {args.batch_size} x "
             f"{args.seq_len} tokens per rank, AdamW, fp32; the dense teacher on every rank (sharded under FSDP2).\n",
             report.markdown_table(rows, ["shape", "allocator", "mode", "rank", "params_m", "peak_rss_mb", "vs_ddp",
                                         "ideal_vs_ddp", "above_entry_mb", "above_vs_ddp", "params_mb", "teacher_mb",
                                         "optimizer_mb", "runtime_mb"],
                                  formats={"params_m": ".1f", "peak_rss_mb": ".0f", "vs_ddp": ".2f",
                                           "ideal_vs_ddp": ".2f", "above_entry_mb": ".0f", "above_vs_ddp": ".2f",
                                           "params_mb": ".0f", "teacher_mb": ".0f", "optimizer_mb": ".0f",
                                           "runtime_mb": ".0f"},
                                  headers={"params_m": "params (M)", "peak_rss_mb": "peak RSS of the steps (MB)",
                                           "vs_ddp": "/ DDP", "ideal_vs_ddp": "ideal / DDP",
                                           "above_entry_mb": "above train begin (MB)", "above_vs_ddp": "/ DDP",
                                           "params_mb": "params held (MB)", "teacher_mb": "teacher held (MB)",
                                           "optimizer_mb": "optimizer state held (MB)",
                                           "runtime_mb": "runtime (MB)"})]
    out = HERE / "results"
    report.write_json(out / "fsdp.json", {"args": asdict(args), "environment": report.environment(), "rows": rows})
    report.write_text(out / "fsdp.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), sys.argv[3], sys.argv[4], FsdpArguments(**json.loads(sys.argv[5])))
    else:
        main()

"""GPU numbers (run by ``scripts/gpu_check.sh``; each part adds its section to ``benchmarks/results/gpu.json``).

Parts:

- ``trainer``: a ``PruningTrainer`` run of MiniLM (a sentence encoder, so a fresh classification head) on the
  embedded SST-2 training sentences: Fisher cut to 50% of layer FLOPs at step 0, then training with KD from the
  dense model, bf16 on CUDA (launched under ``accelerate launch --mixed_precision bf16`` by the shell script): wall
  time, steps/s, losses, accuracy on the embedded SST-2 dev sentences afterwards.
- ``latency``: MiniLM dense vs pruned (Fisher) at 75/50/40% of layer FLOPs, median forward ms at batch 1/32/128 x
  128 tokens in fp16 and bf16, dense and pruned interleaved.
- ``retraining_free``: wall time of the retraining-free call on MiniLM (50%, 256 SST-2 sentences) and on the
  largest decoder available (SmolLM2-135M at 80%, 32 blocks of 128 tokens), each next to one forward+backward over
  the same calibration data; decode ms/token at batch 1 dense vs pruned for the decoder.
- ``streamed`` (issue 38): the layer-streamed retraining-free search (``offload=True``; Fisher blocks, search,
  rearrangement and mask tuning; no stage selection: one calibration batch leaves no held-out samples) on the
  largest ``benchmarks/bench_scale.py`` shape that fits the GPU, random bf16 weights: with the weights on the GPU,
  and with them on the CPU (``accelerate.cpu_offload``, one module brought over per call); peak GPU memory and wall
  time, next to ``benchmarks/results/scale.json``'s extrapolation for that shape.

Models come from ``--models_dir`` (what ``gpu_check.sh --prepare`` puts there: MiniLM's weights in fp16 and
SmolLM2's config and tokenizer) or else the embedded resources. A folder with a config but no weights is built with
random weights: its timings hold (they depend on shapes), its accuracy/perplexity are not reported.

    python scripts/gpu_check.py --part latency --device cuda
    python scripts/gpu_check.py --part latency --device cpu --quick     # the same code path on a CPU, small
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers as T

import hf_prune as hp
from hf_prune import report
from hf_prune.lm import pack_text_blocks
from hf_prune.resources import embedded_glue_dir, embedded_model_path, read_tsv, text_batches

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class GpuCheckArguments:
    """Arguments of ``scripts/gpu_check.py``.

    Args:
        part: ``trainer``, ``latency``, ``retraining_free`` or ``streamed``.
        device: ``cuda`` (default when available) or ``cpu``.
        quick: small sizes (batch 1 and 4, two repeats, 8 training steps): a smoke run of the same code.
        models_dir: where ``gpu_check.sh --prepare`` put ``minilm/`` and ``smollm2/``.
        dtypes: latency dtypes.
        out: the JSON file the part's section is merged into.
        streamed_shape: the ``bench_scale.py`` shape of the ``streamed`` part (``--quick``: the smallest).
    """

    part: str = "latency"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    quick: bool = False
    models_dir: str = str(ROOT / ".gpu_check")
    dtypes: list[str] = field(default_factory=lambda: ["float16", "bfloat16"])
    out: str = str(ROOT / "benchmarks" / "results" / "gpu.json")
    streamed_shape: str = "llama-3.1-8b"


def load(name: str, args: GpuCheckArguments, auto: Any) -> tuple[Any, Any, bool]:
    """(model, tokenizer, real weights?) of ``minilm`` or ``smollm2``."""
    local = Path(args.models_dir) / name
    path = str(local) if (local / "config.json").exists() else embedded_model_path(name)
    tok = T.AutoTokenizer.from_pretrained(path)
    has_weights = any(Path(path).glob("*.safetensors")) or any(Path(path).glob("*.bin"))
    if has_weights:
        model = auto.from_pretrained(path, dtype=torch.float32, **({"num_labels": 2} if name == "minilm" else {}))
    else:
        config = T.AutoConfig.from_pretrained(path, **({"num_labels": 2} if name == "minilm" else {}))
        torch.manual_seed(0)
        model = auto.from_config(config, dtype=torch.float32)
    return model.eval(), tok, has_weights


def sst2_rows(split: str) -> tuple[list[str], list[int]]:
    rows = read_tsv(embedded_glue_dir() / "sst2" / f"{split}.tsv")
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def sst2(tok: Any, n: int, split: str = "train", batch_size: int = 32) -> list[dict]:
    texts, labels = sst2_rows(split)
    return text_batches(tok, texts[:n], labels[:n], batch_size=batch_size, max_length=64)


def _to(batches: list[dict], device: str) -> list[dict]:
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def forward_backward_s(model: torch.nn.Module, batches: list[dict], device: str) -> float:
    m = copy.deepcopy(model).to(device)
    m(**_to(batches[:1], device)[0]).loss.backward()  # warm-up (kernels, allocator)
    m.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    for b in _to(batches, device):
        m(**b).loss.backward()
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches: list[dict], device: str) -> float:
    right = total = 0
    for b in _to(batches, device):
        right += int((model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1) == b["labels"]).sum())
        total += len(b["labels"])
    return 100.0 * right / total


def part_latency(args: GpuCheckArguments) -> dict[str, Any]:
    dense, tok, real = load("minilm", args, T.AutoModelForSequenceClassification)
    calib = sst2(tok, 64 if args.quick else 256)
    batches, repeats = ((1, 4), 2) if args.quick else ((1, 32, 128), 20)
    rows = []
    for keep in (0.75, 0.5, 0.4):
        pruned, _ = hp.prune(copy.deepcopy(dense), calib, hp.PruningConfig(flops_keep=keep, progress=False))
        for dtype in args.dtypes:
            a = copy.deepcopy(dense).to(args.device, DTYPES[dtype])
            b = copy.deepcopy(pruned).to(args.device, DTYPES[dtype])
            for bs in batches:
                lat = hp.compare_latency({"dense": a, "pruned": b}, bs, 128, warmup=3, repeats=repeats)
                rows.append({"flops_keep": keep, "dtype": dtype, "batch": bs, "dense_ms": lat["dense"].median_ms,
                             "pruned_ms": lat["pruned"].median_ms,
                             "speedup": lat["dense"].median_ms / lat["pruned"].median_ms})
                print(json.dumps(rows[-1]), flush=True)
    return {"model": "minilm", "real_weights": real, "seq_len": 128, "rows": rows}


def part_trainer(args: GpuCheckArguments) -> dict[str, Any]:
    import tempfile

    dense, tok, real = load("minilm", args, T.AutoModelForSequenceClassification)
    texts, labels = sst2_rows("train")
    enc = tok(texts, truncation=True, max_length=64, padding="max_length")
    rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
            for i in range(len(texts))]
    dev = sst2(tok, 10_000, "dev")
    with tempfile.TemporaryDirectory() as tmp:
        targs = T.TrainingArguments(
            output_dir=tmp, max_steps=8 if args.quick else 200, per_device_train_batch_size=32, learning_rate=5e-5,
            bf16=args.device == "cuda", use_cpu=args.device == "cpu", report_to=[], save_strategy="no",
            logging_steps=4 if args.quick else 20, disable_tqdm=True, dataloader_pin_memory=False,
        )
        trainer = hp.PruningTrainer(copy.deepcopy(dense), targs, train_dataset=rows, teacher_model=dense,
                                    data_collator=T.default_data_collator,
                                    pruning_config=hp.PruningConfig(flops_keep=0.5, progress=False,
                                                                    max_calibration_samples=256))
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
    model = trainer.model.eval()
    return {"model": "minilm", "real_weights": real, "precision": "bf16" if args.device == "cuda" else "fp32",
            "mixed_precision": trainer.accelerator.mixed_precision, "steps": targs.max_steps, "batch_size": 32,
            "train_s": train_s, "steps_per_s": targs.max_steps / train_s,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "flops_kept": hp.count_flops(model)["total"] / hp.count_flops(dense)["total"],
            "dev_accuracy_pruned": accuracy(model, dev, args.device) if real else None}


def part_retraining_free(args: GpuCheckArguments) -> dict[str, Any]:
    out = {}
    dense, tok, real = load("minilm", args, T.AutoModelForSequenceClassification)
    calib = sst2(tok, 64 if args.quick else 256)
    out["minilm"] = _rf(dense, calib, 0.5, args) | {"real_weights": real, "samples": 64 if args.quick else 256}
    dense, tok, real = load("smollm2", args, T.AutoModelForCausalLM)
    texts = sst2_rows("train")[0]
    n = 4 if args.quick else 32
    calib = pack_text_blocks(tok, texts, block_size=128, batch_size=4, max_blocks=n)
    out["smollm2"] = _rf(dense, calib, 0.8, args, decoder=True) | {"real_weights": real, "blocks": n}
    return out


def _rf(dense: torch.nn.Module, calib: list[dict], keep: float, args: GpuCheckArguments,
        decoder: bool = False) -> dict[str, Any]:
    n = sum(len(b["input_ids"]) for b in calib)
    cfg = hp.PruningConfig(method="retraining_free", flops_keep=keep, progress=False, tuning_samples=n // 2,
                           selection_samples=n // 2)
    fb = forward_backward_s(dense, calib, args.device)
    model = copy.deepcopy(dense).to(args.device)
    _sync(args.device)
    start = time.perf_counter()
    hp.prune(model, calib, cfg)
    _sync(args.device)
    rec = {"flops_keep": keep, "prune_s": time.perf_counter() - start, "forward_backward_s": fb}
    rec["prune_over_fb"] = rec["prune_s"] / fb
    if decoder:
        dec = hp.compare_decode({"dense": dense.to(args.device), "pruned": model}, prompt_len=128,
                                new_tokens=8 if args.quick else 64, repeats=2 if args.quick else 5)
        rec |= {"dense_decode_ms": dec["dense"].decode_ms_per_token, "decode_ms": dec["pruned"].decode_ms_per_token}
    print(json.dumps(rec), flush=True)
    return rec


def part_streamed(args: GpuCheckArguments) -> dict[str, Any]:
    import sys

    import accelerate

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_scale import config_of, sizes

    name = "smollm2-135m" if args.quick else args.streamed_shape
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16  # bf16 backward on a CPU times the emulation
    cfg = hp.PruningConfig(method="retraining_free", flops_keep=0.5, offload=True,
                           select_stages=False, progress=False)
    ids = torch.randint(0, config_of(name).vocab_size, (2, 32 if args.quick else 128))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    out: dict[str, Any] = {"shape": name, "tokens": ids.numel(), **sizes(name)}
    for where in ("device", "cpu_offload"):
        torch.manual_seed(0)  # the same random weights both ways
        with torch.device(args.device if where == "device" else "cpu"):
            model = T.AutoModelForCausalLM.from_config(config_of(name), dtype=dtype).eval()
        if where == "cpu_offload":
            model = accelerate.cpu_offload(model, execution_device=torch.device(args.device))
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(args.device)
        start = time.perf_counter()
        plan, _ = hp.retraining_free_plan(model, _to(batches, args.device), cfg)
        _sync(args.device)
        out[where] = {"seconds": time.perf_counter() - start, "kept_layer_sizes": plan.layer_sizes()[:2],
                      "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if args.device == "cuda" else None}
        print(json.dumps({where: out[where]}), flush=True)
        del model
    return out


PARTS = {"latency": part_latency, "trainer": part_trainer, "retraining_free": part_retraining_free,
         "streamed": part_streamed}


def main() -> None:
    (args,) = T.HfArgumentParser(GpuCheckArguments).parse_args_into_dataclasses()
    if args.part not in PARTS:
        raise SystemExit(f"--part {args.part!r}: choose from {', '.join(PARTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; run on a GPU machine or pass --device cpu")
    if args.device == "cpu" and args.dtypes == GpuCheckArguments().dtypes:
        args.dtypes = ["float32"]  # fp16 matmuls on a CPU time the emulation, not the cut
    torch.manual_seed(0)
    section = PARTS[args.part](args)
    path = Path(args.out)
    payload = json.loads(path.read_text()) if path.exists() else {}
    env = report.environment()
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    payload[args.part] = {"args": vars(args), "environment": env, **section}
    report.write_json(path, payload)
    print(f"wrote {path} [{args.part}]")


if __name__ == "__main__":
    main()

"""Issue 38: memory and time of scoring and of the retraining-free search against model size, in memory vs layer-
streamed (``PruningConfig(offload=True)``), and with the weights on disk (``accelerate.disk_offload``, loaded one
module call at a time).

Random weights of real shapes (fine for memory and time, never for accuracy) of SmolLM2-135M, Qwen2.5-0.5B,
Llama-3.2-1B and Llama-3.2-3B, float32 by default: this CPU runs bf16 backward passes about 40x slower than float32,
which would time the emulation (``--dtype bfloat16`` measures it anyway). Each cell runs in a process of its own (a
clean peak): the model is built, its resident size read (after garbage collection and ``malloc_trim``), then one step
is timed with its peak resident memory sampled every 5 ms (``common.PeakRSS``):

- ``scores``: ``hp.compute_importance(model, batches, "fisher")``, per-sample mask gradients of every head and neuron;
- ``retraining_free``: ``hp.retraining_free_plan`` at ``flops_keep``: the Fisher blocks, the search and the
  rearrangement (``mask_tuning=False, select_stages=False``);
- ``retraining_free_tuned``: the pipeline without the rearrangement, so with the Fisher diagonal alone (no blocks),
  and with the mask tuning (``rearrange=False, select_stages=False``: the selection adds one forward pass over the
  held-out samples per candidate, not measured here). Its tuning runs one layer at a time in every mode.

Modes: ``in_memory`` (weights in RAM, one backward through the whole model), ``streamed`` (weights in RAM,
``offload=True``), ``disk`` (``offload=True`` on a model whose weights ``accelerate.disk_offload`` keeps in a folder).
The fit: peak above the weights = a + b x (one layer's bytes streamed, the layer stack's in memory) per mode; time =
k x params x tokens. Extrapolated to Llama-3.1-8B and Llama-3.3-70B in bf16 on one 80 GB GPU. Writes
``benchmarks/results/scale.{json,md,png}`` (``--out_name`` another stem); cells are cached in
``benchmarks/cache/scale/``.

    .venv/bin/python benchmarks/bench_scale.py
    .venv/bin/python benchmarks/bench_scale.py --shapes smollm2-135m --modes in_memory streamed   # a quick look
    .venv/bin/python benchmarks/bench_scale.py --steps retraining_free_tuned --out_name scale_tuned
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import PeakRSS, cached_cell

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "scale"

#: the configs' sizes (vocab, hidden, FFN, layers, heads, KV heads, tied embeddings), from their config.json files
SHAPES = {
    "smollm2-135m": (49152, 576, 1536, 30, 9, 3, True),
    "smollm2-360m": (49152, 960, 2560, 32, 15, 5, True),
    "qwen2.5-0.5b": (151936, 896, 4864, 24, 14, 2, True),
    "llama-3.2-1b": (128256, 2048, 8192, 16, 32, 8, True),
    "llama-3.2-3b": (128256, 3072, 8192, 28, 24, 8, True),
    "llama-3.1-8b": (128256, 4096, 14336, 32, 32, 8, False),
    "llama-3.3-70b": (128256, 8192, 28672, 80, 64, 8, False),
}
EXTRAPOLATE = ("llama-3.1-8b", "llama-3.3-70b")
MODES = ("in_memory", "streamed", "disk")
STEPS = ("scores", "retraining_free", "retraining_free_tuned")
GPU_GB = 80


@dataclass
class ScaleArguments:
    """Arguments of ``bench_scale.py``.

    Args:
        shapes: measured shapes (names in ``SHAPES``).
        modes: ``in_memory``, ``streamed``, ``disk``.
        steps: ``scores``, ``retraining_free``, ``retraining_free_tuned`` (see the module docstring).
        rf_shapes: the shapes ``retraining_free`` runs on (its float32 Fisher blocks, layers x FFN^2, outgrow this
            machine's 24 GB next to larger models; they are analytic).
        samples: calibration sequences.
        seq_len: tokens per sequence.
        batch_size: sequences per backward pass.
        flops_keep: the retraining-free budget.
        dtype: of the weights: ``float32`` (this CPU runs bf16 backward passes about 40x slower than fp32, timing
            the emulation rather than the method) or ``bfloat16``.
        out_name: stem of the result files under ``benchmarks/results/``.
    """

    shapes: list[str] = field(default_factory=lambda: ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b",
                                                       "llama-3.2-3b"])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    steps: list[str] = field(default_factory=lambda: ["scores", "retraining_free"])
    rf_shapes: list[str] = field(default_factory=lambda: ["smollm2-135m", "qwen2.5-0.5b"])
    samples: int = 8
    seq_len: int = 128
    batch_size: int = 4
    flops_keep: float = 0.5
    dtype: str = "float32"
    out_name: str = "scale"


def config_of(name: str):
    import transformers as T

    vocab, hidden, ffn, layers, heads, kv, tied = SHAPES[name]
    return T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                         max_position_embeddings=4096)


def sizes(name: str, dtype: str = "bfloat16") -> dict[str, float]:
    """Analytic sizes of a shape in GB: weights and one layer in ``dtype``, the float32 Fisher blocks."""
    vocab, d, ffn, layers, heads, kv, tied = SHAPES[name]
    head_dim = d // heads
    layer = d * head_dim * (2 * heads + 2 * kv) + 3 * d * ffn + 2 * d  # Q, O, K, V, up/gate/down, two norms
    params = layers * layer + vocab * d * (1 if tied else 2) + d
    width = 4 if dtype == "float32" else 2
    return {"params": params, "weights_gb": width * params / 1e9, "layer_gb": width * layer / 1e9,
            "blocks_gb": 4 * layers * (heads ** 2 + ffn ** 2) / 1e9}


def worker(name: str, mode: str, step: str, args: ScaleArguments) -> dict:
    import accelerate
    import torch
    import transformers as T

    import hf_prune as hp

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config_of(name), dtype=getattr(torch, args.dtype)).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i:i + args.batch_size], "attention_mask": torch.ones_like(ids[i:i + args.batch_size]),
                "labels": ids[i:i + args.batch_size]} for i in range(0, args.samples, args.batch_size)]
    folder = tempfile.mkdtemp(prefix="offload-")
    if mode == "disk":
        model = accelerate.disk_offload(model, folder, execution_device=torch.device("cpu"))
    with PeakRSS(interval=0.005) as resident:  # nothing inside: the resident size of the model as it sits
        pass
    offload = mode != "in_memory"
    tuned = step == "retraining_free_tuned"
    cfg = hp.PruningConfig(method="retraining_free", flops_keep=args.flops_keep, offload=offload, mask_tuning=tuned,
                           rearrange=not tuned, select_stages=False, progress=False)
    with PeakRSS(interval=0.005) as mem:
        _record_parts(mem)
        start = time.perf_counter()
        if step == "scores":
            scores = hp.compute_importance(model, batches, "fisher", progress=False, offload=offload)
            kept = {"top_heads": scores.heads.flatten().topk(8).indices.tolist()}
        else:
            plan, tuning = hp.retraining_free_plan(model, batches, cfg)
            kept = {"heads": plan.heads, "neurons": plan.neurons}
            if tuning is not None:  # the fit too, rounded: the modes must tune alike
                kept["tuned"] = [f"{float(w['down_weight'].double().sum()):.4g}" for w in tuning.weights]
        seconds = time.perf_counter() - start
    digest = hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:12]  # the modes must keep the same units
    out = {"resident_gb": resident.total_mb / 1024, "peak_gb": mem.total_mb / 1024,
           "above_gb": mem.peak_mb / 1024, "seconds": seconds, "kept_digest": digest,
           **{f"{k}_above_gb": v / 1024 for k, v in mem.parts.items()}}
    if step != "scores" and tuning is not None:  # the tuning's result: the refitted projections, held until folded
        out["fit_gb"] = sum(t.numel() * t.element_size() for w in tuning.weights for t in w.values()
                            if hasattr(t, "numel")) / 1e9
    return out


def _record_parts(mem: PeakRSS) -> None:
    """The pipeline's steps each record their own peak (``mem.parts``): which one holds the memory."""
    from hf_prune.retraining_free import pipeline

    for attr, part in (("fisher_information", "fisher"), ("search_masks", "search"), ("tune_masks", "tuning")):
        def timed(*a, _f=getattr(pipeline, attr), _part=part, **k):
            with mem.part(_part):
                return _f(*a, **k)
        setattr(pipeline, attr, timed)


def run_cell(name: str, mode: str, step: str, args: ScaleArguments) -> dict:
    key = {"shape": name, "mode": mode, "step": step, "samples": args.samples, "seq_len": args.seq_len,
           "batch_size": args.batch_size, "flops_keep": args.flops_keep, "dtype": args.dtype}

    def compute() -> dict:
        cmd = [sys.executable, __file__, "--worker", name, mode, step, json.dumps(asdict(args))]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name} {mode} {step} failed:\n{r.stderr[-3000:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{name} {mode} {step}: {out}", flush=True)
        return out

    return {**cached_cell(CACHE, key, compute), **sizes(name, args.dtype)}


def fit(rows: list[dict], x: str, y: str) -> tuple[float, float]:
    """Least squares ``y = a + b * x`` (``b`` alone through the origin with one point)."""
    xs, ys = [r[x] for r in rows], [r[y] for r in rows]
    if len(xs) < 2:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((a - mx) * (c - my) for a, c in zip(xs, ys)) / max(sum((a - mx) ** 2 for a in xs), 1e-30)
    return my - b * mx, b


def models(rows: list[dict], args: ScaleArguments) -> list[dict]:
    """Per (step, mode): memory above the weights against one layer (streamed) or the layer stack (in memory),
    without the Fisher blocks, which are analytic; time against params x tokens."""
    out = []
    tokens = args.samples * args.seq_len
    for step in dict.fromkeys(r["step"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            group = [r for r in rows if (r["step"], r["mode"]) == (step, mode)]
            if not group:
                continue
            for r in group:
                r["stack_gb"] = r["layer_gb"] * SHAPES[r["shape"]][3]
                r["activations_gb"] = r["above_gb"] - (r["blocks_gb"] if step == "retraining_free" else 0.0)
                r["work"] = r["params"] * tokens / 1e12
            x = "stack_gb" if mode == "in_memory" else "layer_gb"
            a, b = fit(group, x, "activations_gb")
            k = sum(r["seconds"] * r["work"] for r in group) / sum(r["work"] ** 2 for r in group)  # through 0
            out.append({"step": step, "mode": mode, "against": x, "a_gb": a, "b": b, "s_per_tera_param_token": k})
    return out


def extrapolate(fits: list[dict], args: ScaleArguments) -> list[dict]:
    """Device memory of each way on one GPU_GB GPU for the large shapes in bf16: the weights where they sit, the
    fitted activations (fitted in ``args.dtype``; bf16 activations are half of float32's), the float32 Fisher blocks
    (on the device in memory, on the CPU when offloaded)."""
    out = []
    tokens = args.samples * args.seq_len
    half = 0.5 if args.dtype == "float32" else 1.0
    for name in EXTRAPOLATE:
        s, m = sizes(name), sizes(name, args.dtype)  # bf16 on the GPU; the fit's units
        for f in fits:
            x = m["layer_gb"] * (SHAPES[name][3] if f["mode"] == "in_memory" else 1)
            act = (f["a_gb"] + f["b"] * x) * half
            blocks = s["blocks_gb"] if f["step"] == "retraining_free" else 0.0
            if f["mode"] == "disk":  # weights on the host (CPU or disk), one layer on the device at a time
                device, host = act + s["layer_gb"], s["weights_gb"] + blocks
            elif f["mode"] == "streamed":
                device, host = s["weights_gb"] + act, blocks
            else:
                device, host = s["weights_gb"] + act + blocks, 0.0
            out.append({"shape": name, "step": f["step"], "mode": f["mode"], "weights_gb": s["weights_gb"],
                        "device_gb": device, "host_gb": host, "fits": "yes" if device <= GPU_GB else "no",
                        "cpu_hours": f["s_per_tera_param_token"] * s["params"] * tokens / 1e12 / 3600})
    return out


def main() -> None:
    import transformers as T

    from hf_prune import report

    (args,) = T.HfArgumentParser(ScaleArguments).parse_args_into_dataclasses()
    unknown = sorted(set(args.shapes) - set(SHAPES)) + sorted(set(args.modes) - set(MODES)) + sorted(
        set(args.steps) - set(STEPS))
    if unknown:
        raise SystemExit(f"unknown {unknown}: --shapes from {', '.join(SHAPES)}, --modes from {', '.join(MODES)}, "
                         f"--steps from {', '.join(STEPS)}")
    rows = [run_cell(name, mode, step, args) for name in args.shapes for step in args.steps for mode in args.modes
            if step != "retraining_free" or name in args.rf_shapes]
    fits = models(rows, args)
    table = extrapolate(fits, args)
    for r in rows:
        base = next((b for b in rows if (b["shape"], b["step"], b["mode"]) == (r["shape"], r["step"], "in_memory")),
                    None)
        r["time_vs_in_memory"] = r["seconds"] / base["seconds"] if base else None
        r["same_plan"] = ("yes" if r["kept_digest"] == base["kept_digest"] else "NO") if base else None
        r["target_gb"] = r["weights_gb"] + 2 * r["layer_gb"] + 1.0 + r["blocks_gb"] * (r["step"] == "retraining_free")
    cols = ["shape", "step", "mode", "weights_gb", "layer_gb", "resident_gb", "peak_gb", "above_gb", "target_gb",
            "seconds", "time_vs_in_memory", "same_plan"]
    fmt = {c: ".2f" for c in cols[3:-1]}
    heads = {"weights_gb": f"{args.dtype} weights (GB)", "layer_gb": "one layer (GB)", "resident_gb": "RSS before (GB)",
             "peak_gb": "peak RSS (GB)", "above_gb": "above before (GB)", "target_gb": "target peak (GB)",
             "seconds": "time (s)", "time_vs_in_memory": "time / in memory", "same_plan": "plan = in memory"}
    lines = [
        "# Scoring and the retraining-free search against model size: in memory vs layer-streamed\n",
        "> Written by `benchmarks/bench_scale.py`; do not edit by hand.\n",
        f"- command: `.venv/bin/python benchmarks/bench_scale.py {' '.join(sys.argv[1:])}`".rstrip() + "\n",
        f"- environment: {json.dumps(report.environment())}\n",
        f"\nRandom {args.dtype} weights of each config's shapes; {args.samples} sequences of {args.seq_len} tokens in "
        f"batches of {args.batch_size}. `scores`: Fisher scores of every head and neuron; `retraining_free`: Fisher "
        f"blocks, search and rearrangement at {args.flops_keep:.0%} of layer FLOPs (no tuning, no stage selection); "
        "`retraining_free_tuned`: the Fisher diagonal, search and mask tuning (no rearrangement, no selection). "
        "`in_memory`: one backward through the whole model; `streamed`: `offload=True`; `disk`: `offload=True` "
        "with the "
        "weights in a folder (`accelerate.disk_offload`). The target peak is the issue's: weights + 2 x one layer + "
        "1 GB (+ the float32 Fisher blocks the retraining-free search keeps, analytic).\n",
        report.markdown_table(rows, cols, formats=fmt, headers=heads),
        *_parts_section(rows),
        "\n## Fits\n",
        "Memory above the weights, Fisher blocks taken out, = a + b x (the layer stack in memory, one layer streamed); "
        "time = k x params x tokens.\n",
        report.markdown_table(fits, ["step", "mode", "against", "a_gb", "b", "s_per_tera_param_token"],
                              formats={"a_gb": ".2f", "b": ".3f", "s_per_tera_param_token": ".1f"}),
        f"\n## Extrapolated to one {GPU_GB} GB GPU\n",
        "Device memory: in memory, the weights, activations and Fisher blocks; streamed, the weights and one layer's "
        "activations (blocks on the CPU); disk (or CPU) offload, one layer and its activations (weights and blocks on "
        "the host). CPU hours are this machine's rate, for scale only.\n",
        report.markdown_table(table, ["shape", "step", "mode", "weights_gb", "device_gb", "host_gb", "fits",
                                      "cpu_hours"],
                              formats={"weights_gb": ".1f", "device_gb": ".1f", "host_gb": ".1f", "cpu_hours": ".1f"}),
    ]
    out = HERE / "results"
    report.write_json(out / f"{args.out_name}.json", {"args": asdict(args), "environment": report.environment(),
                                                      "rows": rows, "fits": fits, "extrapolated": table})
    report.write_text(out / f"{args.out_name}.md", "\n".join(lines) + "\n")
    _plot(rows, out / f"{args.out_name}.png")
    print("\n".join(lines))


def _parts_section(rows: list[dict]) -> list[str]:
    """Which step of the retraining-free call held the memory (cells measured since the steps were recorded)."""
    from hf_prune import report

    parts = [r for r in rows if r["step"] != "scores" and "tuning_above_gb" in r]
    if not parts:
        return []
    cols = ["shape", "step", "mode", "above_gb", "fisher_above_gb", "search_above_gb", "tuning_above_gb", "fit_gb"]
    heads = {"above_gb": "whole call", "fisher_above_gb": "Fisher", "search_above_gb": "search",
             "tuning_above_gb": "mask tuning", "fit_gb": "of which the fit (GB)"}
    return ["\n## Where the memory goes\n",
            "Peak RSS above the level before the call (GB) while each step ran; the fit is the tuning's result (the "
            "refitted O and down projections at their kept sizes), held until it is folded.\n",
            report.markdown_table(parts, cols, formats={c: ".2f" for c in cols[3:]}, headers=heads)]


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(dict.fromkeys(r["step"] for r in rows))
    fig, axes = plt.subplots(2, len(steps), figsize=(5 * len(steps), 7), squeeze=False)
    for j, step in enumerate(steps):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            pts = sorted((r for r in rows if (r["step"], r["mode"]) == (step, mode)), key=lambda r: r["params"])
            x = [r["params"] / 1e9 for r in pts]
            axes[0, j].plot(x, [r["peak_gb"] for r in pts], "o-", label=mode)
            axes[1, j].plot(x, [r["seconds"] for r in pts], "o-", label=mode)
        axes[0, j].set(title=f"{step}: peak RSS", xlabel="params (B)", ylabel="GB")
        axes[1, j].set(title=f"{step}: wall time", xlabel="params (B)", ylabel="s")
        axes[0, j].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], sys.argv[4], ScaleArguments(**json.loads(sys.argv[5])))))
    else:
        main()

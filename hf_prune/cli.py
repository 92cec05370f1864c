"""``hf-prune``: command-line entry point.

    hf-prune run CONFIG [--key value ...]     run a recipe (recipes/glue/sst2.yaml, recipes/image/mnist_vit.yaml)
    hf-prune prune [options]                  one-shot prune (default: embedded MiniLM to 50% FLOPs), save, reload
    hf-prune inspect CHECKPOINT               per-layer heads/neurons, params and FLOPs vs the dense model
    hf-prune bench CHECKPOINT [--base PATH]   CPU/GPU latency of the checkpoint vs its base (dense) model
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field, fields, make_dataclass

import torch

from .budget import DEFAULT_BUDGET, FIELD_BUDGETS
from .config import PruningConfig, flag_fields, from_flag

#: ``hf-prune prune``'s PruningConfig flags: every field under its own name.
_ConfigFlags = make_dataclass("PruningConfigFlags", flag_fields())


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one line, without a traceback."""


def _parse(parser, argv: list[str]):
    """``parser``'s dataclasses from ``argv``; a mistyped flag is an error naming the closest valid ones."""
    from .recipes.common import check_flags

    check_flags(parser, argv)
    return parser.parse_args_into_dataclasses(argv)


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
    from .resources import read_tsv, sst2_sample

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
    from transformers import HfArgumentParser

    from .recipes.common import check_flags

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
    import copy
    import time

    import transformers
    from transformers import AutoTokenizer

    from . import api, checkpoint, costs
    from .export import save_pruned
    from .resources import resolve_model_path, text_batches

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


def cmd_run(argv: list[str]) -> int:
    from .recipes import RECIPES, run_recipe

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: hf-prune run CONFIG [--key value ...]\n")
        print("Run the recipe named in CONFIG (YAML/JSON, key 'recipe': " + ", ".join(RECIPES) + ").")
        print("Flags override the config's keys; 'hf-prune run CONFIG --help' lists every key of that recipe.")
        print("Examples: hf-prune run recipes/glue/sst2.yaml")
        print("          hf-prune run recipes/glue/mrpc.yaml --flops_keep 0.6 0.4 --recovery lora")
        return 0 if argv else 2
    run_recipe(argv[0], argv[1:])  # a ConfigError is a user error: one line from main()
    return 0


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
    from . import costs
    from .plan import PrunePlan

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
    import json

    from transformers import HfArgumentParser

    from . import report
    from .checkpoint import load_pruned

    parser = HfArgumentParser(InspectArgs, prog="hf-prune inspect")
    parser.description = "Per-layer heads/neurons, parameters and FLOPs of a pruned checkpoint vs its dense model."
    (args,) = _parse(parser, argv)
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
    from .modeling_pruned import homogeneous, stock_class

    config = copy.deepcopy(model.config)
    with homogeneous(config):
        config.__dict__.pop("per_layer_config", None)
        return stock_class(type(model))(config).eval()


def cmd_bench(argv: list[str]) -> int:
    import json

    from tqdm.auto import tqdm
    from transformers import HfArgumentParser

    from . import costs, report
    from .adapters import tokens_per_input
    from .checkpoint import load_pruned

    parser = HfArgumentParser(BenchArgs, prog="hf-prune bench")
    parser.description = "Latency of a pruned checkpoint vs its dense base, timed interleaved (median of repeats)."
    (args,) = _parse(parser, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_pruned(args.checkpoint).eval().to(args.device)
    if args.base:
        import transformers

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


def cmd_export(argv: list[str]) -> int:
    from .formats.command import cmd_export as export

    return export(argv, _parse, UsageError)


COMMANDS = {"run": cmd_run, "prune": cmd_prune, "inspect": cmd_inspect, "bench": cmd_bench, "export": cmd_export}
HELP = """usage: hf-prune COMMAND [options]     (hf-prune COMMAND --help for its options)

commands:
  run CONFIG     run a recipe: (dense fine-tune) -> prune -> recover -> evaluate -> save -> report -> (push)
                 e.g. hf-prune run recipes/glue/sst2.yaml --flops_keep 0.6 0.4
  prune          one-shot prune, measure, save and reload (default: embedded MiniLM, 50% FLOPs, offline)
  inspect CKPT   per-layer heads/neurons, parameters and FLOPs of a pruned checkpoint vs its dense model
  bench CKPT     latency of a pruned checkpoint vs its dense base (batch 1 and 32, interleaved)
  export CKPT --format {stock,gguf,onnx,vllm} --output_dir DIR
                 for a serving runtime: stock architecture (uniform cuts), GGUF for llama.cpp, ONNX for
                 onnxruntime, DeciLM for vLLM"""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the input was wrong (bad value, missing file, wrong checkpoint), not a bug."""
    from .checkpoint import CorruptCheckpointError
    from .plan import PlanMismatchError
    from .recipes import ConfigError

    # ImportError: an optional runtime the command needs is not installed (the message names the install)
    return (UsageError, ConfigError, ValueError, OSError, ImportError, PlanMismatchError, CorruptCheckpointError)


def main(argv: list[str] | None = None) -> int:
    """Run a command. A user error prints one line, ``hf-prune: error: ...``, and exits with status 2; a bug keeps
    its traceback. ``--debug`` (anywhere) shows the traceback of user errors too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(HELP)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nhf-prune: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}",
                  file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] in ("inspect", "bench", "export") and len(argv) > 1 and not argv[1].startswith("-"):
        argv = [argv[0], "--checkpoint", *argv[1:]]  # positional CHECKPOINT
    from .distributed import shutdown
    from .recipes.common import quiet_expected_warnings

    quiet_expected_warnings()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except _user_errors() as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"hf-prune {argv[0]}: error: {message}  (--debug shows the traceback)", file=sys.stderr)
        return 2
    finally:
        shutdown()  # under `accelerate launch -m hf_prune.cli run ...`


if __name__ == "__main__":
    raise SystemExit(main())

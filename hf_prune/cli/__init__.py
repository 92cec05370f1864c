"""``hf-prune``: the command-line entry point, one module per command.

    hf-prune run CONFIG [--key value ...]     run a recipe (recipes/glue/sst2.yaml, recipes/image/mnist_vit.yaml)
    hf-prune prune [options]                  one-shot prune (default: embedded MiniLM to 50% FLOPs), save, reload
    hf-prune inspect CHECKPOINT               per-layer heads/neurons, params and FLOPs vs the dense model
    hf-prune bench CHECKPOINT [--base PATH]   CPU/GPU latency of the checkpoint vs its base (dense) model
    hf-prune export CHECKPOINT --format F     a file or folder for a serving runtime (stock, gguf, onnx, vllm)
"""

from __future__ import annotations

import sys

from ..checkpoint import CorruptCheckpointError
from ..distributed import exit_launched, shutdown
from ..plan import PlanMismatchError
from ..recipes import ConfigError
from ..recipes.common import quiet_expected_warnings
from .bench import BenchArgs, cmd_bench, dense_base
from .common import UsageError, parse
from .export import cmd_export
from .inspect import InspectArgs, checkpoint_summary, cmd_inspect
from .prune import PruneArgs, cmd_prune, parse_prune_args
from .run import cmd_run

__all__ = ["BenchArgs", "COMMANDS", "InspectArgs", "PruneArgs", "UsageError", "checkpoint_summary", "dense_base",
           "main", "parse", "parse_prune_args"]

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
    quiet_expected_warnings()
    try:
        code = COMMANDS[argv[0]](argv[1:])
    except _user_errors() as e:
        if debug:
            shutdown()
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"hf-prune {argv[0]}: error: {message}  (--debug shows the traceback)", file=sys.stderr)
        code = 2
    except BaseException:
        shutdown()
        raise
    exit_launched(code)  # under `accelerate launch -m hf_prune.cli run ...`; returns in a single process
    return code

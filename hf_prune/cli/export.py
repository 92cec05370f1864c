"""``hf-prune export CHECKPOINT --format {stock,gguf,onnx,vllm} --output_dir D``: a saved checkpoint written for a
serving runtime (the formats: :mod:`hf_prune.formats`; the settings: :mod:`hf_prune.formats.settings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, HfArgumentParser

from ..card import write_model_card
from ..checkpoint import load_pruned
from ..formats.registry import export_model, get_export_format
from ..formats.settings import ExportOptions
from .common import UsageError, parse


@dataclass
class ExportArgs:
    """Arguments of ``hf-prune export`` besides :class:`ExportOptions`.

    Args:
        checkpoint: a (pruned) checkpoint folder or Hub id, saved with its tokenizer.
        output_dir: where the export goes: the folder itself for ``stock``, ``onnx`` and ``vllm``, the folder that receives
            ``model-<outtype>.gguf`` for ``gguf``.
    """

    checkpoint: str = field(metadata={"help": "Pruned checkpoint folder or Hub id."})
    output_dir: str = field(default="", metadata={"help": "Output folder."})


def _tokenizer(checkpoint: str, required: bool) -> Any:
    try:
        return AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as e:
        if required:
            raise ValueError(f"{checkpoint} has no tokenizer ({type(e).__name__}); the export carries it: save the "
                             "tokenizer beside the checkpoint (tokenizer.save_pretrained(folder))") from e
        return None  # vision models, or a checkpoint saved without one


def cmd_export(argv: list[str]) -> int:
    parser = HfArgumentParser((ExportArgs, ExportOptions), prog="hf-prune export")
    parser.description = ("Write a checkpoint for a serving runtime: --format stock (plain from_pretrained, no "
                          "trust_remote_code; uniform cuts), gguf (llama.cpp; uneven cuts too), onnx (onnxruntime) "
                          "or vllm (vLLM's own DeciLM implementation; uneven cuts too).")
    args, options = parse(parser, argv)
    if not args.output_dir:
        raise UsageError("pass --output_dir FOLDER for the export")
    fmt = get_export_format(options.format)
    settings = {**options.options_for([fmt.name])[fmt.name], "overwrite": options.overwrite}
    target = Path(args.output_dir) / fmt.file_name(**settings)
    if not options.overwrite and target.exists() and (target.is_file() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists: pass --overwrite to replace it")  # before loading anything
    tokenizer = _tokenizer(args.checkpoint, required=fmt.needs_tokenizer)
    model = load_pruned(args.checkpoint)
    out = export_model(model, tokenizer, args.output_dir, fmt.name, **settings)
    if fmt.name == "stock":
        write_model_card(out)  # sizes, provenance and the no-custom-code loading snippet
        name = type(model).__name__.removeprefix("Pruned")
        print(f"wrote {out}: the stock {name} architecture; load it with {name}.from_pretrained({str(out)!r}), "
              "no trust_remote_code")
    else:
        size = sum(p.stat().st_size for p in ([out] if out.is_file() else Path(out).rglob("*")) if p.is_file())
        print(f"wrote {out} ({size / 2**20:.1f} MiB) for {fmt.runtime}")
    return 0

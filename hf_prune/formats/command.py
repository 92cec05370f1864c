"""``hf-prune export CHECKPOINT --format {stock,gguf,onnx} --output_dir D``: a saved checkpoint written for a serving
runtime. :class:`ExportOptions` is the one definition of the export settings (CLI flags and recipe keys)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ExportOptions:
    """Settings of an export (``hf-prune export`` flags; the same names in recipes).

    Args:
        format: ``stock`` (transformers' own architecture, uniform cuts), ``gguf`` (llama.cpp) or ``onnx``
            (onnxruntime).
        outtype: GGUF weight type: ``f32``, ``f16``, ``bf16``, ``q8_0`` or ``q4_k_m``.
        pad_ffn_to: GGUF: pad FFN widths with zero neurons to a multiple of this (1: none); exact, faster kernels.
        pre_tokenizer: GGUF: llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer it cannot recognise.
        quantize: ONNX: ``int8`` also writes ``model_int8.onnx`` (onnxruntime dynamic quantization).
        overwrite: replace an existing output.
    """

    format: str = field(default="stock", metadata={"help": "stock, gguf or onnx."})
    outtype: str = field(default="f16", metadata={"help": "GGUF: f32, f16, bf16, q8_0 or q4_k_m."})
    pad_ffn_to: int = field(default=32, metadata={"help": "GGUF: pad FFN widths to a multiple of this (1: none)."})
    pre_tokenizer: str = field(default="", metadata={"help": "GGUF: llama.cpp pre-tokenizer name if unrecognised."})
    quantize: str = field(default="", metadata={"help": "ONNX: 'int8' also writes model_int8.onnx."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output."})

    def for_format(self) -> dict[str, Any]:
        """The options the chosen format takes; a setting given for another format is an error, not ignored."""
        from .registry import get_export_format

        fmt = get_export_format(self.format)
        defaults = asdict(ExportOptions())
        given = {k: v for k, v in asdict(self).items() if k != "format" and v != defaults[k]}
        wrong = sorted(k for k in given if k not in fmt.options)
        if wrong:
            raise ValueError(f"--{wrong[0]} does not apply to --format {self.format} (it takes "
                             f"{', '.join('--' + o for o in fmt.options)})")
        out = {k: v for k, v in asdict(self).items() if k in fmt.options}
        return {k: v for k, v in out.items() if v != ""}


@dataclass
class ExportArgs:
    """Arguments of ``hf-prune export`` besides :class:`ExportOptions`.

    Args:
        checkpoint: a (pruned) checkpoint folder or Hub id, saved with its tokenizer.
        output_dir: where the export goes: the folder itself for ``stock`` and ``onnx``, the folder that receives
            ``model-<outtype>.gguf`` for ``gguf``.
    """

    checkpoint: str = field(metadata={"help": "Pruned checkpoint folder or Hub id."})
    output_dir: str = field(default="", metadata={"help": "Output folder."})


def _tokenizer(checkpoint: str, required: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as e:
        if required:
            raise ValueError(f"{checkpoint} has no tokenizer ({type(e).__name__}); GGUF files carry theirs: save the "
                             "tokenizer beside the checkpoint (tokenizer.save_pretrained(folder))") from e
        return None  # vision models, or a checkpoint saved without one


def cmd_export(argv: list[str], parse: Any, usage_error: type[Exception]) -> int:
    from transformers import HfArgumentParser

    from ..checkpoint import load_pruned
    from ..hub import write_model_card
    from .registry import export_model, get_export_format

    parser = HfArgumentParser((ExportArgs, ExportOptions), prog="hf-prune export")
    parser.description = ("Write a checkpoint for a serving runtime: --format stock (plain from_pretrained, no "
                          "trust_remote_code; uniform cuts), gguf (llama.cpp; uneven cuts too) or onnx (onnxruntime).")
    args, options = parse(parser, argv)
    if not args.output_dir:
        raise usage_error("pass --output_dir FOLDER for the export")
    fmt = get_export_format(options.format)
    settings = options.for_format()
    tokenizer = _tokenizer(args.checkpoint, required=fmt.name == "gguf")
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

"""The export settings, one definition each for ``hf-prune export`` flags and recipe keys (:class:`ExportSettings`,
:class:`ExportOptions`, :class:`ServeArguments`), and :func:`export_beside`, what a recipe's ``export_formats``
writes into each checkpoint folder."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .registry import export_formats, export_model, get_export_format


@dataclass
class ExportSettings:
    """How each format is written: one definition for ``hf-prune export`` flags and recipe keys (same names).

    Args:
        outtype: GGUF weight type: ``f32``, ``f16``, ``bf16``, ``q8_0`` or ``q4_k_m``.
        pad_ffn_to: GGUF: pad FFN widths with zero neurons to a multiple of this (1: none); exact, faster kernels.
        pre_tokenizer: GGUF: llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer it cannot recognise.
        quantize: ONNX: ``int8`` also writes ``model_int8.onnx`` (onnxruntime dynamic quantization).
        optimize: ONNX: also write ``model_optimized.onnx`` (onnxruntime's graph optimisations applied ahead of time).
    """

    outtype: str = field(default="f16", metadata={"help": "GGUF: f32, f16, bf16, q8_0 or q4_k_m."})
    pad_ffn_to: int = field(default=32, metadata={"help": "GGUF: pad FFN widths to a multiple of this (1: none)."})
    pre_tokenizer: str = field(default="", metadata={"help": "GGUF: llama.cpp pre-tokenizer name if unrecognised."})
    quantize: str = field(default="", metadata={"help": "ONNX: 'int8' also writes model_int8.onnx."})
    optimize: bool = field(default=False, metadata={"help": "ONNX: also write model_optimized.onnx."})

    def options_for(self, formats: list[str]) -> dict[str, dict[str, Any]]:
        """``{format: its options}``; a setting changed from its default that none of ``formats`` takes is an
        error (it would be silently ignored)."""
        chosen = [get_export_format(f) for f in formats]
        defaults = asdict(ExportSettings())
        mine = {k: v for k, v in asdict(self).items() if k in defaults}
        unused = sorted(k for k, v in mine.items() if v != defaults[k] and not any(k in f.options for f in chosen))
        if unused:
            raise ValueError(f"--{unused[0]} does not apply to {', '.join(formats) or 'no export format'} (it is "
                             f"taken by {', '.join(n for n in _formats_taking(unused[0])) or 'no format'})")
        return {f.name: {k: v for k, v in mine.items() if k in f.options and v != ""} for f in chosen}


def _formats_taking(option: str) -> list[str]:
    return [n for n in export_formats() if option in get_export_format(n).options]


@dataclass
class ExportOptions(ExportSettings):
    """``hf-prune export`` settings: :class:`ExportSettings` plus the format and whether to overwrite.

    Args:
        format: ``stock`` (transformers' own architecture, uniform cuts), ``gguf`` (llama.cpp), ``onnx``
            (onnxruntime) or ``vllm`` (vLLM's own DeciLM implementation, uneven cuts too).
        overwrite: replace an existing output.
    """

    format: str = field(default="stock", metadata={"help": "stock, gguf, onnx or vllm."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output."})


@dataclass
class ServeArguments(ExportSettings):
    """Recipe settings: which serving formats to write beside each pruned checkpoint, and how.

    Args:
        export_formats: any of ``gguf`` (``model-<outtype>.gguf`` in the checkpoint folder), ``onnx`` (its
            ``onnx/`` subfolder) and ``vllm`` (its ``vllm/`` subfolder); pushed with the checkpoint, and the model
            card says how to run each.
    """

    export_formats: list[str] = field(default_factory=list, metadata={"help": "Serving formats: gguf, onnx, vllm."})

    def __post_init__(self) -> None:
        beside = [n for n in export_formats() if get_export_format(n).beside is not None]
        bad = sorted(set(self.export_formats) - set(beside))
        if bad:
            raise ValueError(f"export_formats takes {' and '.join(beside)}, not {bad[0]!r} (a stock checkpoint is "
                             "deployable: true)")
        self.options_for(self.export_formats)  # a setting no chosen format takes fails now, not after the run


def check_exportable(config: Any, serve: ServeArguments) -> None:
    """Every one of ``serve.export_formats`` can export a model of ``config`` (its family), or the one-line reason:
    what a recipe checks before its long work."""
    for name in serve.export_formats:
        fmt = get_export_format(name)
        if fmt.accepts is not None:
            fmt.accepts(config)


def export_beside(model: Any, tokenizer: Any, folder: Path, serve: ServeArguments,
                  dense: Any = None) -> tuple[list[Path], list[dict[str, Any]]]:
    """Write ``serve.export_formats`` into a saved checkpoint ``folder`` (GGUF file at its root, ONNX in ``onnx/``,
    vLLM in ``vllm/``), replacing earlier exports. With the ``dense`` model, each format that can be timed is also
    written for it (in a temporary folder) and the two are timed interleaved in the runtime: returns the files
    written and those rows ``{format, runtime, metric, dense, pruned, speedup}``."""

    written, speed = [], []
    for name, options in serve.options_for(serve.export_formats).items():
        fmt = get_export_format(name)
        out = export_model(model, tokenizer, folder / fmt.beside, name, **options, overwrite=True)
        written.append(out)
        if dense is None or fmt.speed is None:
            continue
        with tempfile.TemporaryDirectory(prefix="hf_prune-dense-export-") as tmp:
            dense_out = export_model(dense, tokenizer, tmp, name, **options, overwrite=True)
            speed += [{"format": name, "runtime": fmt.runtime, **row} for row in fmt.speed(dense_out, out, model)]
    return written, speed

"""Exports for serving runtimes: GGUF (llama.cpp) for decoders, ONNX (onnxruntime) for encoders and vision
models, and the stock transformers architecture for uniform cuts. Each is one :class:`ExportFormat` in the
registry; ``hf-prune export --format``, :func:`export_model` and recipes' ``export_formats`` look them up there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..export import save_stock
from .decilm import decilm_accepts, save_decilm
from .gguf import OUTTYPES, gguf_file_name, save_gguf
from .gguf_families import GgufFamily, gguf_family, register_gguf_family
from .onnx import example_inputs, onnx_accepts, save_onnx
from .registry import ExportFormat, export_formats, export_model, get_export_format, register_export_format
from .runtimes import gguf_speed, onnx_speed


def _write_stock(model: nn.Module, tokenizer: Any, path: Path, *, overwrite: bool = False) -> Path:
    folder = save_stock(model, path, overwrite=overwrite)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _gguf_accepts(config: Any) -> None:
    gguf_family(config.model_type)  # a family llama.cpp has no architecture for: the one-line error


def _onnx_speed(dense: Path, pruned: Path, model: nn.Module) -> list[dict[str, Any]]:
    seq = min(128, getattr(model.config, "max_position_embeddings", 128))  # a text model's usual input length
    return onnx_speed(dense, pruned, example_inputs(model, batch_size=1, seq_len=seq))


for _fmt in (
    ExportFormat("gguf", "llama.cpp (llama-cpp-python, ollama, LM Studio)", save_gguf, gguf_file_name,
                 ("outtype", "pad_ffn_to", "pre_tokenizer", "overwrite"), beside="", needs_tokenizer=True,
                 speed=lambda dense, pruned, _: gguf_speed(dense, pruned),
                 accepts=_gguf_accepts),
    ExportFormat("onnx", "onnxruntime", save_onnx, lambda **_: "", ("quantize", "optimize", "overwrite"),
                 beside="onnx", speed=_onnx_speed, accepts=onnx_accepts),
    ExportFormat("vllm", "vLLM (its own DeciLM / Nemotron-NAS implementation; uneven layers)", save_decilm,
                 lambda **_: "", ("overwrite",), beside="vllm", needs_tokenizer=True, accepts=decilm_accepts),
    ExportFormat("stock", "transformers without remote code (vLLM, TGI)", _write_stock, lambda **_: "",
                 ("overwrite",)),
):
    register_export_format(_fmt)

__all__ = ["ExportFormat", "GgufFamily", "OUTTYPES", "export_formats", "export_model", "get_export_format",
           "register_export_format", "register_gguf_family", "save_decilm", "save_gguf", "save_onnx"]

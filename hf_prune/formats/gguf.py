"""GGUF export: a (pruned) decoder as one file that llama.cpp, llama-cpp-python, ollama and LM Studio run.

Layers that all have one shape are written as the family's own llama.cpp architecture; uneven layers (the cuts
that keep accuracy) as ``deci``, whose every layer carries its own query-head, KV-head and FFN sizes. Nothing here
needs remote code: the file is read by the runtime's own loader. ``f32``/``f16``/``bf16``/``q8_0`` are written by the
``gguf`` package; the k-quants (``q4_k_m``) by llama.cpp's own quantizer (``llama-cpp-python``) from an f16 file.

FFN widths are padded with zero neurons to a multiple of ``pad_ffn_to`` (default 32): the padded neurons output
exactly zero (``act(0) * 0``), and the matmul kernels and 32-element quant blocks then see whole blocks; a width such
as 1535 otherwise leaves each FFN-down row without a whole block, which llama.cpp must keep unquantized and run on
its slow generic path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..adapters import get_adapter, is_peft, layers_of, model_dims
from ..channels import hidden_width
from ..costs import model_layer_sizes
from ..io import default_mode
from ..shapes import get_module
from ..unit_kinds import refuse_units
from .gguf_families import INTERLEAVED_ROPE, GgufFamily, gguf_family, rope_theta
from .gguf_vocab import add_vocab, tokenizer_files

LLAMA_CPP_INSTALL = "pip install 'hf_prune[serve]'   (or: HF_PRUNE_SERVE=1 bash scripts/setup.sh; builds llama.cpp)"


@dataclass(frozen=True)
class OutType:
    """One ``--outtype``: the GGML type of 2-D weights (norms and biases stay f32) and how it is made.

    Args:
        name: what ``outtype`` accepts.
        file_type: ``general.file_type`` (llama.cpp's ``LLAMA_FTYPE_*``).
        via_llama_cpp: made by llama.cpp's quantizer from an f16 file (k-quants the gguf package cannot write).
    """

    name: str
    file_type: int
    via_llama_cpp: bool = False


OUTTYPES = {t.name: t for t in (OutType("f32", 0), OutType("f16", 1), OutType("bf16", 32), OutType("q8_0", 7),
                                OutType("q4_k_m", 15, via_llama_cpp=True))}


def _ggml_type(outtype: str) -> Any:
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]


def gguf_file_name(outtype: str = "f16", **_: Any) -> str:
    return f"model-{outtype}.gguf"


def _check(model: nn.Module, outtype: str, path: Path, overwrite: bool) -> tuple[GgufFamily, str, list[dict]]:
    """Everything that can be refused, before anything is written: (family, llama.cpp architecture, layer sizes)."""
    if is_peft(model):
        get_adapter(model)  # raises the one-line peft error (merge_and_unload first)
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("GGUF export needs the gguf package: pip install gguf")
    if OUTTYPES[outtype].via_llama_cpp and importlib.util.find_spec("llama_cpp") is None:
        raise ImportError(f"outtype {outtype} is made by llama.cpp's quantizer, which is not installed: "
                          f"{LLAMA_CPP_INSTALL}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists: pass overwrite=True (--overwrite) to replace it")
    family = gguf_family(model.config.model_type)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no language-model head: GGUF holds causal LMs; load the "
                         "checkpoint with AutoModelForCausalLM")
    for check in family.checks:
        if reason := check(model.config):
            raise ValueError(f"cannot export to llama.cpp: {reason}")
    act = getattr(model.config, "hidden_act", None) or getattr(model.config, "hidden_activation", None)
    if act != family.activation:
        raise ValueError(f"llama.cpp's {family.arch} architecture runs a {family.activation} FFN, this model's "
                         f"is {act}")
    spec = get_adapter(model)
    layer = layers_of(model)[0]
    if any(getattr(get_module(layer, p), "bias", None) is not None for p in (spec.up, spec.down, spec.gate) if p):
        raise ValueError("the FFN linears have biases (mlp_bias=True), which this GGUF export does not write yet")
    sizes = model_layer_sizes(model)
    dims = model_dims(model)
    width = hidden_width(model, spec)  # the residual width it has (a hidden cut narrows it)
    narrow = family.full_width_attention and sizes[0]["num_heads"] * dims["head_dim"] != width
    uneven = any(s != sizes[0] for s in sizes)
    if not uneven and not narrow:
        if sizes[0]["num_heads"] == 0 or sizes[0]["intermediate_size"] == 0:
            raise ValueError("every layer has an empty attention or FFN block; llama.cpp's "
                             f"{family.arch} architecture builds both in every layer")
        return family, family.arch, sizes
    if family.uneven_arch is None:
        raise ValueError(f"the layers have different sizes and {family.uneven_reason}")
    # narrow and uniform: llama.cpp's own architecture for the family wants full-width attention, deci does not
    if sizes[0]["num_heads"] == 0:
        raise ValueError("layer 0 keeps no attention head; llama.cpp's deci architecture reads the head size off "
                         "layer 0: keep a head there, or remove the layer (layers_keep)")
    for i, s in enumerate(sizes):
        if s["num_heads"] and not s["intermediate_size"]:
            raise ValueError(f"layer {i} keeps attention heads but no FFN neuron; llama.cpp's deci architecture "
                             "drops the attention output of such a layer: keep FFN neurons there")
    return family, family.uneven_arch, sizes


def _permute_rope(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of Q or K (or their bias) from HF's rotate-half order to llama.cpp's adjacent pairs, per head:
    (H * d, ...) -> (H, 2, d/2, ...) -> swap -> (H * d, ...)."""
    rest = w.shape[1:]
    return w.reshape(-1, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def _padded_width(width: int, multiple: int) -> int:
    """``width`` rounded up to a multiple of ``multiple`` (an empty FFN stays empty)."""
    return width + (-width) % multiple if width else 0


def _pad_ffn(up: torch.Tensor, gate: torch.Tensor | None, down: torch.Tensor, multiple: int):
    """Zero neurons appended so the width is a multiple of ``multiple``: gate/up rows and down columns of zeros,
    whose contribution ``down[:, n] * act(gate[n] x) * (up[n] x)`` is exactly 0."""
    extra = _padded_width(up.shape[0], multiple) - up.shape[0]
    if not extra:
        return up, gate, down
    rows = up.new_zeros(extra, up.shape[1])
    up = torch.cat([up, rows])
    gate = None if gate is None else torch.cat([gate, rows])
    down = torch.cat([down, down.new_zeros(down.shape[0], extra)], dim=1)
    return up, gate, down


class _Tensors:
    """Adds tensors to a GGUFWriter in the chosen type: 2-D weights as ``outtype`` (a tensor whose rows are not
    whole quant blocks stays f16, as llama.cpp's own quantizer does), 1-D tensors f32."""

    def __init__(self, writer: Any, outtype: str):
        self.writer, self.outtype = writer, outtype

    def add(self, name: str, t: torch.Tensor) -> None:
        import gguf

        a = t.detach().to(torch.float32).cpu().numpy()
        if a.ndim == 1 or self.outtype == "f32":
            self.writer.add_tensor(name, a)
            return
        if self.outtype in ("f16", "q4_k_m"):  # q4_k_m: llama.cpp quantizes the f16 file afterwards
            self.writer.add_tensor(name, a.astype(np.float16))
            return
        qtype = _ggml_type(self.outtype)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if a.shape[-1] % block:
            self.writer.add_tensor(name, a.astype(np.float16))
            return
        self.writer.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)


def _write_layer(tensors: _Tensors, idx: int, layer: nn.Module, spec: Any, family: GgufFamily, arch: str,
                 sizes: dict[str, int], head_dim: int, pad: int) -> None:
    blk = f"blk.{idx}"
    for path, name in family.norms:
        if name == "attn_norm" and not sizes["num_heads"]:
            continue  # deci: an attention-free layer has no attention norm either
        if name == "ffn_norm" and not sizes["intermediate_size"]:
            continue
        tensors.add(f"{blk}.{name}.weight", get_module(layer, path).weight + family.norm_offset)
    if sizes["num_heads"]:
        for key, name in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
            linear = get_module(layer, getattr(spec, key))
            w, b = linear.weight, linear.bias
            if key in ("q", "k") and arch in INTERLEAVED_ROPE:
                w = _permute_rope(w, head_dim)
                b = None if b is None else _permute_rope(b, head_dim)
            tensors.add(f"{blk}.{name}.weight", w)
            if b is not None:
                tensors.add(f"{blk}.{name}.bias", b)
    if sizes["intermediate_size"]:
        gate = get_module(layer, spec.gate).weight if spec.gate else None
        up, gate, down = _pad_ffn(get_module(layer, spec.up).weight, gate, get_module(layer, spec.down).weight, pad)
        tensors.add(f"{blk}.ffn_up.weight", up)
        if gate is not None:
            tensors.add(f"{blk}.ffn_gate.weight", gate)
        tensors.add(f"{blk}.ffn_down.weight", down)


def _write_keys(writer: Any, model: nn.Module, family: GgufFamily, arch: str, sizes: list[dict], pad: int,
                outtype: str) -> None:
    config = model.config
    dims = model_dims(model)
    padded = [_padded_width(s["intermediate_size"], pad) for s in sizes]
    uniform = arch != "deci"
    name = getattr(config, "_name_or_path", "") or type(model).__name__
    writer.add_name(Path(str(name)).name)
    writer.add_file_type(OUTTYPES[outtype].file_type)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(hidden_width(model, get_adapter(model)))
    writer.add_block_count(len(sizes))
    writer.add_feed_forward_length(padded[0] if uniform else padded)
    writer.add_head_count(sizes[0]["num_heads"] if uniform else [s["num_heads"] for s in sizes])
    writer.add_head_count_kv(sizes[0]["num_kv_heads"] if uniform else [s["num_kv_heads"] for s in sizes])
    # written, not derived: after pruning heads, hidden / heads is no longer the head size
    writer.add_key_length(dims["head_dim"])
    writer.add_value_length(dims["head_dim"])
    writer.add_rope_dimension_count(dims["head_dim"])
    writer.add_rope_freq_base(rope_theta(config, "full_attention"))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(model.get_output_embeddings().out_features))
    if family.extra_keys is not None:
        family.extra_keys(writer, config)


@torch.no_grad()
def save_gguf(model: nn.Module, tokenizer: Any, path: str | Path, *, outtype: str = "f16", pad_ffn_to: int = 32,
              pre_tokenizer: str | None = None, overwrite: bool = False, threads: int | None = None) -> Path:
    """Write ``model`` (dense or pruned, uniform or uneven) and its tokenizer as one GGUF file at ``path``.

    Args:
        model: a causal LM of a family in :mod:`hf_prune.formats.gguf_families`.
        tokenizer: its tokenizer (tokens, merges, special tokens and chat template go into the file).
        path: the ``.gguf`` file to write (atomically: a temporary sibling renamed into place).
        outtype: ``f32``, ``f16``, ``bf16``, ``q8_0`` or ``q4_k_m`` (the last through llama.cpp's quantizer).
        pad_ffn_to: pad each FFN width with zero neurons to a multiple of this (1: no padding); exact.
        pre_tokenizer: llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer it cannot recognise.
        overwrite: replace an existing file.
        threads: quantizer threads for ``q4_k_m`` (default: all cores).
    """
    import gguf

    path = Path(path)
    refuse_units(model, "a GGUF file")
    if pad_ffn_to < 1:
        raise ValueError(f"pad_ffn_to must be >= 1 (1: no padding), got {pad_ffn_to}")
    family, arch, sizes = _check(model, outtype, path, overwrite)
    files = tokenizer_files(tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    stage = Path(tmp)
    try:
        base_type = "f16" if OUTTYPES[outtype].via_llama_cpp else outtype
        writer = gguf.GGUFWriter(stage, arch)
        _write_keys(writer, model, family, arch, sizes, pad_ffn_to, base_type)
        add_vocab(writer, tokenizer, files.name, model.get_output_embeddings().out_features, pre_tokenizer)
        tensors = _Tensors(writer, base_type)
        tensors.add("token_embd.weight", model.get_input_embeddings().weight)
        spec, head_dim = get_adapter(model), model_dims(model)["head_dim"]
        for i, (layer, s) in enumerate(zip(layers_of(model), sizes)):
            _write_layer(tensors, i, layer, spec, family, arch, s, head_dim, pad_ffn_to)
        tensors.add("output_norm.weight", model.base_model.norm.weight + family.norm_offset)
        if not getattr(model.config, "tie_word_embeddings", False):
            tensors.add("output.weight", model.get_output_embeddings().weight)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if OUTTYPES[outtype].via_llama_cpp:
            _llama_cpp_quantize(stage, OUTTYPES[outtype].file_type, threads)
        os.chmod(stage, default_mode())
        os.replace(stage, path)
    except BaseException:
        stage.unlink(missing_ok=True)
        raise
    finally:
        files.cleanup()
    return path


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """llama.cpp logs from C straight to fd 2 (the quantizer a line per tensor); silenced unless
    ``HF_PRUNE_RUNTIME_LOGS`` is set."""
    if os.environ.get("HF_PRUNE_RUNTIME_LOGS"):
        yield
        return
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _llama_cpp_quantize(file: Path, ftype: int, threads: int | None) -> None:
    """Quantize ``file`` in place (through a sibling) with llama.cpp's own quantizer."""
    import llama_cpp

    out = file.with_name(file.name + ".q")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    try:
        with quiet_native_stderr():
            rc = llama_cpp.llama_model_quantize(str(file).encode(), str(out).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama.cpp's quantizer failed on {file.name} (return code {rc})")
        os.replace(out, file)
    finally:
        out.unlink(missing_ok=True)

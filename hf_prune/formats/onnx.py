"""ONNX export: a (pruned) encoder or vision model as an ONNX graph for onnxruntime.

An ONNX graph carries every layer's own shapes, so uneven cuts need no stock config and no remote code. The
folder written holds ``model.onnx`` (``model_optimized.onnx`` with ``optimize=True``, ``model_int8.onnx`` with
``quantize="int8"``), ``config.json`` and the
tokenizer, the layout onnxruntime-based loaders look for. Batch and sequence axes are dynamic. The graph is checked
in onnxruntime against PyTorch before the folder is moved into place.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..adapters import get_adapter, model_dims
from ..io import staged_folder
from ..shapes import HEAD_IDS, current_layer_sizes, get_module, layer_list, sync_layer_attrs_
from .gguf_families import gguf_model_types
from .runtimes import ort_run, ort_session

ONNX_INSTALL = "pip install 'hf_prune[serve]'   (onnx, onnxruntime)"
#: onnxruntime's output may differ from PyTorch's by float reordering only; more than this is a wrong graph.
TOLERANCE = 1e-4


def _output_name(model: nn.Module) -> str:
    return "last_hidden_state" if model is model.base_model else "logits"


class _Traced(nn.Module):
    """The model as a function of plain tensors returning the one tensor a serving runtime reads."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, args)), return_dict=True)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def example_inputs(model: nn.Module, batch_size: int = 2, seq_len: int = 16) -> dict[str, torch.Tensor]:
    """Inputs the graph is traced with and checked on (>= 2 in every dynamic axis: size 1 gets specialised)."""
    config = model.config
    g = torch.Generator().manual_seed(0)
    if get_adapter(model).special_tokens is not None:
        size, channels = config.image_size, getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(batch_size, channels, size, size, generator=g)}
    ids = torch.randint(5, config.vocab_size, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq_len // 2:] = 0  # one padded row: the mask path is traced and checked
    out = {"input_ids": ids, "attention_mask": mask}
    if getattr(config, "type_vocab_size", 0) and "token_type_ids" in _forward_args(model):
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


@torch.no_grad()
def _zero_head_in_empty_layers(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose layers without attention heads keep one head of zeros (only when there are such
    layers). ONNX cannot reshape an empty tensor to ``(-1, heads, head_dim)``; a head with zero query, key and value
    rows and zero output columns attends uniformly over zero values and adds exactly nothing."""
    spec = get_adapter(model)
    head_dim = model_dims(model)["head_dim"]
    empty = [i for i, layer in enumerate(layer_list(model, spec))
             if current_layer_sizes(layer, spec, head_dim)["num_heads"] == 0]
    if not empty:
        return model
    model = copy.deepcopy(model)
    for i in empty:
        layer = layer_list(model, spec)[i]
        for key, dim in (("q", 0), ("k", 0), ("v", 0), ("o", 1)):
            linear = get_module(layer, getattr(spec, key))
            shape = list(linear.weight.shape)
            shape[dim] = head_dim
            linear.weight = nn.Parameter(torch.cat([linear.weight, linear.weight.new_zeros(shape)], dim))
            if dim == 0:
                if linear.bias is not None:
                    linear.bias = nn.Parameter(torch.cat([linear.bias, linear.bias.new_zeros(head_dim)]))
                linear.out_features = head_dim
            else:
                linear.in_features = head_dim
        for path, _, _ in spec.head_inputs:  # its per-head inputs (MPNet's position bias): any row, the head adds 0
            get_module(layer, path).register_buffer(HEAD_IDS, torch.zeros(1, dtype=torch.long), persistent=True)
        sync_layer_attrs_(layer, spec, head_dim)
    return model


def _forward_args(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Eager attention for the trace (the SDPA path traces to shapes fixed at the example's size)."""
    old = getattr(model.config, "_attn_implementation", None)
    try:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        yield
    finally:
        if old is not None and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(old)


def onnx_accepts(config: Any) -> None:
    """Refuse a decoder LLM (those go to GGUF or vLLM), before anything is done."""
    if getattr(config, "is_decoder", False) or config.model_type in gguf_model_types():
        raise ValueError(f"ONNX export covers encoders and vision models; export the {config.model_type} "
                         "decoder with format='gguf' for llama.cpp")


def _check(model: nn.Module, path: Path, overwrite: bool, quantize: str | None) -> None:
    get_adapter(model)  # peft-wrapped or unknown family: the one-line errors
    for package in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"ONNX export needs {package}: {ONNX_INSTALL}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be 'int8' or None, got {quantize!r}")
    onnx_accepts(model.config)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty: pass overwrite=True (--overwrite) to replace it")


@torch.no_grad()
def save_onnx(model: nn.Module, tokenizer: Any, path: str | Path, *, quantize: str | None = None,
              optimize: bool = False, opset: int = 18, overwrite: bool = False) -> Path:
    """Write ``model`` as ONNX into the folder ``path`` (``model.onnx``, ``config.json``, tokenizer files).

    Args:
        model: an encoder (BERT family, DistilBERT) or ViT/DeiT, dense or pruned, any head.
        tokenizer: saved beside the graph (None for vision models).
        path: the folder to write (atomically: a temporary sibling renamed into place).
        quantize: ``"int8"`` also writes ``model_int8.onnx`` (onnxruntime dynamic quantization of the MatMuls).
        optimize: also write ``model_optimized.onnx``, the graph with onnxruntime's CPU graph optimisations applied
            ahead of time (the same arithmetic: a session skips that work at load; it is checked like the first).
        opset: the ONNX opset.
        overwrite: replace an existing folder.
    """
    path = Path(path)
    _check(model, path, overwrite, quantize)
    was_training, original = model.training, model
    model.eval()
    model = _zero_head_in_empty_layers(model)
    inputs = example_inputs(model)
    names = list(inputs)
    try:
        with staged_folder(path, overwrite) as stage:
            with _eager_attention(model):
                expected = _Traced(model, names)(*inputs.values())
                output = _output_name(model)
                batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
                shapes = tuple({0: batch} if n == "pixel_values" else {0: batch, 1: seq} for n in names)
                # the exporter prints its progress; an export prints one line of its own instead
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")  # the exporter's notes on what it specialised or decomposed
                    try:
                        torch.onnx.export(_Traced(model, names), tuple(inputs.values()), str(stage / "model.onnx"),
                                          input_names=names, output_names=[output], dynamic_shapes=(shapes,),
                                          opset_version=opset, dynamo=True, external_data=False, optimize=True,
                                          verbose=False)
                    except Exception as e:  # torch.export's errors are pages long: the first lines name the op
                        cause = e.__cause__ or e
                        lines = [x for x in str(cause).splitlines() if x.strip()][:2]
                        raise ValueError(f"torch could not export {type(model).__name__} to ONNX "
                                         f"({type(cause).__name__}: {' '.join(lines)[:400]})") from e
                again = example_inputs(model, batch_size=3, seq_len=23)  # other sizes: the axes are really dynamic
                _verify(stage / "model.onnx", [(inputs, expected), (again, _Traced(model, names)(*again.values()))])
            if optimize:
                _optimize(stage / "model.onnx", stage / "model_optimized.onnx")
                _verify(stage / "model_optimized.onnx", [(inputs, expected)])
            if quantize == "int8":
                _quantize_int8(stage / "model.onnx", stage / "model_int8.onnx")
            model.config.to_json_file(stage / "config.json")
            if tokenizer is not None:
                tokenizer.save_pretrained(stage)
    finally:
        original.train(was_training)
    return path


def _optimize(source: Path, target: Path) -> None:
    """onnxruntime's graph optimisations (all CPU levels) applied once and saved."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def _quantize_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic int8 quantization of the weight MatMuls, per output channel. MatMuls whose weight is
    empty (a layer left with no FFN neuron) stay float: there is nothing to quantize and the quantizer cannot."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source)).graph
    empty = {t.name for t in graph.initializer if 0 in t.dims}
    skip = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and empty & set(n.input)]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process (shape inference) logs on every call
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=skip)
    finally:
        root.setLevel(level)


def _verify(file: Path, cases: list[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> None:
    """onnxruntime must give PyTorch's output on every case (the trace inputs and other batch/sequence sizes)."""
    session = ort_session(file)
    for inputs, expected in cases:
        got = torch.from_numpy(ort_run(session, inputs)[0])
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
        if diff > TOLERANCE:
            shape = tuple(next(iter(inputs.values())).shape)
            raise RuntimeError(f"the exported graph disagrees with PyTorch on inputs of shape {shape} (max |diff| "
                               f"{diff:.2e} > {TOLERANCE}); nothing was written")

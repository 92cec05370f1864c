"""Running exported files in their real runtimes: llama.cpp (through llama-cpp-python) and onnxruntime.

The checks and the deployment benchmark use these, so "the file works" always means "the runtime that serves it
ran it": logits for given token ids, perplexity over blocks, and timing.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .gguf import LLAMA_CPP_INSTALL, quiet_native_stderr


def has_llama_cpp() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def has_onnxruntime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def load_llama(path: str | Path, *, n_ctx: int = 512, threads: int | None = None, logits_all: bool = True,
               exact: bool = False, n_batch: int = 512) -> Any:
    """A ``llama_cpp.Llama`` on ``path``.

    The default is how it serves: flash attention on (without it llama.cpp pads every layer's V cache to the widest
    layer's size when layers differ) and an f16 KV cache. ``exact``: flash attention off and an f32 KV cache, so an
    f32 file computes what PyTorch computes to float rounding (llama.cpp's CPU flash attention rounds Q, K and V to
    f16, about 1e-4 on logits).
    """
    if not has_llama_cpp():
        raise ImportError(f"running GGUF files needs llama-cpp-python: {LLAMA_CPP_INSTALL}")
    import llama_cpp

    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if exact else {}
    with quiet_native_stderr():
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads or os.cpu_count(), n_batch=n_batch,
                               n_ubatch=n_batch, logits_all=logits_all, flash_attn=not exact,
                               verbose=bool(os.environ.get("HF_PRUNE_RUNTIME_LOGS")), **kv)


def llama_logits(llm: Any, ids: Sequence[int]) -> np.ndarray:
    """Logits ``(len(ids), vocab)`` llama.cpp computes for ``ids`` from an empty cache (row i predicts i + 1)."""
    llm.reset()
    with quiet_native_stderr():
        llm.eval(list(int(i) for i in ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_perplexity(llm: Any, blocks: Sequence[Sequence[int]]) -> float:
    """Perplexity over ``blocks`` (each evaluated from an empty cache, every next token scored), in llama.cpp."""
    nll, count = 0.0, 0
    for block in blocks:
        logits = llama_logits(llm, block).astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        target = np.asarray(block[1:])
        nll += float((logz[:-1] - logits[np.arange(len(target)), target]).sum())
        count += len(target)
    return math.exp(nll / count)


def llama_greedy(llm: Any, ids: Sequence[int], new_tokens: int) -> list[int]:
    """Greedy continuation of ``ids`` in llama.cpp (token ids, no sampling)."""
    llm.reset()
    out = []
    with quiet_native_stderr():
        for token in llm.generate(list(int(i) for i in ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                  repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == new_tokens:
                break
    return out


def ort_session(path: str | Path, *, threads: int | None = None, optimize: bool = True, spin: bool = True) -> Any:
    """An onnxruntime CPU session on ``path`` (graph optimisations on unless ``optimize=False``). ``spin=False``:
    idle worker threads sleep instead of spinning, for timing several sessions in one process (a spinning idle
    session steals the cores of the one being timed)."""
    if not has_onnxruntime():
        raise ImportError("running ONNX files needs onnxruntime: pip install 'hf_prune[serve]'")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_run(session: Any, inputs: dict[str, Any]) -> list[np.ndarray]:
    """Run ``session`` on the inputs it declares (torch tensors or arrays; int inputs as int64; a missing
    ``token_type_ids`` is all zeros, as transformers fills it)."""
    feed = {}
    for spec in session.get_inputs():
        if spec.name == "token_type_ids" and spec.name not in inputs:
            value = np.zeros(np.shape(inputs["input_ids"]), dtype=np.int64)
        else:
            value = inputs[spec.name]
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        feed[spec.name] = value.astype(np.int64) if "int" in spec.type else value.astype(np.float32)
    return session.run(None, feed)

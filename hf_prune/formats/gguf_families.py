"""Which llama.cpp architecture runs each decoder family, and where its tensors go, as data.

llama.cpp reads ``head_count``, ``head_count_kv`` and ``feed_forward_length`` per layer for every architecture,
but only ``deci`` (written for NVIDIA's pruned Nemotron-51B) also *builds* each layer with its own sizes; ``llama``,
``qwen2``, ``qwen3`` and ``gemma3`` create every layer's tensors from layer 0's sizes and refuse an uneven file. So
uneven Llama-shaped layers (Llama, Mistral, Qwen2's biases included) go to ``deci``; a family whose layers need
tensors ``deci`` does not have (Qwen3's and Gemma-3's per-head norms, Gemma's sandwich norms) exports its uniform
cuts only. Add a family with one :func:`register_gguf_family`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..channels import kept_hidden

#: Architectures whose rope rotates adjacent pairs (llama.cpp's "normal" rope): Hugging Face's rotate-half Q/K rows
#: are permuted into that order on export. The others (qwen2, qwen3, gemma3) use the NeoX order, as HF does.
INTERLEAVED_ROPE = frozenset({"llama", "deci"})

#: Per-layer tensors every Llama-shaped family has: (module path inside the HF layer, GGUF name after ``blk.N.``).
LLAMA_NORMS = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"))


@dataclass(frozen=True)
class GgufFamily:
    """How one ``model_type`` becomes a GGUF file.

    Args:
        model_type: the transformers ``config.model_type``.
        arch: the llama.cpp architecture for layers that all have the same shape.
        uneven_arch: the architecture for per-layer shapes (``"deci"``), or None when llama.cpp has none for this
            family (uneven cuts are then refused with ``uneven_reason``).
        norms: per-layer norm modules (HF path inside a layer, GGUF name); linears come from the adapter.
        norm_offset: added to every norm weight (Gemma's RMSNorm scales by ``1 + w``; llama.cpp by ``w``).
        extra_keys: ``extra_keys(writer, config)`` writes family-specific metadata.
        uneven_reason: why uneven cuts cannot be exported (said in the error).
        full_width_attention: ``arch`` builds Q and the output projection at the hidden width (llama.cpp's qwen2),
            so a cut of query heads, even a uniform one, goes to ``uneven_arch``.
        checks: ``check(config) -> reason or None`` for settings llama.cpp's architecture cannot run.
        activation: the FFN activation llama.cpp's architecture runs (the config's ``hidden_act`` must match).
    """

    model_type: str
    arch: str
    uneven_arch: str | None = "deci"
    norms: tuple[tuple[str, str], ...] = LLAMA_NORMS
    norm_offset: float = 0.0
    extra_keys: Callable[[Any, Any], None] | None = None
    uneven_reason: str = ""
    full_width_attention: bool = False
    activation: str = "silu"
    checks: tuple[Callable[[Any], str | None], ...] = field(default_factory=tuple)


_FAMILIES: dict[str, GgufFamily] = {}


def register_gguf_family(family: GgufFamily, *, overwrite: bool = False) -> GgufFamily:
    if family.model_type in _FAMILIES and not overwrite:
        raise ValueError(f"a GGUF family for {family.model_type!r} is already registered; pass overwrite=True")
    _FAMILIES[family.model_type] = family
    return family


def gguf_model_types() -> list[str]:
    """The model types GGUF export writes (the decoder LLM families)."""
    return sorted(_FAMILIES)


def gguf_family(model_type: str) -> GgufFamily:
    if model_type not in _FAMILIES:
        raise ValueError(
            f"llama.cpp has no architecture hf_prune can write for model_type {model_type!r} (GGUF holds decoder "
            f"LLMs: {', '.join(gguf_model_types())}); export encoders and vision models with format='onnx'")
    return _FAMILIES[model_type]


def rope_theta(config: Any, layer_type: str | None = None) -> float:
    """The rope base of ``config`` (transformers 5's ``rope_parameters``, per layer type where it is a dict of
    them, else the older ``rope_theta``); refuses rope scalings this exporter does not write."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"rope_type {kind!r} is not exported to GGUF yet (only the default rope); export "
                         "with llama.cpp's convert_hf_to_gguf.py from a stock save instead")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the config has no rope_theta: cannot write the rope base")
    return float(theta)


def _sliding_window_check(config: Any) -> str | None:
    window = getattr(config, "sliding_window", None)
    use = getattr(config, "use_sliding_window", window is not None)
    if use and window is not None and window < getattr(config, "max_position_embeddings", 0):
        return (f"sliding-window attention (sliding_window={window}) has no equivalent in llama.cpp's "
                f"{config.model_type} architecture; set config.sliding_window = None if the model does not rely on it")
    return None


def _gemma3_keys(writer: Any, config: Any) -> None:
    types = list(getattr(config, "layer_types", None) or [])
    writer.add_sliding_window(int(config.sliding_window))
    # one flag per layer the file has: after depth pruning the stock every-6th-layer pattern no longer holds
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    writer.add_rope_freq_base_swa(rope_theta(config, "sliding_attention"))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _gemma3_check(config: Any) -> str | None:
    head_dim = config.head_dim
    if getattr(config, "query_pre_attn_scalar", head_dim) != head_dim:
        return (f"query_pre_attn_scalar {config.query_pre_attn_scalar} != head_dim {head_dim}: llama.cpp scales "
                "Gemma-3 attention by 1/sqrt(head_dim) (the 27B model's rule aside)")
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping is not run by llama.cpp's gemma3 architecture"
    if kept_hidden(config) is not None:
        return ("llama.cpp's gemma3 scales the token embeddings by sqrt(n_embd), and after a hidden cut n_embd is no "
                "longer the width the model was trained at (its tied output layer cannot absorb the change): keep the "
                "hidden width (no hidden_keep) for a GGUF export, or export to ONNX")
    return None


_NO_PER_HEAD_NORMS = ("llama.cpp's per-layer-size architecture (deci) has no per-head q/k norms, and its {arch} "
                      "architecture builds every layer with layer 0's sizes; export a uniform cut "
                      "(PruningConfig(allocation='uniform'))")

for _family in (
    GgufFamily("llama", "llama"),
    GgufFamily("mistral", "llama", checks=(_sliding_window_check,)),
    GgufFamily("qwen2", "qwen2", full_width_attention=True, checks=(_sliding_window_check,)),
    GgufFamily("qwen3", "qwen3", uneven_arch=None, norms=LLAMA_NORMS + (("self_attn.q_norm", "attn_q_norm"),
                                                                          ("self_attn.k_norm", "attn_k_norm")),
               uneven_reason=_NO_PER_HEAD_NORMS.format(arch="qwen3"), checks=(_sliding_window_check,)),
    GgufFamily("gemma3_text", "gemma3", uneven_arch=None,
               norms=(("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attention_norm"),
                      ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm"),
                      ("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm")),
               norm_offset=1.0, extra_keys=_gemma3_keys, activation="gelu_pytorch_tanh",
               uneven_reason=_NO_PER_HEAD_NORMS.format(arch="gemma3"),
               checks=(_gemma3_check,)),
):
    register_gguf_family(_family)

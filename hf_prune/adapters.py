"""Architecture adapters: where heads and FFN neurons live in each model family, as data.

An adapter is an :class:`ArchAdapter` (module paths inside a layer, config field names, attributes to keep in
sync), registered by ``config.model_type``. Add a family with :func:`register_adapter`::

    from hf_prune import ArchAdapter, register_adapter
    register_adapter(ArchAdapter(model_type="my_llama", layers="layers", q="self_attn.q_proj", ...))
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from .shapes import ArchSpec, dense_dims, layer_list

#: Public name of the declarative adapter (the same dataclass is embedded in checkpoints).
ArchAdapter = ArchSpec

_REGISTRY: dict[str, ArchAdapter] = {}


def register_adapter(adapter: ArchAdapter, *, overwrite: bool = False) -> ArchAdapter:
    """Register ``adapter`` for ``adapter.model_type``.

    Args:
        adapter: the architecture description.
        overwrite: replace an adapter already registered for that model type.
    """
    if adapter.model_type in _REGISTRY and not overwrite:
        raise ValueError(
            f"an adapter for model_type {adapter.model_type!r} is already registered; "
            "pass overwrite=True to replace it"
        )
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model_or_config: Any) -> ArchAdapter:
    """The adapter for a model (or its config), with a clear error for unsupported families."""
    if is_peft(model_or_config):
        raise TypeError(
            "hf_prune prunes plain transformers models, and this one is wrapped by peft. Prune before "
            "get_peft_model(...), or call model.merge_and_unload() first and prune the merged model."
        )
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise NotImplementedError(
            f"hf_prune has no adapter for model_type {model_type!r}. Supported: "
            f"{', '.join(supported_model_types())}. To add one, describe where its attention and FFN linears "
            "live with hf_prune.ArchAdapter(model_type=..., layers=..., q=..., k=..., v=..., o=..., up=..., "
            "down=...) and pass it to hf_prune.register_adapter(...)."
        )
    return _REGISTRY[model_type]


def is_peft(obj: Any) -> bool:
    return any(c.__module__.startswith("peft") for c in type(obj).__mro__)


def layers_of(model: nn.Module) -> nn.ModuleList:
    return layer_list(model, get_adapter(model))


def tokens_per_input(model_or_config: Any, seq_len: int) -> int:
    """Tokens one input puts through the layers (the sequence length FLOPs are counted at): ``seq_len`` for
    text, patches plus the adapter's ``special_tokens`` for vision models."""
    config = getattr(model_or_config, "config", model_or_config)
    extra = get_adapter(config).special_tokens
    return seq_len if extra is None else (config.image_size // config.patch_size) ** 2 + extra


def model_dims(model_or_config: Any) -> dict[str, int]:
    """Dense sizes: ``num_layers, hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size``."""
    config = getattr(model_or_config, "config", model_or_config)
    return dense_dims(config, get_adapter(config))


_BERT_ATTRS = (
    ("attention.self.num_attention_heads", "num_heads"),
    ("attention.self.all_head_size", "all_head_size"),
)
BERT = ArchAdapter(
    model_type="bert",
    layers="encoder.layer",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    up="intermediate.dense",
    down="output.dense",
    attrs=_BERT_ATTRS,
)
MPNET = ArchAdapter(
    model_type="mpnet",
    layers="encoder.layer",
    q="attention.attn.q",
    k="attention.attn.k",
    v="attention.attn.v",
    o="attention.attn.o",
    up="intermediate.dense",
    down="output.dense",
    attrs=(("attention.attn.num_attention_heads", "num_heads"), ("attention.attn.all_head_size", "all_head_size")),
    # the relative-position bias (B, H, T, T) is computed once by the encoder and handed to every layer
    head_inputs=(("attention.attn", "position_bias", 2),),
)
DISTILBERT = ArchAdapter(
    model_type="distilbert",
    layers="transformer.layer",
    q="attention.q_lin",
    k="attention.k_lin",
    v="attention.v_lin",
    o="attention.out_lin",
    up="ffn.lin1",
    down="ffn.lin2",
    num_heads_field="n_heads",
    intermediate_field="hidden_dim",
    hidden_field="dim",
    layers_field="n_layers",
    head_dim_field=None,
    attrs=(("attention.n_heads", "num_heads"),),
)
VIT = ArchAdapter(
    model_type="vit",
    layers="layers",
    q="attention.q_proj",
    k="attention.k_proj",
    v="attention.v_proj",
    o="attention.o_proj",
    up="mlp.fc1",
    down="mlp.fc2",
    attrs=(("attention.num_attention_heads", "num_heads"),),
    special_tokens=1,  # CLS
)
LLAMA = ArchAdapter(
    model_type="llama",
    layers="layers",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
    num_kv_heads_field="num_key_value_heads",
    attrs=(("mlp.intermediate_size", "intermediate_size"), ("self_attn.num_key_value_groups", "kv_groups")),
)

for _adapter in (
    BERT,
    replace(BERT, model_type="roberta"),
    replace(BERT, model_type="xlm-roberta"),
    replace(BERT, model_type="electra"),
    MPNET,
    DISTILBERT,
    VIT,
    replace(VIT, model_type="deit", special_tokens=2),  # CLS and the distillation token
    LLAMA,
    replace(LLAMA, model_type="mistral"),
    replace(LLAMA, model_type="qwen2"),
    replace(LLAMA, model_type="qwen3"),
    # Gemma 3 text: Llama's module names; q/k norms act per head_dim (no per-head slicing), head_dim is a config
    # field (heads x head_dim != hidden), sliding/full layers are config.layer_types
    replace(LLAMA, model_type="gemma3_text"),
):
    register_adapter(_adapter)

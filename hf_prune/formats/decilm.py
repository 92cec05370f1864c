"""vLLM export: a (pruned) Llama-family decoder as a DeciLM / Nemotron-NAS checkpoint, which vLLM runs with its own
implementation (``DeciLMForCausalLM``), not the slower Transformers-backend fallback an hf_prune checkpoint gets.

vLLM's DeciLM reads per-layer sizes from ``config.block_configs``: each layer's FFN width
(``ffn.intermediate_size``), its KV-head count (``num_attention_heads // attention.n_heads_in_group``) and whether its
attention or FFN block is absent (``no_op``). The query-head count is the model's own in every layer, so a layer that
lost query heads is written back at full width with zero heads: a zero query head attends uniformly and its zero
``o_proj`` columns add exactly 0. KV heads are padded (zero K and V rows) up to the nearest count that divides the query
heads with room for the layer's kept group size. The result is exact; FFN cuts, removed blocks and KV-head cuts give
speed, query-head cuts inside a kept KV group do not.

``model_type`` ``nemotron-nas`` is not in transformers, so the folder carries ``configuration_decilm.py`` (a
``LlamaConfig`` subclass, the way NVIDIA's Nemotron-NAS repositories ship it): loading needs
``trust_remote_code=True`` for that config class, and the model code is vLLM's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapters import get_adapter, is_peft, layers_of, model_dims
from ..channels import hidden_width
from ..costs import model_layer_sizes
from ..io import staged_folder
from ..shapes import get_module
from ..unit_kinds import refuse_units

FAMILIES = ("llama", "mistral", "qwen2")
CONFIG_FILE = "configuration_decilm.py"

# The config class the folder ships (vLLM reads block_configs[i].attention.no_op etc. as attributes).
_CONFIG_SOURCE = '''"""DeciLM / Nemotron-NAS config written by hf_prune: a LlamaConfig whose ``block_configs`` give each layer's
sizes. vLLM runs it with its own DeciLMForCausalLM; this file holds no model code."""

import json

from transformers import LlamaConfig


class _Fields(dict):
    """A JSON object read with attribute access (``block.attention.no_op``)."""

    def __getattr__(self, name):
        try:
            value = self[name]
        except KeyError as e:
            raise AttributeError(name) from e
        return _Fields(value) if isinstance(value, dict) else value

    def __deepcopy__(self, memo):
        return _Fields(json.loads(json.dumps(self)))


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [_Fields(b) for b in (block_configs or [])]
        super().__init__(**kwargs)
'''


def decilm_accepts(config: Any) -> None:
    """Refuse a family or attention vLLM's DeciLM cannot run, before anything is done."""
    if config.model_type not in FAMILIES:
        raise ValueError(f"vLLM's DeciLM runs Llama-shaped decoders ({', '.join(FAMILIES)}), not "
                         f"{config.model_type}: export a uniform cut with --format stock, which vLLM loads as its own "
                         "architecture")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        raise ValueError(f"the model uses a sliding attention window ({window}), which vLLM's DeciLM does not; set "
                         "config.sliding_window = None if the model does not rely on it")


def _check(model: nn.Module, tokenizer: Any) -> list[dict[str, int]]:
    if is_peft(model):
        get_adapter(model)  # raises the one-line peft error (merge_and_unload first)
    config = model.config
    decilm_accepts(config)
    if tokenizer is None:
        raise ValueError("the vLLM export needs the tokenizer: save it beside the checkpoint "
                         "(tokenizer.save_pretrained(folder))")
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        raise ValueError("vLLM's DeciLM runs a SiLU-gated FFN without biases; this model's FFN differs")
    sizes = model_layer_sizes(model)
    if sizes[0]["num_heads"] == 0:
        raise ValueError("layer 0 keeps no attention head; vLLM's DeciLM needs attention in the first layer: keep a "
                         "head there, or remove the layer (layers_keep)")
    return sizes


def _kv_layout(heads: int, kv: int, full_heads: int) -> int:
    """KV heads to write for a layer keeping ``heads`` query heads in ``kv`` groups: the fewest (>= kv) that divide
    ``full_heads`` and leave each group room for its ``heads // kv`` query heads."""
    group = heads // kv
    return next(d for d in range(kv, full_heads + 1) if full_heads % d == 0 and full_heads // d >= group)


def _padded_attention(layer: nn.Module, spec: Any, size: dict[str, int], full_heads: int, head_dim: int,
                      out_kv: int) -> dict[str, torch.Tensor]:
    """q/k/v/o weights (and biases) at ``full_heads`` query heads and ``out_kv`` KV heads: kept KV head j goes to slot
    j, its query heads to the first slots of group j; every other row of Q/K/V and column of O is zero."""
    heads, kv = size["num_heads"], size["num_kv_heads"]
    group, out_group = heads // kv, full_heads // out_kv
    # query head h (in group h // group) -> slot (h // group) * out_group + h % group
    slots = torch.tensor([(h // group) * out_group + h % group for h in range(heads)])
    out: dict[str, torch.Tensor] = {}
    for key, n_out, index in (("q", full_heads, slots), ("k", out_kv, torch.arange(kv)),
                              ("v", out_kv, torch.arange(kv))):
        linear = get_module(layer, getattr(spec, key))
        for part in ("weight", "bias"):
            t = getattr(linear, part)
            if t is None:
                continue
            rows = t.reshape(-1, head_dim, *t.shape[1:])  # (heads, d, in) or (heads, d)
            padded = rows.new_zeros(n_out, *rows.shape[1:])
            padded[index] = rows
            out[f"{getattr(spec, key)}.{part}"] = padded.reshape(n_out * head_dim, *t.shape[1:])
    o = get_module(layer, spec.o)
    cols = o.weight.reshape(o.weight.shape[0], heads, head_dim)  # (hidden, heads, d)
    padded = cols.new_zeros(cols.shape[0], full_heads, head_dim)
    padded[:, slots] = cols
    out[f"{spec.o}.weight"] = padded.reshape(cols.shape[0], -1)
    if o.bias is not None:
        out[f"{spec.o}.bias"] = o.bias
    return out


def _layer_tensors(layer: nn.Module, spec: Any, size: dict[str, int], full_heads: int, head_dim: int,
                   out_kv: int) -> dict[str, torch.Tensor]:
    """The layer's tensors under their HF names, blocks that are absent (no heads / no neurons) left out."""
    attention = {spec.q, spec.k, spec.v, spec.o}
    ffn = {p for p in (spec.up, spec.gate, spec.down) if p}
    out = {}
    for name, t in layer.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in attention or (module == "input_layernorm" and not size["num_heads"]):
            continue
        if (module in ffn or module == "post_attention_layernorm") and not size["intermediate_size"]:
            continue
        if module not in ffn | {"input_layernorm", "post_attention_layernorm"}:
            raise ValueError(f"vLLM's DeciLM has no place for the layer tensor {name!r}")
        out[name] = t
    if size["num_heads"]:
        out.update(_padded_attention(layer, spec, size, full_heads, head_dim, out_kv))
    return out


def block_configs(sizes: list[dict[str, int]], full_heads: int) -> list[dict[str, Any]]:
    """``config.block_configs`` for layers of ``sizes`` (the per-layer sizes vLLM's DeciLM reads)."""
    blocks = []
    for s in sizes:
        attention: dict[str, Any] = {"no_op": not s["num_heads"], "replace_with_linear": False}
        if s["num_heads"]:
            attention["n_heads_in_group"] = full_heads // _kv_layout(s["num_heads"], s["num_kv_heads"], full_heads)
        ffn = {"no_op": not s["intermediate_size"], "replace_with_linear": False}
        if s["intermediate_size"]:
            ffn["intermediate_size"] = s["intermediate_size"]
        blocks.append({"attention": attention, "ffn": ffn})
    return blocks


@torch.no_grad()
def save_decilm(model: nn.Module, tokenizer: Any, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` (dense or pruned) and its tokenizer as a DeciLM folder at ``path`` that vLLM serves with its
    own implementation: ``LLM(path, trust_remote_code=True)`` (the remote code is the config class only).

    Args:
        model: a Llama, Mistral or Qwen2 causal LM (dense or pruned, depth cuts included).
        tokenizer: its tokenizer, saved into the folder.
        path: the folder to write (atomically: a temporary sibling renamed into place).
        overwrite: replace an existing folder.
    """
    path = Path(path)
    refuse_units(model, "a DeciLM config")
    sizes = _check(model, tokenizer)
    dims, spec = model_dims(model), get_adapter(model)
    full_heads, head_dim = dims["num_heads"], dims["head_dim"]
    with staged_folder(path, overwrite) as stage:
        tensors: dict[str, torch.Tensor] = {}
        names = {id(m): n for n, m in model.named_modules()}
        for layer, size in zip(layers_of(model), sizes):
            out_kv = _kv_layout(size["num_heads"], size["num_kv_heads"], full_heads) if size["num_heads"] else 0
            prefix = names[id(layer)]
            for name, t in _layer_tensors(layer, spec, size, full_heads, head_dim, out_kv).items():
                tensors[f"{prefix}.{name}"] = t
        for name, t in model.state_dict().items():
            if not name.startswith(f"{names[id(layers_of(model)[0])].rsplit('.', 1)[0]}."):
                tensors[name] = t
        if getattr(model.config, "tie_word_embeddings", False):
            tensors.pop("lm_head.weight", None)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(stage / "model.safetensors"),
                  metadata={"format": "pt"})
        (stage / "config.json").write_text(json.dumps(_config(model, sizes, full_heads), indent=2), encoding="utf-8")
        (stage / CONFIG_FILE).write_text(_CONFIG_SOURCE, encoding="utf-8")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
    return path


def _config(model: nn.Module, sizes: list[dict[str, int]], full_heads: int) -> dict[str, Any]:
    c = model.config
    blocks = block_configs(sizes, full_heads)
    first = next(b["attention"]["n_heads_in_group"] for b in blocks if not b["attention"]["no_op"])
    keep = ("vocab_size", "hidden_size", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters", "rope_theta", "rope_scaling",
            "attention_bias", "initializer_range")
    out = {k: getattr(c, k) for k in keep if getattr(c, k, None) is not None}
    qkv_bias = get_module(layers_of(model)[0], get_adapter(model).q).bias is not None
    out.update({
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": f"{CONFIG_FILE.removesuffix('.py')}.DeciLMConfig"},
        "num_hidden_layers": len(sizes), "num_attention_heads": full_heads,
        "num_key_value_heads": full_heads // first, "intermediate_size": max(s["intermediate_size"] for s in sizes),
        "hidden_act": "silu", "block_configs": blocks, "dtype": str(next(model.parameters()).dtype).split(".")[-1],
        "hidden_size": hidden_width(model, get_adapter(model)),  # the width it has (a hidden cut narrows it)
    })
    if qkv_bias and not getattr(c, "attention_bias", False):
        out["qkv_bias"] = True  # qwen2: biases on q/k/v only, which vLLM's DeciLM reads from qkv_bias
    return out

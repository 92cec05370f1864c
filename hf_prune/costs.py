"""Cost accounting: parameters, FLOPs per sequence, and measured latency.

FLOPs count the transformer layers' matrix products (2 FLOPs per multiply-add) for one sequence of ``seq_len``
tokens: Q/K/V/O and FFN projections plus the attention score and value products (``4 * T^2 * H * d``).
Embeddings, norms, softmax and task heads are excluded; they are a few percent of an encoder's compute and
pruning does not change them.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapters import get_adapter, model_dims
from .channels import hidden_slots, hidden_width
from .plan import PrunePlan
from .shapes import current_layer_sizes, get_module, layer_list
from .unit_kinds import units_flops, units_params

if TYPE_CHECKING:
    from .plan import PrunePlan


@dataclass(frozen=True)
class CostModel:
    """Analytic cost of one layer's prunable parts as a function of its kept sizes.

    Args:
        hidden_size, head_dim: widths of the model.
        gated: FFN has a gate projection (SwiGLU): 3 matrices per neuron instead of 2.
        q_bias, kv_bias, up_bias: whether those projections carry a bias (it is pruned with its rows).
    """

    hidden_size: int
    head_dim: int
    gated: bool
    q_bias: bool
    kv_bias: bool
    up_bias: bool

    @classmethod
    def for_model(cls, model: nn.Module) -> "CostModel":
        """The model's cost model at the hidden width it has now."""
        adapter = get_adapter(model)
        d = model_dims(model)
        layer = layer_list(model, adapter)[0]
        return cls(
            hidden_size=hidden_width(model, adapter),
            head_dim=d["head_dim"],
            gated=adapter.gate is not None,
            q_bias=get_module(layer, adapter.q).bias is not None,
            kv_bias=get_module(layer, adapter.k).bias is not None,
            up_bias=get_module(layer, adapter.up).bias is not None,
        )

    def with_hidden(self, hidden_size: int) -> "CostModel":
        """The same model at another residual width (every unit's cost scales with it)."""
        return replace(self, hidden_size=int(hidden_size))

    # per unit ------------------------------------------------------------------------------------
    @property
    def head_params(self) -> int:
        """Q rows + O columns of one query head."""
        return self.head_dim * (2 * self.hidden_size + self.q_bias)

    @property
    def kv_params(self) -> int:
        """K and V rows of one key/value head."""
        return 2 * self.head_dim * (self.hidden_size + self.kv_bias)

    @property
    def neuron_params(self) -> int:
        mats = 3 if self.gated else 2
        return mats * self.hidden_size + self.up_bias * (2 if self.gated else 1)

    def head_flops(self, seq_len: int) -> int:
        return 4 * seq_len * self.hidden_size * self.head_dim + 4 * seq_len * seq_len * self.head_dim

    def kv_flops(self, seq_len: int) -> int:
        return 4 * seq_len * self.hidden_size * self.head_dim

    def neuron_flops(self, seq_len: int) -> int:
        return 2 * seq_len * self.hidden_size * (3 if self.gated else 2)

    # per layer -----------------------------------------------------------------------------------
    def layer_params(self, s: Mapping[str, int]) -> dict[str, int]:
        return {
            "attention": s["num_heads"] * self.head_params + s["num_kv_heads"] * self.kv_params,
            "ffn": s["intermediate_size"] * self.neuron_params,
        }

    def layer_flops(self, s: Mapping[str, int], seq_len: int) -> dict[str, int]:
        return {
            "attention": s["num_heads"] * self.head_flops(seq_len) + s["num_kv_heads"] * self.kv_flops(seq_len),
            "ffn": s["intermediate_size"] * self.neuron_flops(seq_len),
        }

    def total(self, sizes: Iterable[Mapping[str, int]], seq_len: int | None = None) -> dict[str, int]:
        """Sum over layers: FLOPs when ``seq_len`` is given, prunable parameters otherwise."""
        out = {"attention": 0, "ffn": 0}
        for s in sizes:
            c = self.layer_flops(s, seq_len) if seq_len is not None else self.layer_params(s)
            out["attention"] += c["attention"]
            out["ffn"] += c["ffn"]
        out["total"] = out["attention"] + out["ffn"]
        return out


def model_layer_sizes(model: nn.Module) -> list[dict[str, int]]:
    """Kept sizes of every layer, read off the weights."""
    adapter = get_adapter(model)
    head_dim = model_dims(model)["head_dim"]
    return [current_layer_sizes(layer, adapter, head_dim) for layer in layer_list(model, adapter)]


def count_params(model: nn.Module) -> int:
    """All parameters of the model (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def count_flops(model: nn.Module, seq_len: int = 128) -> dict[str, int]:
    """Layer FLOPs for one sequence of ``seq_len`` tokens: ``{"attention", "ffn", "total"}``."""
    return CostModel.for_model(model).total(model_layer_sizes(model), seq_len)


def plan_flops(plan: "PrunePlan", model: nn.Module, seq_len: int = 128) -> dict[str, int]:
    """FLOPs the model will have once ``plan`` is applied (analytic, from the plan alone; a registered unit kind
    inside the layers' projections adds its own, :func:`hf_prune.unit_kinds.units_flops`)."""
    out = CostModel.for_model(model).with_hidden(plan.hidden_channels).total(plan.layer_sizes(), seq_len)
    extra = units_flops(model, plan.units, plan.hidden_channels, seq_len)
    return {**out, "total": out["total"] + extra} if extra else out


def fixed_params(model: nn.Module, hidden: int | None = None) -> tuple[int, int]:
    """Parameters no head or neuron owns (embeddings, norms, output biases, pooler and task head), in the whole model
    and in one of its layers (the same in every layer), at residual width ``hidden`` (default: the width it has):
    what a plan keeps besides its units, and what removing a layer saves beyond its heads and neurons."""
    adapter = get_adapter(model)
    now = hidden_width(model, adapter)
    hidden = now if hidden is None else int(hidden)
    slots = hidden_slots(model, adapter) if hidden != now else {}
    owned = {f"{p}.weight" for p in (adapter.q, adapter.k, adapter.v, adapter.o, adapter.up, adapter.down,
                                     adapter.gate) if p}
    owned |= {f"{p}.bias" for p in (adapter.q, adapter.k, adapter.v, adapter.up, adapter.gate) if p}
    layers = layer_list(model, adapter)
    inside = {id(p): n for layer in layers for n, p in layer.named_parameters()}  # name inside its layer
    layer0 = {id(p) for p in layers[0].parameters()}
    total = one_layer = 0
    for name, param in model.named_parameters():
        if inside.get(id(param)) in owned:
            continue
        n = param.numel()
        for d in slots.get(name, ()):
            n = n // param.shape[d] * hidden
        total += n
        one_layer += n if id(param) in layer0 else 0
    return total, one_layer


def layer_fixed_params(model: nn.Module) -> int:
    """Parameters of one layer that width pruning cannot remove (norms, output biases): what removing a whole layer
    saves beyond its heads and neurons. The same in every layer (none of them depends on the kept widths)."""
    return fixed_params(model)[1]


def plan_params(plan: "PrunePlan", model: nn.Module) -> int:
    """Total parameter count the model will have once ``plan`` is applied (analytic)."""
    cost = CostModel.for_model(model).with_hidden(plan.hidden_channels)
    fixed, per_layer = fixed_params(model, plan.hidden_channels)
    kept = set(plan.kept_layers)
    removed = sum(i not in kept for i in PrunePlan.of(model).kept_layers)
    units = units_params(model, plan.units, plan.hidden_channels)  # registered kinds, from what the model has now
    return fixed + cost.total(plan.layer_sizes())["total"] - removed * per_layer + units


# ----------------------------------------------------------------------------------------------- latency


def dummy_inputs(model: nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the right kind for ``model`` (token ids, or pixels for vision models)."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    config = model.config
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = config.image_size
        pixels = torch.randn(batch_size, config.num_channels, size, size, generator=g)
        return {"pixel_values": pixels.to(device, next(model.parameters()).dtype)}
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


@dataclass
class Latency:
    """Wall time of one forward pass, in milliseconds, over ``repeats`` timed runs."""

    median_ms: float
    mean_ms: float
    min_ms: float
    times_ms: list[float]


def time_once(model: nn.Module, inputs: Mapping[str, Any]) -> float:
    start = time.perf_counter()
    model(**inputs)
    _sync(model)
    return (time.perf_counter() - start) * 1000.0


def _summarise(times: list[float]) -> Latency:
    return Latency(statistics.median(times), statistics.fmean(times), min(times), times)


@torch.inference_mode()
def compare_latency(
    models: Mapping[str, nn.Module],
    batch_size: int = 1,
    seq_len: int = 128,
    *,
    warmup: int = 2,
    repeats: int = 10,
    inputs: Mapping[str, Any] | None = None,
) -> dict[str, Latency]:
    """Time several models on the same inputs, interleaved run by run so machine noise hits all alike."""
    first = next(iter(models.values()))
    inputs = inputs or dummy_inputs(first, batch_size, seq_len)
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        for _ in range(warmup):
            for m in models.values():
                time_once(m, inputs)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(repeats):
            for name, m in models.items():
                times[name].append(time_once(m, inputs))
    finally:
        for name, m in models.items():
            m.train(modes[name])
    return {name: _summarise(t) for name, t in times.items()}


def benchmark_latency(
    model: nn.Module, batch_size: int = 1, seq_len: int = 128, *, warmup: int = 2, repeats: int = 10
) -> Latency:
    """Median forward latency of ``model`` on random inputs of ``batch_size`` x ``seq_len``."""
    return compare_latency({"model": model}, batch_size, seq_len, warmup=warmup, repeats=repeats)["model"]


# ------------------------------------------------------------------------------------------------ decoding


@dataclass
class DecodeLatency:
    """A causal LM's generation speed: the prompt's forward pass (prefill) and each further token with the KV cache
    (decode), medians over repeats, in milliseconds."""

    prefill_ms: float
    decode_ms_per_token: float
    prompt_len: int
    new_tokens: int
    batch_size: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch_size * self.prompt_len / (self.prefill_ms / 1000.0)


def _sync(model: nn.Module) -> None:
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def _cache_argument(model: nn.Module) -> str:
    """The name ``model.forward`` takes the KV cache by: ``cache`` from transformers 5.2x on, ``past_key_values``
    before (the old name still works there, with a deprecation warning on every call)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _decode_once(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """One greedy generation by hand (no ``generate`` bookkeeping in the timing): prefill ms, decode ms/token."""
    name = _cache_argument(model)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    _sync(model)
    prefill = (time.perf_counter() - start) * 1000.0
    cache, token = getattr(out, name), out.logits[:, -1:].argmax(-1)  # (B, 1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        cache, token = getattr(out, name), out.logits[:, -1:].argmax(-1)
    _sync(model)
    return prefill, (time.perf_counter() - start) * 1000.0 / max(1, new_tokens)


@torch.inference_mode()
def compare_decode(
    models: Mapping[str, nn.Module], *, prompt_len: int = 128, new_tokens: int = 32, batch_size: int = 1,
    warmup: int = 1, repeats: int = 5, seed: int = 0,
) -> dict[str, DecodeLatency]:
    """Prefill and per-token decode latency of causal LMs on the same random prompt, interleaved run by run (so
    machine noise hits all alike); each token is decoded with the KV cache, as serving does."""
    first = next(iter(models.values()))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, first.config.vocab_size, (batch_size, prompt_len), generator=g)
    modes = {name: m.training for name, m in models.items()}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    try:
        for m in models.values():
            m.eval()
        for r in range(warmup + repeats):
            for name, m in models.items():
                timing = _decode_once(m, ids.to(next(m.parameters()).device), new_tokens)
                if r >= warmup:
                    runs[name].append(timing)
    finally:
        for name, m in models.items():
            m.train(modes[name])
    return {name: DecodeLatency(statistics.median(p for p, _ in t), statistics.median(d for _, d in t), prompt_len,
                                new_tokens, batch_size) for name, t in runs.items()}

"""Torch-Pruning (``pip install torch-pruning``, tested with 1.6.1) as a baseline: whole attention heads and FFN
neurons of a Hugging Face BERT-style encoder, cut to a given fraction of the hf_prune layer FLOPs.

How TP is driven (its HF BERT example, ``examples/transformers/prune_hf_bert.py``, adapted):

* ``tp.pruner.MetaPruner`` with ``num_heads={q, k, v: heads}``, ``prune_num_heads=True``,
  ``prune_head_dims=False`` (whole heads go; the head size stays), ``head_pruning_ratio`` for heads and
  ``pruning_ratio`` for the FFN width. The word embeddings, pooler and classifier are ``ignored_layers``: that
  makes the residual-stream group (embeddings, LayerNorms, every output projection) unprunable, so only the
  per-layer attention groups (Q/K/V rows + O columns) and FFN groups (up rows + down columns) are cut.
* Budget: hf_prune's cost model counts a head (Q/K/V rows, O columns, attention products) and an FFN neuron at
  fixed FLOPs, so the counts that meet a FLOPs target are known in closed form: heads removed =
  round((1 - keep) * heads) (TP's usual same-ratio-for-everything setting), FFN neurons removed = the fewest
  that bring the FLOPs under the target. ``local`` scope (uniform per layer, TP's ``global_pruning=False``):
  the ratios that make TP remove exactly those counts are set directly. ``global`` scope
  (``global_pruning=True``): TP ranks FFN channels together with (unpruned) attention channels, so the FFN
  ratio is found by bisection over dry runs (``pruner.step(interactive=True)`` without ``prune()``).
  Either way the result is checked with ``hf_prune.count_flops``.
* transformers 5's ``BertSelfAttention.forward`` reshapes with ``(-1, attention_head_size)``, so a model with
  fewer heads already runs; the module attributes (``num_attention_heads``, ``all_head_size``) are still set
  from the new shapes, as TP's example does.

:func:`kept_units` reads back which heads/neurons TP kept (by matching weight rows with the dense model), so a
TP-pruned model can be compared with the dense model under hf_prune masks (:func:`max_diff_vs_masked`).

Decoders (Llama family, :func:`tp_prune_decoder`): TP's LLM example (``examples/LLMs/prune_llm.py``) - local
pruning (``global_pruning=False``), ``num_heads`` of Q = query heads and of K/V = KV heads (TP's own GQA handling:
it removes query heads and keeps every KV head), whole heads (``prune_head_dims=False``), the module attributes set
from the new shapes afterwards as the example does. Two changes, both said where they are made: the hidden size
stays (embeddings and ``lm_head`` are ``ignored_layers``; the example also narrows the residual stream, a unit
hf_prune does not cut, so FLOPs could not be matched), and one patch for transformers 5 (:func:`_rope_as_scale`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

import hf_prune as hp
from hf_prune.adapters import get_adapter, model_dims
from hf_prune.costs import dummy_inputs
from hf_prune.masks import LayerMasks, mask_hooks
from hf_prune.shapes import get_module, layer_list


def _tp():
    try:
        import torch_pruning
    except ImportError as e:
        raise ImportError("the Torch-Pruning baseline needs torch-pruning: pip install torch-pruning==1.6.1") from e
    return torch_pruning


def _linears(model: nn.Module) -> list[dict[str, nn.Linear]]:
    """Per layer: the q/k/v/o/up/down linears (hf_prune's adapter knows where they are)."""
    a = get_adapter(model)
    return [{k: get_module(layer, getattr(a, k)) for k in ("q", "k", "v", "o", "up", "down")}
            for layer in layer_list(model, a)]


def target_counts(model: nn.Module, flops_keep: float, scope: str, seq_len: int = 128) -> dict[str, Any]:
    """Heads and FFN neurons to remove (per layer for ``local``, in total for ``global``) for ``flops_keep``."""
    d = model_dims(model)
    cost = hp.CostModel.for_model(model)
    c_head = cost.head_flops(seq_len) + cost.kv_flops(seq_len)  # no GQA in BERT: one KV head per query head
    c_neuron = cost.neuron_flops(seq_len)
    n = d["num_layers"] if scope == "global" else 1
    heads, neurons = n * d["num_heads"], n * d["intermediate_size"]
    budget = flops_keep * (heads * c_head + neurons * c_neuron)
    heads_rm = min(heads - n, round((1 - flops_keep) * heads))  # keep >= 1 head per layer (on average)
    neurons_keep = math.floor((budget - (heads - heads_rm) * c_head) / c_neuron)
    neurons_keep = max(n, min(neurons, neurons_keep))
    return {"heads_removed": heads_rm, "neurons_removed": neurons - neurons_keep, "heads": heads, "neurons": neurons}


def _pruner(model: nn.Module, example: Mapping[str, torch.Tensor], importance: Any, scope: str,
            head_ratio: float, ffn_ratio: float) -> Any:
    tp = _tp()
    d = model_dims(model)  # under GQA, K/V have fewer heads than Q (TP's LLM example); equal otherwise
    num_heads = {lin[k]: d["num_heads"] if k == "q" else d["num_kv_heads"] for lin in _linears(model) for k in "qkv"}
    # embeddings and the linears outside the layers (pooler, classifier, lm_head) stay: the hidden size is kept
    ignored = [m for m in (model.get_input_embeddings(), *_head_modules(model)) if m is not None]
    return tp.pruner.MetaPruner(
        model, dict(example), importance=importance, global_pruning=scope == "global",
        pruning_ratio=ffn_ratio, num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=head_ratio, ignored_layers=ignored,
        # the logits themselves (a headless encoder: its token states), not a scalar of them: TP reads the width
        # of the graph's output node as shape[1], and a 0-d output fails MetaPruner's constructor (IndexError,
        # torch 2.13 + TP 1.6.0)
        output_transform=lambda out: out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state,
    )


def _head_modules(model: nn.Module) -> list[nn.Module]:
    """Linears outside the encoder layers (pooler, classifier): never pruned."""
    inside = {id(m) for lin in _linears(model) for m in lin.values()}
    a = get_adapter(model)
    layer_ids = {id(m) for layer in layer_list(model, a) for m in layer.modules()}
    return [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in inside and id(m) not in layer_ids]


def _ratio_for(count: int, total: int) -> float:
    """A ratio that makes TP remove exactly ``count`` of ``total`` (TP: ``total - int(total * (1 - r))`` for
    widths, ``ceil(r * total)`` for local heads; the half-unit offset keeps float error off the boundary)."""
    return 0.0 if count <= 0 else (count - 0.5) / total


def _dry_ffn_removed(model: nn.Module, example: Mapping[str, torch.Tensor], importance: Any, scope: str,
                     head_ratio: float, ffn_ratio: float) -> int:
    ups = {id(lin["up"]) for lin in _linears(model)}
    pruner = _pruner(model, example, importance, scope, head_ratio, ffn_ratio)
    return sum(len(g[0][1]) for g in pruner.step(interactive=True) if id(g[0][0].target.module) in ups)


def tp_prune(
    model: nn.Module,
    flops_keep: float,
    importance: str,
    calib: Iterable[Mapping[str, torch.Tensor]] | None = None,
    *,
    scope: str = "local",
    seq_len: int = 128,
    loss_fn: Any = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune ``model`` in place with Torch-Pruning to ``flops_keep`` of its layer FLOPs.

    Args:
        importance: ``taylor`` (|w * dL/dw|, gradients of the task loss summed over ``calib``) or ``magnitude``
            (L2 norm of the weights).
        calib: labelled batches, for ``taylor``.
        scope: ``local`` (same counts in every layer) or ``global`` (TP ranks units across layers).
        loss_fn: ``(model, batch) -> loss`` whose gradients Taylor reads (default: the model's own task loss); an
            embedding model passes the objective hf_prune scores it with.
    Returns:
        the model and what was set (ratios, counts).
    """
    tp = _tp()
    t0 = time.perf_counter()
    if importance == "taylor":
        if calib is None:
            raise ValueError("Taylor importance needs calibration batches")
        model.eval().zero_grad(set_to_none=True)
        example = None
        for batch in calib:
            (loss_fn(model, batch) if loss_fn is not None else model(**batch).loss).backward()
            example = example or {k: v[:2] for k, v in batch.items() if k != "labels"}
        imp = tp.importance.TaylorImportance()
    elif importance == "magnitude":
        imp = tp.importance.MagnitudeImportance(p=2)
        example = None
    else:
        raise ValueError(f"unknown TP importance {importance!r}")
    if example is None:
        example = dummy_inputs(model, 2, 16)
    model.eval()
    t1 = time.perf_counter()
    want = target_counts(model, flops_keep, scope, seq_len)
    head_ratio = _ratio_for(want["heads_removed"], want["heads"])
    if scope == "local":
        ffn_ratio = _ratio_for(want["neurons_removed"], want["neurons"])
    elif scope == "global":  # bisection: the smallest ratio whose dry run removes at least the wanted FFN neurons
        lo, hi = 0.0, 0.999
        for _ in range(16):  # resolution 1.5e-5, below one FFN channel in 1e4
            mid = (lo + hi) / 2
            removed = _dry_ffn_removed(model, example, imp, scope, head_ratio, mid)
            if removed == want["neurons_removed"]:
                hi = mid
                break
            if removed > want["neurons_removed"]:
                hi = mid
            else:
                lo = mid
        ffn_ratio = hi
    else:
        raise ValueError(f"scope must be 'local' or 'global', not {scope!r}")
    t2 = time.perf_counter()
    pruner = _pruner(model, example, imp, scope, head_ratio, ffn_ratio)
    for group in pruner.step(interactive=True):
        group.prune()
    fix_attention_attrs_(model)
    model.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return model, {"scope": scope, "importance": importance, "head_pruning_ratio": head_ratio,
                   "pruning_ratio": ffn_ratio, "target": want,
                   "times": {"gradients_s": t1 - t0, "ratio_search_s": t2 - t1, "tp_prune_s": t3 - t2}}


def fix_attention_attrs_(model: nn.Module) -> None:
    """Set the head counts BERT-style attention modules keep as attributes from the pruned Q shapes."""
    head_dim = model_dims(model)["head_dim"]
    for module in model.modules():
        q = getattr(module, "query", None)
        if isinstance(q, nn.Linear) and hasattr(module, "num_attention_heads"):
            module.num_attention_heads = q.out_features // head_dim
            module.attention_head_size = head_dim
            module.all_head_size = q.out_features


def kept_units(pruned: nn.Module, dense: nn.Module) -> hp.PrunePlan:
    """The plan (ids of the dense model) of the heads and neurons ``pruned`` kept, found by matching weights."""
    d = model_dims(dense)
    hd = d["head_dim"]
    heads, neurons = [], []
    for lp, ld in zip(_linears(pruned), _linears(dense)):
        dq = ld["q"].weight.detach().view(d["num_heads"], hd, -1)
        pq = lp["q"].weight.detach().view(-1, hd, dq.shape[-1])
        heads.append([next(i for i in range(len(dq)) if torch.equal(dq[i], block)) for block in pq])
        rows = {row.numpy().tobytes(): i for i, row in enumerate(ld["up"].weight.detach())}
        neurons.append([rows[row.numpy().tobytes()] for row in lp["up"].weight.detach()])
    return dataclasses.replace(hp.PrunePlan.dense(dense), heads=heads, neurons=neurons,
                               meta={"source": "torch-pruning"})


@torch.inference_mode()
def max_diff_vs_masked(pruned: nn.Module, dense: nn.Module, plan: hp.PrunePlan,
                       batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Largest |logit difference| between ``pruned`` and ``dense`` with the units ``plan`` drops masked to 0."""
    d = model_dims(dense)
    masks = LayerMasks(plan.num_layers)
    for i in range(plan.num_layers):
        masks.heads[i] = torch.zeros(d["num_heads"]).index_fill_(0, torch.tensor(plan.heads[i]), 1.0)
        masks.neurons[i] = torch.zeros(d["intermediate_size"]).index_fill_(0, torch.tensor(plan.neurons[i]), 1.0)
    pruned.eval()
    dense.eval()
    worst = 0.0
    for b in batches:
        feats = {k: v for k, v in b.items() if k != "labels"}
        with mask_hooks(dense, masks):
            ref = dense(**feats).logits
        worst = max(worst, float((pruned(**feats).logits - ref).abs().max()))
    return worst


@torch.inference_mode()
def max_diff_vs_replay(pruned: nn.Module, dense: nn.Module, plan: hp.PrunePlan,
                       batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Largest |logit difference| between ``pruned`` and hf_prune's surgery of ``plan`` on a copy of ``dense``."""
    replay = hp.apply_plan_(copy.deepcopy(dense), plan).eval()
    pruned.eval()
    worst = 0.0
    for b in batches:
        feats = {k: v for k, v in b.items() if k != "labels"}
        worst = max(worst, float((pruned(**feats).logits - replay(**feats).logits).abs().max()))
    return worst


# --------------------------------------------------------------------------------------------------- decoders


@contextlib.contextmanager
def _rope_as_scale(model: nn.Module):
    """While TP traces its dependency graph: RoPE as a per-channel product with ``cos``, eager attention.

    Why: TP follows ``rotate_half`` (slice, negate, cat) as channel index maps that never converge on transformers
    5's Llama: the K projection's group grew past 2,000 dependencies on a one-layer SmolLM2 and building the pruner
    for the whole model had not finished after 10 minutes. Whole heads go (``prune_head_dims=False``) and the
    rotation mixes channels only inside a head, so the product couples the same channels for head pruning. Only the
    trace sees it: the real RoPE and attention are back before any importance or output is computed.
    """
    module = sys.modules[type(model).__module__]
    real, attn = module.apply_rotary_pos_emb, model.config._attn_implementation

    def as_scale(q, k, cos, sin, unsqueeze_dim=1):
        cos = cos.unsqueeze(unsqueeze_dim)
        return q * cos, k * cos

    module.apply_rotary_pos_emb = as_scale
    model.set_attn_implementation("eager")  # repeat_kv as tensor ops TP can follow (SDPA's enable_gqa hides it)
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = real
        model.set_attn_implementation(attn)


def decoder_counts(model: nn.Module, flops_keep: float, seq_len: int = 128,
                   heads_removed: int | None = None) -> dict[str, Any]:
    """Query heads and FFN neurons per layer TP removes for ``flops_keep`` of the layer FLOPs: heads at TP's
    same-ratio-for-everything, rounded to a multiple of the KV heads (each KV head keeps as many query heads;
    TP's example says its ratio must be such a multiple for the model to reload), FFN the fewest that meet it."""
    d = model_dims(model)
    cost = hp.CostModel.for_model(model)
    c_head, c_kv, c_neuron = cost.head_flops(seq_len), cost.kv_flops(seq_len), cost.neuron_flops(seq_len)
    h, kv, f = d["num_heads"], d["num_kv_heads"], d["intermediate_size"]
    budget = flops_keep * (h * c_head + kv * c_kv + f * c_neuron)
    heads_rm = min(h - kv, kv * round((1 - flops_keep) * h / kv)) if heads_removed is None else heads_removed
    neurons_keep = math.floor((budget - (h - heads_rm) * c_head - kv * c_kv) / c_neuron)
    neurons_rm = f - max(1, min(f, neurons_keep))
    return {"heads_removed": heads_rm, "neurons_removed": neurons_rm, "heads": h, "neurons": f,
            "head_ratio": _ratio_for(heads_rm, h), "ffn_ratio": _ratio_for(neurons_rm, f)}


def tp_prune_decoder(model: nn.Module, flops_keep: float, importance: str,
                     calib: Iterable[Mapping[str, torch.Tensor]] | None = None, *,
                     seq_len: int = 128) -> tuple[nn.Module, dict[str, Any]]:
    """Prune a Llama-family causal LM in place with TP's LLM recipe to ``flops_keep`` of its layer FLOPs.

    Args:
        importance: ``taylor`` (TP's ``TaylorImportance``: |w * dL/dw| with gradients of the LM loss summed over
            ``calib``, LLM-Pruner's criterion) or ``magnitude`` (``GroupMagnitudeImportance(p=2,
            group_reduction="mean")``, the example's).
    """
    tp = _tp()
    t0 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    if importance == "taylor":
        if calib is None:
            raise ValueError("Taylor importance needs calibration batches")
        model.eval()
        for batch in calib:
            model(**batch).loss.backward()
        imp = tp.importance.TaylorImportance()
    elif importance == "magnitude":
        imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    else:
        raise ValueError(f"unknown TP importance {importance!r}")
    t1 = time.perf_counter()
    want = decoder_counts(model, flops_keep, seq_len)
    removed = _heads_removed(_decoder_pruner(model, imp, want), model)  # a dry run (a pruner steps once)
    if removed != want["heads_removed"]:
        # TP removes no query head of a model with one KV head (Gemma-3-270M): spend the budget on the FFN instead
        want = decoder_counts(model, flops_keep, seq_len, heads_removed=removed)
    for group in _decoder_pruner(model, imp, want).step(interactive=True):
        group.prune()
    for layer, lin in zip(layer_list(model, get_adapter(model)), _linears(model)):  # as TP's example, from the new shapes
        layer.self_attn.num_key_value_groups = lin["q"].out_features // lin["k"].out_features
    model.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    return model, {"importance": importance, "head_pruning_ratio": want["head_ratio"],
                   "pruning_ratio": want["ffn_ratio"], "target": want,
                   "times": {"gradients_s": t1 - t0, "tp_prune_s": t2 - t1}}


def _decoder_pruner(model: nn.Module, imp: Any, want: dict[str, Any]) -> Any:
    with _rope_as_scale(model):
        return _pruner(model, dummy_inputs(model, 1, 8), imp, "local", want["head_ratio"], want["ffn_ratio"])


def _heads_removed(pruner: Any, model: nn.Module) -> int:
    """Query heads per layer the pruner would remove (a dry run of its groups, read off the first Q projection)."""
    q = _linears(model)[0]["q"]
    head_dim = model_dims(model)["head_dim"]
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            if dep.target.module is q and dep.handler.__name__.endswith("out_channels"):
                return len(idxs) // head_dim
    return 0


# ------------------------------------------------------------------------------------ decoders, hidden channels too


def _uniform_counts(model: nn.Module, ratio: float) -> dict[str, int]:
    """What TP's local pruning at ``ratio`` removes per layer (``total - int(total * (1 - r))`` for widths; query heads
    rounded to a multiple of the KV heads, as its example requires) and the hidden channels."""
    d = model_dims(model)
    h, kv = d["num_heads"], d["num_kv_heads"]
    return {"heads_removed": min(h - kv, kv * round(ratio * h / kv)),
            "neurons_removed": d["intermediate_size"] - int(d["intermediate_size"] * (1 - ratio)),
            "hidden_removed": d["hidden_size"] - int(d["hidden_size"] * (1 - ratio))}


def _uniform_plan(model: nn.Module, counts: dict[str, int]) -> hp.PrunePlan:
    """A plan of TP's uniform shape (which units does not matter for its cost)."""
    d, dense = model_dims(model), hp.PrunePlan.dense(model)
    group = d["num_heads"] // d["num_kv_heads"]
    per_kv = (d["num_heads"] - counts["heads_removed"]) // d["num_kv_heads"]
    heads = [k * group + j for k in range(d["num_kv_heads"]) for j in range(per_kv)]
    return dataclasses.replace(dense, heads=[heads] * dense.num_layers,
                               neurons=[list(range(d["intermediate_size"] - counts["neurons_removed"]))] * dense.num_layers,
                               hidden=list(range(d["hidden_size"] - counts["hidden_removed"])))


def ratio_for_params(model: nn.Module, target_params: int) -> float:
    """The smallest TP ratio (one for heads, FFN and hidden channels, as its LLM example) whose uniform cut has at
    most ``target_params`` parameters (embeddings included), by bisection on hf_prune's analytic count."""
    lo, hi = 0.0, 0.95
    for _ in range(30):
        mid = (lo + hi) / 2
        if hp.plan_params(_uniform_plan(model, _uniform_counts(model, mid)), model) <= target_params:
            hi = mid
        else:
            lo = mid
    return hi


def tp_prune_decoder_hidden(model: nn.Module, target_params: int, calib: Iterable[Mapping[str, torch.Tensor]]
                            ) -> tuple[nn.Module, dict[str, Any]]:
    """Torch-Pruning's LLM example with hidden channels: one ratio for query heads, FFN neurons and the hidden size
    (embeddings, norms and ``lm_head``'s input pruned through TP's dependency graph; ``lm_head``'s outputs ignored),
    Taylor importance (|w * dL/dw| of the LM loss on ``calib``), the ratio chosen for ``target_params``. A tied
    output layer is sliced by TP as its own module and tied again afterwards (checked equal)."""
    tp = _tp()
    t0 = time.perf_counter()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.eval().zero_grad(set_to_none=True)
    for batch in calib:
        model(**batch).loss.backward()
    t1 = time.perf_counter()
    ratio = ratio_for_params(model, target_params)
    counts = _uniform_counts(model, ratio)
    d = model_dims(model)
    num_heads = {lin[k]: d["num_heads"] if k == "q" else d["num_kv_heads"] for lin in _linears(model) for k in "qkv"}
    with _rope_as_scale(model):
        pruner = tp.pruner.MetaPruner(
            model, dict(dummy_inputs(model, 1, 8)), importance=tp.importance.TaylorImportance(), global_pruning=False,
            pruning_ratio=_ratio_for(counts["neurons_removed"], d["intermediate_size"]), num_heads=num_heads,
            prune_num_heads=True, prune_head_dims=False,
            head_pruning_ratio=_ratio_for(counts["heads_removed"], d["num_heads"]),
            ignored_layers=[model.get_output_embeddings()], output_transform=lambda out: out.logits)
    for group in pruner.step(interactive=True):
        group.prune()
    for layer, lin in zip(layer_list(model, get_adapter(model)), _linears(model)):
        layer.self_attn.num_key_value_groups = lin["q"].out_features // lin["k"].out_features
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if tied and out.weight is not emb.weight:
        if not torch.equal(out.weight, emb.weight):
            raise RuntimeError("TP sliced the tied embedding and lm_head differently")
        out.weight = emb.weight
    model.zero_grad(set_to_none=True)
    return model, {"importance": "taylor", "ratio": ratio, "counts": counts,
                   "hidden": emb.weight.shape[1],
                   "times": {"gradients_s": t1 - t0, "tp_prune_s": time.perf_counter() - t1}}


def kept_units_hidden(pruned: nn.Module, dense: nn.Module) -> hp.PrunePlan:
    """The plan (dense ids) of the hidden channels, heads and neurons ``pruned`` kept, found by matching weights."""
    de, pe = dense.get_input_embeddings().weight.detach(), pruned.get_input_embeddings().weight.detach()
    cols = {de[:, c].numpy().tobytes(): c for c in range(de.shape[1])}
    hidden = [cols[pe[:, c].numpy().tobytes()] for c in range(pe.shape[1])]
    d, hd = model_dims(dense), model_dims(dense)["head_dim"]
    heads, neurons = [], []
    for lp, ld in zip(_linears(pruned), _linears(dense)):
        dq = ld["q"].weight.detach()[:, hidden].reshape(d["num_heads"], hd, -1)
        pq = lp["q"].weight.detach().reshape(-1, hd, len(hidden))
        heads.append([next(i for i in range(len(dq)) if torch.equal(dq[i], block)) for block in pq])
        rows = {row.numpy().tobytes(): i for i, row in enumerate(ld["up"].weight.detach()[:, hidden])}
        neurons.append([rows[row.numpy().tobytes()] for row in lp["up"].weight.detach()])
    return dataclasses.replace(hp.PrunePlan.dense(dense), heads=heads, neurons=neurons, hidden=hidden,
                               meta={"source": "torch-pruning"})

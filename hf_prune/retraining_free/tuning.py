"""Stage 4: mask tuning: layer by layer least squares that make each cut layer reconstruct the dense one, and
:func:`fold_tuning_`, which writes the fit into the kept weights."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adapters import get_adapter, model_dims
from ..batches import Batch
from ..gradients import real_copy
from ..masks import LayerMasks
from ..plan import PrunePlan
from ..selection import masked_candidate
from ..shapes import get_module, layer_list, prune_layer_
from .layer_io import LayerInput, capture_projections, layer_inputs, read_positions, real_tokens, run_layer, run_until
from .obs import NormalEquations, choose_heads, choose_neurons, with_bias
from .refit import refit_, solve_scales

M = TypeVar("M", bound=nn.Module)
#: What mask tuning fits per layer (``PruningConfig.tuning_fit``; :func:`tune_masks`).
TUNING_FITS = ("weights", "scales")


@dataclass
class MaskTuning:
    """What :func:`tune_masks` fitted (positions in the layers as they are now).

    Args:
        heads: per layer, ``(H_l,)`` scale of each head (0 = removed). With ``fit="weights"`` the kept ones
            are 1: the refitted weights carry the fit.
        neurons: per layer, ``(I_l,)`` scale of each neuron (0 = removed), likewise.
        errors: per layer, mean squared reconstruction error per token of the attention and FFN residual sums
            with the plain 0/1 mask (``*_before``) and after the fit (``*_after``).
        fit: ``"scales"`` or ``"weights"``.
        weights: ``fit="weights"`` only: per layer, the refitted output projections at their kept size:
            ``o_weight`` ``(D, k_h * d)``, ``down_weight`` ``(D, k_n)``, ``o_bias``/``down_bias`` ``(D,)`` where
            the layer has biases, and the kept positions ``heads``/``neurons`` they belong to.
    """

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    errors: list[dict[str, float]] = field(default_factory=list)
    fit: str = "scales"
    weights: list[dict[str, Any]] = field(default_factory=list)

    def layer_masks(self) -> LayerMasks:
        """Scaled masks for :func:`hf_prune.mask_hooks`: under them the unfolded model computes what the folded,
        cut model computes. ``fit="scales"`` only: a weights fit is not a mask (fold it with
        :func:`fold_tuning_`, then the plan's 0/1 masks give the cut model's outputs)."""
        if self.fit != "scales":
            raise ValueError(f"a fit={self.fit!r} tuning is not expressible as masks: fold it with fold_tuning_")
        masks = LayerMasks(len(self.heads))
        masks.heads, masks.neurons = list(self.heads), list(self.neurons)
        return masks


def tune_masks(
    model: nn.Module,
    batches: Sequence[Batch],
    plan: PrunePlan,
    *,
    fit: str = "weights",
    damping: float | None = None,
    scale_range: tuple[float, float] = (-1.0, 3.0),
    read_positions_only: bool = True,
    reselect: bool = False,
    progress: bool = True,
) -> MaskTuning:
    """Layer by layer, least squares that make the layers cut to ``plan`` reconstruct the dense layers.

    The model is not modified. Two streams of hidden states run through the layers: the dense model's and
    the pruned one's (layers before the current one already cut and tuned, run as cut copies, so the pruned
    passes cost only the kept FLOPs). For layer ``l`` the attention block is fitted so that, over the
    calibration tokens (padding excluded), the residual sum that feeds the next norm, ``x_p + O(ctx_p)`` on the
    pruned input ``x_p``, matches the dense layer's ``x_d + O_d`` on the dense input. Then, with that
    attention, the FFN is fitted the same way on its residual sum. Fitting against the dense stream lets each
    layer also correct the error the layers before it left. What is fitted (``fit``):

    - ``"scales"`` (Kwon et al.): one scale per kept head (``sum_h s_h W_O^h ctx_h``) and per kept neuron,
      folded into the O / down-projection input columns; damped towards 1 and kept in ``scale_range``.
    - ``"weights"``: the whole O and down projections of the cut layer (weights and biases), a ridge fit pulled
      towards the cut weights. Same passes and about the same time; the scales are its diagonal special case
      (how much closer to the dense model it lands is measured in ``benchmarks/results/retraining_free.md``).

    ``damping`` is the ridge strength relative to the mean diagonal of the normal equations (default 0.1 for
    weights, 0.01 for scales: chosen on MiniLM by the dev divergence from the dense model).

    Either way the result folds into an ordinary smaller model (:func:`fold_tuning_`, then
    :func:`hf_prune.apply_plan_`), and each fit never raises its layer's calibration error.

    ``reselect`` (``fit="weights"`` only): keep each layer's counts but re-choose which heads (whole KV groups)
    and neurons stay, by OBS elimination on the same least squares (:mod:`.obs`), before fitting them; the
    result's ``weights`` then name the chosen positions (:func:`reselected_plan` turns them into a plan).

    In the last layer, with ``read_positions_only``, only the positions the model's output reads are fitted
    (the first token of a BERT/ViT classifier; found by autograd, see :func:`read_positions`), as Kwon et al.
    do for classification; a model that reads every token (a base model, token classification) is unaffected.

    Residual of the FFN sum: in pre-norm models (residual stream, detected per layer from the first batch:
    ``out = x + O + down``) it is ``x + O``; otherwise (post-norm BERT-style encoders) it is the FFN input.
    """
    if fit not in TUNING_FITS:
        raise ValueError(f"unknown fit {fit!r}; choose one of {', '.join(TUNING_FITS)}")
    if reselect and fit != "weights":
        raise ValueError("reselect=True needs fit='weights': the scales fit cannot name the units it keeps")
    if damping is None:
        damping = 0.1 if fit == "weights" else 0.01
    adapter = get_adapter(model)
    head_dim = model_dims(model)["head_dim"]
    layers = layer_list(model, adapter)
    current = PrunePlan.of(model)
    keep_h, keep_n = plan.positions_in(current)
    was_training = model.training
    model.eval()
    result = MaskTuning([], [], [], fit=fit)
    try:
        with torch.no_grad():
            all_inputs = layer_inputs(model, layers, batches)
            dense_x = [x.hidden for x in all_inputs]  # per batch (B, T, D)
            pruned_x = list(dense_x)  # the embeddings are not pruned: both streams start equal
            last_read = read_positions(model, layers[-1], batches, all_inputs) if read_positions_only else None
            kept = set(plan.kept_layers)
            for i in tqdm(range(len(layers)), desc="mask tuning", disable=not progress):
                inputs = [x.at(i) for x in all_inputs]
                if i == len(layers) - 1 and last_read is not None:
                    inputs = [x if r is None else replace(x, tokens=r) for x, r in zip(inputs, last_read)]
                targets, pre_norm, dense_x = _dense_targets(layers[i], adapter, inputs, dense_x)
                if current.kept_layers[i] not in kept:
                    # a removed layer: the cut stream skips it, so the next kept layer's fit, whose targets are
                    # the dense stream's, also makes up for what this layer added
                    result.heads.append(torch.zeros(len(current.heads[current.kept_layers[i]])))
                    result.neurons.append(torch.zeros(len(current.neurons[current.kept_layers[i]])))
                    result.errors.append({"removed": 1.0})
                    if fit == "weights":
                        result.weights.append(_removed_weights(layers[i], adapter))
                    continue
                d = current.kept_layers[i]
                kh, kn = keep_h[d], keep_n[d]
                cut = real_copy(layers[i]).eval()  # offloaded weights: this layer's, loaded
                if reselect:  # heads chosen on the whole attention, neurons once it is cut and fitted
                    group = len(current.heads[d]) // max(len(current.kv_heads(d)), 1)  # query heads per KV head
                    kh = choose_heads(cut, adapter, head_dim, inputs, pruned_x, targets, kh, group, damping)
                prune_layer_(cut, adapter, head_dim, kh, None if reselect else kn)
                h_scale, h_err = _tune_heads_(cut, adapter, head_dim, inputs, pruned_x, targets, fit, damping,
                                              scale_range)
                if reselect:
                    kn = choose_neurons(cut, adapter, inputs, pruned_x, targets, pre_norm, len(kn), damping)
                    prune_layer_(cut, adapter, head_dim, None, kn)
                n_scale, n_err = _tune_neurons_(cut, adapter, inputs, pruned_x, targets, pre_norm, fit, damping,
                                                scale_range)
                pruned_x = [run_layer(cut, x, h) for x, h in zip(inputs, pruned_x)]
                result.heads.append(_scatter(h_scale, kh, len(current.heads[d])))
                result.neurons.append(_scatter(n_scale, kn, len(current.neurons[d])))
                result.errors.append({**h_err, **n_err, "pre_norm": float(pre_norm)})
                if fit == "weights":
                    result.weights.append(_output_weights(cut, adapter, kh, kn))
                del cut
    finally:
        model.train(was_training)
    return result


def reselected_plan(plan: PrunePlan, current: PrunePlan, tuning: MaskTuning) -> PrunePlan:
    """``plan`` with each kept layer's heads and neurons replaced by those a ``reselect=True`` tuning chose
    (``current``: the plan of the model it ran on); folding ``tuning`` and cutting to it gives the tuned model."""
    heads, neurons = [list(h) for h in plan.heads], [list(n) for n in plan.neurons]
    for i, w in zip(current.kept_layers, tuning.weights):
        if i in plan.kept_layers:
            heads[i] = [current.heads[i][p] for p in w["heads"]]
            neurons[i] = [current.neurons[i][p] for p in w["neurons"]]
    return replace(plan, heads=heads, neurons=neurons, meta={**plan.meta, "reselected": "obs"})


def _removed_weights(layer: nn.Module, adapter) -> dict[str, Any]:
    """A removed layer's entry of a weights fit: nothing kept (folding zeroes its O and down columns; the layer is
    gated off or cut anyway)."""
    d = get_module(layer, adapter.o).out_features
    return {"heads": [], "neurons": [], "o_weight": torch.zeros(d, 0), "down_weight": torch.zeros(d, 0)}


def _scatter(values: torch.Tensor, positions: list[int], size: int) -> torch.Tensor:
    out = torch.zeros(size)
    out[positions] = values.float().cpu()
    return out


def _scale_columns_(linear: nn.Linear, scale: torch.Tensor) -> None:
    """Multiply input column ``j`` of ``linear`` by ``scale[j]`` (what a mask of ``scale`` does before it)."""
    linear.weight.mul_(scale.to(linear.weight.device, linear.weight.dtype)[None, :])


def _output_weights(cut: nn.Module, adapter, heads: list[int], neurons: list[int]) -> dict[str, Any]:
    """The refitted O and down projections of a cut layer (CPU copies) and the positions they keep."""
    out: dict[str, Any] = {"heads": list(heads), "neurons": list(neurons)}
    for name in ("o", "down"):
        lin = get_module(cut, getattr(adapter, name))
        out[f"{name}_weight"] = lin.weight.detach().cpu().clone()
        if lin.bias is not None:
            out[f"{name}_bias"] = lin.bias.detach().cpu().clone()
    return out


def _dense_targets(
    layer: nn.Module, adapter, inputs: list[LayerInput], dense_x: list[torch.Tensor]
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], bool, list[torch.Tensor]]:
    """Dense residual sums ``(x + O, FFN residual + down)`` over real tokens, per batch ``((N, D), (N, D))``,
    whether the layer is pre-norm, and the dense stream's next hidden states."""
    targets, nxt, pre_norm = [], [], None
    for x, h in zip(inputs, dense_x):
        with capture_projections(layer, adapter, None) as rec:
            out = run_layer(layer, x, h)
        attn_sum = h + rec["o_out"]  # (B, T, D)
        if pre_norm is None:
            stream = attn_sum + rec["down_out"]
            pre_norm = bool(torch.allclose(stream, out, rtol=1e-4, atol=1e-4 * float(out.abs().mean())))
        ffn_res = attn_sum if pre_norm else rec["up_in"]
        targets.append((real_tokens(attn_sum, x.tokens), real_tokens(ffn_res + rec["down_out"], x.tokens)))
        nxt.append(out)
    return targets, bool(pre_norm), nxt


def _tune_heads_(cut, adapter, head_dim, inputs, pruned_x, targets, fit, damping, scale_range):
    """Fit the O projection of ``cut`` (a layer cut to its kept units) in place; returns the head scales
    ``(k,)`` (ones for ``fit="weights"``) and the errors."""
    o = get_module(cut, adapter.o)
    k = o.in_features // head_dim
    W = o.weight.view(o.out_features, k, head_dim)  # (D, k, d)
    bias = o.bias if o.bias is not None else 0.0
    # weights: rows are tokens, unknowns O's input columns (+ bias); scales: rows are (token, output dim)
    # pairs, unknowns one scale per head multiplying that head's output W_O^h ctx_h
    if fit == "weights":
        normal = NormalEquations(o.in_features + (o.bias is not None), o.out_features)
    else:
        normal = NormalEquations(k, 1)
    tokens = 0
    for x, h, (t_attn, _) in zip(inputs, pruned_x, targets):
        ctx = real_tokens(run_until(cut, adapter, x, h, "o")["o_in"], x.tokens)  # (N, k * d)
        r = t_attn - real_tokens(h, x.tokens)  # (N, D) what O (weights and bias) must supply
        tokens += r.shape[0]
        if fit == "weights":
            normal.add(with_bias(ctx, o), r)
        else:
            C = torch.einsum("nkd,Dkd->nDk", ctx.view(ctx.shape[0], k, head_dim), W)  # (N, D, k) per-head outputs
            normal.add(C.reshape(-1, k), (r - bias).reshape(-1, 1))
    if fit == "weights":
        before, after = refit_(o, normal, damping)
        s = torch.ones(k)
    else:
        s, before, after = solve_scales(normal.XtX, normal.XtR[:, 0], normal.rr, damping, scale_range)
        _scale_columns_(o, s.repeat_interleave(head_dim))
    tokens = max(tokens, 1)
    return s, {"attention_before": before / tokens, "attention_after": after / tokens}


def _tune_neurons_(cut, adapter, inputs, pruned_x, targets, pre_norm, fit, damping, scale_range):
    """Fit the down projection of ``cut`` (its attention already fitted) in place; returns the neuron scales
    ``(k,)`` (ones for ``fit="weights"``) and the errors."""
    down = get_module(cut, adapter.down)
    W = down.weight  # (D, k)
    bias = down.bias if down.bias is not None else 0.0
    k = down.in_features
    if fit == "weights":
        normal = NormalEquations(k + (down.bias is not None), down.out_features)
    else:  # scales: the (token, output dim) rows a_nk w_k would be (N * D, k); their normal equations factor
        AtA, rhs, rr = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), 0.0
    tokens = 0
    for x, h, (_, t_ffn) in zip(inputs, pruned_x, targets):
        rec = run_until(cut, adapter, x, h, "down")
        A = real_tokens(rec["down_in"], x.tokens)  # (N, k) activations of the kept neurons
        res = (h + rec["o_out"]) if pre_norm else rec["up_in"]  # (B, T, D) FFN residual
        r = t_ffn - real_tokens(res, x.tokens)  # (N, D) what down (weights and bias) must supply
        tokens += r.shape[0]
        if fit == "weights":
            normal.add(with_bias(A, down), r)
            continue
        r = r - bias
        AtA.add_((A.T @ A).cpu())  # cast as it is added: no float64 copy of the (k, k) product
        rhs += ((r @ W) * A).sum(0).double().cpu()  # sum_n a_nk (w_k . r_n)
        rr += float(r.double().pow(2).sum())
    if fit == "weights":
        before, after = refit_(down, normal, damping)
        s = torch.ones(k)
    else:
        G = (W.T @ W).cpu().double().mul_(AtA)  # (k, k): <a_j w_j, a_k w_k> summed over tokens
        s, before, after = solve_scales(G, rhs, rr, damping, scale_range)
        _scale_columns_(down, s)
    tokens = max(tokens, 1)
    return s, {"ffn_before": before / tokens, "ffn_after": after / tokens}


@torch.no_grad()
def fold_tuning_(model: M, tuning: MaskTuning) -> M:
    """Fold :func:`tune_masks`' fit into ``model``, in place: each head's scale into its O-projection input
    columns and each neuron's into its down-projection input column (``fit="scales"``), or the refitted O and
    down weights and biases into the kept columns, removed columns zeroed (``fit="weights"``). The model then
    computes what the cut model computes, except that removed units still run until
    :func:`hf_prune.apply_plan_` cuts them."""
    adapter = get_adapter(model)
    head_dim = model_dims(model)["head_dim"]
    layers = layer_list(model, adapter)
    _check_structure(tuning, PrunePlan.of(model), len(layers))
    if tuning.fit == "weights":
        for layer, w in zip(layers, tuning.weights):
            cols = _head_columns(w["heads"], head_dim)
            _set_columns_(get_module(layer, adapter.o), cols, w["o_weight"], w.get("o_bias"))
            _set_columns_(get_module(layer, adapter.down), w["neurons"], w["down_weight"], w.get("down_bias"))
        return model
    for layer, hs, ns in zip(layers, tuning.heads, tuning.neurons):
        o = get_module(layer, adapter.o).weight  # (D, H_l * d)
        o.mul_(hs.to(o.device, o.dtype).repeat_interleave(head_dim)[None, :])
        down = get_module(layer, adapter.down).weight  # (D, I_l)
        down.mul_(ns.to(down.device, down.dtype)[None, :])
    return model


def _set_columns_(linear: nn.Linear, cols: list[int], weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    w = linear.weight
    w.zero_()
    w[:, cols] = weight.to(w.device, w.dtype)
    if bias is not None:
        linear.bias.copy_(bias.to(linear.bias.device, linear.bias.dtype))


@contextmanager
def fitted_projections(model: nn.Module, tuning: MaskTuning) -> Iterator[None]:
    """Under it, ``model``'s O and down projections compute a ``fit="weights"`` tuning's refit: each reads only
    its kept input columns, times the refitted weights (plus bias), in place of the projection's own output. The
    model's weights are not changed (the projections still run, and their output is discarded), so a model whose
    weights accelerate offloads (and that cannot be folded or copied) computes, with the plan's masks, what the
    folded, cut model computes (:func:`hf_prune.selection.masked_candidate`)."""
    if tuning.fit != "weights":
        raise ValueError(f"a fit={tuning.fit!r} tuning is a mask: use its layer_masks()")
    adapter = get_adapter(model)
    head_dim = model_dims(model)["head_dim"]
    layers = layer_list(model, adapter)
    _check_structure(tuning, PrunePlan.of(model), len(layers))
    handles = []
    for layer, w in zip(layers, tuning.weights):
        for name, cols in (("o", _head_columns(w["heads"], head_dim)), ("down", w["neurons"])):
            hook = _refit_hook(cols, w[f"{name}_weight"], w.get(f"{name}_bias"))
            # registered before any mask hook, so that hidden-channel masks act on the refit's output
            handles.append(get_module(layer, getattr(adapter, name)).register_forward_hook(hook, prepend=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def masked_stand_in(model: nn.Module, plan: PrunePlan, tuning: MaskTuning | None) -> nn.Module:
    """``model`` itself computing its cut to ``plan`` with ``tuning`` folded in, with no weight written or copied:
    the plan's masks, with a scales fit's scales or a weights fit's refitted projections
    (:func:`fitted_projections`)."""
    if tuning is None or tuning.fit == "scales":
        return masked_candidate(model, plan, None if tuning is None else tuning.layer_masks())
    return masked_candidate(model, plan, patch=functools.partial(fitted_projections, tuning=tuning))


def _refit_hook(cols: list[int], weight: torch.Tensor, bias: torch.Tensor | None):
    index = torch.tensor(cols, dtype=torch.long)

    def hook(_module, args, _output):  # the module's own output is discarded
        x = args[0]  # (..., in): the projection's input, head / neuron masks already applied
        b = None if bias is None else bias.to(x.device, x.dtype)
        return F.linear(x.index_select(-1, index.to(x.device)), weight.to(x.device, x.dtype), b)
    return hook


def _head_columns(heads: list[int], head_dim: int) -> list[int]:
    """The O-projection input columns of ``heads``."""
    return [p * head_dim + j for p in heads for j in range(head_dim)]


def _check_structure(tuning: MaskTuning, current: PrunePlan, num_layers: int) -> None:
    shapes = [(len(h), len(n)) for h, n in zip(current.heads, current.neurons)]
    tuned = [(len(h), len(n)) for h, n in zip(tuning.heads, tuning.neurons)]
    if shapes != tuned or (tuning.fit == "weights" and len(tuning.weights) != num_layers):
        raise ValueError(
            f"the tuning was computed on a model with a different structure (heads, neurons per layer: {tuned}); "
            f"this model has {shapes}. Fold it into the model tune_masks ran on, before apply_plan_ cuts it."
        )

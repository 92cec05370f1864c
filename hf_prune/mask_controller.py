"""``MaskController``: pruning a model that is being trained without reshaping it (what
:class:`hf_prune.PruningCallback` drives): mask hooks, masked weights kept at zero through optimizer steps, and
mask-gradient statistics accumulated from the training steps."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapters import get_adapter, model_dims
from .batches import model_device
from .criteria import get_criterion
from .distributed import all_reduce_sum_
from .importance import ImportanceScores
from .masks import LayerMasks, mask_hooks
from .plan import PrunePlan
from .shapes import get_module, layer_list


class MaskController:
    """Masks, zeroed weights and gradient statistics for one model that is pruned without reshaping.

    Args:
        model: the model being trained (unwrapped).
        criterion: importance criterion for gradient statistics (``fisher`` or ``taylor``).
        hidden: also mask hidden channels (a ``hidden_keep`` budget): the channel mask's hooks are installed with the
            others. Masked channels need no zeroed weights: the mask stops every gradient into them.
    """

    def __init__(self, model: nn.Module, criterion: str = "fisher", hidden: bool = False) -> None:
        self.model = model
        self.criterion = criterion
        self.adapter = get_adapter(model)
        self.dims = model_dims(model)
        self.physical = PrunePlan.of(model)  # what the weights hold now (dense unless pruned before)
        self.plan = self.physical
        self.ids = self.physical.kept_layers  # dense id of each layer the model has
        device = model_device(model)
        self.masks = LayerMasks(len(self.ids))
        for p, i in enumerate(self.ids):
            # leaf tensors: the training backward pass leaves dL/dm in .grad
            self.masks.heads[p] = torch.ones(len(self.physical.heads[i]), device=device, requires_grad=True)
            self.masks.neurons[p] = torch.ones(len(self.physical.neurons[i]), device=device, requires_grad=True)
        if hidden:
            self.masks.hidden = torch.ones(self.physical.hidden_channels, device=device)  # (D,)
        self.acc_heads = [torch.zeros_like(m) for m in self.masks.heads]
        self.acc_neurons = [torch.zeros_like(m) for m in self.masks.neurons]
        self._hooks: Any = None

    # hooks ---------------------------------------------------------------------------------------
    def install(self) -> None:
        if self._hooks is None:
            self._hooks = mask_hooks(self.model, self.masks)
            self._hooks.__enter__()

    def remove(self) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    # plan ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_plan(self, plan: PrunePlan, gate: float = 0.0) -> None:
        """Mask everything ``plan`` does not keep and zero those weights; the layers it removes are gated at
        ``gate`` (0: skipped; their heads and neurons stay, so a layer fading out is the whole layer)."""
        self.plan = plan
        target = LayerMasks.of_plan(plan, self.physical, self.masks.heads[0].device)
        for ours, theirs in ((self.masks.heads, target.heads), (self.masks.neurons, target.neurons)):
            for mask, value in zip(ours, theirs):  # in place: the leaves keep collecting gradients
                if value is None:  # a removed layer keeps its units: its gate removes it whole
                    mask.fill_(1.0)
                else:
                    mask.copy_(value)
        self.masks.layers = [None if g is None else g.fill_(float(gate)) for g in target.layers]
        if target.hidden is not None:
            if self.masks.hidden is None:
                raise ValueError("this plan cuts hidden channels: make the MaskController with hidden=True")
            self.masks.hidden.copy_(target.hidden)
        self._set_unit_masks(target.units)
        self.zero_masked_weights_()

    def _set_unit_masks(self, units: dict[str, torch.Tensor]) -> None:
        """The registered unit kinds' masks (hooked on first use: a kind's hooks are installed when a plan first
        names it)."""
        new = False
        for name, value in units.items():
            if name not in self.masks.units:
                self.masks.units[name] = torch.ones_like(value)
                new = True
            self.masks.units[name].copy_(value)
        if new and self._hooks is not None:
            self.remove()
            self.install()

    @torch.no_grad()
    def set_gate_(self, gate: float) -> None:
        """Move the gates of the layers the plan removes to ``gate`` (a gradual schedule fades them out)."""
        for g in self.masks.layers:
            if g is not None:
                g.fill_(float(gate))

    @torch.no_grad()
    def zero_masked_weights_(self) -> None:
        """Zero Q/K/V rows, O columns, FFN up/gate rows and down columns of masked units (biases too)."""
        a, d = self.adapter, self.dims["head_dim"]
        for p, layer in enumerate(layer_list(self.model, a)):
            hm = self.masks.heads[p]
            if not bool((hm == 0).any()) and not bool((self.masks.neurons[p] == 0).any()):
                continue
            kv = get_module(layer, a.k).out_features // d  # the layer's KV heads as it is now
            q_off = (hm == 0).repeat_interleave(d)  # (H * d,)
            if kv:  # a KV head is off when none of its query heads is left
                kv_off = (hm.view(kv, -1).sum(1) == 0).repeat_interleave(d)  # (KV * d,)
            else:
                kv_off = torch.zeros(0, dtype=torch.bool, device=hm.device)
            n_off = self.masks.neurons[p] == 0  # (I,)
            for path, off, dim in (
                (a.q, q_off, 0), (a.k, kv_off, 0), (a.v, kv_off, 0), (a.o, q_off, 1),
                (a.up, n_off, 0), (a.gate, n_off, 0), (a.down, n_off, 1),
            ):
                if path is None:
                    continue
                lin = get_module(layer, path)
                if dim == 0:
                    lin.weight[off] = 0
                    if lin.bias is not None:
                        lin.bias[off] = 0
                else:
                    lin.weight[:, off] = 0

    # scores --------------------------------------------------------------------------------------
    @torch.no_grad()
    def accumulate_(self) -> None:
        """Add this step's mask gradients to the running Fisher/Taylor statistics, then clear them (a criterion
        that reads no gradients, e.g. ``magnitude``, only has them cleared)."""
        reduce = get_criterion(self.criterion).reduce
        for acc, m in zip(self.acc_heads + self.acc_neurons, self.masks.heads + self.masks.neurons):
            if m.grad is not None:
                if reduce is not None:
                    acc += reduce(m.grad[None])  # one "sample": this step's batch
                m.grad = None

    def gradient_scores(self) -> ImportanceScores:
        """Accumulated statistics as (L, H) / (L, I) scores; summed over processes under DDP."""
        accs = [a.clone() for a in self.acc_heads + self.acc_neurons]
        all_reduce_sum_(accs)
        n = len(self.ids)
        return ImportanceScores.scatter(self.physical, accs[:n], accs[n:], self.criterion)

    def restrict(self, scores: ImportanceScores) -> ImportanceScores:
        """Scores with masked units marked removed (NaN), so a new plan only ever removes more."""
        h, n = scores.heads.clone(), scores.neurons.clone()
        for i in range(self.plan.num_layers):
            keep_h = torch.zeros(h.shape[1], dtype=torch.bool)
            keep_h[self.plan.heads[i]] = True
            keep_n = torch.zeros(n.shape[1], dtype=torch.bool)
            keep_n[self.plan.neurons[i]] = True
            h[i, ~keep_h] = float("nan")
            n[i, ~keep_n] = float("nan")
        layers = hidden = None
        if scores.layers is not None:
            layers = scores.layers.clone()
            layers[[i for i in range(len(layers)) if i not in set(self.plan.kept_layers)]] = float("nan")
        if scores.hidden is not None:
            hidden = torch.full_like(scores.hidden, float("nan"))
            hidden[self.plan.kept_hidden] = scores.hidden[self.plan.kept_hidden]
        return ImportanceScores(h, n, scores.criterion, scores.num_samples, layers, hidden)

    def reset_statistics(self) -> None:
        for a in self.acc_heads + self.acc_neurons:
            a.zero_()

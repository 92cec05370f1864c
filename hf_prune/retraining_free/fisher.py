"""Stage 1: per-layer Fisher blocks of the head and neuron masks (one forward+backward over the calibration set)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import get_adapter, model_dims
from ..batches import Batch, batch_size, model_device, to_device
from ..budget import build_plan
from ..distributed import all_reduce_sum_
from ..importance import ImportanceScores, per_sample_mask_grads
from ..plan import PrunePlan
from ..shapes import get_module, layer_list

if TYPE_CHECKING:
    from ..config import PruningConfig

#: Most masks (heads plus neurons, all layers) a cross-layer Fisher may hold: 20k is 1.5 GiB in float32 (MiniLM has
#: 9,288; SmolLM2-135M 46,350, 8 GiB, refused).
MAX_JOINT_UNITS = 20_000


@dataclass
class FisherInfo:
    """Empirical Fisher of the head and neuron masks, one block per layer (positions in the layer as it is
    now; ids of the dense model via ``current``).

    Args:
        heads: per layer, ``(H_l, H_l)`` sum over samples of ``g g^T``, ``g`` the head-mask gradient, or ``(H_l,)``,
            its diagonal alone (``fisher_information(diagonal=True)``: all the search reads).
        neurons: per layer, ``(I_l, I_l)`` likewise for the FFN neuron masks (or ``(I_l,)``).
        current: the plan the model carried when the Fisher was computed.
        num_samples: calibration samples seen.
        joint: with ``cross_layer=True``, the whole ``(N, N)`` Fisher of all masks, every layer's heads first, then
            every layer's neurons (the blocks above are views into it); None otherwise.
    """

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    current: PrunePlan
    num_samples: int
    joint: torch.Tensor | None = None

    @property
    def diagonal_only(self) -> bool:
        """Whether only the diagonal was kept (no blocks for the rearrangement)."""
        return any(f.dim() == 1 for f in [*self.heads, *self.neurons])

    def scores(self) -> ImportanceScores:
        """The diagonal as ``fisher`` importance scores ``(L, H)`` / ``(L, I)`` in dense ids (NaN = removed)."""
        def diag(f: torch.Tensor) -> torch.Tensor:
            return f if f.dim() == 1 else f.diagonal()

        return ImportanceScores.scatter(self.current, [diag(f) for f in self.heads],
                                        [diag(f) for f in self.neurons], "fisher", self.num_samples)


def fisher_information(
    model: nn.Module, batches: Sequence[Batch], *, seed: int = 0, progress: bool = True, cross_layer: bool = False,
    offload: bool = False, diagonal: bool = False,
) -> FisherInfo:
    """Per-layer Fisher blocks of the head and neuron masks from per-sample mask gradients.

    The loss is the one :func:`hf_prune.compute_importance` uses: the task loss with labels, the model's own
    predicted class (classifiers) or a random output projection (regression / headless) without.
    ``cross_layer=True`` also keeps the terms between layers and between heads and neurons (``FisherInfo.joint``,
    ``N^2`` floats for ``N`` masks in all: 340 MB on MiniLM, see :data:`MAX_JOINT_UNITS`). ``offload``: each
    backward runs one layer at a time (:mod:`hf_prune.gradients`) and the blocks are summed on the CPU.
    ``diagonal=True`` keeps only each block's diagonal, ``(n,)`` per layer: all the mask search reads, without the
    blocks' ``L x I^2`` floats (the pipeline asks for it when the rearrangement, their one reader, is off).
    """
    if diagonal and cross_layer:
        raise ValueError("cross_layer=True keeps the terms between masks; diagonal=True keeps none: choose one")
    adapter = get_adapter(model)
    head_dim = model_dims(model)["head_dim"]
    layers = layer_list(model, adapter)
    device = model_device(model)
    n_heads = [get_module(l, adapter.q).out_features // head_dim for l in layers]
    n_neurons = [get_module(l, adapter.up).out_features for l in layers]
    sizes = n_heads + n_neurons
    # (n, n) per layer: 28 x 8192^2 floats = 7.5 GB for a 3B Llama's neurons; offloaded, they wait on the CPU
    store = torch.device("cpu") if offload else device
    joint = None
    if cross_layer:
        if sum(sizes) > MAX_JOINT_UNITS:
            gib = sum(sizes) ** 2 * 4 / 2**30
            raise ValueError(f"a cross-layer Fisher over {sum(sizes)} masks needs {gib:.1f} GiB (limit "
                             f"{MAX_JOINT_UNITS} masks): use rearrange_scope='layer'")
        joint = torch.zeros(sum(sizes), sum(sizes), device=store)
        ends = torch.tensor(sizes).cumsum(0).tolist()
        blocks = [joint[e - n:e, e - n:e] for n, e in zip(sizes, ends)]  # views: the per-layer blocks
    else:
        blocks = [torch.zeros(*((n,) if diagonal else (n, n)), device=store) for n in sizes]
    f_heads, f_neurons = blocks[:len(n_heads)], blocks[len(n_heads):]
    seen = 0
    was_training = model.training
    model.eval()  # dropout off: the Fisher must not depend on dropout noise
    try:
        for step, raw in enumerate(tqdm(batches, desc="fisher", unit="batch", disable=not progress)):
            batch = to_device(raw, device)
            bsz = batch_size(batch)
            grads = per_sample_mask_grads(model, batch, n_heads, n_neurons, seed + step, offload)
            if joint is not None:
                g = torch.cat([torch.zeros(bsz, n, device=store) if g is None else g.float().to(store)
                               for g, n in zip(grads, sizes)], dim=1)  # (B, N)
                joint += g.T @ g  # (N, N)
            else:
                for acc, g in zip(blocks, grads):
                    if g is not None:
                        g = g.float().to(store)  # (B, n): row s is sample s's gradient
                        acc += g.pow(2).sum(0) if diagonal else g.T @ g  # (n,) or (n, n)
            seen += bsz
    finally:
        model.train(was_training)
    counts = torch.tensor([float(seen)], device=store)
    all_reduce_sum_(([joint] if joint is not None else blocks) + [counts])
    seen = int(counts.item())
    return FisherInfo(f_heads, f_neurons, PrunePlan.of(model), seen, joint)


def search_masks(
    fisher: FisherInfo, model: nn.Module, config: PruningConfig, latency_table: Any = None,
    layer_scores: torch.Tensor | None = None, hidden_scores: torch.Tensor | None = None,
) -> PrunePlan:
    """Stage 2: kept heads and neurons per layer maximising the kept diagonal Fisher under ``config``'s budget
    (:func:`hf_prune.build_plan` on the diagonal Fisher; a ``latency_keep`` budget searches its own way, with
    ``latency_table`` if given). With ``config.layers_keep``, the layers with the lowest ``layer_scores`` (``(L,)``,
    :func:`hf_prune.layer_importance`) are removed first and the width budget is spent on the rest; with
    ``config.hidden_keep``, the hidden channels with the best ``hidden_scores`` (``(D,)``,
    :func:`hf_prune.hidden_importance`) stay and the units are costed at the kept width.
    """
    scores = fisher.scores()
    scores.layers, scores.hidden = layer_scores, hidden_scores
    if config.layers_keep is not None and layer_scores is None:
        raise ValueError("layers_keep needs layer_scores (hf_prune.layer_importance) for the search")
    plan = build_plan(scores, model, config, {"latency_table": latency_table})
    plan.meta["search"] = "fisher"
    return plan

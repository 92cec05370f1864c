"""Retraining-free structured pruning, after Kwon et al. (2022), "A Fast Post-Training Pruning Framework for
Transformers". No gradient step touches the weights; one calibration pass gives mask gradients, and a few
layer-by-layer forward passes fit, by least squares, what the cut layers need to reconstruct the dense ones;
the fit is folded into the kept weights.

Stages (one function each, chained by :func:`prune_retraining_free`):

1. :func:`fisher_information`: per-sample gradients of head and neuron masks (one forward+backward over the
   calibration set) give, per layer, the full Fisher matrix of its head masks ``(H, H)`` and of its neuron
   masks ``(I, I)``. Its diagonal is the ``fisher`` importance score.
2. :func:`search_masks`: how many heads/neurons each layer keeps, maximising the kept diagonal Fisher under a
   budget. FLOPs (and the other :class:`PruningConfig` budgets) go through :func:`hf_prune.build_plan`, which
   is the paper's search: try every total number of kept heads, fill the rest with the best neurons. A
   latency budget uses a per-layer latency lookup table (:class:`LatencyTable`, measured on the user's
   device) and an exact knapsack over per-layer kept counts (:func:`search_latency`).
3. :func:`rearrange_masks`: with each layer's counts fixed, swap kept/removed units to minimise the
   second-order loss estimate ``1/2 (1 - m)^T F (1 - m)`` with the layer's full Fisher block ``F``. With
   ``rearrange_scope="model"``, :func:`rearrange_across_layers` then also swaps units between layers with the
   whole cross-layer Fisher (``fisher_information(cross_layer=True)``).
4. :func:`tune_masks`: layer by layer, least squares make the cut layer's residual sums reconstruct the dense
   model's on the calibration set. ``fit="scales"`` is the paper's one scale per kept head/neuron;
   ``fit="weights"`` (the default) refits the whole attention-output and FFN down projections (weights and
   biases; ridge towards the cut weights), same passes, far closer to the dense model. :func:`fold_tuning_`
   writes either into the kept weights, so the cut model has no extra parameters. In the last layer only
   the positions the model's output reads are fitted (a classifier's [CLS]). With ``reselect=True``
   (``config.obs_reselection``) it first re-chooses which units each layer keeps, same counts, by OBS elimination
   on its own least squares (:func:`backward_eliminate`, ZipLM-style); :func:`reselected_plan` names them.
5. Selection (:func:`prune_retraining_free`, ``config.select_stages``): each stage optimises a proxy, so the
   searched, rearranged and tuned candidates (the search plan tuned too when rearrangement changed it, and the
   final plan with scales as well when the fit is weights) are compared on held-out calibration samples by how
   far their outputs are from the dense model's (or by their task loss, ``selection_metric="task_loss"``), and
   the best is cut.

Depth (``layers_keep``): the lowest-scoring layers (:func:`hf_prune.layer_importance`) are removed in the search
and the width budget is spent on the rest; the tuning skips them in the cut stream, so the next kept layer's fit
(its targets are the dense stream's) also makes up for what they added. ``depth_search`` tries every layer count
the budget allows, tunes each candidate and keeps the one closest to the dense outputs (:func:`choose_depth`).

One module per stage: :mod:`.fisher` (the scores and the search), :mod:`.latency` (the latency table and knapsack of
``latency_keep``, the budget kind with a search of its own),
:mod:`.rearrange`, :mod:`.tuning` (with :mod:`.obs`); selection is the library's own step
(:mod:`hf_prune.selection`, which every method can use); :mod:`.layer_io` records and replays layer calls;
:mod:`.pipeline` chains them.
"""

from ..batches import by_length, collect_batches, split_batches
from ..divergence import model_output, sample_divergence
from ..selection import choose_depth, held_out_loss, output_divergence
from .fisher import FisherInfo, fisher_information, search_masks
from .latency import LatencyTable, measure_latency_table, search_latency
from .layer_io import LayerInput, capture_layer_calls, layer_inputs, read_positions
from .obs import backward_eliminate
from .pipeline import prune_retraining_free, retraining_free_plan
from .rearrange import quadratic_loss, rearrange_across_layers, rearrange_masks, swap_descent
from .tuning import MaskTuning, fitted_projections, fold_tuning_, reselected_plan, tune_masks

__all__ = [
    "FisherInfo", "LatencyTable", "LayerInput", "MaskTuning", "backward_eliminate", "by_length", "capture_layer_calls",
    "choose_depth", "collect_batches", "fisher_information", "fitted_projections", "fold_tuning_", "held_out_loss",
    "layer_inputs", "measure_latency_table", "model_output",
    "output_divergence", "prune_retraining_free", "quadratic_loss", "read_positions", "rearrange_across_layers",
    "rearrange_masks",
    "reselected_plan", "retraining_free_plan", "sample_divergence", "search_latency", "search_masks", "split_batches",
    "swap_descent", "tune_masks",
]

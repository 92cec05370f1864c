"""``method="one_shot"``: score heads and neurons (and whole layers for a depth budget) with a criterion, then keep
the highest-scoring units under the budget (:func:`hf_prune.budget.build_plan`), or, with ``depth_search``, the
candidate layer count whose cut stays closest to the dense model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ..batches import collect_batches
from ..budget import build_plan
from ..criteria import get_criterion
from ..depth import layer_importance
from ..hidden import HIDDEN_CRITERIA, hidden_importance
from ..importance import compute_importance
from ..plan import PrunePlan
from ..selection import choose_depth, choose_hidden
from .registry import Batches, MethodContext, PruningMethod

if TYPE_CHECKING:
    from ..config import PruningConfig

#: calibration samples ``depth_search`` and ``hidden_search`` compare their one-shot candidates on
#: (``retraining_free`` uses its own held-out selection samples)
DEPTH_SEARCH_SAMPLES = 256


def one_shot_plan(model: nn.Module, batches: Batches | None, config: PruningConfig,
                  context: MethodContext) -> tuple[PrunePlan, Any]:
    depth = config.layers_keep is not None or config.depth_search
    scores_hidden = config.hidden_keep is not None or config.hidden_search
    hidden = scores_hidden and (HIDDEN_CRITERIA[config.hidden_importance].needs_data or config.hidden_search)
    if hidden and batches is None:
        raise ValueError(f"hidden_keep and hidden_search score hidden channels on calibration data (hidden_importance="
                         f"{config.hidden_importance!r}): pass a dataloader, or hidden_importance='magnitude'")
    if depth and batches is None:
        raise ValueError(f"layers_keep and depth_search score whole layers on calibration data (layer_importance="
                         f"{config.layer_importance!r}): pass a dataloader")
    if depth or hidden:  # every stage sees the same samples, even from a one-shot iterator
        batches = collect_batches(batches, config.max_calibration_samples)
    progress = config.progress and context.main_process
    if batches is None and get_criterion(config.importance).gradient and context.gradient_scores is not None:
        scores = context.gradient_scores()  # the training steps' own mask gradients
    else:
        scores = compute_importance(model, batches, config.importance, max_samples=config.max_calibration_samples,
                                    seed=config.seed + context.step, progress=progress, offload=config.offload)
    if depth:
        scores.layers = layer_importance(model, batches, config.layer_importance,
                                         max_samples=config.max_calibration_samples, seed=config.seed + context.step,
                                         progress=progress, offload=config.offload)
    if scores_hidden:
        scores.hidden = hidden_importance(model, batches, config.hidden_importance,
                                          max_samples=config.max_calibration_samples, seed=config.seed + context.step,
                                          progress=progress)
    scores = context.restrict(scores)
    if config.hidden_search:
        with context.unmasked():
            held_out = collect_batches(batches, DEPTH_SEARCH_SAMPLES)
            return choose_hidden(model, held_out, config, lambda c: build_plan(scores, model, c)), None
    if not config.depth_search:
        return build_plan(scores, model, config), None
    with context.unmasked():  # the candidates are cut copies of the model, without any mask hooks
        held_out = collect_batches(batches, DEPTH_SEARCH_SAMPLES)
        return choose_depth(model, held_out, config, lambda c: build_plan(scores, model, c),
                            PrunePlan.of(model).num_layers), None


ONE_SHOT = PruningMethod(
    name="one_shot", plan=one_shot_plan, uses_criterion=True,
    summary="score units with a criterion and keep the highest under the budget",
)

"""``method="retraining_free"``: Kwon et al. (2022), the pipeline of :mod:`hf_prune.retraining_free` (Fisher mask
search, rearrangement, least-squares mask tuning folded into the kept weights, held-out selection) as a method."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from torch import nn

from ..budget_kinds import BUDGETS
from ..plan import PrunePlan
from ..retraining_free import fold_tuning_, retraining_free_plan
from ..retraining_free.tuning import TUNING_FITS
from .registry import Batches, MethodContext, PruningMethod

if TYPE_CHECKING:
    from ..config import PruningConfig

#: How selection compares candidate cuts on held-out samples (``selection_metric``).
SELECTION_METRICS = ("divergence", "task_loss")
#: Where rearrangement may move units (``rearrange_scope``).
REARRANGE_SCOPES = ("layer", "model")
#: The ``PruningConfig`` fields only this method reads.
SETTINGS = ("rearrange", "rearrange_scope", "mask_tuning", "tuning_fit", "obs_reselection", "tuning_samples",
            "select_stages", "selection_samples", "selection_metric")


def _plan(model: nn.Module, batches: Batches | None, config: PruningConfig,
          context: MethodContext) -> tuple[PrunePlan, Any]:
    if batches is None:
        raise ValueError("method='retraining_free' needs calibration data: pass a dataloader")
    config = dataclasses.replace(config, progress=config.progress and context.main_process)
    with context.unmasked():  # the search scores the model through its own mask hooks
        return retraining_free_plan(model, batches, config, latency_table=context.latency_table)


def _validate(config: PruningConfig) -> None:
    if config.importance != "fisher":
        raise ValueError(f"method='retraining_free' ranks and rearranges units with the Fisher information of their "
                         f"masks; importance={config.importance!r} does not apply (leave importance='fisher')")
    if config.tuning_fit not in TUNING_FITS:
        raise ValueError(f"tuning_fit must be 'weights' or 'scales', not {config.tuning_fit!r}")
    if config.obs_reselection and (config.tuning_fit != "weights" or not config.mask_tuning):
        raise ValueError("obs_reselection re-chooses units inside the weights fit: set tuning_fit='weights' and "
                         "mask_tuning=True, or drop obs_reselection")
    if config.rearrange_scope not in REARRANGE_SCOPES:
        raise ValueError(f"rearrange_scope must be 'layer' or 'model', not {config.rearrange_scope!r}")
    if config.rearrange_scope == "model":
        needs = (("rearrange", config.rearrange), ("allocation", config.allocation == "global"),
                 ("round_to", config.round_to == 1), ("head_unit", config.head_unit == "kv_group"),
                 ("latency_keep", config.latency_keep is None))
        clash = [f"{name}={getattr(config, name)!r}" for name, ok in needs if not ok]
        if clash:
            raise ValueError(f"rearrange_scope='model' moves single heads (KV groups) and neurons between layers "
                             f"at equal cost, which {', '.join(clash)} rules out: drop rearrange_scope or those")
    if config.tuning_samples is not None and config.tuning_samples < 1:
        raise ValueError(f"tuning_samples must be >= 1 (or None for all), got {config.tuning_samples}")
    if config.selection_samples < 1:
        raise ValueError(f"selection_samples must be >= 1, got {config.selection_samples}")
    if config.selection_metric not in SELECTION_METRICS:
        raise ValueError(f"selection_metric must be one of {', '.join(SELECTION_METRICS)}, not "
                         f"{config.selection_metric!r}")
    if config.selection_metric != "divergence" and not (config.select_stages or config.depth_search):
        raise ValueError("selection_metric only applies when candidates are compared: set select_stages=True "
                         "(or depth_search=True), or drop selection_metric")
    if config.deployable and [k for k in config.budget() if not BUDGETS[k].combines]:
        raise ValueError("deployable=True needs the same shape in every layer, and the retraining-free search sizes "
                         "each layer on its own: use method='one_shot' with allocation='uniform', or layers_keep "
                         "alone")


def _fold(model: nn.Module, tuning: Any) -> None:
    fold_tuning_(model, tuning)


RETRAINING_FREE = PruningMethod(
    name="retraining_free", plan=_plan, fold=_fold, settings=SETTINGS, validate=_validate, needs_data=True,
    once_at_start=True,
    summary="Fisher mask search, rearrangement and least-squares mask tuning folded into the kept weights",
)

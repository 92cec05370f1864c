"""``prune(model, dataloader, config)``: plan with the configured method, fold its refit, cut; one call."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from torch import nn

from .config import PruningConfig
from .export import stock_config
from .gradients import refuse_offloaded
from .methods import DEPTH_SEARCH_SAMPLES, MethodContext, get_method
from .model_kinds import pruning_view
from .plan import PrunePlan
from .retraining_free import LatencyTable
from .surgery import apply_plan_

M = TypeVar("M", bound=nn.Module)
__all__ = ["DEPTH_SEARCH_SAMPLES", "prune"]


def prune(
    model: M,
    dataloader: Iterable[Mapping[str, Any]] | None,
    config: PruningConfig,
    *,
    latency_table: LatencyTable | None = None,
) -> tuple[M, PrunePlan]:
    """Choose what to keep with ``config.method`` (a registered :class:`hf_prune.methods.PruningMethod`: scores
    and layer scores on ``dataloader`` under ``config``'s budget for ``one_shot``; the retraining-free pipeline for
    ``retraining_free``), fold any refit into the kept weights and cut, in place.

    A ``SentenceTransformer`` is pruned through its encoder, scored on the sentence embedding it outputs;
    ``dataloader`` may then be a list of unlabeled sentences (:mod:`hf_prune.embeddings`; other such kinds:
    :func:`hf_prune.model_kinds.register_model_kind`).

    Returns the (same, now physically smaller) model and the plan. ``dataloader`` may be None for the
    data-free criteria ``magnitude`` and ``random`` of ``method="one_shot"``. ``latency_table``: reuse a table
    measured earlier for a ``latency_keep`` budget instead of timing the model again. With ``config.deployable``, a
    cut whose shape the family's stock config cannot express raises :class:`hf_prune.NotStockExpressible` here,
    before any recovery.
    """
    method = get_method(config.method)
    refuse_offloaded(model, "hp.prune")
    if method.needs_data and dataloader is None:
        raise ValueError(f"method={method.name!r} needs calibration data: pass a dataloader")
    # a model pruned through the transformers model inside it (a SentenceTransformer): the steps run on its real
    # output, the cut on the inner model; a plain model is all three
    scored, inner, dataloader = pruning_view(model, dataloader, config)
    start = time.perf_counter()
    plan, tuning = method.plan(scored, dataloader, config, MethodContext(latency_table=latency_table))
    if tuning is not None and method.fold is not None:
        method.fold(scored, tuning)
    t = time.perf_counter()
    apply_plan_(inner, plan)
    info = plan.meta.get(method.name)
    if isinstance(info, dict) and "times" in info:  # a method reporting its stage times gets the cut's added
        info["times"].update(cut_s=time.perf_counter() - t, total_s=time.perf_counter() - start)
    if config.deployable:  # a shape the stock config cannot hold fails now, not after recovery
        stock_config(inner)
    return model, plan

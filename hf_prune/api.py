"""``prune(model, dataloader, config)``: score, plan and cut in one call."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from torch import nn

from .config import PruningConfig
from .depth import layer_importance
from .export import stock_config
from .importance import compute_importance
from .budget import build_plan
from .plan import PrunePlan
from .batches import collect_batches
from .retraining_free import LatencyTable, choose_depth, prune_retraining_free
from .surgery import apply_plan_

M = TypeVar("M", bound=nn.Module)
#: calibration samples ``depth_search`` compares its one-shot candidates on (``retraining_free`` uses its own
#: held-out selection samples)
DEPTH_SEARCH_SAMPLES = 256


def prune(
    model: M,
    dataloader: Iterable[Mapping[str, Any]] | None,
    config: PruningConfig,
    *,
    latency_table: LatencyTable | None = None,
) -> tuple[M, PrunePlan]:
    """Score heads and neurons (and whole layers, for ``layers_keep``) on ``dataloader``, build a plan under
    ``config``'s budget and apply it in place.

    Returns the (same, now physically smaller) model and the plan. ``dataloader`` may be None for the
    data-free criteria ``magnitude`` and ``random`` of ``method="one_shot"``. ``method="retraining_free"``
    runs :func:`hf_prune.prune_retraining_free` (``latency_table``: reuse a table measured earlier for a
    ``latency_keep`` budget instead of timing the model again). With ``config.deployable``, a cut whose shape the
    family's stock config cannot express raises :class:`hf_prune.NotStockExpressible` here, before any recovery.
    """
    if config.method == "retraining_free":
        if dataloader is None:
            raise ValueError("method='retraining_free' needs calibration data: pass a dataloader")
        model, plan = prune_retraining_free(model, dataloader, config, latency_table=latency_table)
        if config.deployable:
            stock_config(model)
        return model, plan
    depth = config.layers_keep is not None or config.depth_search
    if depth and dataloader is None:
        raise ValueError(f"layers_keep and depth_search score whole layers on calibration data (layer_importance="
                         f"{config.layer_importance!r}): pass a dataloader")
    if depth:  # every stage sees the same samples, even from a one-shot iterator
        dataloader = collect_batches(dataloader, config.max_calibration_samples)
    scores = compute_importance(
        model,
        dataloader,
        config.importance,
        max_samples=config.max_calibration_samples,
        seed=config.seed,
        progress=config.progress,
    )
    if depth:
        scores.layers = layer_importance(
            model, dataloader, config.layer_importance, max_samples=config.max_calibration_samples,
            seed=config.seed, progress=config.progress,
        )
    if config.depth_search:
        held_out = collect_batches(dataloader, DEPTH_SEARCH_SAMPLES)
        plan = choose_depth(model, held_out, config, lambda c: build_plan(scores, model, c),
                            PrunePlan.of(model).num_layers)
    else:
        plan = build_plan(scores, model, config)
    apply_plan_(model, plan)
    if config.deployable:  # a shape the stock config cannot hold fails now, not after recovery
        stock_config(model)
    return model, plan

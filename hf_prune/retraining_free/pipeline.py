"""The retraining-free pipeline: the stages chained (:func:`retraining_free_plan`) and the in-place cut
(:func:`prune_retraining_free`)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from torch import nn

from ..batches import batch_size, by_length, collect_batches, split_batches
from ..depth import layer_importance
from ..gradients import offloaded, refuse_offloaded
from ..hidden import hidden_importance
from ..plan import PrunePlan
from ..selection import (
    SELECTION_SCORES,
    choose_depth,
    cut_candidate,
    output_divergence,
    require_labels,
)
from ..surgery import apply_plan_
from .fisher import fisher_information, search_masks
from .latency import LatencyTable
from .rearrange import rearrange_across_layers, rearrange_masks
from .tuning import MaskTuning, fold_tuning_, masked_stand_in, reselected_plan, tune_masks

if TYPE_CHECKING:
    from ..config import PruningConfig

M = TypeVar("M", bound=nn.Module)
#: ``retraining_free_plan(inspect=...)``: sees the selection's candidates, name -> (plan, build the cut model)
Inspect = Callable[[dict[str, tuple[PrunePlan, Callable[[], nn.Module]]]], Any]


def retraining_free_plan(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    config: "PruningConfig",
    *,
    latency_table: LatencyTable | None = None,
    inspect: Inspect | None = None,
) -> tuple[PrunePlan, MaskTuning | None]:
    """Everything :func:`prune_retraining_free` does except changing ``model``: the plan (with
    ``plan.meta["retraining_free"]``) and the tuning to fold into the dense weights (None when the chosen
    stage is untuned). ``fold_tuning_`` then masks or ``apply_plan_`` reproduce the cut model exactly, which is
    how :class:`hf_prune.PruningCallback` applies it without reshaping parameters.

    ``inspect(candidates)``, when given, is called before the selection with every candidate the selection will
    compare, ``name -> (plan, build)`` (``build()`` returns that candidate's cut model): how a study sees each
    stage's cut on its own data (``benchmarks/bench_robustness.py --stages``). It must not change ``model``."""
    current = PrunePlan.of(model)
    if any(len(h) != len(current.kv_heads(i)) * current.group_size for i, h in enumerate(current.heads)):
        raise ValueError("this model keeps part of some key/value groups (head_unit='query_head'); the retraining-free "
                         "search and rearrangement move whole groups: run it on the base model")
    if config.depth_search or config.latency_keep is not None:
        refuse_offloaded(model, "depth_search or a latency_keep budget")
    times: dict[str, float] = {}
    start = time.perf_counter()
    batches = collect_batches(dataloader, config.max_calibration_samples)
    # which samples tune and which select is decided in the data's order; each pass then runs them sorted by
    # length (same samples, little padding)
    tune_batches, held_out = split_batches(batches, config.tuning_samples, config.selection_samples)
    tune_batches, held_out = by_length(tune_batches), by_length(held_out)
    if config.selection_metric == "task_loss":
        require_labels(batches)
    # the blocks serve only the rearrangement: without it, their diagonals (what the search reads) are enough
    fisher = fisher_information(model, by_length(batches), seed=config.seed, progress=config.progress,
                                cross_layer=config.rearrange and config.rearrange_scope == "model",
                                offload=config.offload, diagonal=not config.rearrange)
    times["fisher_s"] = time.perf_counter() - start
    layer_scores = None
    if config.layers_keep is not None or config.depth_search:
        t = time.perf_counter()
        layer_scores = layer_importance(model, by_length(batches), config.layer_importance, seed=config.seed,
                                        progress=config.progress, offload=config.offload)
        times["layer_scores_s"] = time.perf_counter() - t
    hidden_scores = None
    if config.hidden_keep is not None:  # the width the search, rearrangement and tuning then cut heads/neurons at
        t = time.perf_counter()
        hidden_scores = hidden_importance(model, by_length(batches), config.hidden_importance, seed=config.seed,
                                          progress=config.progress)
        times["hidden_scores_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if config.depth_search:  # one search per layer count; the tuned cut closest to the dense outputs wins
        tune = functools.partial(_tune_quietly, model, tune_batches, config.tuning_fit) if config.mask_tuning else None
        plan = choose_depth(model, held_out or tune_batches, config,
                            functools.partial(search_masks, fisher, model, latency_table=latency_table,
                                              layer_scores=layer_scores, hidden_scores=hidden_scores),
                            fisher.current.num_layers, tune)
    else:
        plan = search_masks(fisher, model, config, latency_table, layer_scores, hidden_scores)
    times["search_s"] = time.perf_counter() - t
    stages = {"search": plan}
    info: dict[str, Any] = {"calibration_samples": fisher.num_samples}
    if config.rearrange:
        t = time.perf_counter()
        plan, info["rearrangement"] = rearrange_masks(plan, fisher, progress=config.progress)
        if config.rearrange_scope == "model":
            plan, info["rearrangement_across_layers"] = rearrange_across_layers(
                plan, fisher, floor=0 if config.allow_empty_layers else 1)
        stages["rearranged"] = plan
        times["rearrange_s"] = time.perf_counter() - t
    del fisher
    plan, tuning = _tune_and_select(model, stages, plan, tune_batches, held_out, config, info, times, inspect)
    plan.meta["retraining_free"] = info
    if "fidelity" in info:  # what the user is told before any evaluation (CLI, recipes, model card)
        plan.meta["fidelity"] = info.pop("fidelity")
    info["times"] = {**times, "total_s": time.perf_counter() - start}
    return plan, tuning


def _tune_and_select(model: nn.Module, stages: dict[str, PrunePlan], plan: PrunePlan, tune_batches: list,
                     held_out: list, config: "PruningConfig", info: dict[str, Any],
                     times: dict[str, float], inspect: Inspect | None) -> tuple[PrunePlan, MaskTuning | None]:
    """Stages 4 and 5: tune the candidates (the final plan, and with selection on its alternatives), then keep the
    candidate closest to the dense model on the held-out samples. Records into ``info`` and ``times``."""
    selecting = config.select_stages and bool(held_out)
    # Tuned candidates (name -> plan, fit): the final plan; with selection on, also the search plan when
    # rearrangement changed it (which of the two tunes better differs by model and budget), and, for the weights
    # fit, the final plan with the paper's scales: the weights fit has ~D unknowns per kept unit and can overfit
    # few calibration tokens (real MiniLM as a sentence encoder, 64 tuning sentences: held-out hidden-state error
    # above the untuned plan's, scales below). The held-out check is cheap next to a tuning.
    weights = config.tuning_fit == "weights"
    to_tune = {"tuned": (plan, config.tuning_fit, weights and config.obs_reselection and not selecting)}
    search, rearranged = stages["search"], stages.get("rearranged")
    if selecting and rearranged is not None and (rearranged.heads, rearranged.neurons) != (
        search.heads, search.neurons
    ):
        to_tune["tuned_search"] = (search, config.tuning_fit, False)
    if selecting and weights:
        to_tune["tuned_scales"] = (plan, "scales", False)
    if selecting and weights and config.obs_reselection:
        to_tune["tuned_obs"] = (plan, "weights", True)
    tuned: dict[str, MaskTuning] = {}
    if config.mask_tuning:
        t = time.perf_counter()
        for name, (p, fit, reselect) in to_tune.items():
            tuned[name] = tune_masks(model, tune_batches, p, fit=fit, reselect=reselect, progress=config.progress)
            if reselect:  # the units it kept are its own
                to_tune[name] = (reselected_plan(p, PrunePlan.of(model), tuned[name]), fit, reselect)
        info["mask_tuning"] = tuned["tuned"].errors
        if "tuned_search" in tuned:
            info["mask_tuning_search"] = tuned["tuned_search"].errors
        info["tuning_samples"] = sum(batch_size(b) for b in tune_batches)
        info["tuning_fit"] = config.tuning_fit
        times["tuning_s"] = time.perf_counter() - t
    tuning = tuned.get("tuned")
    if tuning is not None:
        plan = to_tune["tuned"][0]  # the reselected units where the tuning chose them
    if selecting and (len(stages) > 1 or tuned):
        # The search, the rearrangement and the tuning each optimise a proxy (diagonal Fisher, block Fisher,
        # layer-wise reconstruction); keep the stage whose masked model stays closest to the dense model's
        # outputs (or has the lowest task loss) on calibration samples none of them was fitted to. Each candidate
        # runs as a cut copy, at its kept FLOPs (about half the time of the full model under masks), except where
        # the model cannot or should not be copied (see _candidate).
        t = time.perf_counter()
        candidates = {name: _candidate(model, p, None, config.offload) for name, p in stages.items()}
        candidates.update({name: _candidate(model, to_tune[name][0], tn, config.offload) for name, tn in tuned.items()})
        if inspect is not None:
            inspect({name: (stages[name] if name in stages else to_tune[name][0], build)
                     for name, build in candidates.items()})
        details: dict[str, dict[str, Any]] = {}
        score = SELECTION_SCORES[config.selection_metric]
        divergence = score(model, held_out, candidates, details=details) if score is output_divergence else \
            score(model, held_out, candidates)
        chosen = min(divergence, key=divergence.get)
        if chosen not in details:  # selected by task loss: measure the chosen cut's fidelity on the same samples
            output_divergence(model, held_out, {chosen: candidates[chosen]}, details=details)
        info["selection"] = {"divergence": divergence, "chosen": chosen, "metric": config.selection_metric,
                             "samples": sum(batch_size(b) for b in held_out), "fidelity": details}
        info["fidelity"] = details[chosen]
        if chosen in tuned:
            plan, tuning = to_tune[chosen][0], tuned[chosen]
        else:
            plan, tuning = stages[chosen], None
        times["selection_s"] = time.perf_counter() - t
    if held_out and "fidelity" not in info:  # nothing was selected: still tell the user what they got
        details = {}
        output_divergence(model, held_out, {"cut": _candidate(model, plan, tuning, config.offload)}, details=details)
        info["fidelity"] = details["cut"]
    return plan, tuning


def _candidate(model: nn.Module, plan: PrunePlan, tuning: MaskTuning | None, offload: bool
               ) -> Callable[[], nn.Module]:
    """What builds the candidate cut to ``plan`` with ``tuning`` folded in: a cut copy of ``model``, or, where its
    weights cannot be copied (accelerate offloads them) or should not be (``offload=True``: a model the size of the
    device), ``model`` itself under the plan's masks and the tuning's scales or refitted projections (the same
    outputs, at the dense FLOPs)."""
    if not (offload or offloaded(model)):
        return functools.partial(cut_candidate, model, plan, None if tuning is None else _folding(tuning))
    return functools.partial(masked_stand_in, model, plan, tuning)


def _folding(tuning: MaskTuning) -> Callable[[nn.Module], nn.Module]:
    """What prepares a candidate's copy of the model: ``tuning`` folded into its kept weights."""
    return functools.partial(_fold_into, tuning=tuning)


def _fold_into(model: nn.Module, tuning: MaskTuning) -> nn.Module:
    return fold_tuning_(model, tuning)


def _tune_quietly(model: nn.Module, batches: list, fit: str, plan: PrunePlan) -> Callable[[nn.Module], nn.Module]:
    return _folding(tune_masks(model, batches, plan, fit=fit, progress=False))


def prune_retraining_free(
    model: M,
    dataloader: Iterable[Mapping[str, Any]],
    config: "PruningConfig",
    *,
    latency_table: LatencyTable | None = None,
) -> tuple[M, PrunePlan]:
    """Fisher mask search, rearrangement (``config.rearrange``), mask tuning (``config.mask_tuning``),
    folding and cut, in place. Returns the smaller model and its plan; ``plan.meta["retraining_free"]``
    holds per-stage wall times, the rearrangement's loss estimates and the tuning's reconstruction errors.
    """
    start = time.perf_counter()
    plan, tuning = retraining_free_plan(model, dataloader, config, latency_table=latency_table)
    times = plan.meta["retraining_free"]["times"]
    if tuning is not None:
        fold_tuning_(model, tuning)
    t = time.perf_counter()
    apply_plan_(model, plan)
    times["cut_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - start
    return model, plan

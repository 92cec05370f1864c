"""Unit kinds as one registration: what a plan keeps of a part of the model other than heads, neurons, layers and
the hidden width.

The four built-in kinds are :class:`hf_prune.PrunePlan` fields, cut by the shape kernel (``shapes.py``,
``channels.py``) that every pruned checkpoint carries as its remote code, so those checkpoints load without hf_prune.
Any other kind is one ``register_unit_kind(UnitKind(...))`` in one file. Its kept ids live in
``PrunePlan.units[name]`` (``{"size": dense count, "kept": sorted dense ids}``; a kind the plan does not name keeps
everything), and every step that handles a plan calls the kind's hooks:

- the plan checks the ids against ``size(config)`` (the dense count; the config keeps dense values);
- :func:`hf_prune.apply_plan_` calls ``cut`` and records the kept count in the config's ``hf_prune`` section;
- :func:`hf_prune.load_pruned` builds the model, then ``resize`` brings it to the recorded count before the weights
  load (such a checkpoint needs hf_prune and the module that registers the kind: its remote code refuses it, naming
  the kind, see ``modeling_pruned.UNIT_RESIZERS``);
- :func:`hf_prune.masks.mask_hooks` installs ``mask`` (what the cut computes, without cutting: what a
  :class:`hf_prune.PruningCallback` trains with);
- :func:`hf_prune.costs.plan_params` counts ``unit_params`` per unit removed (FLOPs count the layers' products only,
  so a kind outside the layers' projections adds none; a kind inside them passes ``unit_flops``).

How many units a plan keeps is the choice of a method (:func:`hf_prune.methods.register_method`) or a budget kind
with its own ``search`` (:func:`hf_prune.register_budget`). ``tests/test_registries.py`` registers one: a
classifier's output classes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import modeling_pruned

#: ``mask(model, read)``: hooks that apply ``read()`` (the kind's mask ``(n,)``, 1 kept / 0 removed, or None for
#: none) at call time; returns the handles
MaskHooks = Callable[[nn.Module, Callable[[], "torch.Tensor | None"]], list]


@dataclass(frozen=True)
class UnitKind:
    """One kind of prunable unit outside the built-in four.

    Args:
        name: its key in ``PrunePlan.units`` and in the config's ``hf_prune`` section.
        description: one line for summaries and errors.
        size: the dense model's count of these units, from the config (which keeps dense values).
        count: the count the model has now, read off its weights.
        cut: ``cut(model, positions)``: keep only the units at these positions (of the model as it is now), in place.
        resize: ``resize(model, count)``: a model just built from its config (dense shapes) to ``count`` units, before
            the saved weights load into it.
        mask: what the cut computes, without cutting (see :data:`MaskHooks`).
        unit_params: ``unit_params(model, hidden)``: parameters one unit holds at residual width ``hidden``.
        unit_flops: ``unit_flops(model, hidden, seq_len)``: layer FLOPs one unit costs per sequence (None: the kind
            lies outside the layers' projections, which are what hf_prune counts).
    """

    name: str
    description: str
    size: Callable[[Any], int]
    count: Callable[[nn.Module], int]
    cut: Callable[[nn.Module, list[int]], None]
    resize: Callable[[nn.Module, int], None]
    mask: MaskHooks
    unit_params: Callable[[nn.Module, int], int]
    unit_flops: Callable[[nn.Module, int, int], int] | None = None


UNIT_KINDS: dict[str, UnitKind] = {}


def register_unit_kind(kind: UnitKind) -> UnitKind:
    """Make ``kind`` a unit kind plans may keep (``PrunePlan.units[kind.name]``), cuts, masks, costs and reloads
    handle."""
    if kind.name in UNIT_KINDS or kind.name in ("heads", "neurons", "layers", "hidden"):
        raise ValueError(f"a unit kind named {kind.name!r} is already registered")
    UNIT_KINDS[kind.name] = kind
    modeling_pruned.UNIT_RESIZERS[kind.name] = kind.resize  # what a reload runs (this process's hf_prune only)
    return kind


def unregister_unit_kind(name: str) -> None:
    UNIT_KINDS.pop(name, None)
    modeling_pruned.UNIT_RESIZERS.pop(name, None)


def get_unit_kind(name: str) -> UnitKind:
    try:
        return UNIT_KINDS[name]
    except KeyError:
        raise ValueError(f"the plan keeps units of kind {name!r}, which is not registered here (registered: "
                         f"{', '.join(UNIT_KINDS) or 'none'}): import the module that registers it first") from None


def check_units(units: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``PrunePlan.units`` normalised (sorted int ids) and checked; a kind that keeps everything is dropped, so a
    plan has one spelling. Raises ValueError naming the kind."""
    out = {}
    for name, entry in sorted(units.items()):
        get_unit_kind(name)
        if set(entry) != {"size", "kept"}:
            raise ValueError(f"units[{name!r}] must be {{'size': dense count, 'kept': ids}}, got keys {sorted(entry)}")
        size, kept = int(entry["size"]), sorted(int(i) for i in entry["kept"])
        if not kept or len(set(kept)) != len(kept) or any(not 0 <= i < size for i in kept):
            raise ValueError(f"units[{name!r}]: kept ids must be distinct, at least one, and in [0, {size})")
        if len(kept) < size:
            out[name] = {"size": size, "kept": kept}
    return out


def kept_ids(units: Mapping[str, Mapping[str, Any]], name: str, size: int) -> list[int]:
    """The dense ids of kind ``name`` a plan with these ``units`` keeps (all of them when it does not name it)."""
    return list(units[name]["kept"]) if name in units else list(range(size))


def dense_sizes(config: Any, names: Any) -> dict[str, int]:
    """The dense count of each named kind, from ``config``."""
    return {name: int(get_unit_kind(name).size(config)) for name in names}


def unit_positions(plan_units: Mapping, current_units: Mapping, name: str) -> tuple[list[int], int]:
    """Where, in a model cut to ``current_units``, the units of kind ``name`` that ``plan_units`` keeps are (ranks
    among the ids the model still has: plans hold dense ids), and how many the model has now."""
    size = (plan_units.get(name) or current_units[name])["size"]
    now = kept_ids(current_units, name, size)
    return ranks(kept_ids(plan_units, name, size), now), len(now)


def ranks(kept: list[int], current: list[int]) -> list[int]:
    """The positions of the ids ``kept`` among the ids ``current`` a model has now (plans hold dense ids)."""
    where = {unit: p for p, unit in enumerate(current)}
    return [where[u] for u in kept]


def cut_units_(model: nn.Module, plan_units: Mapping, current_units: Mapping) -> None:
    """Cut every registered kind that ``plan_units`` keeps less of than the model has (``current_units``), in place."""
    for name in sorted(set(plan_units) | set(current_units)):
        if plan_units.get(name) != current_units.get(name):
            get_unit_kind(name).cut(model, unit_positions(plan_units, current_units, name)[0])


def kept_counts(plan_units: Mapping) -> dict[str, int]:
    """What the config's ``hf_prune`` section records for a reload: each cut kind's kept count."""
    return {name: len(entry["kept"]) for name, entry in sorted(plan_units.items())}


def _changes(model: nn.Module, plan_units: Mapping) -> list[tuple[UnitKind, int]]:
    """Each registered kind the plan or the model names, with the units the plan keeps minus those the model has."""
    kinds = [get_unit_kind(name) for name in sorted(set(plan_units) | set(_present(model)))]
    return [(k, len(kept_ids(plan_units, k.name, k.size(model.config))) - k.count(model)) for k in kinds]


def units_params(model: nn.Module, plan_units: Mapping, hidden: int) -> int:
    """Parameters the registered kinds' cuts add to the model as it is now (negative: they remove), at width
    ``hidden``."""
    return sum(change * kind.unit_params(model, hidden) for kind, change in _changes(model, plan_units))


def units_flops(model: nn.Module, plan_units: Mapping, hidden: int, seq_len: int) -> int:
    """Layer FLOPs the registered kinds' cuts add to the model as it is now (kinds with ``unit_flops`` only)."""
    return sum(change * kind.unit_flops(model, hidden, seq_len) for kind, change in _changes(model, plan_units)
               if kind.unit_flops is not None)


def refuse_units(model: nn.Module, writer: str) -> None:
    """Raise the one-line error of an export that writes a config of its own (it knows heads, neurons, layers and
    hidden channels only) for a model that cut a registered kind."""
    cut = sorted(_present(model))
    if cut:
        raise ValueError(f"this model cut unit kinds {cut} registered with hf_prune, which {writer} cannot describe: "
                         "export it to ONNX (which traces the model) or save it with save_pretrained (it reloads with "
                         "hf_prune.load_pruned)")


def _present(model: nn.Module) -> dict[str, int]:
    """Registered kinds the model has already cut (its config section records them)."""
    section = modeling_pruned.config_get(model.config, modeling_pruned.CONFIG_KEY) or {}
    return dict(section.get("units") or {})

"""Pruning methods as an extension point: one :class:`PruningMethod` per method, registered by name.

``PruningConfig(method=NAME)``, :func:`hf_prune.prune`, :class:`hf_prune.PruningCallback` and
:class:`hf_prune.PruningTrainer` look the method up here and run it the same way: ``plan`` chooses what to keep
without changing the model's shapes, ``fold`` writes any refitted weights into the kept units, then the caller cuts
(``prune``) or masks (the callback). Adding a method is one :func:`register_method` call, like peft's
``register_peft_method``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from ..config import PruningConfig
    from ..importance import ImportanceScores
    from ..plan import PrunePlan

Batches = Iterable[Mapping[str, Any]]


@dataclass
class MethodContext:
    """What the caller adds to a method's inputs (the defaults are :func:`hf_prune.prune`'s).

    Args:
        step: the training step of this pruning event (0 outside training); seeds are offset by it.
        main_process: whether this process reports progress (under DDP only rank 0 does).
        gradient_scores: scores accumulated from the training steps' mask gradients, when the callback has them
            and no calibration data was given.
        restrict: narrows scores to the units the model still keeps (the callback's earlier events).
        unmasked: a context manager under which the model runs without the callback's mask hooks.
        latency_table: a latency table measured earlier, for a ``latency_keep`` budget.
    """

    step: int = 0
    main_process: bool = True
    gradient_scores: Callable[[], ImportanceScores] | None = None
    restrict: Callable[[ImportanceScores], ImportanceScores] = field(default=lambda scores: scores)
    unmasked: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)
    latency_table: Any = None


@dataclass(frozen=True)
class PruningMethod:
    """One way of choosing what to prune.

    Args:
        name: what ``PruningConfig(method=...)`` accepts.
        plan: ``plan(model, batches, config, context) -> (PrunePlan, tuning)``: what to keep, without changing the
            model's shapes; ``tuning`` is None or what ``fold`` writes into the kept weights. ``batches`` is None
            when no calibration data was given.
        fold: ``fold(model, tuning)``, in place, before the cut or the masks (None: the method never refits).
        settings: the ``PruningConfig`` fields only this method reads; another method refuses them when they are
            changed from their defaults (they would be ignored).
        validate: ``validate(config) -> None``: the method's own rules, raising ``ValueError`` with the fix.
        needs_data: whether it always needs calibration data.
        uses_criterion: it scores units with ``config.importance``, from calibration data or, in the callback,
            from the training steps' mask gradients (so the criterion decides what data it needs).
        once_at_start: it prunes the trained model once: the callback accepts it only as one event at step 0.
        summary: one line for ``--help`` and the docs.
    """

    name: str
    plan: Callable[[nn.Module, Batches | None, PruningConfig, MethodContext], tuple[PrunePlan, Any]]
    fold: Callable[[nn.Module, Any], None] | None = None
    settings: tuple[str, ...] = ()
    validate: Callable[[PruningConfig], None] | None = None
    needs_data: bool = False
    uses_criterion: bool = False
    once_at_start: bool = False
    summary: str = ""


_REGISTRY: dict[str, PruningMethod] = {}


def register_method(method: PruningMethod, *, overwrite: bool = False) -> PruningMethod:
    """Register ``method`` under ``method.name`` (``overwrite`` replaces a method of that name)."""
    if method.name in _REGISTRY and not overwrite:
        raise ValueError(f"a pruning method named {method.name!r} is already registered; pass overwrite=True to "
                         "replace it")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (tests and plugins that register temporary ones)."""
    _REGISTRY.pop(name, None)


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str) -> PruningMethod:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def check_method_settings(config: PruningConfig, defaults: Mapping[str, Any]) -> None:
    """Refuse settings that belong to another method than ``config.method`` (changed from their defaults)."""
    chosen = get_method(config.method)
    for other in _REGISTRY.values():
        if other.name == chosen.name:
            continue
        changed = [n for n in other.settings if n not in chosen.settings and getattr(config, n) != defaults[n]]
        if changed:
            raise ValueError(f"{', '.join(changed)} only apply to method={other.name!r} (method={config.method!r} "
                             f"would ignore them): set method={other.name!r} or drop them")

"""Models hf_prune prunes through the transformers model inside them, e.g. a ``SentenceTransformer`` (a pipeline whose
first module holds a transformers encoder).

A :class:`ModelKind` says how to recognise such a model, which module the importance, search and selection steps
run (one whose output is what the user's model really outputs: the sentence embedding, not the encoder's token
states), which transformers model surgery cuts, how the user's data becomes calibration batches, and how the
pruned model is saved. ``hp.prune``, ``PruningCallback`` and ``hp.save_pruned`` ask :func:`model_kind`; a plain
transformers model has no kind and is used as it is. Adding a kind is one :func:`register_model_kind` call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelKind:
    """One kind of model pruned through the transformers model inside it.

    Args:
        name: what errors and reports call it.
        matches: whether a model is of this kind (checked in registration order).
        scored: the ``nn.Module`` the pruning steps run: ``config`` and ``base_model`` of the inner model (what
            adapters, plans and costs read), parameters shared with it, and a forward pass over calibration batches
            whose output (``logits`` or ``last_hidden_state``) is the model's real output.
        inner: the transformers model surgery cuts, in place (the model keeps holding it).
        batches: turns what the user passed as data (e.g. a list of sentences) into calibration batches; None:
            batches are passed as they are.
        check: refuses, with a one-line error, a model or a setting the kind cannot prune (before any work).
        save: writes the pruned model in its own format: ``(model, folder, deployable, overwrite) -> folder``.
    """

    name: str
    matches: Callable[[Any], bool]
    scored: Callable[[Any], nn.Module]
    inner: Callable[[Any], nn.Module]
    batches: Callable[[Any, Any], Iterable[Any]] | None = None
    check: Callable[[Any, Any], None] | None = None
    save: Callable[[Any, Path, bool, bool], Path] | None = None


MODEL_KINDS: dict[str, ModelKind] = {}


def register_model_kind(kind: ModelKind) -> ModelKind:
    """Make ``hp.prune``, ``PruningCallback`` and ``hp.save_pruned`` accept models of ``kind``."""
    if kind.name in MODEL_KINDS:
        raise ValueError(f"a model kind named {kind.name!r} is already registered")
    MODEL_KINDS[kind.name] = kind
    return kind


def model_kind(model: Any) -> ModelKind | None:
    """The registered kind ``model`` is, or None for a plain transformers model."""
    return next((k for k in MODEL_KINDS.values() if k.matches(model)), None)


def scored_view(model: Any) -> nn.Module:
    """The module the pruning steps and cost counts read: ``kind.scored(model)``, or the model itself."""
    kind = model_kind(model)
    return kind.scored(model) if kind is not None else model


def inner_model(model: Any) -> nn.Module:
    """The transformers model surgery cuts: ``kind.inner(model)``, or the model itself."""
    kind = model_kind(model)
    return kind.inner(model) if kind is not None else model


def pruning_view(model: Any, data: Any, config: Any) -> tuple[nn.Module, nn.Module, Any]:
    """``(scored, inner, batches)`` for ``model``: for a plain model all three are what was passed."""
    kind = model_kind(model)
    if kind is None:
        return model, model, data
    if kind.check is not None:
        kind.check(model, config)
    batches = kind.batches(model, data) if kind.batches is not None and data is not None else data
    return kind.scored(model), kind.inner(model), batches

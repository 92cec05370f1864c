"""The budget kinds: the one table that config validation, schedules, recipes and the CLI read.

A budget says how much of the dense model a plan may keep. Each kind is a :class:`PruningConfig` field;
``heads_keep`` and ``neurons_keep`` form one budget (either or both), every other kind stands alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class BudgetKind:
    """One budget field of :class:`hf_prune.PruningConfig`.

    Args:
        name: the config field (and recipe key / CLI flag).
        group: fields of one group are one budget and may be set together.
        value: ``fraction`` of the dense model, in (0, 1]; or ``count``, a positive number.
        scheduled_from: what a gradual/iterative schedule moves the value from: ``one`` (keep everything) or
            ``dense_params`` (the dense model's parameter count).
        method: the only pruning method that supports it (None: every method).
        help: one line for ``--help``.
    """

    name: str
    group: str
    value: Literal["fraction", "count"]
    scheduled_from: Literal["one", "dense_params"]
    method: str | None
    help: str

    def check(self, value: Any) -> None:
        if self.value == "fraction" and not 0 < value <= 1:
            raise ValueError(f"{self.name}={value} is outside (0, 1]: it is the fraction of the dense model to keep")
        if self.value == "count" and value <= 0:
            raise ValueError(f"{self.name}={value} must be positive")


BUDGETS: dict[str, BudgetKind] = {
    b.name: b
    for b in (
        BudgetKind("heads_keep", "units", "fraction", "one", None, "fraction of attention heads to keep"),
        BudgetKind("neurons_keep", "units", "fraction", "one", None, "fraction of FFN neurons to keep"),
        BudgetKind("flops_keep", "flops", "fraction", "one", None, "fraction of the layers' FLOPs to keep"),
        BudgetKind("target_params", "params", "count", "dense_params", None,
                   "total parameter count of the pruned model"),
        BudgetKind("latency_keep", "latency", "fraction", "one", "retraining_free",
                   "fraction of the layers' measured latency to keep"),
    )
}

#: The budget a command line or recipe uses when none is given: half the layer FLOPs.
DEFAULT_BUDGET = {"flops_keep": 0.5}


def set_budget(config: Any) -> dict[str, Any]:
    """The budget fields of ``config`` that are set (not None), in table order."""
    return {name: getattr(config, name) for name in BUDGETS if getattr(config, name, None) is not None}


def check_budget(config: Any) -> None:
    """Exactly one budget group set, each value in range, and supported by ``config.method``."""
    given = set_budget(config)
    for name, value in given.items():
        BUDGETS[name].check(value)
    groups = {BUDGETS[name].group for name in given}
    if len(groups) != 1:
        listing = "; ".join(f"{b.name} ({b.help})" for b in BUDGETS.values())
        raise ValueError(f"set exactly one budget (heads_keep and neurons_keep count as one): {listing}")
    for name in given:
        method = BUDGETS[name].method
        if method is not None and config.method != method:
            raise ValueError(f"{name} needs method={method!r} (got method={config.method!r})")

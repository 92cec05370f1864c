"""The table of budget kinds: the one place config validation, schedules, recipes, the CLI and the allocation
(:mod:`hf_prune.budget`) read what a budget is.

A budget says how much of the dense model a plan may keep. Built-in kinds are :class:`PruningConfig` fields
(``heads_keep`` and ``neurons_keep`` form one budget, every other kind stands alone, except that ``layers_keep``,
the depth budget, combines with any one width budget); a kind added with
:func:`register_budget` is set by name with ``PruningConfig(custom_budget={name: value})``. A cost kind
(``unit_costs`` + ``limit``) is allocated by :func:`build_plan` with no other change: units are ranked by score and
kept while their summed cost fits the limit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from .adapters import model_dims
from .costs import fixed_params
from .plan import PrunePlan

if TYPE_CHECKING:
    from .costs import CostModel
    from .importance import ImportanceScores

#: (per query head, per KV head, per FFN neuron) cost of a unit at a sequence length
UnitCosts = Callable[["CostModel", int], tuple[float, float, float]]
#: how much the kept layers may cost in total: (value, model, cost model, seq_len) -> limit
Limit = Callable[[float, nn.Module, "CostModel", int], float]
#: a kind's own allocation: (scores, model, config, kept dense layers or None, context) -> plan; the scores are those
#: of the kept layers (the depth budget is applied before), context holds what the caller measured (latency_table)
Search = Callable[["ImportanceScores", nn.Module, Any, "list[int] | None", Mapping[str, Any]], PrunePlan]


@dataclass(frozen=True)
class BudgetKind:
    """One kind of budget.

    Args:
        name: the config field or ``custom_budget`` key (and recipe key / CLI flag for built-ins).
        group: kinds of one group are one budget and may be set together.
        value: ``fraction`` of the dense model, in (0, 1]; ``count``, a positive number; ``layers`` (the depth
            budget) or ``channels`` (the hidden-width budget), a fraction in (0, 1] or a whole count above 1.
        scheduled_from: what a gradual/iterative schedule moves the value from: ``one`` (keep everything),
            ``dense_params`` (the dense model's parameter count) or ``layers`` (every layer: iterative schedules
            remove layers round by round; gradual schedules choose them at the first event and fade them out).
        help: one line for ``--help`` and errors.
        method: the only pruning method that supports it (None: every method).
        unit_costs: for a cost budget, each unit's cost; None for count budgets and kinds with their own ``search``.
        limit: for a cost budget, the total the kept units may cost.
        search: an allocation of its own, which :func:`hf_prune.build_plan` calls instead of ranking units by cost
            (``latency_keep``: a knapsack over a measured latency table, registered in
            :mod:`hf_prune.retraining_free.latency`).
        combines: may be set together with one budget of another group (the depth budget).
        trades_depth: ``depth_search`` may spend it on fewer, wider layers (a cost budget that depth changes).
        several_values: a recipe (and its flag) may list several values of it: one run each.
        label: its part of a run's folder name (default: the name's first word and the value in percent).
    """

    name: str
    group: str
    value: Literal["fraction", "count", "layers", "channels"]
    scheduled_from: Literal["one", "dense_params", "layers"]
    help: str
    method: str | None = None
    unit_costs: UnitCosts | None = None
    limit: Limit | None = None
    search: Search | None = None
    combines: bool = False
    trades_depth: bool = False
    several_values: bool = False
    label: Callable[[float], str] | None = None

    def run_label(self, value: float) -> str:
        """``flops50``, ``params20M``, ``layers4``: this budget's part of a run's folder name."""
        return self.label(value) if self.label is not None else f"{self.name.split('_')[0]}{round(value * 100)}"

    def check(self, value: Any) -> None:
        if self.value in ("layers", "channels") and not (0 < value <= 1 or (value > 1 and float(value).is_integer())):
            raise ValueError(f"{self.name}={value} must be a fraction in (0, 1] of the {self.value} or a whole count "
                             f"of {self.value} above 1")
        if self.value == "fraction" and not 0 < value <= 1:
            raise ValueError(f"{self.name}={value} is outside (0, 1]: it is the fraction of the dense model to keep")
        if self.value == "count" and value <= 0:
            raise ValueError(f"{self.name}={value} must be positive")


BUDGETS: dict[str, BudgetKind] = {}
#: Kinds that are PruningConfig fields (the rest are set through ``custom_budget``); ``latency_keep`` is registered
#: with its search (:mod:`hf_prune.retraining_free.latency`).
FIELD_BUDGETS = ("heads_keep", "neurons_keep", "flops_keep", "target_params", "latency_keep", "layers_keep",
                 "hidden_keep")
#: The budget a command line or recipe uses when none is given: half the layer FLOPs.
DEFAULT_BUDGET = {"flops_keep": 0.5}


def register_budget(kind: BudgetKind) -> BudgetKind:
    """Make ``kind`` settable as ``PruningConfig(custom_budget={kind.name: value})`` and allocated by build_plan."""
    if kind.name in BUDGETS:
        raise ValueError(f"a budget kind named {kind.name!r} is already registered")
    BUDGETS[kind.name] = kind
    return kind


def set_budget(config: Any) -> dict[str, Any]:
    """Every budget ``config`` sets (fields that are not None, then ``custom_budget``), by kind name."""
    out = {name: getattr(config, name) for name in FIELD_BUDGETS if getattr(config, name, None) is not None}
    out.update(getattr(config, "custom_budget", None) or {})
    return out


def check_budget(config: Any) -> None:
    """Exactly one budget group set, each value in range, and supported by ``config.method``."""
    custom = getattr(config, "custom_budget", None) or {}
    unknown = sorted(set(custom) - set(BUDGETS))
    if unknown:
        raise ValueError(f"unknown budget kinds {unknown} in custom_budget; registered: {', '.join(BUDGETS)}")
    twice = sorted(k for k in custom if getattr(config, k, None) is not None)
    if twice:
        raise ValueError(f"{twice} set both as a field and in custom_budget: set each budget once")
    given = set_budget(config)
    for name, value in given.items():
        BUDGETS[name].check(value)
    groups = {BUDGETS[name].group for name in given if not BUDGETS[name].combines}
    if len(groups) > 1 or not given:
        listing = "; ".join(f"{b.name} ({b.help})" for b in BUDGETS.values())
        raise ValueError(f"set exactly one budget (heads_keep and neurons_keep count as one; layers_keep and "
                         f"hidden_keep may be added to any): {listing}")
    for name in given:
        method = BUDGETS[name].method
        if method is not None and config.method != method:
            raise ValueError(f"{name} needs method={method!r} (got method={config.method!r})")


def _flops_costs(cost: "CostModel", seq: int) -> tuple[float, float, float]:
    return cost.head_flops(seq), cost.kv_flops(seq), cost.neuron_flops(seq)


def _params_costs(cost: "CostModel", seq: int) -> tuple[float, float, float]:
    return cost.head_params, cost.kv_params, cost.neuron_params


def _flops_limit(value: float, model: nn.Module, cost: "CostModel", seq: int) -> float:
    dense = cost.with_hidden(model_dims(model)["hidden_size"])  # a fraction of the dense model's FLOPs
    return value * dense.total(PrunePlan.dense(model).layer_sizes(), seq)["total"]


def _params_limit(value: float, model: nn.Module, cost: "CostModel", seq: int) -> float:
    fixed = fixed_params(model, cost.hidden_size)[0]  # at the width the plan keeps
    if value - fixed < 0:
        raise ValueError(f"target_params={value} is unreachable: the parts pruning cannot touch (embeddings, norms, "
                         f"task head, output biases) already hold {fixed} parameters at a hidden width of "
                         f"{cost.hidden_size}; raise it or cut more hidden channels (hidden_keep)")
    return value - fixed


for _kind in (
    BudgetKind("heads_keep", "units", "fraction", "one", "fraction of attention heads to keep"),
    BudgetKind("neurons_keep", "units", "fraction", "one", "fraction of FFN neurons to keep"),
    BudgetKind("flops_keep", "flops", "fraction", "one", "fraction of the layers' FLOPs to keep",
               unit_costs=_flops_costs, limit=_flops_limit, trades_depth=True, several_values=True),
    BudgetKind("target_params", "params", "count", "dense_params", "total parameter count of the pruned model",
               unit_costs=_params_costs, limit=_params_limit, label=lambda v: f"params{v / 1e6:.3g}M"),
    BudgetKind("layers_keep", "depth", "layers", "layers", "fraction (<= 1) or count (> 1) of the layers to keep",
               combines=True, label=lambda v: f"layers{int(v)}" if v > 1 else f"layers{round(v * 100)}pct"),
    BudgetKind("hidden_keep", "hidden", "channels", "one",
               "fraction (<= 1) or count (> 1) of the hidden (residual) channels to keep", combines=True,
               label=lambda v: f"hidden{int(v)}" if v > 1 else f"hidden{round(v * 100)}pct"),
):
    register_budget(_kind)

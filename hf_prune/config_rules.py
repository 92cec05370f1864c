"""The rules a :class:`hf_prune.PruningConfig` must satisfy, as a table: each rule reads the config (and the
fields' defaults, to tell a set value from an untouched one) and returns the one-line error, or None.

A rule is added by appending a function to :data:`RULES`; methods add their own through
``PruningMethod.validate`` and budget kinds through ``BudgetKind.limit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .budget_kinds import BUDGETS, check_budget
from .criteria import CRITERIA
from .depth import LAYER_CRITERIA
from .hidden import HIDDEN_CRITERIA
from .methods.registry import check_method_settings, get_method

#: What one attention unit is under grouped-query attention (``head_unit``).
HEAD_UNITS = ("kv_group", "query_head")

Rule = Callable[[Any, dict[str, Any]], "str | None"]


def known_names(c: Any, defaults: dict[str, Any]) -> str | None:
    get_method(c.method)  # unknown: the registry's one-line error naming the registered methods
    if c.importance not in CRITERIA:
        return f"unknown importance {c.importance!r}; choose one of {', '.join(CRITERIA)}"
    if c.layer_importance not in LAYER_CRITERIA:
        return f"unknown layer_importance {c.layer_importance!r}; choose one of {', '.join(LAYER_CRITERIA)}"
    if c.allocation not in ("global", "uniform"):
        return f"allocation must be 'global' or 'uniform', not {c.allocation!r}"
    if c.head_unit not in HEAD_UNITS:
        return f"head_unit must be one of {', '.join(HEAD_UNITS)}, not {c.head_unit!r}"
    return None


def budget(c: Any, defaults: dict[str, Any]) -> str | None:
    check_budget(c)  # the kinds' own ranges and combinations (raises with its message)
    return None


def layer_scoring(c: Any, defaults: dict[str, Any]) -> str | None:
    if c.layers_keep is None and not c.depth_search and c.layer_importance != defaults["layer_importance"]:
        return ("layer_importance only applies to a layers_keep budget or depth_search (it scores whole layers): set "
                "one of them or drop layer_importance")
    return None


def hidden_width(c: Any, defaults: dict[str, Any]) -> str | None:
    if c.hidden_importance not in HIDDEN_CRITERIA:
        return f"unknown hidden_importance {c.hidden_importance!r}; choose one of {', '.join(HIDDEN_CRITERIA)}"
    if c.hidden_keep is None and not c.hidden_search and c.hidden_importance != defaults["hidden_importance"]:
        return ("hidden_importance only applies to a hidden_keep budget or hidden_search (it scores hidden channels): "
                "set one of them")
    if c.hidden_search:
        if c.hidden_keep is not None:
            return "hidden_search chooses the hidden width itself: drop hidden_keep (or drop hidden_search)"
        if not any(BUDGETS[k].unit_costs is not None for k in c.budget()):
            return ("hidden_search trades hidden channels against heads and neurons under one cost budget: set "
                    "flops_keep or target_params")
        if c.depth_search or c.method != "one_shot":
            return "hidden_search runs with method='one_shot' and without depth_search (one search at a time)"
    searched = [k for k in c.budget() if BUDGETS[k].search is not None]
    if c.hidden_keep is not None and searched:
        return (f"{searched[0]} allocates from a table measured at the dense hidden width, so it cannot be combined "
                "with hidden_keep: use flops_keep or target_params with hidden_keep")
    return None


def depth_search(c: Any, defaults: dict[str, Any]) -> str | None:
    if not c.depth_search:
        return None
    if c.layers_keep is not None:
        return ("depth_search chooses the number of layers itself: drop layers_keep (or keep layers_keep and drop "
                "depth_search)")
    if not any(BUDGETS[k].trades_depth for k in c.budget()):
        return ("depth_search trades layers against heads and neurons under one cost budget: set flops_keep (or "
                "latency_keep with method='retraining_free')")
    return None


def method_settings(c: Any, defaults: dict[str, Any]) -> str | None:
    check_method_settings(c, defaults)  # another method's settings would be ignored: refused (raises)
    return None


def latency_table(c: Any, defaults: dict[str, Any]) -> str | None:
    if c.latency_keep is None and c.latency_batch_size != defaults["latency_batch_size"]:
        return ("latency_batch_size only applies to a latency_keep budget (it sizes the latency table): set "
                "latency_keep or drop latency_batch_size")
    if c.latency_batch_size < 1:
        return f"latency_batch_size must be >= 1, got {c.latency_batch_size}"
    if c.head_unit == "query_head" and c.latency_keep is not None:
        return ("head_unit='query_head' is allocated by flops_keep, target_params or heads_keep; the latency search "
                "keeps whole key/value groups: use head_unit='kv_group' with latency_keep")
    return None


def deployable(c: Any, defaults: dict[str, Any]) -> str | None:
    if not c.deployable:
        return None
    if any(not BUDGETS[k].combines for k in c.budget()) and c.allocation != "uniform":
        return ("deployable=True saves the stock architecture, which has one size for all layers: set "
                "allocation='uniform' (or prune depth only, with layers_keep alone)")
    if c.allow_empty_layers:
        return ("deployable=True cannot keep empty attention/FFN blocks (stock code builds every block): drop "
                "allow_empty_layers")
    return None


def positive_sizes(c: Any, defaults: dict[str, Any]) -> str | None:
    for name in ("round_to", "seq_len"):
        if getattr(c, name) < 1:
            return f"{name} must be >= 1, got {getattr(c, name)}"
    return None


def offload(c: Any, defaults: dict[str, Any]) -> str | None:
    scored = c.hidden_keep is not None or c.hidden_search
    if c.offload and scored and HIDDEN_CRITERIA[c.hidden_importance].whole_model_gradient:
        return (f"offload=True runs the gradient passes one layer at a time, but hidden_importance="
                f"{c.hidden_importance!r} backpropagates through every layer at once: use "
                "hidden_importance='activation' (or offload=False)")
    return None


def method_rules(c: Any, defaults: dict[str, Any]) -> str | None:
    method = get_method(c.method)
    if method.validate is not None:
        method.validate(c)  # the method's own rules (raise)
    return None


#: Checked in this order by ``PruningConfig.__post_init__``; the first error is raised.
RULES: list[Rule] = [known_names, budget, layer_scoring, hidden_width, depth_search, method_settings, latency_table,
                     deployable, positive_sizes, offload, method_rules]


def check_config(config: Any) -> None:
    """Raise ``ValueError`` with the first rule's message that ``config`` breaks."""
    defaults = {name: f.default for name, f in type(config).__dataclass_fields__.items()}
    for rule in RULES:
        if message := rule(config, defaults):
            raise ValueError(message)

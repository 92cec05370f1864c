"""Pruning methods: the registry (:mod:`.registry`) and the built-in methods, one module each. ``one_shot`` is
registered first: it is the default."""

from .one_shot import DEPTH_SEARCH_SAMPLES, ONE_SHOT, one_shot_plan
from .registry import (
    MethodContext,
    PruningMethod,
    check_method_settings,
    get_method,
    method_names,
    register_method,
    unregister_method,
)
from .retraining_free import RETRAINING_FREE

for _method in (ONE_SHOT, RETRAINING_FREE):
    register_method(_method)

__all__ = ["DEPTH_SEARCH_SAMPLES", "MethodContext", "PruningMethod", "check_method_settings", "get_method",
           "method_names", "one_shot_plan", "register_method", "unregister_method"]

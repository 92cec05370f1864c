"""Moved to :mod:`hf_prune.recipes.tasks` (only the recipes and benchmarks use GLUE tasks); this name is an
alias of it."""

import sys

from .recipes import tasks as _moved

sys.modules[__name__] = _moved

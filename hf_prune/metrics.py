"""Moved to :mod:`hf_prune.recipes.metrics` (only the recipes and benchmarks use GLUE metrics); this name is an
alias of it."""

import sys

from .recipes import metrics as _moved

sys.modules[__name__] = _moved

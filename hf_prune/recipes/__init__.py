"""Recipes: one config per task, run with ``hf-prune run CONFIG`` or ``accelerate launch recipes/run_*.py CONFIG``.

Each recipe is (dense fine-tune) → prune → recover → evaluate → save → report → (push). The config file's
``recipe:`` key picks the recipe; every other key is an argument of that recipe's dataclasses.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from .common import ConfigError, read_config_file

#: recipe name -> module with ``main(argv)``
RECIPES: dict[str, str] = {
    "glue": "hf_prune.recipes.glue",
    "clm": "hf_prune.recipes.clm",
    "image_classification": "hf_prune.recipes.image_classification",
    "embeddings": "hf_prune.recipes.embeddings",
}


def run_recipe(config: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the recipe named in ``config`` (a YAML/JSON file) with command-line ``overrides``."""
    name = read_config_file(config).get("recipe")
    if name is None:
        raise ConfigError(f"{config}: no 'recipe:' key; set it to one of {', '.join(RECIPES)}")
    if name not in RECIPES:
        raise ConfigError(f"{config}: unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[name]).main([config, *overrides])


__all__ = ["RECIPES", "ConfigError", "run_recipe"]

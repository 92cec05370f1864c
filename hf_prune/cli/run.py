"""``hf-prune run CONFIG``: run the recipe a config names."""

from __future__ import annotations

from ..recipes import RECIPES, run_recipe


def cmd_run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: hf-prune run CONFIG [--key value ...]\n")
        print("Run the recipe named in CONFIG (YAML/JSON, key 'recipe': " + ", ".join(RECIPES) + ").")
        print("Flags override the config's keys; 'hf-prune run CONFIG --help' lists every key of that recipe.")
        print("Examples: hf-prune run recipes/glue/sst2.yaml")
        print("          hf-prune run recipes/glue/mrpc.yaml --flops_keep 0.6 0.4 --recovery lora")
        return 0 if argv else 2
    run_recipe(argv[0], argv[1:])  # a ConfigError is a user error: one line from main()
    return 0

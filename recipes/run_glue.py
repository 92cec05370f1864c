#!/usr/bin/env python
"""Prune and recover a model on a GLUE task (or any text classification/regression dataset).

    python recipes/run_glue.py recipes/glue/sst2.yaml [--flag value ...]
    accelerate launch recipes/run_glue.py recipes/glue/mrpc.yaml --flops_keep 0.6 0.4

Same as ``hf-prune run CONFIG``. The steps live in :mod:`hf_prune.recipes.glue` (arguments:
``python recipes/run_glue.py --help``).
"""

from hf_prune.distributed import exit_launched
from hf_prune.recipes.glue import main

if __name__ == "__main__":
    main()
    exit_launched()

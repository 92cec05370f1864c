#!/usr/bin/env python
"""Prune a causal language model and recover it on text; held-out perplexity.

    python recipes/run_clm.py recipes/clm/smollm2.yaml [--flag value ...]
    accelerate launch recipes/run_clm.py recipes/clm/smollm2.yaml --flops_keep 0.8 0.7

Same as ``hf-prune run CONFIG``. The steps live in :mod:`hf_prune.recipes.clm` (arguments:
``python recipes/run_clm.py --help``).
"""

from hf_prune.distributed import exit_launched
from hf_prune.recipes.clm import main

if __name__ == "__main__":
    main()
    exit_launched()

#!/usr/bin/env python
"""Prune a sentence-transformers model and distil its embeddings; STS and retrieval quality.

    python recipes/run_embeddings.py recipes/embeddings/minilm.yaml [--flag value ...]
    accelerate launch recipes/run_embeddings.py recipes/embeddings/minilm.yaml --flops_keep 0.5 0.25

Same as ``hf-prune run CONFIG``. The steps live in :mod:`hf_prune.recipes.embeddings` (arguments:
``python recipes/run_embeddings.py --help``).
"""

from hf_prune.distributed import exit_launched
from hf_prune.recipes.embeddings import main

if __name__ == "__main__":
    main()
    exit_launched()

#!/usr/bin/env python
"""Prune and recover a ViT/DeiT image classifier (Hub dataset, image folder, or MNIST csv).

    python recipes/run_image_classification.py recipes/image/mnist_vit.yaml [--flag value ...]
    accelerate launch recipes/run_image_classification.py recipes/image/vit_hub_example.yaml --flops_keep 0.6 0.4

Same as ``hf-prune run CONFIG``. The steps live in :mod:`hf_prune.recipes.image_classification` (arguments:
``python recipes/run_image_classification.py --help``).
"""

from hf_prune.distributed import exit_launched
from hf_prune.recipes.image_classification import main

if __name__ == "__main__":
    main()
    exit_launched()

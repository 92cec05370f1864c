"""``python -m hf_prune.cli`` (and ``accelerate launch -m hf_prune.cli run ...``)."""

from . import main

raise SystemExit(main())

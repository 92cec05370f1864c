#!/usr/bin/env bash
# Creates .venv with a CPU build of PyTorch (pinned first, so nothing pulls a multi-GB CUDA build) and
# hf_prune installed editable with its test extras. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # On this project's machines torch==2.13.0 is a local CPU wheel; elsewhere take the CPU index.
  .venv/bin/python -m pip install -q "$TORCH_SPEC" \
    || .venv/bin/python -m pip install -q "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/python -m pip install -q -e ".[${HF_PRUNE_EXTRAS:-dev}]"   # HF_PRUNE_EXTRAS=dev,bench for benchmarks
.venv/bin/python -c "import torch, transformers, hf_prune; print(f'hf_prune {hf_prune.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"

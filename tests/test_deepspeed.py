"""PruningTrainer under DeepSpeed ZeRO-3: two processes on CPU (``DS_ACCELERATOR=cpu``, gloo) through `accelerate
launch` and ``TrainingArguments(deepspeed=...)``, which accelerate honours on a CPU as it is (no shim, unlike FSDP).
The cut happens before DeepSpeed partitions the model; the cut model and the KD teacher train partitioned; the
result must equal the DDP run's, save to a reloadable pruned checkpoint, and resume. Skipped without deepspeed
(the ``deepspeed`` extra), unless HF_PRUNE_REQUIRE_DEEPSPEED is set (CI), where a missing install fails."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import check_sharded_recovery

if os.environ.get("HF_PRUNE_REQUIRE_DEEPSPEED"):
    import deepspeed  # noqa: F401  (CI: a failed install fails here instead of skipping)
else:
    pytest.importorskip("deepspeed")

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.mark.parametrize("arch,method", [("bert", "one_shot"), ("llama", "retraining_free")])
def test_zero3_recovery_partitions_and_equals_ddp(tmp_path, arch, method):
    check_sharded_recovery(tmp_path, "zero3", arch, method, resume=True, DS_ACCELERATOR="cpu")


def test_zero3_refuses_a_partitioned_model_and_saves_without_gathering(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
    r = subprocess.run([sys.executable, str(SCRIPTS / "zero3_refusals.py"), str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith(("REFUSED", "ACCEPTED", "partitioned"))]
    assert lines[0] == "partitioned at load: True"  # what a script that parses its arguments first gets
    assert lines[1].startswith("REFUSED: the model's parameters are already partitioned by DeepSpeed ZeRO-3")
    assert "load the model before creating the TrainingArguments" in lines[1]
    assert lines[2].startswith("REFUSED: under ZeRO-3") and "stage3_gather_16bit_weights_on_model_save" in lines[2]

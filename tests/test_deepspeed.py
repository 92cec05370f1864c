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
from helpers import assert_reload_equals_gathered, launch_sharded
from tiny import BY_NAME

import hf_prune as hp

if os.environ.get("HF_PRUNE_REQUIRE_DEEPSPEED"):
    import deepspeed  # noqa: F401  (CI: a failed install fails here instead of skipping)
else:
    pytest.importorskip("deepspeed")

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.mark.parametrize("arch,method", [("bert", "one_shot"), ("llama", "retraining_free")])
def test_zero3_recovery_partitions_and_equals_ddp(tmp_path, arch, method):
    zero3 = launch_sharded(tmp_path, "zero3", arch, method, DS_ACCELERATOR="cpu")
    assert [r["world_size"] for r in zero3] == [2, 2]
    assert zero3[0]["plan"] == zero3[1]["plan"]  # every rank cut the same structure before DeepSpeed partitioned it
    dense = hp.PrunePlan.of(BY_NAME[arch].model())
    assert zero3[0]["plan"] != {"heads": dense.heads, "neurons": dense.neurons}  # something was pruned
    for rank in zero3:  # every matrix of the cut model is partitioned over the ranks, and so is the teacher
        assert rank["sharded"] == rank["params"] > 0 and rank["teacher_sharded"]
    assert_reload_equals_gathered(tmp_path, "zero3")
    if method == "retraining_free":
        return
    ddp = launch_sharded(tmp_path, "ddp", arch, method)
    assert ddp[0]["plan"] == zero3[0]["plan"] and ddp[0]["sharded"] == 0
    steps = sorted(ddp[0]["losses"], key=int)
    assert steps == [str(i) for i in range(1, 9)]
    for s in steps:  # the same cut, data and updates: the partitioned run computes what the replicated one does
        assert zero3[0]["losses"][s] == pytest.approx(ddp[0]["losses"][s], rel=1e-5, abs=1e-7), s
    resumed = launch_sharded(tmp_path, "zero3-resume", arch, method, DS_ACCELERATOR="cpu")  # from the ZeRO-3 run's step-4 checkpoint
    assert sorted(resumed[0]["losses"], key=int) == steps  # steps 1-4 from the checkpoint's state, 5-8 trained
    for s in ("5", "6", "7", "8"):
        assert resumed[0]["losses"][s] == pytest.approx(zero3[0]["losses"][s], rel=1e-5, abs=1e-7), s
    assert_reload_equals_gathered(tmp_path, "zero3-resume")


def test_zero3_refuses_a_partitioned_model_and_saves_without_gathering(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29517"}
    r = subprocess.run([sys.executable, str(SCRIPTS / "zero3_refusals.py"), str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith(("REFUSED", "ACCEPTED", "partitioned"))]
    assert lines[0] == "partitioned at load: True"  # what a script that parses its arguments first gets
    assert lines[1].startswith("REFUSED: the model's parameters are already partitioned by DeepSpeed ZeRO-3")
    assert "load the model before creating the TrainingArguments" in lines[1]
    assert lines[2].startswith("REFUSED: under ZeRO-3") and "stage3_gather_16bit_weights_on_model_save" in lines[2]

"""Two processes on CPU (gloo) through `accelerate launch`: every rank must build the same plan."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_prune.py"


@pytest.mark.parametrize("schedule", ["one_shot", "gradual", "retraining_free"])
def test_two_process_run_prunes_identically_on_every_rank(tmp_path, schedule):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(launcher + [str(SCRIPT), str(tmp_path), schedule], capture_output=True, text=True,
                       env=env, timeout=600)
    done = [tmp_path / f"rank{i}.json" for i in range(2)]  # written by each rank after its last step
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    ranks = [json.loads(p.read_text()) for p in done]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["plan"] == ranks[1]["plan"]
    assert ranks[0]["plan"]["heads"] != [[0, 1, 2, 3]] * 3  # something was pruned
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # DDP kept the pruned replicas in sync
    assert all(r["retraining_free"] for r in ranks) == (schedule == "retraining_free")


@pytest.mark.parametrize("code", [0, 3])
def test_exit_launched_runs_atexit_and_skips_finalization(tmp_path, code):
    """gloo's worker threads abort an interpreter that finalizes while they drop a collective's Python tensors
    (hf_prune.distributed.exit_launched); a launched script ends without finalizing, after its atexit handlers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(SCRIPT.parent / "exit_launched.py"), str(tmp_path), str(code)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert (r.returncode == 0) == (code == 0), (r.stdout[-2000:], r.stderr[-4000:])
    assert "before exit" in r.stdout and "after exit" not in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atexit0", "atexit1"]  # no finalized{rank}
    if code:
        assert f"exitcode  : {code}" in r.stderr

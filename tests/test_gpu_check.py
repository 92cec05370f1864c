"""``scripts/gpu_check.py`` is run only where a GPU is lent (minutes, rarely): its parts are run here on the CPU with
``--quick`` so that an API change breaks this test, not a scarce GPU run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(part: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--part", part, "--device", "cpu",
                           "--quick", "--models_dir", str(out.parent / "none"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())[part]


def test_latency_and_trainer_parts_write_their_sections(tmp_path):
    out = tmp_path / "gpu.json"
    lat = _run("latency", out)
    assert {(r["flops_keep"], r["batch"]) for r in lat["rows"]} == {(k, b) for k in (0.75, 0.5, 0.4) for b in (1, 4)}
    assert all(r["dense_ms"] > 0 and r["pruned_ms"] > 0 for r in lat["rows"]) and lat["real_weights"]
    tr = _run("trainer", out)
    assert tr["steps"] == 8 and tr["losses"] and abs(tr["flops_kept"] - 0.5) < 0.02
    assert set(json.loads(out.read_text())) == {"latency", "trainer"}  # sections merge, none is overwritten


def test_streamed_part_scores_the_model_on_the_device_and_offloaded(tmp_path):
    st = _run("streamed", tmp_path / "gpu.json")
    assert st["shape"] == "smollm2-135m" and st["tokens"] == 64
    assert st["device"]["kept_layer_sizes"] == st["cpu_offload"]["kept_layer_sizes"]  # the same plan either way
    assert st["device"]["seconds"] > 0 and st["cpu_offload"]["seconds"] > 0


@pytest.mark.slow
def test_retraining_free_part(tmp_path):
    rf = _run("retraining_free", tmp_path / "gpu.json")
    assert rf["minilm"]["prune_s"] > 0 and rf["smollm2"]["decode_ms"] > 0

"""`hf-prune` commands: help, inspect and bench on a saved checkpoint, run dispatch."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_plan
from tiny import BY_NAME

import hf_prune as hp
from hf_prune.cli import checkpoint_summary, dense_base, main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    spec = BY_NAME["bert"]
    model = spec.model()
    plan = random_plan(model, seed=3)
    hp.apply_plan_(model, plan)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    return path, model, plan


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for cmd in ("run", "prune", "inspect", "bench"):
        assert f"  {cmd}" in text
    assert main(["frobnicate"]) == 2


def test_inspect_reports_kept_sizes_params_and_flops(checkpoint, capsys):
    path, model, plan = checkpoint
    assert main(["inspect", str(path), "--json", "true"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [r["heads"] for r in info["layers"]] == [len(h) for h in plan.heads]
    assert [r["neurons"] for r in info["layers"]] == [len(n) for n in plan.neurons]
    assert info["params"] == hp.count_params(model)
    assert info["layer_flops"] == hp.count_flops(model, 128)["total"]
    dense = dense_base(model)
    assert info["dense_params"] == hp.count_params(dense)
    assert info["dense_layer_flops"] == hp.count_flops(dense, 128)["total"]
    assert main(["inspect", str(path)]) == 0
    table = capsys.readouterr().out
    assert f"| 0 | {len(plan.heads[0])}/{plan.num_heads} |" in table and "params (all)" in table


def test_checkpoint_summary_of_a_dense_model_keeps_everything():
    model = BY_NAME["llama"].model()
    info = checkpoint_summary(model)
    assert info["params"] == info["dense_params"] and info["layer_flops"] == info["dense_layer_flops"]


def test_bench_times_checkpoint_against_dense_base(checkpoint, capsys):
    path, model, _ = checkpoint
    assert main(["bench", str(path), "--batch_sizes", "1", "2", "--seq_len", "8", "--repeats", "2",
                 "--json", "true"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["batch"] for r in out["rows"]] == [1, 2]
    ideal = hp.count_flops(dense_base(model), 8)["total"] / hp.count_flops(model, 8)["total"]
    for row in out["rows"]:
        assert row["dense ms"] > 0 and row["pruned ms"] > 0
        assert row["FLOPs-ideal"] == pytest.approx(ideal)


def test_dense_base_has_stock_class_and_dense_shapes(checkpoint):
    _, model, plan = checkpoint
    base = dense_base(model)
    assert type(base).__name__ == type(model).__name__.removeprefix("Pruned")
    assert hp.PrunePlan.of(base) == hp.PrunePlan.dense(model)
    x = BY_NAME["bert"].batch(labels=False)
    with torch.no_grad():
        base(**x)


def test_missing_local_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        main(["inspect", str(tmp_path / "nope"), "--debug"])  # without --debug: one line, see test_settings.py


def test_run_without_config_prints_usage(capsys):
    assert main(["run"]) == 2
    assert "hf-prune run CONFIG" in capsys.readouterr().out

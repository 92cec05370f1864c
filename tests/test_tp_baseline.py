"""The Torch-Pruning baseline of the side-by-side benchmarks (``benchmarks/tp_baseline.py``) on tiny models: it
lands on the FLOPs budget, and the TP-pruned model computes what the dense model computes with the same units
masked (encoders) or what hf_prune's replay of the units TP kept computes (decoders). Every Torch-Pruning number in
``benchmarks/results`` rests on these two facts, and a new torch / transformers / torch-pruning can break TP's graph
tracing without any other test noticing.

Needs torch-pruning (the ``bench`` extra: ``HF_PRUNE_EXTRAS=dev,bench bash scripts/setup.sh``); without it the module
is skipped, unless ``HF_PRUNE_REQUIRE_BENCH=1`` (CI sets it, so a missing install fails there instead of skipping).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path

import pytest
from tiny import BY_NAME

import hf_prune as hp
from hf_prune.adapters import model_dims

if importlib.util.find_spec("torch_pruning") is None:
    if os.environ.get("HF_PRUNE_REQUIRE_BENCH") == "1":
        raise ImportError("HF_PRUNE_REQUIRE_BENCH=1 but torch-pruning is missing: HF_PRUNE_EXTRAS=dev,bench "
                          "bash scripts/setup.sh")
    pytest.skip("needs torch-pruning (HF_PRUNE_EXTRAS=dev,bench bash scripts/setup.sh)", allow_module_level=True)

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # after tests/ and site-packages
import tp_baseline

SEQ = 16  # the cost model's sequence length for the budget


def _flops(model) -> float:
    return hp.count_flops(model, SEQ)["total"]


@pytest.mark.parametrize("name", ["bert", "roberta"])
@pytest.mark.parametrize("importance,scope", [("taylor", "local"), ("magnitude", "local"), ("taylor", "global")])
def test_tp_prune_encoder_meets_budget_and_equals_masked_dense(name, importance, scope):
    tiny = BY_NAME[name]
    dense = tiny.model()
    calib = [tiny.batch(seed=s) for s in (1, 2)]
    model, info = tp_baseline.tp_prune(copy.deepcopy(dense), 0.5, importance, calib, scope=scope, seq_len=SEQ)
    want = info["target"]
    assert _flops(model) <= 0.5 * _flops(dense) + 1e-6
    plan = tp_baseline.kept_units(model, dense)
    dims = model_dims(dense)
    removed_heads = sum(dims["num_heads"] - len(h) for h in plan.heads)
    removed_neurons = sum(dims["intermediate_size"] - len(n) for n in plan.neurons)
    n = 1 if scope == "global" else plan.num_layers  # local counts are per layer
    assert (removed_heads, removed_neurons) == (n * want["heads_removed"], n * want["neurons_removed"])
    if scope == "local":
        assert len({len(h) for h in plan.heads}) == 1 and len({len(u) for u in plan.neurons}) == 1
    # the attributes attention reads were set from the new shapes, and the model equals dense with the cut masked
    assert tp_baseline.max_diff_vs_masked(model, dense, plan, [tiny.batch(seed=9)]) < 1e-5
    # and equals hf_prune's own surgery of the same units (the plan is a complete description of TP's cut)
    assert tp_baseline.max_diff_vs_replay(model, dense, plan, [tiny.batch(seed=9)]) < 1e-5


@pytest.mark.parametrize("importance", ["taylor", "magnitude"])
def test_tp_prune_decoder_meets_budget_and_equals_replay(importance):
    tiny = BY_NAME["llama"]
    dense = tiny.model()
    calib = [tiny.batch(seed=s) for s in (1, 2)]
    model, info = tp_baseline.tp_prune_decoder(copy.deepcopy(dense), 0.6, importance, calib, seq_len=SEQ)
    assert _flops(model) <= 0.6 * _flops(dense) + 1e-6
    plan = tp_baseline.kept_units(model, dense)
    assert tp_baseline.max_diff_vs_replay(model, dense, plan, [tiny.batch(seed=9)]) < 1e-5
    assert info["target"]["neurons_removed"] > 0

"""Extension points are registries: a new criterion, layer criterion, budget kind or architecture is one registration
call, with no edit of library files, and then works everywhere (config validation, plans, cuts)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as T
from tiny import BY_NAME, inputs_only

import hf_prune as hp
from hf_prune.budget import BUDGETS, BudgetKind, register_budget
from hf_prune.criteria import CRITERIA, Criterion, register_criterion


@pytest.fixture
def toy_criterion():
    """Keep the units with the largest ids: easy to check, and nothing else ranks that way."""

    def by_position(model, seed):
        plan = hp.PrunePlan.of(model)
        return ([torch.tensor(h, dtype=torch.float) for h in plan.heads],
                [torch.tensor(n, dtype=torch.float) for n in plan.neurons])

    register_criterion(Criterion("by_position", "larger ids first", score=by_position))
    yield "by_position"
    CRITERIA.pop("by_position")


def test_a_registered_criterion_prunes(toy_criterion):
    model = BY_NAME["bert"].model()
    cfg = hp.PruningConfig(importance=toy_criterion, heads_keep=0.5, neurons_keep=0.5, allocation="uniform")
    _, plan = hp.prune(model, None, cfg)
    assert plan.heads == [[2, 3]] * 3 and plan.neurons == [list(range(24, 48))] * 3
    assert plan.meta["criterion"] == "by_position"
    with pytest.raises(ValueError, match="already registered"):
        register_criterion(CRITERIA[toy_criterion])


def test_a_registered_gradient_criterion_uses_the_mask_gradients():
    register_criterion(Criterion("max_grad", "largest per-sample |dL/dm|", reduce=lambda g: g.abs().amax(0)))
    try:
        model = BY_NAME["bert"].model()
        batches = [BY_NAME["bert"].batch(seed=s) for s in range(2)]
        scores = hp.compute_importance(model, batches, "max_grad", progress=False)
        assert scores.comparable and torch.isfinite(scores.heads).all() and (scores.heads > 0).any()
        fisher = hp.compute_importance(model, batches, "fisher", progress=False)
        assert scores.heads.argmax() != fisher.heads.argmin()  # a real score, not noise
    finally:
        CRITERIA.pop("max_grad")


def test_a_registered_budget_kind_is_allocated_by_build_plan():
    """A cap on attention+FFN parameters per layer, as a fraction of the dense layers' (not a built-in)."""
    def params_costs(cost, seq):
        return cost.head_params, cost.kv_params, cost.neuron_params

    def params_limit(value, model, cost, seq):
        return value * cost.total(hp.PrunePlan.dense(model).layer_sizes())["total"]

    register_budget(BudgetKind("layer_params_keep", "layer_params", "fraction", "one",
                               "fraction of the layers' parameters to keep", unit_costs=params_costs,
                               limit=params_limit))
    try:
        model = BY_NAME["llama"].model()
        cost = hp.CostModel.for_model(model)
        dense = cost.total(hp.PrunePlan.dense(model).layer_sizes())["total"]
        _, plan = hp.prune(model, None, hp.PruningConfig(importance="magnitude",
                                                         custom_budget={"layer_params_keep": 0.5}))
        assert plan.meta["budget"] == {"layer_params_keep": 0.5}
        kept = cost.total(plan.layer_sizes())["total"]
        assert 0.4 * dense < kept <= 0.5 * dense
        with pytest.raises(ValueError, match="outside \\(0, 1\\]"):
            hp.PruningConfig(custom_budget={"layer_params_keep": 1.5})
        with pytest.raises(ValueError, match="exactly one budget"):
            hp.PruningConfig(flops_keep=0.5, custom_budget={"layer_params_keep": 0.5})
    finally:
        BUDGETS.pop("layer_params_keep")
    with pytest.raises(ValueError, match="unknown budget kinds"):
        hp.PruningConfig(custom_budget={"layer_params_keep": 0.5})


def test_a_registered_adapter_prunes_a_new_family():
    from hf_prune.adapters import _REGISTRY, BERT

    class ToyConfig(T.BertConfig):
        model_type = "toy-bert"

    class ToyModel(T.BertModel):
        config_class = ToyConfig

    hp.register_adapter(dataclasses.replace(BERT, model_type="toy-bert"))
    try:
        model = ToyModel(ToyConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48)).eval()
        x = inputs_only(BY_NAME["bert"].batch())
        dense_flops = hp.count_flops(model, 16)["total"]
        _, plan = hp.prune(model, None, hp.PruningConfig(importance="magnitude", flops_keep=0.5, seq_len=16))
        assert 0.4 * dense_flops < hp.count_flops(model, 16)["total"] <= 0.5 * dense_flops
        with torch.no_grad():
            model(**x)
    finally:
        _REGISTRY.pop("toy-bert")


def test_a_registered_layer_criterion_chooses_the_layers_removed():
    """A statistic no built-in computes (the inverse of the output norm): the registered function decides which
    layers stay."""
    from hf_prune.depth import LAYER_CRITERIA

    def output_norm_inverse(x, y, mask):  # (B, T, D) -> (B,): small outputs = important, the reverse of usual
        return 1.0 / y.float().norm(dim=-1).mean(-1)

    hp.register_layer_criterion(hp.LayerCriterion("inverse_norm", "1 / |output|", stat=output_norm_inverse))
    try:
        tiny = BY_NAME["llama"]
        model = tiny.model()
        batches = [tiny.batch(seed=s) for s in range(2)]
        scores = hp.layer_importance(model, batches, "inverse_norm", progress=False)
        _, plan = hp.prune(model, batches, hp.PruningConfig(layers_keep=2, layer_importance="inverse_norm",
                                                            progress=False))
        assert plan.kept_layers == sorted(torch.argsort(scores, descending=True)[:2].tolist())
        with pytest.raises(ValueError, match="already registered"):
            hp.register_layer_criterion(LAYER_CRITERIA["inverse_norm"])
    finally:
        LAYER_CRITERIA.pop("inverse_norm")

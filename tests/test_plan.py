import pytest
import torch
from tiny import BY_NAME

import hf_prune as hp


def _scores(model, seed=0, criterion="fisher"):
    """Deterministic random scores on a shared scale (as a gradient criterion gives)."""
    d = hp.PrunePlan.dense(model)
    g = torch.Generator().manual_seed(seed)
    return hp.ImportanceScores(
        heads=torch.rand(d.num_layers, d.num_heads, generator=g),
        neurons=torch.rand(d.num_layers, d.intermediate_size, generator=g) * 0.05,
        criterion=criterion,
    )


def _model(name="bert"):
    return BY_NAME[name].model()


def test_fraction_budgets_uniform_keep_the_top_units_of_each_layer():
    model = _model()
    scores = _scores(model)
    plan = hp.build_plan(scores, model, hp.PruningConfig(heads_keep=0.5, neurons_keep=0.25, allocation="uniform"))
    for i in range(3):
        assert plan.heads[i] == sorted(torch.topk(scores.heads[i], 2).indices.tolist())
        assert plan.neurons[i] == sorted(torch.topk(scores.neurons[i], 12).indices.tolist())


def test_fraction_budgets_global_keep_the_global_top_units():
    model = _model()
    scores = _scores(model)
    plan = hp.build_plan(scores, model, hp.PruningConfig(heads_keep=0.5, allocation="global"))
    assert sum(map(len, plan.heads)) == 6
    kept = torch.zeros_like(scores.heads, dtype=torch.bool)
    for i, hs in enumerate(plan.heads):
        kept[i, hs] = True
    # every layer keeps its best head; beyond that the kept ones outscore the dropped ones
    best = scores.heads.argmax(1)
    assert kept[torch.arange(3), best].all()
    others = kept.clone()
    others[torch.arange(3), best] = False
    dropped = ~kept
    assert scores.heads[others].min() >= scores.heads[dropped].max()
    assert plan.neurons == [list(range(48))] * 3  # neurons untouched


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("keep", [0.75, 0.5, 0.4])
def test_flops_budget_is_met_and_never_exceeded(allocation, round_to, keep):
    model = _model()
    plan = hp.build_plan(
        _scores(model), model, hp.PruningConfig(flops_keep=keep, allocation=allocation, round_to=round_to, seq_len=32)
    )
    dense = hp.count_flops(model, 32)["total"]
    got = hp.plan_flops(plan, model, 32)["total"]
    assert got <= keep * dense
    # within one unit of the budget: a head costs ~8% of a tiny layer, so allow that much slack
    assert got >= keep * dense - 0.1 * dense
    for ns in plan.neurons:
        assert len(ns) % round_to == 0 or len(ns) == 48
    if allocation == "uniform":
        assert len({len(h) for h in plan.heads}) == 1 and len({len(n) for n in plan.neurons}) == 1


def test_global_flops_search_trades_heads_for_neurons_by_score():
    model = _model()
    s = _scores(model)
    s.heads[:] = 1e-6  # worthless heads: all go but the one each layer must keep
    plan = hp.build_plan(s, model, hp.PruningConfig(flops_keep=0.5, seq_len=32))
    assert [len(h) for h in plan.heads] == [1, 1, 1]
    assert sum(map(len, plan.neurons)) > 0.5 * 3 * 48


def test_params_budget():
    model = _model()
    target = int(hp.count_params(model) * 0.9)
    plan = hp.build_plan(_scores(model), model, hp.PruningConfig(target_params=target))
    got = hp.plan_params(plan, model)
    assert got <= target
    assert got >= target - 3 * 32 * 4 * 3  # within a couple of heads' parameters
    hp.apply_plan_(model, plan)
    assert hp.count_params(model) == got


def test_gqa_budget_keeps_whole_groups():
    model = _model("llama")
    plan = hp.build_plan(_scores(model), model, hp.PruningConfig(heads_keep=0.5))
    for hs in plan.heads:
        assert len(hs) % 2 == 0 and all(h // 2 == hs[k - k % 2] // 2 for k, h in enumerate(hs))
    assert sum(map(len, plan.heads)) == 6


def test_layers_keep_a_head_and_a_neuron_unless_empty_layers_are_allowed():
    model = _model()
    s = _scores(model)
    s.heads[1] = 0
    s.neurons[1] = 0
    strict = hp.build_plan(s, model, hp.PruningConfig(flops_keep=0.3, seq_len=32))
    assert len(strict.heads[1]) >= 1 and len(strict.neurons[1]) >= 1
    loose = hp.build_plan(s, model, hp.PruningConfig(flops_keep=0.3, seq_len=32, allow_empty_layers=True))
    assert loose.heads[1] == [] and loose.neurons[1] == []


def test_non_gradient_scores_are_put_on_one_scale():
    """Magnitude scores of heads and neurons live on unrelated scales; the split must not follow the scale."""
    model = _model()
    d = hp.PrunePlan.dense(model)
    g = torch.Generator().manual_seed(0)
    for head_scale in (1e4, 1e-4):
        s = hp.ImportanceScores(
            torch.rand(3, d.num_heads, generator=g) * head_scale, torch.rand(3, 48, generator=g), "magnitude"
        )
        kept = hp.build_plan(s, model, hp.PruningConfig(flops_keep=0.5, seq_len=32)).kept_fraction()
        assert 0.2 <= kept["heads"] <= 0.8 and 0.2 <= kept["neurons"] <= 0.8, kept


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"flops_keep": 0.0}, r"outside \(0, 1\]"),
        ({"heads_keep": 1.5}, r"outside \(0, 1\]"),
        ({"target_params": -3}, "positive"),
        ({}, "exactly one budget"),
        ({"flops_keep": 0.5, "heads_keep": 0.5}, "exactly one budget"),
        ({"flops_keep": 0.5, "importance": "l0"}, "unknown importance 'l0'"),
        ({"flops_keep": 0.5, "allocation": "per-layer"}, "allocation"),
        ({"flops_keep": 0.5, "round_to": 0}, "round_to"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hp.PruningConfig(**kwargs)


def test_unknown_config_keys_are_listed():
    with pytest.raises(ValueError, match="unknown PruningConfig keys \\['flop_keep'\\].*flops_keep"):
        hp.PruningConfig.from_dict({"flop_keep": 0.5})


def test_unreachable_budgets_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="unreachable.*allow_empty_layers"):
        hp.build_plan(_scores(model), model, hp.PruningConfig(flops_keep=0.01, seq_len=32))
    with pytest.raises(ValueError, match="target_params=.* unreachable.*embeddings"):
        hp.build_plan(_scores(model), model, hp.PruningConfig(target_params=1000))


def test_plans_for_other_models_are_refused():
    bert, other = _model("bert"), _model("distilbert")
    plan = hp.PrunePlan.dense(bert)
    with pytest.raises(hp.PlanMismatchError, match="model_type: plan bert vs model distilbert"):
        hp.apply_plan_(other, plan)
    shallower = hp.PrunePlan.from_dict({**plan.to_dict(), "heads": plan.heads[:2], "neurons": plan.neurons[:2]})
    with pytest.raises(hp.PlanMismatchError, match="num_layers: plan 2 vs model 3"):
        hp.apply_plan_(bert, shallower)
    wrong = hp.ImportanceScores(torch.rand(2, 4), torch.rand(2, 48), "fisher")
    with pytest.raises(hp.PlanMismatchError, match="do not fit this model"):
        hp.build_plan(wrong, bert, hp.PruningConfig(heads_keep=0.5))


def test_plan_json_round_trip_and_validation(tmp_path):
    model = _model()
    plan = hp.build_plan(_scores(model), model, hp.PruningConfig(flops_keep=0.5, seq_len=32))
    plan.save(tmp_path / "p.json")
    assert hp.PrunePlan.load(tmp_path / "p.json") == plan
    assert plan.meta["budget"] == {"flops_keep": 0.5} and plan.meta["criterion"] == "fisher"
    with pytest.raises(hp.PlanMismatchError, match="in \\[0, 4\\)"):
        hp.PrunePlan.from_dict({**plan.to_dict(), "heads": [[0, 9], [1], [2]]})
    with pytest.raises(hp.PlanMismatchError, match="not a valid hf_prune plan"):
        hp.PrunePlan.from_dict({"heads": []})


def test_prune_one_call():
    tiny = BY_NAME["bert"]
    model = tiny.model()
    dense_flops = hp.count_flops(model, 16)["total"]
    out, plan = hp.prune(model, [tiny.batch()], hp.PruningConfig(flops_keep=0.5, seq_len=16, progress=False))
    assert out is model and model.prune_plan is plan
    assert hp.count_flops(model, 16)["total"] <= 0.5 * dense_flops

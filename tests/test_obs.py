"""OBS reselection inside mask tuning: the elimination's removal cost is the exact least-squares increase, the
reselected units keep each layer's counts and fold into an ordinary cut model, and the pipeline compares the
candidate on held-out samples."""

import copy
import itertools

import pytest
import torch
from helpers import assert_fold_then_cut_equals_masked
from tiny import BY_NAME, inputs_only, output_tensor

import hf_prune as hp
from hf_prune.retraining_free.obs import NormalEquations, backward_eliminate
from hf_prune.retraining_free.tuning import reselected_plan

FAMILIES = ["bert", "distilbert", "vit", "llama"]


def _problem(n_cols=8, m=3, rows=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, n_cols, generator=g, dtype=torch.float64)
    X[:, 1] = X[:, 0] + 0.05 * torch.randn(rows, generator=g, dtype=torch.float64)  # two near-duplicates
    R = X @ torch.randn(n_cols, m, generator=g, dtype=torch.float64) + 0.1 * torch.randn(rows, m, generator=g,
                                                                                         dtype=torch.float64)
    normal = NormalEquations(n_cols, m)
    normal.add(X, R)
    return X, R, normal


def _ridge_err(X, R, cols, lam):
    """min ||X_S W - R||^2 + lam ||W||^2 over W, kept columns ``cols``."""
    Xs = X[:, cols]
    W = torch.linalg.solve(Xs.T @ Xs + lam * torch.eye(len(cols), dtype=X.dtype), Xs.T @ R)
    return float((Xs @ W - R).pow(2).sum() + lam * W.pow(2).sum())


@pytest.mark.parametrize("group", [1, 2])
def test_one_elimination_step_removes_the_group_whose_removal_costs_least(group):
    X, R, normal = _problem(seed=group)
    damping = 0.01
    lam = damping * float(normal.XtX.diagonal().mean()) + 1e-12
    groups = [list(range(g * group, (g + 1) * group)) for g in range(X.shape[1] // group)]
    kept = backward_eliminate(normal, groups, len(groups) - 1, damping)
    errs = {g: _ridge_err(X, R, [c for k in range(len(groups)) if k != g for c in groups[k]], lam)
            for g in range(len(groups))}
    (removed,) = set(range(len(groups))) - set(kept)
    assert errs[removed] == pytest.approx(min(errs.values()), rel=1e-9)


def test_elimination_keeps_the_count_and_lands_among_the_best_choices():
    X, R, normal = _problem(n_cols=10, seed=3)
    lam = 0.01 * float(normal.XtX.diagonal().mean())
    kept = backward_eliminate(normal, [[j] for j in range(10)], 4, 0.01)
    assert len(kept) == 4 and kept == sorted(kept)
    assert not {0, 1} <= set(kept)  # never both of the near-duplicate pair
    best = min(_ridge_err(X, R, list(c), lam) for c in itertools.combinations(range(10), 4))
    others = [_ridge_err(X, R, list(c), lam) for c in itertools.combinations(range(10), 4)]
    mine = _ridge_err(X, R, kept, lam)
    assert mine <= sorted(others)[len(others) // 10]  # in the best tenth of all 210 choices
    assert mine >= best * (1 - 1e-9)
    assert backward_eliminate(normal, [[j] for j in range(10)], 10, 0.01) == list(range(10))
    chunked = backward_eliminate(normal, [[j] for j in range(10)], 4, 0.01, max_steps=2)  # 3 per round
    assert len(chunked) == 4 and chunked == sorted(chunked)


@pytest.mark.parametrize("name", FAMILIES)
def test_reselected_units_keep_the_counts_and_fold_into_the_cut_model_exactly(name):
    model = BY_NAME[name].model()
    batches = [BY_NAME[name].batch(batch_size=4, seq_len=9, seed=s) for s in range(4)]
    fisher = hp.fisher_information(model, batches, progress=False)
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.5, seq_len=16, progress=False)
    plan = hp.search_masks(fisher, model, config)
    tuning = hp.tune_masks(model, batches, plan, fit="weights", reselect=True, progress=False)
    new = reselected_plan(plan, hp.PrunePlan.of(model), tuning)
    assert [len(h) for h in new.heads] == [len(h) for h in plan.heads]
    assert [len(n) for n in new.neurons] == [len(n) for n in plan.neurons]
    assert (new.heads, new.neurons) != (plan.heads, plan.neurons)  # it chose differently somewhere
    for i in range(new.num_layers):  # whole KV groups
        assert len(new.kv_heads(i)) * new.group_size == len(new.heads[i])
    inputs = inputs_only(BY_NAME[name].batch(batch_size=2, seq_len=11, seed=9))
    assert_fold_then_cut_equals_masked(model, tuning, new, inputs, output_tensor)
    assert hp.PrunePlan.from_dict(new.to_dict()).to_dict() == new.to_dict()  # still a JSON value


def test_reselect_needs_the_weights_fit():
    model = BY_NAME["bert"].model()
    batches = [BY_NAME["bert"].batch(batch_size=4, seq_len=9, seed=0)]
    with pytest.raises(ValueError, match="needs fit='weights'"):
        hp.tune_masks(model, batches, hp.PrunePlan.of(model), fit="scales", reselect=True, progress=False)


@pytest.mark.parametrize("select", [True, False])
def test_the_pipeline_tunes_an_obs_candidate_and_cuts_what_it_chose(select):
    model = BY_NAME["bert"].model()
    dense = copy.deepcopy(model)
    batches = [BY_NAME["bert"].batch(batch_size=8, seq_len=9, seed=s) for s in range(8)]
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.5, seq_len=16, tuning_samples=32,
                              selection_samples=32, select_stages=select, obs_reselection=True, progress=False)
    pruned, plan = hp.prune(model, batches, config)
    info = plan.meta["retraining_free"]
    if select:
        assert "tuned_obs" in info["selection"]["divergence"]
        assert (plan.meta.get("reselected") == "obs") == (info["selection"]["chosen"] == "tuned_obs")
    else:
        assert plan.meta["reselected"] == "obs"
    # the cut model has the plan's shapes and differs from the dense one
    assert [dict(s) for s in hp.PrunePlan.of(pruned).layer_sizes()] == [dict(s) for s in plan.layer_sizes()]
    x = inputs_only(batches[0])
    with torch.no_grad():
        assert not torch.allclose(output_tensor(pruned(**x)), output_tensor(dense(**x)))

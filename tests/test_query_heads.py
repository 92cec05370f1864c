"""Query heads inside key/value groups (``head_unit="query_head"``): a layer keeps some of its KV heads and the same
number of query heads in each. The cut equals the masked dense model, reloads, generates with the cache like the
masked model, exports as the stock architecture when every layer has one shape, and the allocation keeps every
layer balanced under its budget, including a model with a single KV head (Gemma-3-270M's shape)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from helpers import generate_cached_uncached_masked, masked_output, random_plan
from tiny import BY_NAME, inputs_only, output_tensor

import hf_prune as hp
from hf_prune.shapes import get_module, layer_list

DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


def _gqa(name: str, heads: int = 6, kv: int = 2, seed: int = 0):
    """The tiny decoder with ``heads`` query heads of size 8 sharing ``kv`` KV heads."""
    tiny = BY_NAME[name]
    config = tiny.make_config()
    # hidden = heads x head_dim: transformers' Llama config validation asks hidden % heads == 0
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = heads * 8, heads, kv
    config.head_dim = 8
    if name == "gemma3_text":
        config.query_pre_attn_scalar = 8
    torch.manual_seed(seed)
    return tiny.model_class(config).eval()


def _kv_heads(model) -> list[int]:
    adapter = hp.get_adapter(model)
    return [get_module(layer, adapter.k).out_features // 8 for layer in layer_list(model, adapter)]


@pytest.mark.parametrize("name", DECODERS)
def test_query_head_cut_equals_the_masked_dense_model_and_reloads(name, tmp_path):
    tiny = BY_NAME[name]
    model = _gqa(name)
    plan = random_plan(model, seed=3, query_heads=True)
    assert any(len(h) % 3 for h in plan.heads)  # some group keeps only part of its query heads
    x = inputs_only(tiny.batch())
    expected = masked_output(model, plan, x, output_tensor)
    hp.apply_plan_(model, plan)
    assert _kv_heads(model) == [len({h // 3 for h in hs}) for hs in plan.heads]
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(model(**x)), expected, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "ckpt")
    again = hp.load_pruned(tmp_path / "ckpt").eval()
    remote = tiny.auto_class.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(output_tensor(again(**x)), output_tensor(model(**x)))
        assert torch.equal(output_tensor(remote(**x)), output_tensor(model(**x)))
    assert again.prune_plan.heads == plan.heads


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_query_head_cut_generates_with_the_cache_like_the_masked_dense_model(name):
    tiny = BY_NAME[name]
    dense, pruned = _gqa(name), _gqa(name)
    plan = random_plan(pruned, seed=4, query_heads=True, empty_layer=2)
    hp.apply_plan_(pruned, plan)
    generate_cached_uncached_masked(dense, pruned, plan, tiny.batch(batch_size=2, seq_len=5, labels=False)["input_ids"])


def test_a_second_query_head_cut_of_a_pruned_model_equals_one_cut():
    model = _gqa("llama")
    first = random_plan(model, seed=6, query_heads=True)
    # second: drop one query head from every kept group of layers that keep two per group
    heads = []
    for hs in first.heads:
        groups = sorted({h // 3 for h in hs})
        per = len(hs) // max(len(groups), 1)
        heads.append([h for h in hs if per < 2 or h != max(x for x in hs if x // 3 == h // 3)])
    second = hp.PrunePlan.from_dict({**first.to_dict(), "heads": heads})
    once = hp.apply_plan_(copy.deepcopy(model), second)
    twice = hp.apply_plan_(hp.apply_plan_(model, first), second)
    for (ka, a), (kb, b) in zip(once.state_dict().items(), twice.state_dict().items()):
        assert ka == kb and torch.equal(a, b)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("budget", [{"flops_keep": 0.6}, {"target_params": None}, {"heads_keep": 0.5}])
def test_query_head_allocation_keeps_every_layer_balanced_under_the_budget(allocation, budget):
    model = _gqa("llama", heads=9, kv=3)
    dense_params = hp.count_params(model)
    if "target_params" in budget:
        budget = {"target_params": int(dense_params * 0.8)}
    config = hp.PruningConfig(importance="magnitude", head_unit="query_head", allocation=allocation, **budget)
    plan = hp.build_plan(hp.compute_importance(model, None, "magnitude"), model, config)
    per_group = []
    for hs in plan.heads:
        counts = {k: sum(1 for h in hs if h // 3 == k) for k in {h // 3 for h in hs}}
        assert hs and len(set(counts.values())) == 1  # balanced, and no layer without heads
        per_group.append(next(iter(counts.values())))
    if allocation == "uniform":
        assert len({len(h) for h in plan.heads}) == 1
    if "flops_keep" in budget:
        dense_flops = hp.plan_flops(hp.PrunePlan.dense(model), model, 128)["total"]
        assert 0.5 * dense_flops < hp.plan_flops(plan, model, 128)["total"] <= 0.6 * dense_flops
    if "target_params" in budget:
        assert hp.plan_params(plan, model) <= budget["target_params"]
    if "heads_keep" in budget and allocation == "uniform":
        assert all(len(h) <= 4 for h in plan.heads)  # round(0.5 * 9) heads, never more
    hp.apply_plan_(model, plan)  # the cut runs
    with torch.no_grad():
        model(**inputs_only(BY_NAME["llama"].batch()))


def test_a_single_kv_head_model_loses_query_heads_only_by_query_head():
    model = _gqa("gemma3_text", heads=4, kv=1)
    data = [BY_NAME["gemma3_text"].batch(seed=s) for s in range(2)]
    by_group = hp.PruningConfig(importance="taylor", heads_keep=0.5, head_unit="kv_group")
    by_query = hp.PruningConfig(importance="taylor", heads_keep=0.5, head_unit="query_head")
    scores = hp.compute_importance(model, data, "taylor", progress=False)
    assert all(len(h) == 4 for h in hp.build_plan(scores, model, by_group).heads)  # one group: all or nothing
    plan = hp.build_plan(scores, model, by_query)
    assert sum(len(h) for h in plan.heads) == 6 and all(len(h) >= 1 for h in plan.heads)
    x = inputs_only(BY_NAME["gemma3_text"].batch())
    expected = masked_output(model, plan, x, output_tensor)
    hp.apply_plan_(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(model(**x)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3_text"])
def test_uniform_query_head_cut_exports_as_the_stock_architecture(name, tmp_path):
    tiny = BY_NAME[name]
    model = _gqa(name)
    config = hp.PruningConfig(importance="magnitude", head_unit="query_head", allocation="uniform",
                              heads_keep=0.34, neurons_keep=0.5, round_to=8, deployable=True)
    hp.prune(model, None, config)
    assert _kv_heads(model) == [2] * 3 and {len(h) for h in model.prune_plan.heads} == {2}  # 1 of 3 per group
    stock = tiny.auto_class.from_pretrained(hp.save_stock(model, tmp_path / "stock")).eval()
    assert (stock.config.num_attention_heads, stock.config.num_key_value_heads) == (2, 2)
    x = inputs_only(tiny.batch())
    with torch.no_grad():
        assert torch.equal(output_tensor(stock(**x)), output_tensor(model(**x)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"head_unit": "query", "flops_keep": 0.5}, "head_unit must be one of"),
        ({"head_unit": "query_head", "latency_keep": 0.5, "method": "retraining_free"}, "kv_group"),
    ],
)
def test_bad_head_unit_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hp.PruningConfig(**kwargs)


def test_a_plan_with_uneven_groups_is_refused_by_the_surgery_too():
    from hf_prune.shapes import prune_layer_

    model = _gqa("llama")
    adapter = hp.get_adapter(model)
    with pytest.raises(ValueError, match="same number of query heads"):
        prune_layer_(layer_list(model, adapter)[0], adapter, 8, [0, 1, 3], None)


def test_retraining_free_refuses_a_model_with_partial_kv_groups():
    model = _gqa("llama")
    hp.apply_plan_(model, random_plan(model, seed=3, query_heads=True))
    data = [BY_NAME["llama"].batch(seed=s) for s in range(2)]
    with pytest.raises(ValueError, match="base model"):
        hp.prune(model, data, hp.PruningConfig(method="retraining_free", flops_keep=0.5, progress=False))


def test_query_heads_with_depth_pruning_export_as_the_stock_architecture(tmp_path):
    tiny = BY_NAME["llama"]
    model = _gqa("llama")
    data = [tiny.batch(seed=s) for s in range(2)]
    config = hp.PruningConfig(importance="taylor", head_unit="query_head", allocation="uniform", layers_keep=2,
                              flops_keep=0.4, deployable=True, progress=False)
    hp.prune(model, data, config)
    sizes = model.prune_plan.physical_sizes()
    assert len(sizes) == 2 and len({tuple(s.values()) for s in sizes}) == 1
    stock = tiny.auto_class.from_pretrained(hp.save_stock(model, tmp_path / "stock")).eval()
    x = inputs_only(tiny.batch())
    with torch.no_grad():
        assert torch.equal(output_tensor(stock(**x)), output_tensor(model(**x)))


@pytest.mark.parametrize("seed", range(4))
def test_swap_descent_inside_groups_keeps_every_groups_count(seed):
    from hf_prune.retraining_free.rearrange import quadratic_loss, swap_descent

    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(40, 9, generator=g) * torch.rand(9, generator=g)
    F = grads.T @ grads  # (9, 9): 3 KV groups of 3 query heads
    groups = torch.arange(9) // 3
    keep = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0, 0], dtype=torch.bool)  # 2, 2 and 0 kept
    new = swap_descent(F, keep, groups=groups)
    assert [int(new[groups == k].sum()) for k in range(3)] == [2, 2, 0]
    assert quadratic_loss(F, new) <= quadratic_loss(F, keep) + 1e-12
    for i, j in itertools.product(range(9), range(9)):  # no swap inside a group improves it
        if not new[i] and new[j] and groups[i] == groups[j]:
            swapped = new.clone()
            swapped[i], swapped[j] = True, False
            assert quadratic_loss(F, swapped) >= quadratic_loss(F, new) - 1e-9


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
@pytest.mark.parametrize("kv", [3, 1])
def test_retraining_free_with_query_heads_cuts_balanced_groups_as_its_masks_say(name, kv):
    """The retraining-free pipeline with ``head_unit="query_head"``: search, in-group rearrangement, tuning and
    selection give a balanced plan within the budget; the cut model equals the dense model with the tuning folded
    in and the dropped units masked; a model with one KV head loses query heads (it could lose none by group)."""
    from hf_prune.retraining_free import fold_tuning_, retraining_free_plan

    tiny = BY_NAME[name]
    model = _gqa(name, heads=6, kv=kv)
    data = [tiny.batch(batch_size=4, seq_len=8, seed=s) for s in range(6)]
    cfg = hp.PruningConfig(method="retraining_free", head_unit="query_head", flops_keep=0.5, progress=False,
                           tuning_samples=8, selection_samples=8)
    plan, tuning = retraining_free_plan(model, data, cfg)
    group = 6 // kv
    for heads in plan.heads:  # balanced: every kept KV head keeps the same number of query heads
        counts = [sum(h // group == k for h in heads) for k in {h // group for h in heads}]
        assert len(set(counts)) <= 1
    dense_flops = hp.plan_flops(hp.PrunePlan.dense(model), model, 128)["total"]
    assert hp.plan_flops(plan, model, 128)["total"] <= 0.5 * dense_flops
    if kv == 1:
        assert sum(len(h) for h in plan.heads) < 6 * len(plan.heads)
    x = inputs_only(tiny.batch())
    reference = copy.deepcopy(model)
    if tuning is not None:
        fold_tuning_(reference, tuning)
    expected = masked_output(reference, plan, x, output_tensor)
    pruned, again = hp.prune(model, data, cfg)
    assert (again.heads, again.neurons) == (plan.heads, plan.neurons)
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(pruned(**x)), expected, atol=1e-4, rtol=1e-4)

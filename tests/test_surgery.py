import copy

import pytest
import torch
from helpers import masked_output, random_plan
from tiny import inputs_only, output_tensor

import hf_prune as hp
from hf_prune.shapes import get_module, layer_list


def _cut_and_compare(tiny, plan_seed, empty_layer=None):
    """Prune a tiny model with a random plan; its outputs must equal the masked dense model's."""
    model = tiny.model()
    plan = random_plan(model, seed=plan_seed, empty_layer=empty_layer)
    inputs = inputs_only(tiny.batch())
    expected = masked_output(model, plan, inputs, output_tensor)
    hp.apply_plan_(model, plan)
    with torch.no_grad():
        got = output_tensor(model(**inputs))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    return model


def test_masked_equals_pruned(tiny):
    model = _cut_and_compare(tiny, plan_seed=1)
    assert type(model).__name__ == "Pruned" + tiny.model_class.__name__
    assert isinstance(model, tiny.model_class)


def test_param_and_flop_counts_are_analytic(tiny):
    model = tiny.model()
    plan = random_plan(model, seed=2)
    expected_params = hp.plan_params(plan, model)
    expected_flops = hp.plan_flops(plan, model, seq_len=64)
    dense_params = hp.count_params(model)
    hp.apply_plan_(model, plan)
    assert hp.count_params(model) == expected_params < dense_params
    assert hp.count_flops(model, seq_len=64) == expected_flops


def test_modules_and_config_follow_the_plan(tiny):
    model = tiny.model()
    plan = random_plan(model, seed=3)
    hp.apply_plan_(model, plan)
    adapter = hp.get_adapter(model)
    d = hp.PrunePlan.dense(model)
    head_dim = {"qwen3": 8, "gemma3_text": 16}.get(tiny.name, d.hidden_size // d.num_heads)
    sizes = hp.modeling_pruned.layer_sizes(model.config, adapter)
    for i, layer in enumerate(layer_list(model, adapter)):
        h, n = len(plan.heads[i]), len(plan.neurons[i])
        kv = h // plan.group_size
        assert get_module(layer, adapter.q).out_features == h * head_dim == get_module(layer, adapter.q).weight.shape[0]
        assert get_module(layer, adapter.k).out_features == kv * head_dim
        assert get_module(layer, adapter.o).in_features == h * head_dim == get_module(layer, adapter.o).weight.shape[1]
        assert get_module(layer, adapter.up).out_features == n
        assert get_module(layer, adapter.down).in_features == n == get_module(layer, adapter.down).weight.shape[1]
        assert sizes[i] == {"num_heads": h, "num_kv_heads": kv, "intermediate_size": n}
        for path, quantity in adapter.attrs:
            owner, _, attr = path.rpartition(".")
            value = {"num_heads": h, "num_kv_heads": kv, "all_head_size": h * head_dim, "intermediate_size": n,
                     "kv_groups": h // kv if kv else plan.group_size}
            assert getattr(get_module(layer, owner), attr) == value[quantity]


def test_empty_attention_and_ffn_blocks_still_run(tiny):
    model = _cut_and_compare(tiny, plan_seed=4, empty_layer=1)
    layer = layer_list(model, hp.get_adapter(model))[1]
    assert get_module(layer, hp.get_adapter(model).q).weight.numel() == 0


def test_pruning_twice_equals_pruning_once(tiny):
    model = tiny.model()
    first = random_plan(model, seed=5)
    # second plan: a subset of the first (drop the last kept head group / half the neurons where possible)
    heads = [h[: len(h) - first.group_size] if len(h) > first.group_size else h for h in first.heads]
    neurons = [n[: max(1, len(n) // 2)] for n in first.neurons]
    second = hp.PrunePlan.from_dict({**first.to_dict(), "heads": heads, "neurons": neurons})
    once = hp.apply_plan_(copy.deepcopy(model), second)
    twice = hp.apply_plan_(hp.apply_plan_(model, first), second)
    a, b = once.state_dict(), twice.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    with pytest.raises(hp.PlanMismatchError, match="already removed"):
        hp.apply_plan_(twice, first)


def test_gqa_kv_groups_keep_the_same_number_of_query_heads():
    from tiny import BY_NAME

    model = BY_NAME["llama"].model()
    dense = hp.PrunePlan.dense(model)
    assert dense.group_size == 2
    with pytest.raises(hp.PlanMismatchError, match="same number of query heads"):  # group 0 keeps 1, group 1 keeps 2
        hp.PrunePlan.from_dict({**dense.to_dict(), "heads": [[0, 2, 3], [0, 1], [2, 3]]})

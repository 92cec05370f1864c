"""Hidden channels (the residual width) as a unit: masked == cut for every family, alone and with heads, neurons and
layers; analytic costs; save -> reload; generation; scores; budgets; bad input."""

import copy

import pytest
import torch
from helpers import GREEDY, masked_output, plan_masks, random_plan
from tiny import BY_NAME, TINY, inputs_only, output_tensor

import hf_prune as hp
from hf_prune.adapters import get_adapter
from hf_prune.channels import hidden_slots, hidden_width

DECODERS = [t for t in TINY if t.labels == "lm"]


def _cut_equals_masked(tiny, plan):
    model = tiny.model()
    inputs = inputs_only(tiny.batch())
    expected = masked_output(model, plan, inputs, output_tensor)
    hp.apply_plan_(model, plan)
    with torch.no_grad():
        got = output_tensor(model(**inputs))
    if got.shape[-1] != expected.shape[-1]:  # a headless model outputs the stream itself: the kept channels
        expected = expected[..., plan.kept_hidden]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    return model


def test_hidden_cut_equals_masked_norms_over_kept_channels(tiny):
    """The mask zeroes the channels everywhere and runs every norm over the kept channels: that is the cut."""
    model = _cut_equals_masked(tiny, random_plan(tiny.model(), seed=3, hidden=20))
    assert hidden_width(model, get_adapter(model)) == 20
    # a masked norm that kept dense statistics (zeros counted) would differ: the mask is not a no-op on the stats
    dense = tiny.model()
    plan = random_plan(dense, seed=3, hidden=20)
    naive = hp.LayerMasks(plan.num_layers)
    with torch.no_grad(), hp.mask_hooks(dense, plan_masks(plan)):
        right = output_tensor(dense(**inputs_only(tiny.batch())))
    with torch.no_grad():
        unmasked = output_tensor(dense(**inputs_only(tiny.batch())))
    assert not torch.allclose(right, unmasked) and naive.hidden is None


def test_hidden_with_heads_neurons_and_layers_equals_masked(tiny):
    dense = tiny.model()
    _cut_equals_masked(tiny, random_plan(dense, seed=4, hidden=24, layers=[0, 2]))


def test_hidden_costs_are_analytic_and_pruning_twice_equals_once(tiny):
    model = tiny.model()
    plan = random_plan(model, seed=6, hidden=22, layers=[1, 2])
    params, flops = hp.plan_params(plan, model), hp.plan_flops(plan, model, seq_len=16)
    once = hp.apply_plan_(copy.deepcopy(model), plan)
    assert hp.count_params(once) == params and hp.count_flops(once, seq_len=16) == flops
    first = hp.PrunePlan.from_dict({**plan.to_dict(), "hidden": plan.hidden + [c for c in range(32)
                                                                                 if c not in plan.hidden][:5]})
    twice = hp.apply_plan_(hp.apply_plan_(model, first), plan)
    a, b = once.state_dict(), twice.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert hp.plan_params(plan, twice) == params  # costs read off a cut model agree with the dense model's
    with pytest.raises(hp.PlanMismatchError, match="already removed"):
        hp.apply_plan_(twice, first)


def test_hidden_cut_saves_and_reloads_identically(tiny, tmp_path):
    model = tiny.model()
    plan = random_plan(model, seed=8, hidden=24)
    hp.apply_plan_(model, plan)
    model.save_pretrained(tmp_path)
    again = tiny.auto_class.from_pretrained(tmp_path, trust_remote_code=True).eval()
    inputs = inputs_only(tiny.batch())
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(again(**inputs)), output_tensor(model(**inputs)), atol=0, rtol=0)
    assert hp.load_plan(tmp_path).hidden == plan.hidden
    assert again.config.to_dict()["hf_prune"]["hidden_channels"] == 24


@pytest.mark.parametrize("tiny", DECODERS, ids=[t.name for t in DECODERS])
def test_hidden_cut_generates_the_same_with_and_without_cache(tiny):
    dense = tiny.model()
    plan = random_plan(dense, seed=9, hidden=20)
    pruned = hp.apply_plan_(copy.deepcopy(dense), plan)
    ids = inputs_only(tiny.batch(batch_size=1))["input_ids"]
    with torch.no_grad():
        cached = pruned.generate(ids, use_cache=True, **GREEDY)
        uncached = pruned.generate(ids, use_cache=False, **GREEDY)
        with hp.mask_hooks(dense, plan_masks(plan)):
            masked = dense.generate(ids, use_cache=False, **GREEDY)
    assert torch.equal(cached, uncached) and torch.equal(cached, masked)


@pytest.mark.parametrize("criterion", list(hp.HIDDEN_CRITERIA))
def test_hidden_scores_cover_the_kept_channels(criterion):
    tiny = BY_NAME["llama"]
    model = tiny.model()
    data = [tiny.batch(seed=s) for s in range(2)]
    scores = hp.hidden_importance(model, data, criterion)
    assert scores.shape == (32,) and torch.isfinite(scores).all() and (scores >= 0).all()
    hp.apply_plan_(model, random_plan(model, seed=1, hidden=24))
    again = hp.hidden_importance(model, data, criterion)
    assert int(torch.isnan(again).sum()) == 8 and torch.isfinite(again[hp.PrunePlan.of(model).kept_hidden]).all()


@pytest.mark.parametrize("criterion", ["activation", "magnitude"])
def test_a_dead_channel_scores_lowest(criterion):
    """A channel whose every weight is zero carries nothing: activation and magnitude rank it last."""
    tiny = BY_NAME["bert"]
    model = tiny.model()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, dims in hidden_slots(model, get_adapter(model)).items():
            for d in dims:
                params[name].index_fill_(d, torch.tensor([5]), 0.0)
    scores = hp.hidden_importance(model, [tiny.batch()], criterion)
    assert int(scores.argmin()) == 5
    plan = hp.build_plan(hp.ImportanceScores(torch.ones(3, 4), torch.ones(3, 48), "random", hidden=scores), model,
                         hp.PruningConfig(hidden_keep=31))
    assert 5 not in plan.kept_hidden and plan.hidden_channels == 31


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_params_budget_spends_the_kept_width(name):
    """target_params with hidden_keep: every unit costs less at the kept width, the plan meets the target."""
    tiny = BY_NAME[name]
    model = tiny.model()
    data = [tiny.batch(seed=s) for s in range(2)]
    target = int(0.6 * hp.count_params(model))
    pruned, plan = hp.prune(model, data, hp.PruningConfig(target_params=target, hidden_keep=0.75, progress=False))
    assert plan.hidden_channels == 24
    assert hp.count_params(pruned) <= target
    narrow, _ = hp.prune(tiny.model(), data, hp.PruningConfig(target_params=target, progress=False))
    # at the narrower width the same target keeps more heads and neurons
    kept = plan.kept_fraction()
    other = hp.PrunePlan.of(narrow).kept_fraction()
    assert kept["heads"] + kept["neurons"] > other["heads"] + other["neurons"]


def test_hidden_alone_keeps_every_head_and_neuron_and_flops_shrink():
    tiny = BY_NAME["llama"]
    model = tiny.model()
    dense_flops = hp.count_flops(model, seq_len=16)["total"]
    pruned, plan = hp.prune(model, [tiny.batch()], hp.PruningConfig(hidden_keep=16, progress=False))
    assert plan.kept_fraction()["heads"] == plan.kept_fraction()["neurons"] == 1.0
    assert hp.count_flops(pruned, seq_len=16)["total"] < dense_flops


@pytest.mark.parametrize("method", ["one_shot", "retraining_free"])
def test_methods_and_the_callback_cut_hidden_channels(method, tmp_path):
    tiny = BY_NAME["bert"]
    data = [tiny.batch(seed=s) for s in range(4)]
    config = hp.PruningConfig(method=method, flops_keep=0.7, hidden_keep=0.75, progress=False,
                              **({"tuning_samples": 6, "selection_samples": 6} if method == "retraining_free" else {}))
    model, plan = hp.prune(tiny.model(), data, config)
    assert plan.hidden_channels == 24 and hidden_width(model, get_adapter(model)) == 24
    with torch.no_grad():
        assert torch.isfinite(output_tensor(model(**inputs_only(data[0])))).all()


def test_the_callback_masks_then_cuts_hidden_channels(tmp_path):
    from transformers import Trainer, TrainingArguments

    tiny = BY_NAME["bert"]
    data = [{k: v[i] for k, v in tiny.batch(batch_size=8, seed=s).items()} for s in range(2) for i in range(8)]
    model = tiny.model()
    callback = hp.PruningCallback(hp.PruningConfig(hidden_keep=0.5, neurons_keep=0.5, progress=False),
                                  calibration_dataloader=[tiny.batch(seed=9)])
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], save_strategy="no",
                             use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert callback.stats["prune/hidden_kept"] == 0.5
    inputs = inputs_only(tiny.batch())
    model.eval()
    with torch.no_grad():
        masked = output_tensor(model(**inputs))
    callback.prune_model_(model)
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(model(**inputs)), masked, atol=1e-5, rtol=1e-5)
    assert hidden_width(model, get_adapter(model)) == 16


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"hidden_keep": 0}, "fraction in \\(0, 1\\] of the channels"),
    ({"hidden_keep": 1.5}, "whole count"),
    ({"flops_keep": 0.5, "hidden_importance": "fisher"}, "only applies to a hidden_keep"),
    ({"hidden_keep": 0.5, "hidden_importance": "nope"}, "unknown hidden_importance"),
    ({"hidden_keep": 0.5, "latency_keep": 0.5, "method": "retraining_free"}, "cannot be combined with hidden_keep"),
])
def test_bad_hidden_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hp.PruningConfig(**kwargs)


def test_more_channels_than_the_model_has_is_refused():
    tiny = BY_NAME["bert"]
    with pytest.raises(ValueError, match="keeps 40 hidden channels, but the model has 32"):
        hp.prune(tiny.model(), [tiny.batch()], hp.PruningConfig(hidden_keep=40, progress=False))


def test_a_tensor_shared_with_an_unknown_side_is_refused_by_name():
    tiny = BY_NAME["llama"]
    model = tiny.model()
    # an lm_head tied to the embedding the wrong way round would read channels as vocabulary
    model.extra = torch.nn.Linear(97, 32, bias=False)
    model.extra.weight = torch.nn.Parameter(model.model.embed_tokens.weight.data.T.contiguous())
    model.model.embed_tokens.weight = model.extra.weight  # (32, 97): now shared, sides disagree
    with pytest.raises(ValueError, match="shares its tensor with"):
        hidden_slots(model, get_adapter(model))


def test_a_peft_model_is_refused():
    peft = pytest.importorskip("peft")
    tiny = BY_NAME["llama"]
    wrapped = peft.get_peft_model(tiny.model(), peft.LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(TypeError, match="wrapped by peft"):
        hp.prune(wrapped, [tiny.batch()], hp.PruningConfig(hidden_keep=0.5, progress=False))


def test_a_count_cannot_be_scheduled():
    with pytest.raises(ValueError, match="is a channel count"):
        hp.PruningCallback(hp.PruningConfig(hidden_keep=16, progress=False), {"kind": "gradual", "end_step": 10},
                           calibration_dataloader=[{}])


def test_hidden_search_trades_the_width_against_heads_and_neurons():
    tiny = BY_NAME["llama"]
    model = tiny.model()
    data = [tiny.batch(seed=s) for s in range(3)]
    target = int(0.7 * hp.count_params(model))
    pruned, plan = hp.prune(model, data, hp.PruningConfig(target_params=target, hidden_search=True, progress=False))
    search = plan.meta["hidden_search"]
    assert len(search["divergence"]) >= 3 and search["chosen"] == plan.hidden_channels
    assert search["divergence"][str(search["chosen"])] == min(search["divergence"].values())
    assert hp.count_params(pruned) <= target
    with pytest.raises(ValueError, match="drop hidden_keep"):
        hp.PruningConfig(target_params=target, hidden_search=True, hidden_keep=0.5)
    with pytest.raises(ValueError, match="one cost budget"):
        hp.PruningConfig(heads_keep=0.5, hidden_search=True)


def test_a_stock_config_that_refuses_the_width_is_not_stock_expressible():
    """LlamaConfig validates hidden_size % num_attention_heads == 0: a width of 30 with 4 heads is refused by name."""
    tiny = BY_NAME["llama"]
    model = hp.apply_plan_(tiny.model(), hp.PrunePlan.from_dict({**hp.PrunePlan.dense(tiny.model()).to_dict(),
                                                                  "hidden": list(range(30))}))
    with pytest.raises(hp.NotStockExpressible, match="multiple of the kept heads"):
        hp.save_stock(model, "unused-folder")
    with pytest.raises(hp.NotStockExpressible, match="multiple of the kept heads"):
        hp.prune(tiny.model(), [tiny.batch()], hp.PruningConfig(hidden_keep=30, allocation="uniform", deployable=True,
                                                               progress=False))


@pytest.mark.parametrize("value,size,kept", [
    (0.9, 576, 512), (0.8, 576, 448), (0.5, 576, 288), (0.75, 4096, 3072),  # whole 32-channel blocks
    (0.9, 64, 58), (0.5, 48, 24),  # widths below 8 blocks (the tiny models): as computed
    (518, 576, 518),  # a count is taken as given
])
def test_a_hidden_fraction_keeps_whole_blocks_of_32_channels(value, size, kept):
    from hf_prune.hidden import hidden_count

    assert hidden_count(value, size) == kept

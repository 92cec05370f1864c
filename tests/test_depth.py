"""Depth pruning: whole layers removed (with heads and neurons of the rest) compute exactly what the gated dense
model computes, reload identically, replay identically, generate with the KV cache, export as the stock
architecture; layer criteria find the layers that do nothing; bad depth budgets are refused before any work."""

from __future__ import annotations

import copy
import inspect
import json

import datasets
import pytest
import torch
import transformers as T
from helpers import plan_masks, random_plan
from tiny import BY_NAME, LAYERS, inputs_only, output_tensor

import hf_prune as hp
from hf_prune.adapters import layers_of
from hf_prune.depth import LAYER_CRITERIA


def depth_plan(model, drop: int, seed: int = 0, widths: bool = True) -> hp.PrunePlan:
    """``random_plan``'s widths (or the dense ones) with dense layer ``drop`` removed."""
    base = random_plan(model, seed=seed) if widths else hp.PrunePlan.dense(model)
    data = base.to_dict()
    data["layers"] = [i for i in range(base.num_layers) if i != drop]
    return hp.PrunePlan.from_dict(data)


def gated_masks(plan: hp.PrunePlan) -> hp.LayerMasks:
    masks = plan_masks(plan)
    masks.layers = [None if i in plan.kept_layers else torch.zeros(1) for i in range(plan.num_layers)]
    return masks


@torch.no_grad()
def test_depth_and_width_cut_equals_the_gated_dense_model_and_reloads(tiny, tmp_path):
    dense = tiny.model()
    plan = depth_plan(dense, drop=1)
    x = inputs_only(tiny.batch())
    with hp.mask_hooks(dense, gated_masks(plan)):
        want = output_tensor(dense(**x))
    pruned = hp.apply_plan_(copy.deepcopy(dense), plan)
    assert len(layers_of(pruned)) == 2
    got = output_tensor(pruned(**x))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    pruned.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["hf_prune"]["layers"] == [0, 2] and saved["hf_prune"]["num_layers"] == LAYERS
    reloaded = hp.load_pruned(tmp_path / "ckpt").eval()
    remote = tiny.auto_class.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()
    replayed = hp.apply_plan_(copy.deepcopy(dense), hp.load_plan(str(tmp_path / "ckpt")))
    for other in (reloaded, remote, replayed):
        assert torch.equal(output_tensor(other(**x)), got)
    assert reloaded.prune_plan == plan


@torch.no_grad()
def test_a_second_cut_of_a_depth_pruned_model_removes_more(tiny):
    """Plans hold dense ids: cutting layer 0 from a model that already lost layer 1 equals one cut of both."""
    dense = tiny.model()
    first = depth_plan(dense, drop=1, widths=False)
    second = hp.PrunePlan.from_dict({**first.to_dict(), "layers": [2]})
    twice = hp.apply_plan_(hp.apply_plan_(copy.deepcopy(dense), first), second)
    once = hp.apply_plan_(copy.deepcopy(dense), second)
    x = inputs_only(tiny.batch())
    assert torch.equal(output_tensor(twice(**x)), output_tensor(once(**x)))
    with pytest.raises(hp.PlanMismatchError, match="already removed"):
        hp.apply_plan_(twice, first)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gemma3_text"])
@torch.no_grad()
def test_decoder_without_a_layer_generates_with_the_cache_like_the_gated_dense_model(name):
    tiny = BY_NAME[name]
    dense = tiny.model()
    plan = depth_plan(dense, drop=0, seed=4)
    pruned = hp.apply_plan_(copy.deepcopy(dense), plan)
    ids = tiny.batch(batch_size=2, seq_len=6, labels=False)["input_ids"]
    if name == "qwen2":  # a sequence classifier: compare the cached forward passes of its base decoder instead
        dense, pruned = dense.model, pruned.model
        arg = "cache" if "cache" in inspect.signature(pruned.forward).parameters else "past_key_values"
        out = pruned(ids, use_cache=True)
        step = pruned(ids[:, -1:] * 0 + 5, use_cache=True, **{arg: getattr(out, arg)}).last_hidden_state
        full = pruned(torch.cat([ids, ids[:, -1:] * 0 + 5], 1), use_cache=False).last_hidden_state[:, -1:]
        torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)
        return
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    cached = pruned.generate(ids, use_cache=True, **kw)
    uncached = pruned.generate(ids, use_cache=False, **kw)
    with hp.mask_hooks(dense, gated_masks(plan)):
        masked = dense.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached) and torch.equal(cached, masked)


@torch.no_grad()
def test_sliding_window_layer_types_follow_the_layers_that_stay(tmp_path):
    config = T.Qwen2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=48, vocab_size=97, max_position_embeddings=64, use_sliding_window=True,
                           sliding_window=3, max_window_layers=2, layer_types=None)
    torch.manual_seed(0)
    dense = T.Qwen2ForCausalLM(config).eval()
    types = list(dense.config.layer_types)
    assert len(set(types)) == 2  # mixed full and sliding layers
    plan = hp.PrunePlan.from_dict({**hp.PrunePlan.dense(dense).to_dict(), "layers": [0, 3]})
    pruned = hp.apply_plan_(copy.deepcopy(dense), plan)
    assert list(pruned.config.layer_types) == [types[0], types[3]]
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    ids = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    masks = hp.LayerMasks(4)
    masks.layers = [None, torch.zeros(1), torch.zeros(1), None]
    with hp.mask_hooks(dense, masks):
        want = dense(ids).logits
    torch.testing.assert_close(pruned(ids).logits, want, atol=1e-5, rtol=1e-4)
    stock = T.AutoModelForCausalLM.from_pretrained(hp.save_stock(pruned, tmp_path / "stock")).eval()
    assert stock.config.num_hidden_layers == 2 and list(stock.config.layer_types) == [types[0], types[3]]
    assert torch.equal(stock(ids).logits, pruned(ids).logits)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "bert", "roberta", "electra",
                                  "distilbert", "vit"])
@torch.no_grad()
def test_depth_plus_uniform_width_exports_as_the_stock_architecture(name, tmp_path):
    tiny = BY_NAME[name]
    model = tiny.model()
    budget = {"heads_keep": 0.5, "neurons_keep": 0.5} if tiny.auto_class is not T.AutoModelForImageClassification \
        and name in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text") else {"neurons_keep": 0.5}
    cfg = hp.PruningConfig(importance="magnitude", allocation="uniform", round_to=8, layers_keep=2,
                           layer_importance="block_influence", progress=False, **budget)
    hp.prune(model, [tiny.batch()], cfg)
    folder = hp.save_stock(model, tmp_path / "stock")
    config = json.loads((folder / "config.json").read_text())
    assert "hf_prune" not in config and "per_layer_config" not in config and "auto_map" not in config
    layers_field = hp.get_adapter(model).layers_field
    assert config[layers_field] == 2
    stock = tiny.auto_class.from_pretrained(folder).eval()  # no trust_remote_code
    assert type(stock) is tiny.model_class
    x = inputs_only(tiny.batch())
    assert torch.equal(output_tensor(stock(**x)), output_tensor(model(**x)))
    again = hp.load_pruned(folder)
    assert again.prune_plan.kept_layers == model.prune_plan.kept_layers


@pytest.mark.parametrize("criterion", sorted(LAYER_CRITERIA))
def test_layer_criteria_rank_a_layer_that_does_nothing_last(criterion):
    tiny = BY_NAME["llama"]
    model = tiny.model()
    layer = model.model.layers[1]
    with torch.no_grad():  # no attention output and no FFN output: the layer is the identity
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    scores = hp.layer_importance(model, [tiny.batch(), tiny.batch(seed=2)], criterion, progress=False)
    assert scores.shape == (LAYERS,) and float(scores[1]) == pytest.approx(0.0, abs=1e-6)
    assert (scores[[0, 2]] > 1e-6).all()
    _, plan = hp.prune(model, [tiny.batch()], hp.PruningConfig(layers_keep=2, layer_importance=criterion,
                                                               progress=False))
    assert plan.kept_layers == [0, 2]
    assert plan.heads[1] == [] and plan.neurons[1] == [] and plan.heads[0] == list(range(4))


def test_layer_scores_of_a_depth_pruned_model_are_nan_for_removed_layers():
    tiny = BY_NAME["bert"]
    model = hp.apply_plan_(tiny.model(), depth_plan(tiny.model(), drop=2, widths=False))
    scores = hp.layer_importance(model, [tiny.batch()], progress=False)
    assert torch.isnan(scores[2]) and not torch.isnan(scores[:2]).any()


def test_a_width_budget_counts_removed_layers_as_saved():
    tiny = BY_NAME["llama"]
    model = tiny.model()
    dense_flops = hp.count_flops(model, seq_len=16)["total"]
    cfg = hp.PruningConfig(layers_keep=2, flops_keep=0.5, seq_len=16, progress=False)
    _, plan = hp.prune(model, [tiny.batch()], cfg)
    assert len(plan.kept_layers) == 2
    assert hp.count_flops(model, seq_len=16)["total"] <= 0.5 * dense_flops
    # two of three layers hold 2/3 of the FLOPs: only a quarter of theirs had to go, not half
    assert hp.count_flops(model, seq_len=16)["total"] > 0.4 * dense_flops
    assert plan.meta["budget"] == {"flops_keep": 0.5, "layers_keep": 2}


def test_removed_layers_free_their_parameters():
    tiny = BY_NAME["bert"]
    model = tiny.model()
    plan = depth_plan(model, drop=1, widths=False)
    predicted = hp.plan_params(plan, model)
    hp.apply_plan_(model, plan)
    assert predicted == hp.count_params(model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layers_keep": 0}, r"layers_keep=0 must be a fraction in \(0, 1\]"),
        ({"layers_keep": 1.5}, "or a whole count"),
        ({"layers_keep": -2}, "must be a fraction"),
        ({"layer_importance": "skip_divergence", "flops_keep": 0.5}, "only applies to a layers_keep budget"),
        ({"layers_keep": 0.5, "layer_importance": "nope"}, "unknown layer_importance 'nope'"),
    ],
)
def test_bad_depth_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hp.PruningConfig(**kwargs)


@pytest.mark.parametrize(
    "layers_keep, match", [(0.1, "keeps no layer of 3"), (5, "keeps 5 layers but the model has 3")]
)
def test_depth_budgets_the_model_cannot_meet_are_refused_before_cutting(layers_keep, match):
    tiny = BY_NAME["llama"]
    model = tiny.model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        hp.prune(model, [tiny.batch()], hp.PruningConfig(layers_keep=layers_keep, progress=False))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_plan_removing_every_layer_is_refused():
    dense = hp.PrunePlan.dense(BY_NAME["llama"].model())
    with pytest.raises(hp.PlanMismatchError, match="removes every layer"):
        hp.PrunePlan.from_dict({**dense.to_dict(), "layers": []})
    with pytest.raises(ValueError, match="needs calibration data|pass a dataloader"):
        hp.prune(BY_NAME["llama"].model(), None, hp.PruningConfig(importance="magnitude", layers_keep=2))


def test_iterative_schedules_remove_layers_round_by_round_and_gradual_ones_fade_them():
    cfg = hp.PruningConfig(layers_keep=2, flops_keep=0.5)
    it = hp.PruningSchedule("iterative", start_step=0, end_step=10, rounds=2)
    first = it.budget_at(cfg, 0, 1000, dense_layers=4).layers_keep
    assert 0.5 < first < 1 and it.budget_at(cfg, 10, 1000, dense_layers=4).layers_keep == pytest.approx(0.5)
    gr = hp.PruningSchedule("gradual", start_step=0, end_step=10, frequency=5)
    assert gr.budget_at(cfg, 0, 1000, dense_layers=4).layers_keep == 2  # chosen at once ...
    assert gr.fade(0) == 1.0 and 0 < gr.fade(5) < 1 and gr.fade(10) == 0.0  # ... and faded out
    assert hp.PruningSchedule().fade(0) == 0.0


def _with_identity_layer(tiny):
    model = tiny.model()
    layer = model.model.layers[1]
    with torch.no_grad():  # no attention output and no FFN output: the layer is the identity
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize("method", ["one_shot", "retraining_free"])
def test_depth_search_trades_a_layer_that_does_nothing_for_width(method):
    """At 70% of the FLOPs, dropping the identity layer (2 of 3 layers = 67%) loses nothing, while cutting heads and
    neurons of all three layers does: the search must find it."""
    tiny = BY_NAME["llama"]
    model = _with_identity_layer(tiny)
    batches = [tiny.batch(seed=s) for s in range(4)]
    extra = {"tuning_samples": 6, "selection_samples": 6} if method == "retraining_free" else {}
    cfg = hp.PruningConfig(method=method, flops_keep=0.7, depth_search=True, seq_len=7, progress=False, **extra)
    _, plan = hp.prune(model, batches, cfg)
    search = plan.meta["depth_search"]
    assert set(search["divergence"]) == {"3", "2"} and search["chosen"] == 2
    assert plan.kept_layers == [0, 2] and search["divergence"]["2"] < search["divergence"]["3"]


def test_depth_search_in_a_callback_equals_prune(tmp_path):
    tiny = BY_NAME["llama"]
    batches = [tiny.batch(seed=s) for s in range(4)]
    cfg = hp.PruningConfig(flops_keep=0.7, depth_search=True, seq_len=7, progress=False)
    _, want = hp.prune(_with_identity_layer(tiny), batches, cfg)
    cb = hp.PruningCallback(cfg, calibration_dataloader=batches)
    ids = torch.randint(3, 97, (8, 7), generator=torch.Generator().manual_seed(0)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 7] * 8, "labels": ids})
    args = T.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, learning_rate=0.0, report_to=[],
                               per_device_train_batch_size=4, use_cpu=True, save_strategy="no", disable_tqdm=True)
    T.Trainer(model=_with_identity_layer(tiny), args=args, train_dataset=data, callbacks=[cb]).train()
    got = cb.plan
    assert (got.layers, got.heads, got.neurons) == (want.layers, want.heads, want.neurons)
    with pytest.raises(ValueError, match="not on a gradual schedule"):
        hp.PruningCallback(cfg, hp.PruningSchedule("gradual", start_step=0, end_step=4), calibration_dataloader=batches)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"heads_keep": 0.5, "depth_search": True}, "under one cost budget: set flops_keep"),
        ({"flops_keep": 0.5, "layers_keep": 2, "depth_search": True}, "drop layers_keep"),
    ],
)
def test_bad_depth_search_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hp.PruningConfig(**kwargs)

import pytest
import torch
from helpers import random_plan
from tiny import BY_NAME

import hf_prune as hp
from hf_prune.shapes import get_module, layer_list


@pytest.mark.parametrize("criterion", hp.CRITERIA)
def test_every_criterion_scores_every_unit(tiny, criterion):
    model = tiny.model()
    batches = [tiny.batch(seed=s) for s in range(2)]
    scores = hp.compute_importance(model, batches, criterion, progress=False)
    d = hp.PrunePlan.dense(model)
    assert scores.heads.shape == (d.num_layers, d.num_heads)
    assert scores.neurons.shape == (d.num_layers, d.intermediate_size)
    assert torch.isfinite(scores.heads).all() and torch.isfinite(scores.neurons).all()
    assert (scores.heads >= 0).all() and (scores.neurons >= 0).all()
    assert scores.num_samples == (0 if criterion in ("magnitude", "random") else 6)
    if criterion != "random":  # real signal: not all units equal
        assert scores.neurons.std() > 0


@pytest.mark.parametrize("criterion", ["fisher", "taylor"])
def test_per_sample_gradients_match_one_sample_batches(criterion):
    """Per-sample masks give each sample's own gradient: a batch of 3 scores like 3 batches of 1."""
    tiny = BY_NAME["bert"]
    model = tiny.model()
    batch = tiny.batch(batch_size=3)
    batch["attention_mask"][:] = 1  # unpadded, so single-sample batches see the same tokens
    singles = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(3)]
    together = hp.compute_importance(model, [batch], criterion, progress=False)
    apart = hp.compute_importance(model, singles, criterion, progress=False)
    torch.testing.assert_close(together.heads, apart.heads, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(together.neurons, apart.neurons, rtol=1e-4, atol=1e-12)


def test_fisher_matches_a_finite_difference_of_the_loss():
    """The head-mask gradient the Fisher squares is the loss's derivative along that mask."""
    tiny = BY_NAME["bert"]
    model = tiny.model().double()
    batch = tiny.batch(batch_size=1)
    scores = hp.compute_importance(model, [batch], "taylor", progress=False)
    masks = hp.LayerMasks(3)
    eps = 1e-6

    def loss(value):
        masks.heads[1] = torch.ones(4, dtype=torch.float64)
        masks.heads[1][2] = value
        with torch.no_grad(), hp.mask_hooks(model, masks):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()

    numeric = abs(loss(1 + eps) - loss(1 - eps)) / (2 * eps)
    assert scores.heads[1, 2].item() == pytest.approx(numeric, rel=1e-4)


def test_label_free_scores_work_for_classifiers_and_headless_models():
    for name in ("bert", "qwen3"):
        tiny = BY_NAME[name]
        scores = hp.compute_importance(tiny.model(), [tiny.batch(labels=False)], "fisher", progress=False)
        assert scores.heads.sum() > 0 and scores.neurons.sum() > 0


def test_magnitude_is_the_squared_norm_of_a_units_own_weights():
    tiny = BY_NAME["bert"]
    model = tiny.model()
    scores = hp.compute_importance(model, None, "magnitude")
    layer = layer_list(model, hp.get_adapter(model))[0]
    q, o = layer.attention.self.query.weight, layer.attention.output.dense.weight
    up, down = layer.intermediate.dense.weight, layer.output.dense.weight
    head1 = q[8:16].pow(2).sum() + o[:, 8:16].pow(2).sum()
    neuron5 = up[5].pow(2).sum() + down[:, 5].pow(2).sum()
    assert scores.heads[0, 1].item() == pytest.approx(head1.item(), rel=1e-5)
    assert scores.neurons[0, 5].item() == pytest.approx(neuron5.item(), rel=1e-5)


def test_scores_of_a_pruned_model_use_dense_ids_and_nan_for_removed_units():
    tiny = BY_NAME["llama"]
    model = tiny.model()
    plan = random_plan(model, seed=3)
    dense_scores = hp.compute_importance(model, None, "magnitude")
    hp.apply_plan_(model, plan)
    scores = hp.compute_importance(model, [tiny.batch()], "fisher", progress=False)
    mag = hp.compute_importance(model, None, "magnitude")
    for i in range(plan.num_layers):
        kept = torch.zeros(4, dtype=torch.bool)
        kept[plan.heads[i]] = True
        assert torch.isnan(scores.heads[i, ~kept]).all() and torch.isfinite(scores.heads[i, kept]).all()
        assert torch.isnan(scores.neurons[i]).sum() == plan.intermediate_size - len(plan.neurons[i])
        # a surviving unit keeps its weights, so its magnitude score is unchanged
        torch.testing.assert_close(mag.heads[i, kept], dense_scores.heads[i, kept])


def test_bad_inputs_are_named():
    tiny = BY_NAME["bert"]
    model = tiny.model()
    with pytest.raises(ValueError, match="unknown importance criterion 'l0'.*fisher"):
        hp.compute_importance(model, [tiny.batch()], "l0")
    with pytest.raises(ValueError, match="no batches"):
        hp.compute_importance(model, [], "fisher", progress=False)
    with pytest.raises(ValueError, match="needs calibration data"):
        hp.compute_importance(model, None, "taylor")


def test_peft_wrapped_model_gets_a_clear_error():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(BY_NAME["bert"].model(), LoraConfig(target_modules=["query", "value"], r=2))
    with pytest.raises(TypeError, match="merge_and_unload"):
        hp.compute_importance(model, None, "magnitude")
    with pytest.raises(TypeError, match="get_peft_model"):
        hp.apply_plan_(model, hp.PrunePlan.dense(model.base_model.model))


def test_unsupported_architecture_names_the_supported_ones():
    import transformers as T

    model = T.GPT2Model(T.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10))
    with pytest.raises(NotImplementedError, match="gpt2.*bert.*register_adapter"):
        hp.compute_importance(model, None, "magnitude")


def test_register_adapter_adds_a_family():
    import dataclasses

    import transformers as T

    from hf_prune.adapters import _REGISTRY, BERT

    class MyConfig(T.BertConfig):
        model_type = "my-bert"

    class MyModel(T.BertModel):
        config_class = MyConfig

    with pytest.raises(ValueError, match="already registered"):
        hp.register_adapter(BERT)
    hp.register_adapter(dataclasses.replace(BERT, model_type="my-bert"))
    try:
        model = MyModel(MyConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48))
        _, plan = hp.prune(model, None, hp.PruningConfig(importance="magnitude", heads_keep=0.5, allocation="uniform"))
        assert [len(h) for h in plan.heads] == [2, 2]
        assert get_module(layer_list(model, hp.get_adapter(model))[0], "attention.self.query").out_features == 16
    finally:
        _REGISTRY.pop("my-bert")

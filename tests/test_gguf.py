"""GGUF export checked in llama.cpp itself (llama-cpp-python): for every family with a llama.cpp architecture,
dense, uniform and uneven cuts (removed layers, query heads inside KV groups) give transformers' logits and greedy
tokens in f32, the tokenizer splits text as transformers' does, the quantized outtypes load and run, and every shape
llama.cpp cannot run is refused before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_plan
from serving import GGUF_FAMILIES, TEXT, UNEVEN_FAMILIES, require, tiny_lm, tiny_tokenizer

import hf_prune as hp
from hf_prune.formats import save_gguf
from hf_prune.formats.runtimes import llama_greedy, llama_logits, load_llama


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _ids(tokenizer) -> list[int]:
    return tokenizer(TEXT, add_special_tokens=False)["input_ids"][:40]


def _torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _cut(model, how: str):
    if how == "uniform":
        hp.prune(model, None, hp.PruningConfig(importance="magnitude", allocation="uniform", heads_keep=0.5,
                                               neurons_keep=0.6))
    elif how == "uneven":
        hp.apply_plan_(model, random_plan(model, seed=3, query_heads=True))
    elif how == "hidden":  # a uniform cut of heads, neurons and the residual width: the stock architecture, narrower
        hp.prune(model, None, hp.PruningConfig(importance="magnitude", allocation="uniform", heads_keep=0.5,
                                               neurons_keep=0.6, hidden_keep=0.75, hidden_importance="magnitude"))
    elif how == "hidden-uneven":
        hp.apply_plan_(model, random_plan(model, seed=3, query_heads=True, hidden=40))
    elif how == "depth":  # layers removed, widths untouched: still one shape (Gemma: its sliding pattern shifts)
        plan = hp.PrunePlan.dense(model).to_dict()
        hp.apply_plan_(model, hp.PrunePlan.from_dict({**plan, "layers": [0, 2]}))
    elif how == "layers":
        plan = random_plan(model, seed=5)
        plan.layers = [0, 2]
        hp.apply_plan_(model, hp.PrunePlan.from_dict(plan.to_dict()))
    return model


CASES = [(f, c) for f in GGUF_FAMILIES for c in ("dense", "uniform", "depth")] + \
        [(f, c) for f in UNEVEN_FAMILIES for c in ("uneven", "layers", "hidden-uneven")] + \
        [(f, "hidden") for f in GGUF_FAMILIES if f != "gemma3_text"]


@pytest.mark.parametrize("family,cut", CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_f32_gguf_gives_transformers_logits_and_greedy_tokens_in_llama_cpp(family, cut, tokenizer, tmp_path):
    require("llama_cpp")
    model = _cut(tiny_lm(family, len(tokenizer)), cut)
    path = save_gguf(model, tokenizer, tmp_path / "m.gguf", outtype="f32")
    llm = load_llama(path, n_ctx=128, exact=True)
    ids = _ids(tokenizer)
    # ggml's GELU (Gemma) is an f16 table lookup: ~1e-4 on logits; SiLU families match to float rounding
    atol = 1e-3 if family == "gemma3_text" else 1e-5
    np.testing.assert_allclose(llama_logits(llm, ids), _torch_logits(model, ids), atol=atol, rtol=1e-4)
    want, prompt = [], list(ids[:8])
    with torch.no_grad():  # greedy by hand: generate() would stop at the tiny model's EOS, llama.cpp's loop does not
        for _ in range(8):
            want.append(int(model(torch.tensor([prompt + want])).logits[0, -1].argmax()))
    assert llama_greedy(llm, prompt, 8) == want


def test_the_tokenizer_travels_with_the_file(tokenizer, tmp_path):
    require("llama_cpp")
    path = save_gguf(tiny_lm("llama", len(tokenizer)), tokenizer, tmp_path / "m.gguf", outtype="f32")
    llm = load_llama(path, n_ctx=128, logits_all=False)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == tokenizer(TEXT)["input_ids"]
    assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2"
    assert "<|im_start|>" in llm.metadata["tokenizer.chat_template"]
    assert int(llm.metadata["tokenizer.ggml.eos_token_id"]) == tokenizer.eos_token_id


def test_uneven_layers_are_deci_with_per_layer_sizes_and_ffn_padding_is_exact(tokenizer, tmp_path):
    require("llama_cpp")
    import gguf

    model = _cut(tiny_lm("llama", len(tokenizer)), "uneven")
    sizes = hp.PrunePlan.of(model).physical_sizes()
    path = save_gguf(model, tokenizer, tmp_path / "m.gguf", outtype="f32", pad_ffn_to=32)
    fields = gguf.GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "deci"
    assert fields["deci.attention.head_count"].contents() == [s["num_heads"] for s in sizes]
    assert fields["deci.attention.head_count_kv"].contents() == [s["num_kv_heads"] for s in sizes]
    assert fields["deci.feed_forward_length"].contents() == [-(-s["intermediate_size"] // 32) * 32 for s in sizes]
    unpadded = save_gguf(model, tokenizer, tmp_path / "u.gguf", outtype="f32", pad_ffn_to=1)
    ids = _ids(tokenizer)
    np.testing.assert_allclose(llama_logits(load_llama(path, n_ctx=128, exact=True), ids),
                               llama_logits(load_llama(unpadded, n_ctx=128, exact=True), ids), atol=1e-5)


@pytest.mark.parametrize("outtype,tol", [("f16", 0.05), ("bf16", 0.1), ("q8_0", 0.1), ("q4_k_m", None)])
def test_quantized_outtypes_load_and_stay_close(outtype, tol, tokenizer, tmp_path):
    require("llama_cpp")
    model = _cut(tiny_lm("llama", len(tokenizer)), "uneven")
    path = save_gguf(model, tokenizer, tmp_path / f"m-{outtype}.gguf", outtype=outtype)
    ids = _ids(tokenizer)
    got, want = llama_logits(load_llama(path, n_ctx=128), ids), _torch_logits(model, ids)
    assert np.isfinite(got).all()
    if tol is not None:  # k-quants of 64-wide tiny rows fall back to other types: only that it runs is checked
        assert np.abs(got - want).max() < tol * np.abs(want).max()
    import gguf

    assert gguf.GGUFReader(path).fields["general.file_type"].contents() == hp.formats.OUTTYPES[outtype].file_type


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_uneven_cuts_of_families_without_a_per_layer_architecture_are_refused(family, tokenizer, tmp_path):
    model = _cut(tiny_lm(family, len(tokenizer)), "uneven")
    with pytest.raises(ValueError, match="different sizes.*uniform"):
        save_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_a_hidden_cut_gemma_is_refused_its_embedding_scale_reads_the_width(tokenizer, tmp_path):
    model = _cut(tiny_lm("gemma3_text", len(tokenizer)), "hidden")
    with pytest.raises(ValueError, match="sqrt\\(n_embd\\)"):
        save_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_bad_input_is_refused_before_anything_is_written(tokenizer, tmp_path):
    from tiny import BY_NAME

    with pytest.raises(ValueError, match="no architecture.*bert.*format='onnx'"):
        save_gguf(BY_NAME["bert"].model(), tokenizer, tmp_path / "m.gguf")
    model = tiny_lm("llama", len(tokenizer))
    with pytest.raises(ValueError, match="unknown GGUF outtype 'q3'"):
        save_gguf(model, tokenizer, tmp_path / "m.gguf", outtype="q3")
    with pytest.raises(ValueError, match="none was given"):
        save_gguf(model, None, tmp_path / "m.gguf")
    (tmp_path / "old.gguf").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_gguf(model, tokenizer, tmp_path / "old.gguf")
    assert (tmp_path / "old.gguf").read_text() == "keep me"
    plan = random_plan(model, seed=3)
    plan.heads[0] = []
    hp.apply_plan_(model, plan)
    with pytest.raises(ValueError, match="layer 0 keeps no attention head"):
        save_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.gguf"]


def test_a_peft_wrapped_model_is_refused(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_lm("llama", len(tokenizer)), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="merge_and_unload"):
        save_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_cli_export_refuses_a_checkpoint_without_its_tokenizer(tmp_path, capsys):
    from hf_prune.cli import main

    tokenizer = tiny_tokenizer()
    _cut(tiny_lm("llama", len(tokenizer)), "uneven").save_pretrained(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "gguf", "--output_dir", str(tmp_path / "g")]) == 2
    assert "has no tokenizer" in capsys.readouterr().err and not (tmp_path / "g").exists()
    tokenizer.save_pretrained(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "gguf", "--quantize", "int8", "--output_dir",
                 str(tmp_path / "g")]) == 2
    assert "--quantize does not apply to gguf" in capsys.readouterr().err
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "model-f16.gguf").write_text("keep")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "gguf", "--output_dir", str(tmp_path / "g")]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "g" / "model-f16.gguf").read_text() == "keep"

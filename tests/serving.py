"""Shared pieces of the serving-export tests: a tiny byte-level BPE tokenizer (built offline), tiny causal LMs of
every GGUF family sized to it, and whether the runtimes are installed (CI requires them: a missing install fails)."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
import transformers as T
from tiny import BY_NAME

#: families with a llama.cpp architecture, and the ones that also export uneven cuts (through deci)
GGUF_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
UNEVEN_FAMILIES = ["llama", "mistral", "qwen2"]
TEXT = ("The quick brown fox jumps over the lazy dog. Pruned models run in llama.cpp and onnxruntime; "
        "3 + 4 = 7, and 12345 tokens later we're still here! <|im_start|>user hi<|im_end|>")


def require(module: str):
    """Skip without ``module``, unless HF_PRUNE_REQUIRE_SERVE is set (CI), where a missing runtime fails."""
    if importlib.util.find_spec(module) is None:
        if os.environ.get("HF_PRUNE_REQUIRE_SERVE"):
            pytest.fail(f"{module} is not installed but HF_PRUNE_REQUIRE_SERVE is set")
        pytest.skip(f"{module} not installed (pip install 'hf_prune[serve]')")


def tiny_tokenizer() -> T.PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE (256 byte tokens + merges) with ChatML specials, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 4 + ["hello world, pruning heads and neurons"] * 4, trainer)
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                     pad_token="<|endoftext|>", add_bos_token=False,
                                     chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                                                   "{{ m['content'] }}<|im_end|>\n{% endfor %}")


def tiny_lm(name: str, vocab: int, seed: int = 0, head_dim: int = 16) -> torch.nn.Module:
    """The tiny table's config for ``name`` as a causal LM with ``vocab`` tokens and a head size of ``head_dim``."""
    config = copy.deepcopy(BY_NAME[name].make_config())
    config.vocab_size = vocab
    config.hidden_size, config.head_dim = 64, head_dim
    config.intermediate_size = 96
    config.max_position_embeddings = 128
    if name == "gemma3_text":
        config.query_pre_attn_scalar = 16
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # visible norms and biases, so a misplaced one shows in the logits
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model

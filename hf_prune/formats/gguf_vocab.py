"""A Hugging Face tokenizer written into a GGUF file the way llama.cpp reads it: tokens and their types, BPE
merges, the pre-tokenizer llama.cpp must split text with, special token ids, add-BOS/EOS flags and the chat
template.

Two tokenizer kinds cover the exported families: byte-level BPE (GPT-2 style: SmolLM, Llama 3, Qwen) as
``tokenizer.ggml.model = "gpt2"``, and SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma) as
``"llama"``. A byte-level BPE tokenizer also needs ``tokenizer.ggml.pre``, the name of llama.cpp's own split
rules; llama.cpp's converter recognises it by hashing the token ids of one check string, and so does this module
(:data:`KNOWN_PRE`). An unknown tokenizer is refused with the fix (``pre_tokenizer=NAME``) instead of guessed.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

#: The string llama.cpp's converter tokenizes to recognise a pre-tokenizer (its ``chktxt``; test data).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

#: sha256 of ``str(tokenizer.encode(CHECK_TEXT))`` -> llama.cpp's pre-tokenizer name (the hashes llama.cpp's
#: converter lists for these reference tokenizers).
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}

_SPECIAL_LOOKING = re.compile(r"^<\|.*\|>$|^<pad>$|^<unused.*>$")


def tokenizer_files(tokenizer: Any) -> tempfile.TemporaryDirectory:
    """The tokenizer saved to a temporary folder (tokenizer.json, tokenizer_config.json, chat template): the one
    form every reader below takes. The caller removes it."""
    if tokenizer is None:
        raise ValueError("a GGUF file carries its tokenizer and none was given: pass the model's tokenizer (a "
                         "checkpoint folder needs its tokenizer files beside the weights)")
    folder = tempfile.TemporaryDirectory(prefix="hf_prune-tokenizer-")
    tokenizer.save_pretrained(folder.name)
    if not (Path(folder.name) / "tokenizer.json").is_file():
        folder.cleanup()
        raise ValueError(f"{type(tokenizer).__name__} has no fast (tokenizer.json) form; GGUF export reads the fast "
                         "tokenizer: load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    return folder


def tokenizer_kind(folder: str | Path) -> str:
    """``"gpt2"`` (byte-level BPE) or ``"llama"`` (SentencePiece-style BPE with byte fallback); refuses others."""
    data = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    model, decoder = data["model"], data.get("decoder") or {}
    if model["type"] == "BPE" and not model.get("byte_fallback", False) and decoder.get("type") == "ByteLevel":
        return "gpt2"
    if model["type"] == "BPE" and model.get("byte_fallback", False):
        return "llama"
    raise ValueError(f"the tokenizer is a {model['type']} model with a {decoder.get('type')} decoder; GGUF export "
                     "writes byte-level BPE (GPT-2 style) and SentencePiece-style BPE tokenizers")


def pre_tokenizer_name(tokenizer: Any, folder: str | Path) -> str:
    """llama.cpp's pre-tokenizer for a byte-level BPE tokenizer: by the converter's hash, else plain GPT-2 splitting
    when tokenizer.json asks for exactly that, else an error naming the fix."""
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in KNOWN_PRE:
        return KNOWN_PRE[digest]
    pre = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # the GPT-2 regex alone: llama.cpp's gpt-2 rules are that regex
    raise ValueError(
        f"hf_prune does not know which llama.cpp pre-tokenizer this tokenizer uses (check hash {digest[:16]}..., "
        f"pre_tokenizer {pre.get('type')}); pass pre_tokenizer='NAME' with the tokenizer.ggml.pre value llama.cpp "
        "uses for its family (e.g. llama-bpe, qwen2, smollm, gpt-2)")


def _gpt2_tokens(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_tokens)
    tokens, types = [], []
    for i in range(n_vocab):
        tok = by_id.get(i)
        if tok is None:  # embedding rows past the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added and (tok in special or _SPECIAL_LOOKING.match(tok)):
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL)
        elif tok in added:
            tokens.append(tok)
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def add_vocab(writer: Any, tokenizer: Any, folder: str | Path, n_vocab: int, pre_tokenizer: str | None = None) -> None:
    """Write ``tokenizer`` (saved in ``folder``) into ``writer`` for a model with ``n_vocab`` embedding rows."""
    import gguf

    if len(tokenizer) > n_vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embedding rows")
    kind = tokenizer_kind(folder)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer or pre_tokenizer_name(tokenizer, folder))
        tokens, types = _gpt2_tokens(tokenizer, n_vocab)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:
        writer.add_tokenizer_pre(pre_tokenizer or "default")
        vocab = gguf.LlamaHfVocab(Path(folder))
        tokens, scores, types = [], [], []
        for text, score, typ in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(typ)
        for i in range(len(tokens), n_vocab):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(False)
    special = gguf.SpecialVocab(Path(folder), load_merges=kind == "gpt2", n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)

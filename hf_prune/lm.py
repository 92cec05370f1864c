"""Causal language models: calibration batches packed from raw text, and perplexity on held-out text."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .batches import model_device, to_device


def text_block_rows(
    tokenizer: Any, texts: Sequence[str], *, block_size: int = 128, max_blocks: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Token blocks of ``block_size`` packed from ``texts`` (joined with the tokenizer's EOS, or a newline when it
    has none), one ``{input_ids, attention_mask, labels}`` row per block with ``labels = input_ids`` (the model
    shifts them): a training set for causal-LM recovery. Every block starts with the special tokens the tokenizer
    puts before a text (Gemma's ``<bos>``: without it Gemma's predictions fall apart; none for Llama-style
    SmolLM2). The tail shorter than a block is dropped. Refuses text shorter than one block."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 tokens, got {block_size}")
    sep = tokenizer.eos_token if getattr(tokenizer, "eos_token", None) else "\n"
    ids = tokenizer(sep.join(texts), add_special_tokens=False)["input_ids"]
    prefix = _leading_special_tokens(tokenizer)
    body = block_size - len(prefix)
    if body < 1:
        raise ValueError(f"block_size={block_size} leaves no room for text after the {len(prefix)} special tokens "
                         "every block starts with")
    n = len(ids) // body
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one block of {block_size}: pass more text or a "
                         "smaller block_size")
    blocks = torch.tensor(ids[: n * body]).view(n, body)  # (N, T - prefix)
    blocks = torch.cat([torch.tensor(prefix, dtype=blocks.dtype).expand(n, -1), blocks], dim=1)  # (N, T)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in blocks]


def pack_text_blocks(
    tokenizer: Any, texts: Sequence[str], *, block_size: int = 128, batch_size: int = 8, max_blocks: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """:func:`text_block_rows` batched by ``batch_size``: what a causal LM's Fisher scores, tuning and perplexity
    run on."""
    rows = text_block_rows(tokenizer, texts, block_size=block_size, max_blocks=max_blocks)
    return [{k: torch.stack([r[k] for r in rows[i : i + batch_size]]) for k in rows[0]}
            for i in range(0, len(rows), batch_size)]


def _leading_special_tokens(tokenizer: Any) -> list[int]:
    """The ids a tokenizer puts before a text by default (``<bos>``, ``[CLS]``; often none)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    if not plain or plain[0] not in full:
        return []
    return list(full[: full.index(plain[0])])


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> float:
    """``exp`` of the mean next-token cross-entropy over every predicted token of ``batches`` (padding, where
    ``labels`` are -100, excluded), in one pass with the model in eval mode."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    try:
        for raw in batches:
            batch = to_device(raw, device)
            labels = batch.pop("labels", batch["input_ids"])
            logits = model(**batch).logits[:, :-1].float()  # (B, T-1, V)
            target = labels[:, 1:]
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                               ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((target != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to score: the batches are empty or fully masked")
    return math.exp(total / count)

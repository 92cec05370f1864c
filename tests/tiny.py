"""A table of tiny random models, one per supported family, built from configs (never downloaded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import transformers as T

HIDDEN, HEADS, FFN, LAYERS, VOCAB = 32, 4, 48, 3, 97


@dataclass
class Tiny:
    name: str
    make_config: Callable[[], Any]
    model_class: type
    auto_class: type
    vision: bool = False
    labels: str = "class"  # "class", "lm" or "none"

    def model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.model_class(self.make_config()).eval()

    def batch(self, batch_size: int = 3, seq_len: int = 7, seed: int = 1, labels: bool = True) -> dict:
        g = torch.Generator().manual_seed(seed)
        if self.vision:
            out = {"pixel_values": torch.randn(batch_size, 3, 8, 8, generator=g)}
        else:
            ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
            mask = torch.ones_like(ids)
            mask[0, -2:] = 0  # one padded sequence
            out = {"input_ids": ids, "attention_mask": mask}
        if labels and self.labels == "class":
            out["labels"] = torch.randint(0, 3, (batch_size,), generator=g)
        elif labels and self.labels == "lm":
            out["labels"] = out["input_ids"].clone()
        return out


def _text(cls, **kw):
    base = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                vocab_size=VOCAB, num_labels=3, max_position_embeddings=64)
    base.update(kw)
    return lambda: cls(**base)


def _vision(cls):
    return lambda: cls(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                       image_size=8, patch_size=4, num_channels=3, num_labels=3)


def _decoder(cls, **kw):
    base = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                intermediate_size=FFN, vocab_size=VOCAB, num_labels=3, max_position_embeddings=64, pad_token_id=0)
    base.update(kw)
    return lambda: cls(**base)


TINY = [
    Tiny("bert", _text(T.BertConfig), T.BertForSequenceClassification, T.AutoModelForSequenceClassification),
    Tiny("roberta", _text(T.RobertaConfig, pad_token_id=1), T.RobertaForSequenceClassification,
         T.AutoModelForSequenceClassification),
    Tiny("xlm-roberta", _text(T.XLMRobertaConfig, pad_token_id=1), T.XLMRobertaModel, T.AutoModel, labels="none"),
    Tiny("electra", _text(T.ElectraConfig, embedding_size=16), T.ElectraForSequenceClassification,
         T.AutoModelForSequenceClassification),
    Tiny("mpnet", _text(T.MPNetConfig, pad_token_id=1), T.MPNetForSequenceClassification,
         T.AutoModelForSequenceClassification),
    Tiny("distilbert", lambda: T.DistilBertConfig(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
                                                  vocab_size=VOCAB, num_labels=3, max_position_embeddings=64),
         T.DistilBertForSequenceClassification, T.AutoModelForSequenceClassification),
    Tiny("vit", _vision(T.ViTConfig), T.ViTForImageClassification, T.AutoModelForImageClassification, vision=True),
    Tiny("deit", _vision(T.DeiTConfig), T.DeiTForImageClassification, T.AutoModelForImageClassification,
         vision=True),
    Tiny("llama", _decoder(T.LlamaConfig), T.LlamaForCausalLM, T.AutoModelForCausalLM, labels="lm"),
    Tiny("mistral", _decoder(T.MistralConfig), T.MistralForCausalLM, T.AutoModelForCausalLM, labels="lm"),
    Tiny("qwen2", _decoder(T.Qwen2Config), T.Qwen2ForSequenceClassification, T.AutoModelForSequenceClassification),
    Tiny("qwen3", _decoder(T.Qwen3Config, head_dim=8), T.Qwen3Model, T.AutoModel, labels="none"),
    Tiny("gemma3_text", _decoder(T.Gemma3TextConfig, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
         T.Gemma3ForCausalLM, T.AutoModelForCausalLM, labels="lm"),
]
BY_NAME = {t.name: t for t in TINY}


def output_tensor(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def inputs_only(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}

"""A ``SentenceTransformer`` as a model hf_prune prunes: the transformers encoder inside it is cut, and every pruning
step scores the sentence embedding the whole pipeline outputs (its pooling, dense layers and normalisation), not the
encoder's token states or a classifier's [CLS] position.

``hp.prune(st_model, sentences, PruningConfig(...))`` takes unlabeled text (or batches made by
:func:`sentence_batches`); ``hp.save_pruned(st_model, folder)`` / :func:`save_sentence_transformer` write a
sentence-transformers folder whose transformer module is the pruned checkpoint (``SentenceTransformer(folder,
trust_remote_code=True)`` loads it without hf_prune; ``deployable=True`` writes the stock architecture, which loads
with plain ``SentenceTransformer(folder)``). Registered as the model kind ``sentence-transformers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from ..export import stock_model, write_stock_plan
from ..io import staged_folder
from ..model_kinds import ModelKind, register_model_kind

#: sentences per calibration batch when ``hp.prune`` is given a list of sentences
CALIBRATION_BATCH_SIZE = 32
#: pooling modes whose read positions change with the weights (an argmax), which the tuning cannot follow
_MOVING_POOLING = ("max",)


def is_sentence_transformer(model: Any) -> bool:
    """Whether ``model`` is a ``sentence_transformers.SentenceTransformer`` (checked without importing it)."""
    return any(c.__name__ == "SentenceTransformer" and c.__module__.startswith("sentence_transformers")
               for c in type(model).__mro__)


def encoder(st: Any) -> PreTrainedModel:
    """The transformers model inside ``st`` (its first module's ``model``), or a one-line error naming the module."""
    first = st[0] if len(st) else None
    inner = getattr(first, "model", None) if first is not None else None
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(
            f"this SentenceTransformer's first module is {type(first).__name__}, not a transformers model "
            "(sentence_transformers' Transformer module): hf_prune prunes the attention heads, FFN neurons and layers "
            "of a transformer encoder, so static-embedding and other non-transformer models cannot be pruned"
        )
    return inner


def pooling_modes(st: Any) -> tuple[str, ...]:
    """The pooling modes of ``st``'s Pooling modules (empty: it has none)."""
    modes: list[str] = []
    for module in st:
        mode = getattr(module, "pooling_mode", None)
        if mode is not None:
            modes += [mode] if isinstance(mode, str) else list(mode)
    return tuple(modes)


class SentenceEmbedder(nn.Module):
    """A ``SentenceTransformer`` seen as a transformers model: the ``config`` and ``base_model`` of its encoder (what
    adapters, plans and costs read) and a forward pass over tokenized batches that returns the sentence embedding
    the pipeline outputs as ``last_hidden_state`` ``(B, D)``. Importance then projects the embedding, selection
    compares embeddings (squared error), and the tuning reconstructs the token positions the pooling reads."""

    def __init__(self, st: Any) -> None:
        super().__init__()
        self.st = st

    @property
    def config(self) -> Any:
        return encoder(self.st).config

    @property
    def base_model(self) -> nn.Module:
        return encoder(self.st).base_model

    @property
    def prune_plan(self) -> Any:
        """The encoder's plan (None while it is dense): what ``PrunePlan.of`` reads."""
        return getattr(encoder(self.st), "prune_plan", None)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **batch: Any) -> BaseModelOutput:
        # named arguments: Trainer keeps the dataset columns the forward signature names
        batch.update(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        features = {k: v for k, v in batch.items() if k != "labels" and v is not None}
        return BaseModelOutput(last_hidden_state=self.st(features)["sentence_embedding"])


def sentence_batches(
    st: Any, sentences: Sequence[str], *, batch_size: int = CALIBRATION_BATCH_SIZE
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches from unlabeled ``sentences``, tokenized by ``st`` itself (its max length, its
    prompts-free preprocessing), each padded to its longest sentence."""
    sentences = [s for s in sentences if isinstance(s, str) and s.strip()]
    if len(sentences) < batch_size:
        raise ValueError(
            f"calibration text has {len(sentences)} non-empty sentences, fewer than one batch of {batch_size}: pass "
            "more sentences (a few hundred is typical) or build smaller batches with hf_prune.sentence_batches("
            "model, sentences, batch_size=...)"
        )
    prepare = getattr(st, "preprocess", None) or st.tokenize  # sentence-transformers < 6 has tokenize only
    out = []
    for i in range(0, len(sentences), batch_size):
        features = prepare(sentences[i : i + batch_size])
        out.append({k: v for k, v in features.items() if isinstance(v, torch.Tensor)})
    return out


def _batches(st: Any, data: Any) -> Any:
    if isinstance(data, str):
        raise TypeError("pass the calibration sentences as a list of strings, not one string")
    if isinstance(data, Sequence) and (not data or isinstance(data[0], str)):
        return sentence_batches(st, data)
    return data  # batches already tokenized by the caller


def _check(st: Any, config: Any) -> None:
    encoder(st)
    if getattr(config, "hidden_keep", None) is not None:
        raise ValueError(
            "hidden_keep cuts the encoder's hidden width, which is the size of the sentence embedding this model "
            "outputs (every stored embedding and index would stop matching): prune heads, neurons or layers instead"
        )
    moving = [m for m in pooling_modes(st) if m in _MOVING_POOLING]
    if moving and getattr(config, "method", None) == "retraining_free" and getattr(config, "mask_tuning", False):
        raise ValueError(
            f"this model pools with {moving[0]!r}: which token a dimension's maximum comes from changes as the "
            "weights are refitted, so the retraining-free tuning cannot reconstruct what the embedding reads; set "
            "mask_tuning=False (or method='one_shot')"
        )


def save_sentence_transformer(st: Any, save_directory: str | Path, *, deployable: bool = False,
                              overwrite: bool = False) -> Path:
    """Write ``st`` as a sentence-transformers folder (``modules.json``, pooling, normalisation, tokenizer) whose
    transformer module is the pruned checkpoint, atomically. ``deployable``: the encoder as its stock architecture
    (plain ``SentenceTransformer(folder)`` loads it; raises :class:`hf_prune.NotStockExpressible` before writing
    when the layers differ). An existing non-empty folder is refused unless ``overwrite``."""
    inner = encoder(st)
    stock = stock_model(inner) if deployable else None
    with staged_folder(save_directory, overwrite=overwrite) as stage:
        if stock is not None:
            st[0].model = stock  # the Transformer module saves whatever model it holds
            try:
                st.save(str(stage))
            finally:
                st[0].model = inner
            write_stock_plan(stock, stage)
        else:
            st.save(str(stage))
    return Path(save_directory)


register_model_kind(ModelKind(
    name="sentence-transformers", matches=is_sentence_transformer, scored=SentenceEmbedder, inner=encoder,
    batches=_batches, check=_check,
    save=lambda st, folder, deployable, overwrite: save_sentence_transformer(
        st, folder, deployable=deployable, overwrite=overwrite),
))

"""Sentence-embedding models: pruning a ``SentenceTransformer`` through the encoder inside it, scored on the embedding
it outputs (:mod:`.sentence_transformer`)."""

from .sentence_transformer import (
    SentenceEmbedder,
    encoder,
    is_sentence_transformer,
    pooling_modes,
    save_sentence_transformer,
    sentence_batches,
)

__all__ = ["SentenceEmbedder", "encoder", "is_sentence_transformer", "pooling_modes", "save_sentence_transformer",
           "sentence_batches"]

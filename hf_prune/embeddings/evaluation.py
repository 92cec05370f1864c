"""How good a sentence-embedding model is, offline: STS (Spearman correlation of cosine similarity with human scores,
MTEB's STS metric) and retrieval (MRR@10 and recall@10 of cosine nearest neighbours), and how fast it encodes
(sentences per second in PyTorch, interleaved with a reference model).

Data readers take the GLUE TSV files: STS-B ``dev.tsv`` (sentence pairs scored 0-5) and QNLI ``dev.tsv`` read as
question -> answer retrieval: every question whose sentence is labelled ``entailment`` is a query, every distinct
QNLI dev sentence is the corpus, and the query's own sentence is the one relevant document.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..formats.runtimes import interleaved
from ..resources import read_tsv


@dataclass
class StsPairs:
    """Sentence pairs with a similarity score (STS-B: 0 to 5)."""

    first: list[str]
    second: list[str]
    scores: list[float]


@dataclass
class RetrievalSet:
    """Queries, a corpus, and the corpus index relevant to each query."""

    queries: list[str]
    corpus: list[str]
    relevant: list[int]


def read_sts(path: str | Path, limit: int | None = None) -> StsPairs:
    """STS-B pairs from a GLUE ``dev.tsv`` (columns ``sentence1``, ``sentence2``, ``score``)."""
    rows = read_tsv(Path(path), header=False)
    head = rows[0]
    cols = [head.index(c) for c in ("sentence1", "sentence2", "score") if c in head]
    if len(cols) != 3:
        raise ValueError(f"{path} is not an STS-B file: it needs sentence1, sentence2 and score columns (has {head})")
    body = [r for r in rows[1:] if len(r) > max(cols)][:limit]
    return StsPairs([r[cols[0]] for r in body], [r[cols[1]] for r in body], [float(r[cols[2]]) for r in body])


def read_qnli_retrieval(path: str | Path, limit: int | None = None, corpus_size: int | None = None) -> RetrievalSet:
    """QNLI ``dev.tsv`` as question -> answer retrieval (see the module docstring); ``limit`` caps the queries (the
    first ones), ``corpus_size`` the corpus (the queries' own sentences, then the others in file order)."""
    rows = read_tsv(Path(path), header=False)
    head = rows[0]
    if not {"question", "sentence", "label"} <= set(head):
        raise ValueError(f"{path} is not a QNLI file: it needs question, sentence and label columns (has {head})")
    q, s, lab = (head.index(c) for c in ("question", "sentence", "label"))
    body = [r for r in rows[1:] if len(r) > max(q, s, lab)]
    return retrieval_set([r[q] for r in body], [r[s] for r in body], [r[lab] == "entailment" for r in body], limit,
                         corpus_size)


def retrieval_set(questions: Sequence[str], sentences: Sequence[str], answers: Sequence[bool],
                  limit: int | None = None, corpus_size: int | None = None) -> RetrievalSet:
    """QNLI rows (question, sentence, whether the sentence answers it) as question -> answer retrieval: the first
    ``limit`` answered questions are the queries; the corpus is their sentences, then the other distinct sentences in
    row order, up to ``corpus_size``."""
    pairs = [(q, s) for q, s, yes in zip(questions, sentences, answers) if yes][:limit]
    corpus = list(dict.fromkeys([a for _, a in pairs] + list(sentences)))  # distinct, relevant ones first
    corpus = corpus[: max(corpus_size or len(corpus), len({a for _, a in pairs}))]
    where = {text: i for i, text in enumerate(corpus)}
    return RetrievalSet([p[0] for p in pairs], corpus, [where[a] for _, a in pairs])


@torch.no_grad()
def embed(model: Any, sentences: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """``(N, D)`` float32 embeddings, unit length (cosine similarity is then a dot product)."""
    out = model.encode(list(sentences), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    return torch.nn.functional.normalize(out.float().cpu(), dim=-1)


def sts_spearman(model: Any, pairs: StsPairs, batch_size: int = 64) -> float:
    """Spearman correlation (x 100) between the cosine similarity of each pair's embeddings and its score."""
    from scipy.stats import spearmanr

    a, b = embed(model, pairs.first, batch_size), embed(model, pairs.second, batch_size)
    return float(spearmanr((a * b).sum(-1).numpy(), pairs.scores).statistic) * 100


def retrieval_scores(model: Any, data: RetrievalSet, k: int = 10, batch_size: int = 64) -> dict[str, float]:
    """``mrr@k`` and ``recall@k`` (x 100) of the relevant document among each query's ``k`` nearest by cosine."""
    docs = embed(model, data.corpus, batch_size)  # (C, D)
    queries = embed(model, data.queries, batch_size)  # (Q, D)
    top = (queries @ docs.T).topk(min(k, len(data.corpus)), dim=-1).indices  # (Q, k); a smaller corpus: all of it
    hit = top == torch.tensor(data.relevant)[:, None]  # (Q, k)
    rank = hit.float().argmax(-1) + 1  # first hit's rank where there is one
    found = hit.any(-1)
    return {f"mrr@{k}": float(torch.where(found, 1.0 / rank, 0.0).mean()) * 100,
            f"recall@{k}": float(found.float().mean()) * 100}


def encode_throughput(models: dict[str, Any], sentences: Sequence[str], batch_size: int,
                      repeats: int = 3) -> dict[str, float]:
    """Sentences per second of each model encoding ``sentences`` at ``batch_size`` (PyTorch, this process's
    threads), the models interleaved repeat by repeat; the median of ``repeats`` timed passes after one warm-up."""
    def timed(model: Any) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            model.encode(list(sentences), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
            return time.perf_counter() - start
        return run

    times = interleaved({name: timed(model) for name, model in models.items()}, repeats)
    return {name: len(sentences) / sorted(t)[len(t) // 2] for name, t in times.items()}

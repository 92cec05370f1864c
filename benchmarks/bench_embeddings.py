"""Sentence-embedding models pruned: all-MiniLM-L6-v2 and all-mpnet-base-v2 (the embedded ones) at fractions of their
layer FLOPs, quality (STS-B dev Spearman, QNLI question -> answer retrieval) and encode throughput.

    .venv/bin/python benchmarks/bench_embeddings.py                      # quality cells, then throughput (run alone)
    .venv/bin/python benchmarks/bench_embeddings.py --parts quality      # the slow part, cached cell by cell

Variants per model, budget and calibration draw (``draw`` picks the calibration sentences):

* ``rf``: hf_prune's retraining-free cut, scored on the sentence embedding (``hp.prune(SentenceTransformer, ...)``);
* ``tp``: Torch-Pruning Taylor (``benchmarks/tp_baseline.py``, local scope as in its BERT example) with the same
  objective (the gradient of a random projection of the sentence embedding) on the same sentences. MiniLM only:
  on MPNet TP removes no attention head (its dependency graph ties every layer's heads to the relative-position
  bias they share; a 3-layer MPNet cut to half its FLOPs kept all its heads and lost only FFN neurons), so it
  cannot meet the budgets;
* ``+kd``: then embedding distillation from the dense model (``PruningTrainer``, squared distance of the
  embeddings), the same number of steps and sentences for every variant (draw 0).

Data (``../shared``, for benchmarks only): calibration and distillation sentences from STS-B train (both sides of
each pair, unlabeled) and SST-2 train; STS-B dev (1,500 pairs, Spearman x 100 of the cosine similarity: MTEB's STS
metric); QNLI dev as retrieval (the questions whose sentence is labelled entailment are queries, the first
``--queries``; the corpus is their sentences plus other QNLI dev sentences up to ``--corpus``; MRR@10, recall@10).
Throughput: sentences/s encoding 256 STS-B sentences in PyTorch at batch 1 / 32 / 128, every model interleaved.
Writes ``benchmarks/results/embeddings.{md,json}`` and ``embeddings_quality_vs_speed.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from common import CACHE, GLUE, cached_cell
from sentence_transformers import SentenceTransformer
from tp_baseline import kept_units, tp_prune
from transformers import DataCollatorWithPadding, HfArgumentParser, TrainingArguments

import hf_prune as hp
from hf_prune import report
from hf_prune.embeddings import SentenceEmbedder, encoder, pooling_modes
from hf_prune.embeddings.evaluation import (
    encode_throughput,
    read_qnli_retrieval,
    read_sts,
    retrieval_scores,
    sts_spearman,
)
from hf_prune.gradients import per_sample_loss
from hf_prune.resources import embedded_model_path, read_tsv

OUT = CACHE.parent / "results"


@dataclass
class EmbeddingBenchArguments:
    """Args:
    models: embedded models to prune.
    keeps: fractions of the layer FLOPs kept.
    mpnet_keeps: MPNet's fractions (its throughput-matched point against dense MiniLM lies far below MiniLM's).
    draws: calibration draws (sentence subsets) per cut (MPNet: mpnet_draws).
    calibration: calibration sentences per draw (MiniLM; MPNet: mpnet_calibration), 3/4 fitted by the tuning and
        1/4 held out for selection; MiniLM's cuts also try OBS reselection (``obs_reselection``).
    kd_steps: distillation steps (batch 32) per recovered variant.
    queries: retrieval queries; corpus: retrieval corpus size.
    parts: quality, throughput.
    """

    models: list[str] = field(default_factory=lambda: ["minilm", "mpnet"], metadata={"help": "Models."})
    keeps: list[float] = field(default_factory=lambda: [0.75, 0.5, 0.4, 0.25], metadata={"help": "FLOPs kept."})
    mpnet_keeps: list[float] = field(default_factory=lambda: [0.25, 0.125], metadata={"help": "MPNet's."})
    draws: int = field(default=2, metadata={"help": "Calibration draws."})
    mpnet_draws: int = field(default=1, metadata={"help": "MPNet's calibration draws."})
    calibration: int = field(default=1024, metadata={"help": "Calibration sentences (3/4 tune, 1/4 select)."})
    mpnet_calibration: int = field(default=256, metadata={"help": "MPNet's (its cuts are ~8x slower)."})
    kd_steps: int = field(default=150, metadata={"help": "Distillation steps (batch 32)."})
    queries: int = field(default=500, metadata={"help": "Retrieval queries."})
    corpus: int = field(default=1500, metadata={"help": "Retrieval corpus size."})
    parts: list[str] = field(default_factory=lambda: ["quality", "throughput"], metadata={"help": "Parts."})


def _pool() -> list[str]:
    sts = read_tsv(GLUE / "stsb" / "train.tsv")
    sst = read_tsv(GLUE / "sst2" / "train.tsv")
    text = [r[7] for r in sts] + [r[8] for r in sts] + [r[0] for r in sst[:6000]]
    random.Random(0).shuffle(text)
    return [t for t in dict.fromkeys(text) if t.strip()]


def _load(name: str) -> SentenceTransformer:
    model = SentenceTransformer(embedded_model_path(name), device="cpu")
    model.max_seq_length = 128
    return model.eval()


def _evaluate(model: Any, sts: Any, ret: Any) -> dict[str, float]:
    return {"sts_spearman": sts_spearman(model, sts), **retrieval_scores(model, ret)}


def _distil(model: Any, teacher: Any, pool: list[str], steps: int) -> float:
    """Embedding KD on ``steps`` batches of 32 pool sentences (the same ones for every variant); returns seconds."""
    import datasets

    sents = pool[-steps * 32:]
    feats = model.preprocess(sents)
    keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in feats]
    rows = datasets.Dataset.from_dict({k: [r[m.bool()].tolist() for r, m in zip(feats[k], feats["attention_mask"])]
                                       for k in keep})
    args = TrainingArguments(output_dir=str(CACHE / "embeddings" / "trainer"), max_steps=steps,
                             per_device_train_batch_size=32, learning_rate=1e-4, warmup_steps=steps // 10,
                             weight_decay=0.0, logging_steps=50, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0, data_seed=0, disable_tqdm=True)
    trainer = hp.PruningTrainer(model, args, pruning_config=hp.PruningConfig(flops_keep=1.0, progress=False),
                                distillation=hp.DistillationConfig(alpha=1.0), teacher_model=teacher,
                                train_dataset=rows, data_collator=DataCollatorWithPadding(model.tokenizer))
    start = time.perf_counter()
    trainer.train()
    model.eval()
    return time.perf_counter() - start


def _prune(variant: str, dense: Any, keep: float, calib: list[str], seed: int, obs: bool) -> Any:
    model = copy.deepcopy(dense)
    if variant == "rf":
        cfg = hp.PruningConfig(method="retraining_free", flops_keep=keep, tuning_samples=len(calib) * 3 // 4,
                               selection_samples=len(calib) // 4, obs_reselection=obs, seed=seed, progress=False)
        hp.prune(model, calib, cfg)
    else:
        batches = hp.sentence_batches(model, calib, batch_size=32)
        view = SentenceEmbedder(model)
        tp_prune(encoder(model), keep, "taylor", batches,
                 loss_fn=lambda _m, b: per_sample_loss(view, b, seed), seq_len=128)
        # which units TP kept, read back off the weights: the plan recovery and saving need
        encoder(model).prune_plan = kept_units(encoder(model), encoder(dense))
    return model


def _cell(name: str, variant: str, keep: float, draw: int, a: EmbeddingBenchArguments, dense: Any, pool: list[str],
          sts: Any, ret: Any) -> dict[str, Any]:
    n_calib = a.calibration if name == "minilm" else a.mpnet_calibration
    key = {"model": name, "variant": variant, "keep": keep, "draw": draw, "calibration": n_calib,
           "kd_steps": a.kd_steps if variant.endswith("+kd") else 0, "queries": a.queries, "corpus": a.corpus}

    def compute() -> dict[str, Any]:
        rng = random.Random(draw)
        calib = rng.sample(pool[: -a.kd_steps * 32], n_calib)  # the KD sentences are never calibration
        base = variant.removesuffix("+kd")
        start = time.perf_counter()
        saved = CACHE / "embeddings" / "models" / f"{name}-{base}-{keep}"  # the draw-0 cut, saved by its own cell
        if variant == "rf+kd" and draw == 0 and (saved / "modules.json").is_file():
            model = SentenceTransformer(str(saved), trust_remote_code=True, device="cpu")
            model.max_seq_length = dense.max_seq_length
        else:
            model = _prune(base, dense, keep, calib, seed=draw, obs=name == "minilm")
        out: dict[str, Any] = {"prune_s": time.perf_counter() - start,
                               "flops_kept": hp.count_flops(encoder(model), 128)["total"]
                               / hp.count_flops(encoder(dense), 128)["total"]}
        if variant.endswith("+kd"):
            out["kd_s"] = _distil(model, copy.deepcopy(dense), pool, a.kd_steps)
        out.update(_evaluate(model, sts, ret))
        if draw == 0 and variant == "rf":  # TP's cut is not a pruned checkpoint (TP slices the stock modules)
            hp.save_pruned(model, saved)
        return out

    return cached_cell(CACHE / "embeddings" / "cells", key, compute)


def quality(a: EmbeddingBenchArguments) -> list[dict[str, Any]]:
    pool = _pool()
    sts = read_sts(GLUE / "stsb" / "dev.tsv")
    ret = read_qnli_retrieval(GLUE / "qnli" / "dev.tsv", limit=a.queries, corpus_size=a.corpus)
    rows = []
    for name in a.models:
        dense = _load(name)
        rows.append(cached_cell(CACHE / "embeddings" / "cells", {"model": name, "variant": "dense", "queries":
                                a.queries, "corpus": a.corpus}, lambda d=dense: _evaluate(d, sts, ret)))
        keeps = a.keeps if name == "minilm" else a.mpnet_keeps
        variants = ["rf", "tp"] if name == "minilm" else ["rf"]
        for keep in keeps:
            for variant in variants:
                for draw in range(a.draws if name == "minilm" else a.mpnet_draws):
                    rows.append(_cell(name, variant, keep, draw, a, dense, pool, sts, ret))
                if name == "minilm" or keep == min(keeps):
                    rows.append(_cell(name, f"{variant}+kd", keep, 0, a, dense, pool, sts, ret))
    return rows


def throughput(a: EmbeddingBenchArguments, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sentences = read_sts(GLUE / "stsb" / "dev.tsv").first[:256]
    models = {f"{m}-dense": _load(m) for m in a.models}
    for r in (r for r in rows if r["variant"] == "rf"):
        path = CACHE / "embeddings" / "models" / f"{r['model']}-{r['variant']}-{r['keep']}"
        if path.is_dir():
            models[f"{r['model']}-{r['variant']}-{r['keep']}"] = SentenceTransformer(
                str(path), trust_remote_code=True, device="cpu").eval()
    out = []
    for bs in (1, 32, 128):
        speed = encode_throughput(models, sentences if bs > 1 else sentences[:64], bs, repeats=3)
        out += [{"model": k, "runtime": "pytorch", "batch_size": bs, "sentences_per_s": v} for k, v in speed.items()]
    sessions = {name: _onnx_session(name, model) for name, model in models.items()}
    for bs in (1, 32, 128):
        speed = _ort_throughput(sessions, models, sentences if bs > 1 else sentences[:64], bs)
        out += [{"model": k, "runtime": "onnxruntime", "batch_size": bs, "sentences_per_s": v}
                for k, v in speed.items()]
    return out


def _onnx_session(name: str, model: Any) -> Any:
    """The encoder of ``model`` exported once (checked in onnxruntime by save_onnx) and opened."""
    from hf_prune.formats.runtimes import ort_session

    assert pooling_modes(model) == ("mean",), pooling_modes(model)  # what _ort_throughput pools with
    folder = CACHE / "embeddings" / "onnx" / name
    if not (folder / "model.onnx").is_file():
        hp.save_onnx(encoder(model), None, folder, overwrite=True)
    return ort_session(folder / "model.onnx", spin=False)


def _ort_throughput(sessions: dict[str, Any], models: dict[str, Any], sentences: list[str], bs: int,
                    repeats: int = 3) -> dict[str, float]:
    """Sentences/s of each encoder in onnxruntime plus mean pooling and normalisation in numpy (the pipeline
    sentence-transformers runs after the encoder), on each model's own tokenization, models interleaved."""
    import numpy as np

    from hf_prune.formats.runtimes import ort_run

    batches = {}
    for name, model in models.items():
        feats = [model.preprocess(sentences[i : i + bs]) for i in range(0, len(sentences), bs)]
        names = {i.name for i in sessions[name].get_inputs()}
        batches[name] = [{k: v.numpy() for k, v in f.items() if k in names} for f in feats]
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(repeats + 1):
        for name, session in sessions.items():
            start = time.perf_counter()
            for b in batches[name]:
                (h,) = ort_run(session, b)  # (B, T, D)
                m = b["attention_mask"][..., None].astype(h.dtype)
                e = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
                e /= np.linalg.norm(e, axis=-1, keepdims=True)
            if rep:
                times[name].append(time.perf_counter() - start)
    return {name: len(sentences) / sorted(t)[len(t) // 2] for name, t in times.items()}


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["variant"], r.get("keep", 1.0)), []).append(r)
    out = []
    for (model, variant, keep), rs in groups.items():
        t = torch.tensor([[r["sts_spearman"], r["mrr@10"], r["recall@10"]] for r in rs])
        row = {"model": model, "variant": variant, "FLOPs kept": keep, "draws": len(rs),
               "STS-B": float(t[:, 0].mean()), "STS-B spread": float(t[:, 0].max() - t[:, 0].min()),
               "MRR@10": float(t[:, 1].mean()), "R@10": float(t[:, 2].mean())}
        out.append(row)
    return out


def main() -> None:
    (a,) = HfArgumentParser(EmbeddingBenchArguments).parse_args_into_dataclasses()
    torch.manual_seed(0)
    rows = quality(a)
    summary = _summary(rows)
    result: dict[str, Any] = {"args": dataclasses.asdict(a), "cells": rows, "summary": summary,
                              "environment": report.environment()}
    text = "# Sentence-embedding models pruned\n\n" + report.markdown_table(
        summary, formats={"STS-B": ".2f", "STS-B spread": ".2f", "MRR@10": ".2f", "R@10": ".2f"}) + "\n"
    if "throughput" in a.parts:
        speed = throughput(a, rows)
        result["throughput"] = speed
        text += ("\n## Encode throughput\n\nSentences/s encoding 256 STS-B dev sentences (64 at batch 1), every model "
                 "interleaved, median of 3; pytorch: the whole SentenceTransformer; onnxruntime: the encoder exported "
                 "by save_onnx, mean pooling and normalisation in numpy.\n\n") + report.markdown_table(
            speed, formats={"sentences_per_s": ".1f"}) + "\n"
        _plot(summary, speed)
    report.write_json(OUT / "embeddings.json", result)
    report.write_text(OUT / "embeddings.md", text)
    print(text)


def _plot(summary: list[dict[str, Any]], speed: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    at32 = {s["model"]: s["sentences_per_s"] for s in speed if s["batch_size"] == 32 and s["runtime"] == "pytorch"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, marker in (("minilm", "o"), ("mpnet", "s")):
        pts = []
        for r in summary:
            name = f"{model}-dense" if r["variant"] == "dense" else f"{model}-{r['variant']}-{r['FLOPs kept']}"
            if r["model"] == model and r["variant"] in ("dense", "rf") and name in at32:
                pts.append((at32[name], r["STS-B"], r["variant"], r["FLOPs kept"]))
        for x, y, variant, keep in pts:
            ax.scatter(x, y, marker=marker, color="black" if variant == "dense" else "tab:blue")
            ax.annotate(f"{model} {'dense' if variant == 'dense' else f'{keep:.0%}'}", (x, y), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("sentences/s at batch 32 (PyTorch, 2 CPU threads)")
    ax.set_ylabel("STS-B dev Spearman x 100")
    ax.set_title("Pruned (retraining-free) vs dense embedders")
    fig.tight_layout()
    fig.savefig(OUT / "embeddings_quality_vs_speed.png", dpi=120)


if __name__ == "__main__":
    main()

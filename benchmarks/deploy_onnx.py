"""bench_deploy's onnxruntime part: the all-MiniLM-L6-v2 sentence encoder, dense and retraining-free cuts, as ONNX.

Quality: STS-B dev Spearman of the cosine of mean-pooled embeddings (the model's own use, no fine-tuning), in
PyTorch, onnxruntime fp32 and onnxruntime int8. Speed: batch 1 and batch 32 at 128 tokens in PyTorch eager and in
onnxruntime (all graph optimisations; fp32 and int8; idle threads do not spin, so sessions alive side by side do
not steal each other's cores), one runtime at a time with its models interleaved run by run, median; each cut's
speedup is over the dense model *in the same runtime*, and its share of the FLOPs ideal.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers as T
from common import CACHE, TASKS
from scipy.stats import spearmanr

import hf_prune as hp
from hf_prune.formats import save_onnx
from hf_prune.formats.runtimes import ort_run, ort_session
from hf_prune.resources import embedded_model_path

CUTS = CACHE / "deploy" / "minilm"


def load() -> tuple[torch.nn.Module, Any]:
    path = embedded_model_path()
    return T.AutoModel.from_pretrained(path).eval(), T.AutoTokenizer.from_pretrained(path)


def cut(dense: torch.nn.Module, tok: Any, budget: float, samples: int) -> torch.nn.Module:
    """Retraining-free at ``budget`` from unlabelled STS-B training sentences (cached checkpoint)."""
    folder = CUTS / f"rf-{budget:g}-{samples}"
    if (folder / "config.json").exists():
        return hp.load_pruned(folder, T.AutoModel).eval()
    texts = [a for a, _ in TASKS["stsb"].read("train")[0]][:samples]
    calib = [dict(tok(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
             for i in range(0, len(texts), 32)]
    cfg = hp.PruningConfig(method="retraining_free", flops_keep=budget, tuning_samples=samples // 2,
                           selection_samples=samples // 2, progress=False)
    model, _ = hp.prune(copy.deepcopy(dense), calib, cfg)
    model.save_pretrained(folder)
    return model.eval()


def _pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / m.sum(1)


def stsb_spearman(run: Any, tok: Any) -> float:
    """Spearman (x100) of cosine(mean-pooled embeddings) against STS-B dev scores; ``run(inputs) -> hidden``."""
    pairs, scores = TASKS["stsb"].read("dev")
    sims = []
    for i in range(0, len(pairs), 64):
        chunk = pairs[i:i + 64]
        emb = []
        for side in (0, 1):
            x = dict(tok([p[side] for p in chunk], padding=True, truncation=True, max_length=128,
                         return_tensors="pt"))
            emb.append(_pool(run(x), x["attention_mask"].numpy()))
        a, b = emb
        sims.extend((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
    return 100 * float(spearmanr(sims, scores).statistic)


def _torch_runner(model: torch.nn.Module):
    def run(x):
        with torch.no_grad():
            return model(**x).last_hidden_state.numpy()
    return run


def _ort_runner(session: Any):
    return lambda x: ort_run(session, x)[0]


def measure(budgets: list[float], samples: int, repeats: int, threads: int, out_dir: Path) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    dense, tok = load()
    models = {"dense": dense, **{f"rf {b:.0%}": cut(dense, tok, b, samples) for b in budgets}}
    runners: dict[tuple[str, str], Any] = {}
    rows = []
    dense_flops = hp.count_flops(dense, 128)["total"]
    for name, model in models.items():
        folder = save_onnx(model, tok, out_dir / name.replace(" ", "_").replace("%", ""), quantize="int8",
                           overwrite=True)
        runners[(name, "torch")] = _torch_runner(model)
        runners[(name, "ort")] = _ort_runner(ort_session(folder / "model.onnx", threads=threads, spin=False))
        runners[(name, "ort_int8")] = _ort_runner(ort_session(folder / "model_int8.onnx", threads=threads, spin=False))
        row = {"model": name, "flops_kept": hp.count_flops(model, 128)["total"] / dense_flops,
               "heads": [len(h) for h in hp.PrunePlan.of(model).heads],
               "onnx_mb": (folder / "model.onnx").stat().st_size / 2**20,
               "int8_mb": (folder / "model_int8.onnx").stat().st_size / 2**20}
        for runtime in ("torch", "ort", "ort_int8"):
            row[f"stsb_{runtime}"] = stsb_spearman(runners[(name, runtime)], tok)
        print(f"  {name:<8} FLOPs {row['flops_kept']:.1%}  STS-B torch {row['stsb_torch']:.2f} / ort "
              f"{row['stsb_ort']:.2f} / int8 {row['stsb_ort_int8']:.2f}", flush=True)
        rows.append(row)
    g = torch.Generator().manual_seed(0)
    inputs = {bs: {"input_ids": torch.randint(1000, 20000, (bs, 128), generator=g),
                   "attention_mask": torch.ones(bs, 128, dtype=torch.long),
                   "token_type_ids": torch.zeros(bs, 128, dtype=torch.long)} for bs in (1, 32)}
    times: dict[tuple, list[float]] = {}
    # one runtime at a time, its models interleaved: runtimes' idle threads (ORT's spin) never steal each other's cores
    for runtime in ("torch", "ort", "ort_int8"):
        for bs, x in inputs.items():
            for r in range(repeats + 1):  # round 0 warms up
                for name in models:
                    start = time.perf_counter()
                    runners[(name, runtime)](x)
                    if r:
                        times.setdefault((name, runtime, bs), []).append(time.perf_counter() - start)
    for row in rows:
        for runtime in ("torch", "ort", "ort_int8"):
            for bs in inputs:
                ms = 1000 * statistics.median(times[(row["model"], runtime, bs)])
                base = 1000 * statistics.median(times[("dense", runtime, bs)])
                row[f"{runtime}_b{bs}_ms"] = ms
                row[f"{runtime}_b{bs}_speedup"] = base / ms
                row[f"{runtime}_b{bs}_of_ideal"] = base / ms * row["flops_kept"]
    return rows

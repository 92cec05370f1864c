"""Pieces the benchmarks share: the GLUE task table, dense fine-tuning (cached), dev evaluation, calibration data,
timing helpers. Imported by ``bench_retraining_free.py`` and ``bench_compare.py`` (run from the repo root as
``.venv/bin/python benchmarks/<script>.py``: Python puts ``benchmarks/`` on the path).

Data: the original GLUE TSVs under ``<repo>/../shared/data/glue/<task>/{train,dev}.tsv``, read with
:func:`hf_prune.recipes.tasks.load_task_data` (which knows every task's columns and label names). Metrics:
:func:`hf_prune.recipes.metrics.compute_glue_metrics`, in percent, with the GLUE keys (``accuracy``, ``f1``,
``spearmanr``, ``pearson``, ``matthews_correlation``).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import gc
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch
from transformers import AutoModelForSequenceClassification

from hf_prune.recipes.metrics import compute_glue_metrics
from hf_prune.recipes.tasks import TaskSpec, get_task, load_task_data
from hf_prune.resources import embedded_model_path, text_batches

HERE = Path(__file__).resolve().parent
GLUE = HERE.parents[1] / "shared" / "data" / "glue"  # /work/shared/data/glue next to the checkout
CACHE = HERE / "cache"  # gitignored


@dataclass(frozen=True)
class Task:
    """One GLUE task as the benchmarks use it: its registry entry and the tokens per (pair of) sentence(s).

    Args:
        name: ``hf_prune.recipes.tasks`` registry name, also the folder under ``GLUE``.
        max_len: tokens per example for fine-tuning, calibration, recovery and evaluation.
    """

    name: str
    max_len: int

    @property
    def spec(self) -> TaskSpec:
        return get_task(self.name)

    @property
    def num_labels(self) -> int:
        return self.spec.num_labels

    @property
    def metrics(self) -> tuple[str, ...]:
        """Reported metrics, the main one first."""
        main = MAIN_METRIC[self.name]
        return (main, *(m for m in self.spec.metric_names if m != main))

    def read(self, split: str) -> tuple[list[Any], list[float] | list[int]]:
        """``split`` is ``train`` or ``dev``: texts (strings, or pairs as tuples) and labels, in file order."""
        return _read(self.name, split)


@functools.cache
def _read(name: str, split: str) -> tuple[list[Any], list[float] | list[int]]:
    spec = get_task(name)
    hf_split = "train" if split == "train" else spec.eval_splits[0]
    ds = load_task_data(spec, GLUE, splits=[hf_split], seed=None)[hf_split]
    cols = [ds[c] for c in spec.text_fields]
    texts = cols[0] if len(cols) == 1 else list(zip(cols[0], cols[1]))
    labels = [float(v) for v in ds["label"]] if spec.is_regression else [int(v) for v in ds["label"]]
    return list(texts), labels


TASKS = {
    "sst2": Task("sst2", 64),
    "mrpc": Task("mrpc", 128),
    "stsb": Task("stsb", 128),
    "rte": Task("rte", 128),
    "cola": Task("cola", 64),
}

#: Epochs of the robustness protocol's dense fine-tunes (a ``--dense`` factor multiplies them): SST-2 one epoch of
#: 67k sentences, the small tasks three.
PROTOCOL_EPOCHS = {"sst2": 1.0, "mrpc": 3.0, "stsb": 3.0, "cola": 3.0, "rte": 3.0}

#: The metric each task is judged by (first column of its tables).
MAIN_METRIC = {"sst2": "accuracy", "mrpc": "f1", "stsb": "spearmanr", "rte": "accuracy",
               "cola": "matthews_correlation"}


# ----------------------------------------------------------------------------------------------- fine-tuning


def finetune_dir(task: Task, steps: int, batch_size: int, lr: float, seed: int) -> Path:
    return CACHE / f"minilm-{task.name}-s{steps}-b{batch_size}-len{task.max_len}-lr{lr:g}-seed{seed}"


#: flags a dense spec may end with: fine-tuned the way users do (``trainer``: a stock ``transformers.Trainer``,
#: linear decay after 6% warmup, weight decay 0.01, dynamic padding, sentences truncated only at the model's limit)
#: and its checkpoint saved in float16, then reloaded in float32 (``fp16``; the weights rounded as a shared fp16
#: checkpoint rounds them)
DENSE_FLAGS = ("trainer", "fp16")


def parse_dense(spec: str) -> tuple[int, float, float, int]:
    """A dense model ``seed:lr:epochs_factor[:batch][:trainer][:fp16]`` (``--dense`` of the robustness,
    side-by-side and dense benchmarks): seed, learning rate, the task's usual epochs times ``epochs_factor``, batch
    size (default 32). The flags (:data:`DENSE_FLAGS`) are read by :func:`dense_flags`."""
    try:
        seed, lr, factor, *rest = spec.split(":")
        rest = [r for r in rest if r not in DENSE_FLAGS]
        if len(rest) > 1:
            raise ValueError
        batch = int(rest[0]) if rest else 32
        if batch < 1 or float(factor) <= 0:
            raise ValueError
        return int(seed), float(lr), float(factor), batch
    except ValueError:
        raise SystemExit(f"--dense {spec!r}: write seed:lr:epochs_factor[:batch][:trainer][:fp16], e.g. 0:5e-5:1, "
                         "0:2e-5:1.667:16 or 3:2e-5:2:trainer:fp16") from None


def dense_flags(spec: str) -> set[str]:
    """The :data:`DENSE_FLAGS` a dense spec ends with."""
    return set(spec.split(":")[3:]) & set(DENSE_FLAGS)


def dense_model(task: "Task", tok: Any, spec: str, protocol_epochs: float) -> Path:
    """The fine-tuned folder of a dense spec (fine-tuned once, then cached); ``protocol_epochs`` is what an epochs
    factor of 1 means for ``task``."""
    seed, lr, factor, batch = parse_dense(spec)
    flags = dense_flags(spec)
    if "trainer" in flags:
        return finetune_trainer(task, tok, protocol_epochs * factor, batch, lr, seed, fp16="fp16" in flags)
    steps = epochs_to_steps(task, protocol_epochs * factor, batch)
    if "fp16" in flags:
        raise SystemExit(f"--dense {spec!r}: fp16 goes with trainer (the user-style fine-tune)")
    return finetune(task, tok, steps, batch, lr, seed)


def epochs_to_steps(task: Task, epochs: float, batch_size: int) -> int:
    """Optimizer steps of ``epochs`` passes over the task's training set."""
    n = len(task.read("train")[0])
    return max(1, round(epochs * n / batch_size))


def finetune(task: Task, tok: Any, steps: int, batch_size: int, lr: float, seed: int) -> Path:
    """Fine-tune MiniLM on ``task`` once; later calls load the cached folder."""
    out = finetune_dir(task, steps, batch_size, lr, seed)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(embedded_model_path(), num_labels=task.num_labels)
    texts, labels = task.read("train")
    order = list(range(len(texts)))
    rng = random.Random(seed)
    idx: list[int] = []
    while len(idx) < steps * batch_size:  # epochs of fresh shuffles until the step budget is covered
        rng.shuffle(order)
        idx += order
    idx = idx[: steps * batch_size]
    batches = text_batches(
        tok, [texts[i] for i in idx], [labels[i] for i in idx], batch_size=batch_size, max_length=task.max_len
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    model.train()
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"[{task.name}] fine-tune step {step}/{steps} loss {loss.item():.4f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    return _save_finetuned(model, tok, out, {"seconds": time.perf_counter() - start, "last_loss": loss.item(),
                                             "steps": steps, "batch": batch_size, "lr": lr, "seed": seed})


def _save_finetuned(model: torch.nn.Module, tok: Any, out: Path, info: dict[str, Any]) -> Path:
    """Save a fine-tuned model with its tokenizer and ``finetune.json`` (what the fine-tune cost, for the dense
    sweep's table; folders cached before this file existed lack it) through a temporary folder, so an interrupted
    save never looks cached."""
    tmp = out.with_name(out.name + ".tmp")
    model.eval().save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "finetune.json").write_text(json.dumps(info))
    tmp.rename(out)
    return out


def finetune_trainer(task: "Task", tok: Any, epochs: float, batch_size: int, lr: float, seed: int,
                     fp16: bool = False) -> Path:
    """Fine-tune MiniLM on ``task`` as a user would with a stock ``Trainer`` (see :data:`DENSE_FLAGS`); cached."""
    import datasets
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    out = CACHE / (f"minilm-{task.name}-trainer-e{epochs:g}-b{batch_size}-lr{lr:g}-seed{seed}"
                   + ("-fp16" if fp16 else ""))
    if (out / "config.json").exists():
        return out
    texts, labels = task.read("train")
    pair = isinstance(texts[0], tuple)
    cols = {"a": [t[0] for t in texts], "b": [t[1] for t in texts]} if pair else {"a": list(texts)}
    ds = datasets.Dataset.from_dict({**cols, "label": labels}).map(
        lambda ex: tok(ex["a"], ex["b"] if pair else None, truncation=True), batched=True, remove_columns=list(cols))
    model = AutoModelForSequenceClassification.from_pretrained(embedded_model_path(), num_labels=task.num_labels)
    args = TrainingArguments(str(out.with_name(out.name + ".tmp") / "run"), num_train_epochs=epochs, learning_rate=lr, seed=seed,
                             per_device_train_batch_size=batch_size, warmup_steps=0.06, weight_decay=0.01,
                             save_strategy="no", report_to=[], logging_steps=200, use_cpu=True,
                             dataloader_num_workers=0)
    start = time.perf_counter()
    result = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                     data_collator=DataCollatorWithPadding(tok)).train()
    if fp16:  # shared as float16, loaded back in float32 by whoever prunes it
        model.to(torch.float16)
    return _save_finetuned(model, tok, out, {"seconds": time.perf_counter() - start, "train_loss": result.training_loss,
                                             "epochs": epochs, "batch": batch_size, "lr": lr, "seed": seed,
                                             "fp16": fp16, "trainer": True})


# ----------------------------------------------------------------------------------------------- evaluation


def dev_batches(task: Task, tok: Any, batch_size: int = 64) -> tuple[list[dict], list[float] | list[int]]:
    """Dev batches sorted by length (less padding, same predictions), and the labels in that order."""
    texts, labels = task.read("dev")
    order = sorted(range(len(texts)), key=lambda i: len(str(texts[i])))
    texts, labels = [texts[i] for i in order], [labels[i] for i in order]
    return text_batches(tok, texts, None, batch_size=batch_size, max_length=task.max_len), labels


@torch.inference_mode()
def dev_logits(model: torch.nn.Module, batches: list[dict]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**b).logits.float() for b in batches])  # (N, C)


def metrics_of(task: Task, logits: torch.Tensor, labels: list) -> dict[str, float]:
    """The task's GLUE metrics, in percent (``hf_prune.recipes.metrics.compute_glue_metrics``), from dev logits."""
    preds = logits.squeeze(-1).numpy() if task.num_labels == 1 else logits.argmax(-1).numpy()
    return {k: 100 * v for k, v in compute_glue_metrics(task.name, preds, labels).items()}


def evaluate(model: torch.nn.Module, task: Task, batches: list[dict], labels: list) -> dict[str, float]:
    """The task's GLUE metrics on the dev set, in percent."""
    return metrics_of(task, dev_logits(model, batches), labels)


def calibration(task: Task, tok: Any, samples: int, seed: int, batch_size: int = 32) -> list[dict]:
    """``samples`` labelled training examples (a fixed random subset), batches of ``batch_size``."""
    texts, labels = task.read("train")
    idx = random.Random(seed + 1).sample(range(len(texts)), min(samples, len(texts)))
    return text_batches(tok, [texts[i] for i in idx], [labels[i] for i in idx], batch_size=batch_size,
                        max_length=task.max_len)


def forward_backward_s(model: torch.nn.Module, batches: list[dict]) -> float:
    """Wall time of one forward+backward pass (parameter gradients) over ``batches``."""
    m = copy.deepcopy(model).eval()
    start = time.perf_counter()
    for b in batches:
        m(**b).loss.backward()
    return time.perf_counter() - start


def omp_env() -> dict[str, str | None]:
    """The OpenMP variables that change CPU latency (``OMP_WAIT_POLICY=PASSIVE`` adds a thread wake-up per op)."""
    return {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- peak memory


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every ``interval`` s from ``/proc/self/statm``.

    Before the baseline is read, garbage is collected and glibc returns freed heap to the OS (``malloc_trim``),
    so memory freed by earlier cells does not hide new allocations. Linux only (elsewhere: None).
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_mb: float | None = None
        self.parts: dict[str, float] = {}  # :meth:`part`: name -> peak above entry while it ran (MB)
        self._stop = threading.Event()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Also record the peak above entry while this context runs, as ``parts[name]`` (the largest over repeated
        entries): which step of a call holds the memory. Nested parts are not supported."""
        if self._thread is None:
            yield
            return
        self._part_peak = self._rss()
        try:
            yield
        finally:
            peak = max(self._part_peak, self._rss())
            self._part_peak = None
            self.parts[name] = max(self.parts.get(name, 0.0), (peak - self._base) / 2**20)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> Self:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            self._base = self._peak = self._rss()
            self.base_mb = self._base / 2**20  # the level at entry, after the collection
        except (OSError, ValueError):
            self._thread = None
            return self
        self._part_peak: int | None = None
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            rss = self._rss()
            self._peak = max(self._peak, rss)
            if self._part_peak is not None:
                self._part_peak = max(self._part_peak, rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss())
        self.peak_mb = (self._peak - self._base) / 2**20
        self.total_mb = self._peak / 2**20  # the peak itself, not above entry


# ----------------------------------------------------------------------------------------------- cached cells


def cached_cell(folder: Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The cached result of one benchmark cell (keyed by everything that changes it), computed once."""
    import json

    name = "-".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(key.items()))
    path = folder / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    out = {**key, **compute()}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # a run stopped while writing leaves no half cell that looks cached
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    return out


# ----------------------------------------------------------------------------------------------- causal LMs


def qnli_text(split: str = "dev") -> list[str]:
    """QNLI's Wikipedia sentences (column 2), in file order: calibration text first, held-out text after."""
    from hf_prune.resources import read_tsv

    return [r[2] for r in read_tsv(GLUE / "qnli" / f"{split}.tsv")]


def lm_measure(dense: torch.nn.Module, model: torch.nn.Module, held_out: list[dict], repeats: int) -> dict[str, Any]:
    """A pruned causal LM against its dense model: layers, FLOPs and params kept, held-out perplexity, decode
    ms/token at batch 1 with the KV cache and prefill of 128 tokens (dense and pruned interleaved)."""
    import hf_prune as hp
    from hf_prune.lm import perplexity

    dec = hp.compare_decode({"dense": dense, "pruned": model}, prompt_len=128, new_tokens=32, repeats=repeats)
    return {
        "layers_kept": len(hp.PrunePlan.of(model).kept_layers),
        "flops_kept": hp.count_flops(model, 128)["total"] / hp.count_flops(dense, 128)["total"],
        "params_m": hp.count_params(model) / 1e6, "ppl": perplexity(model, held_out),
        "decode_ms": dec["pruned"].decode_ms_per_token, "dense_decode_ms": dec["dense"].decode_ms_per_token,
        "decode_speedup": dec["dense"].decode_ms_per_token / dec["pruned"].decode_ms_per_token,
        "prefill_ms": dec["pruned"].prefill_ms, "dense_prefill_ms": dec["dense"].prefill_ms,
        "prefill_speedup": dec["dense"].prefill_ms / dec["pruned"].prefill_ms,
    }

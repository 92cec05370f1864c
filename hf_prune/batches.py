"""Calibration batches: device moves, sizes, collecting and limiting samples, length bucketing, splits.

A leaf module: every pass over calibration data (importance scores, the retraining-free stages, recipes) uses
these, so the data never makes round trips between the modules that consume it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

Batch = dict[str, Any]


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with every tensor on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_size(batch: Mapping[str, Any]) -> int:
    """Samples in ``batch``: the leading size of its first tensor."""
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("calibration batch holds no tensors")


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes, so where calibration batches and masks go: the execution device of an accelerate
    hook (``cpu_offload``, ``disk_offload``, a ``device_map`` with offloaded modules, whose parameters wait on the
    meta device), else where its first parameter that is not on the meta device lives."""
    execution = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
    if execution is not None:
        return torch.device("cuda", execution) if isinstance(execution, int) else torch.device(execution)
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


class CalibrationPass:
    """One pass over calibration batches, up to ``max_samples`` samples (whole batches), with a progress bar.

    Iterating gives ``(step, batch on device, batch size)``; afterwards ``seen`` is the number of samples gone
    through and ``total`` the number of batches (None when the dataloader has no length).

    Args:
        dataloader: the calibration batches.
        device: where each batch is moved.
        max_samples: stop after this many samples (None: all).
        desc: the progress bar's label.
        progress: show the bar.
    """

    def __init__(self, dataloader: Iterable[Mapping[str, Any]], device: torch.device, max_samples: int | None,
                 desc: str, progress: bool) -> None:
        self.dataloader, self.device, self.max_samples = dataloader, device, max_samples
        self.desc, self.progress = desc, progress
        self.seen = 0
        try:
            self.total: int | None = len(dataloader)  # type: ignore[arg-type]
        except TypeError:
            self.total = None

    def __iter__(self) -> Iterator[tuple[int, Batch, int]]:
        bar = tqdm(total=self.max_samples, desc=self.desc, unit="sample", disable=not self.progress)
        try:
            for step, raw in enumerate(self.dataloader):
                batch = to_device(raw, self.device)
                bsz = batch_size(batch)
                if step == 0 and self.total is not None:  # batches x first batch size: the bar's best guess
                    bar.total = min(self.max_samples or self.total * bsz, self.total * bsz)
                yield step, batch, bsz
                self.seen += bsz
                bar.update(bsz)
                if self.max_samples is not None and self.seen >= self.max_samples:
                    break
        finally:
            bar.close()


def collect_batches(dataloader: Iterable[Mapping[str, Any]], max_samples: int | None) -> list[Batch]:
    """The calibration batches, up to ``max_samples`` samples (whole batches), held so that every stage
    sees the same samples (a dataloader may reshuffle or be a one-shot iterator)."""
    batches: list[Batch] = []
    seen = 0
    for raw in dataloader:
        batches.append(dict(raw))
        seen += batch_size(raw)
        if max_samples is not None and seen >= max_samples:
            break
    if not batches:
        raise ValueError("the calibration dataloader yielded no batches: retraining-free pruning needs data")
    return batches


def by_length(batches: Sequence[Batch]) -> list[Batch]:
    """The same samples re-batched shortest first, each batch trimmed to its longest sample.

    Random batches of sentences are padded to their longest one (SST-2 phrases: about half the tokens are
    padding); sorted, the padding nearly vanishes and so does its compute. Per-sample quantities (the Fisher
    sums of ``g g^T``, reconstruction errors over real tokens, per-sample divergences) do not depend on the
    batching. Applies only when that is safe: every batch a dict of tensors with the same keys, an
    ``attention_mask`` padded on the right, and every other tensor either per token ``(B, T, ...)`` or per
    sample ``(B, ...)``; otherwise (images, left padding) the batches are returned as they are.
    """
    batches = list(batches)
    if not batches or not all(_right_padded(b) and b.keys() == batches[0].keys() for b in batches):
        return batches
    rows = []  # (length, batch, row)
    for b in batches:
        for r, n in enumerate(b["attention_mask"].sum(1).tolist()):
            rows.append((int(n), b, r))
    rows.sort(key=lambda x: x[0])  # stable: equal lengths keep their order
    size = max(batch_size(b) for b in batches)
    pads = {key: _pad_value(batches, key) for key in batches[0]}
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        width = max(1, chunk[-1][0])
        new = {}
        for key in batches[0]:
            # per token: (B, T, ...) like the mask, trimmed (or padded) to ``width``; else per sample (B, ...)
            try:
                picked = [_fit(b[key][r], width, pads[key]) if _per_token(b, key) else b[key][r] for _, b, r in chunk]
                new[key] = torch.stack(picked)
            except RuntimeError:  # per-sample shapes differ between batches, or a pad value is unknown
                return batches
        out.append(new)
    return out


def _per_token(batch: Mapping[str, Any], key: str) -> bool:
    value, mask = batch[key], batch["attention_mask"]
    return value.dim() >= 2 and tuple(value.shape[:2]) == tuple(mask.shape)


def _pad_value(batches: Sequence[Batch], key: str) -> torch.Tensor | None:
    """What ``key`` holds at padded positions (the tokenizer's pad id for ``input_ids``); None if never padded
    (then it is unknown: decoder classifiers find the last token by the pad id, so guessing one is unsafe)."""
    for b in batches:
        if _per_token(b, key):
            pad = b["attention_mask"] == 0  # (B, T)
            if pad.any():
                return b[key][pad][0]
    return None


def _fit(row: torch.Tensor, width: int, pad: torch.Tensor | None) -> torch.Tensor:
    """One sample's ``(T, ...)`` per-token row cut or right-padded with ``pad`` to ``width``."""
    if row.shape[0] >= width:
        return row[:width]
    if pad is None:
        raise RuntimeError("no pad value seen for this key")
    filler = torch.as_tensor(pad, dtype=row.dtype, device=row.device).expand(width - row.shape[0], *row.shape[1:])
    return torch.cat([row, filler])


def _right_padded(batch: Mapping[str, Any]) -> bool:
    """A dict of tensors with a leading batch axis and a ``(B, T)`` attention mask padded on the right."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return False
    if not all(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == mask.shape[0] for v in batch.values()):
        return False
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def split_batches(
    batches: Sequence[Batch], tuning_samples: int | None, held_out_samples: int
) -> tuple[list[Batch], list[Batch]]:
    """The first whole batches up to ``tuning_samples`` samples (all if None) for mask tuning, and up to
    ``held_out_samples`` samples of the batches after them for stage selection (empty if none are left)."""
    tune: list[Batch] = []
    seen = 0
    for b in batches:
        if tuning_samples is not None and seen >= tuning_samples:
            break
        tune.append(b)
        seen += batch_size(b)
    held: list[Batch] = []
    seen = 0
    for b in batches[len(tune):]:
        if seen >= held_out_samples:
            break
        held.append(b)
        seen += batch_size(b)
    return tune, held

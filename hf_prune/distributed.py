"""The one place that asks about ``torch.distributed``: under DDP every rank must build the same plan."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is running (``accelerate launch``, ``torchrun``)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main() -> bool:
    """Rank 0, or the only process."""
    return not is_distributed() or torch.distributed.get_rank() == 0


def all_reduce_sum_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor over processes, in place (no-op in a single process)."""
    if is_distributed():
        for t in tensors:
            torch.distributed.all_reduce(t)


@torch.no_grad()
def broadcast_parameters_(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank, in place (no-op in a single process): for weights
    that were changed from per-rank data after DDP made them equal."""
    if is_distributed():
        for t in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(t.data, src=0)


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        torch.distributed.barrier()


def shutdown() -> None:
    """Wait for every process, then destroy the process group, if one runs: the last call of a script launched with
    ``accelerate launch`` or ``torchrun``. A gloo group left to interpreter shutdown, or torn down by one rank while
    another still talks to it, can abort the process (SIGABRT, "terminate called without an active exception")
    after all the work succeeded."""
    if is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

"""The one place that asks about ``torch.distributed``: under DDP every rank must build the same plan."""

from __future__ import annotations

import atexit
import os
import sys
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
    """Wait for every process, then destroy the process group, if one runs (no-op in a single process): for a
    program that goes on without the group. A script that ends here should call :func:`exit_launched` instead."""
    if is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_launched(code: int = 0) -> None:
    """The last call of a script launched with ``accelerate launch`` or ``torchrun``: when a process group runs,
    :func:`shutdown`, run the ``atexit`` handlers, flush, and end the process with ``code`` without finalizing the
    interpreter. Returns at once in a single process.

    Why not a plain exit: gloo's worker threads drop their last reference to a finished collective after the caller
    has moved on, and when the collective's tensors were made in Python (``all_gather`` outputs), that drop takes the
    GIL. A thread taking the GIL while the interpreter finalizes is ended by ``pthread_exit`` inside a ``noexcept``
    destructor, so the process aborts (SIGABRT, "terminate called without an active exception") after its work
    succeeded: in a core dump, ``AsyncAllgatherWork::~AsyncAllgatherWork`` -> ``decref_pyobject`` -> ``take_gil``
    -> ``PyThread_exit_thread``, with the main thread in ``Py_FinalizeEx``. ``destroy_process_group`` does not stop
    those threads: after DDP wrapped a model they outlive it (the reducer keeps the group), so only not finalizing
    closes the window."""
    if not is_distributed():
        return
    shutdown()
    atexit._run_exitfuncs()  # what a normal exit would run (logging, trackers), while the interpreter is whole
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

"""Run under `torchrun --nproc_per_node 2`: collectives with tensors made in Python, then `exit_launched(code)`.
Each rank records what ran at exit: the atexit handlers must (a tracker's flush), the interpreter's finalization
must not (the window in which gloo's threads abort the process)."""

import atexit
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hf_prune.distributed import exit_launched

out, code = Path(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
for _ in range(20):  # all_gather outputs made in Python: what gloo's threads drop last
    outputs = [torch.empty(4) for _ in range(2)]
    dist.all_gather(outputs, torch.full((4,), float(rank)))
assert [float(t[0]) for t in outputs] == [0.0, 1.0]
atexit.register(lambda: (out / f"atexit{rank}").write_text("ran"))


class Finalized:
    def __del__(self):  # module globals are cleared when the interpreter finalizes
        (out / f"finalized{rank}").write_text("ran")


marker = Finalized()
print(f"rank {rank} before exit", flush=True)
exit_launched(code)
print(f"rank {rank} after exit", flush=True)  # only in a single process

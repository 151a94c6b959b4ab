"""``ddrl train`` with one rank SIGKILLed at a chosen point (tests/test_distributed.py).

Usage (under torchrun): kill_harness.py WHERE N RANK -- <ddrl train arguments>
  WHERE=iteration: rank RANK kills itself at the N-th optimizer step, after its rollout;
  WHERE=checkpoint: rank RANK kills itself in the N-th checkpoint write, after its DCP shard
  is on disk and before rank 0 has renamed the folder into place.
SIGKILL cannot be caught: nothing of ddrl's own shutdown runs, as on a preempted node.
"""

import os
import signal
import sys

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import ddrl.dist.checkpoint
import ddrl.training.step
from ddrl.cli import main


def _kill_in(fn, n: int, rank: int, before: bool):
    """``fn`` that SIGKILLs this process in its n-th call on ``rank`` (before or after it runs)."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        now = calls[0] == n and dist.get_rank() == rank
        if now and before:
            os.kill(os.getpid(), signal.SIGKILL)
        out = fn(*args, **kwargs)
        if now:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    return wrapped


if __name__ == "__main__":
    where, n, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    assert sys.argv[4] == "--"
    if where == "iteration":
        ddrl.training.step.optimizer_step = _kill_in(
            ddrl.training.step.optimizer_step, n, rank, before=True
        )
    elif where == "checkpoint":
        ddrl.dist.checkpoint.dcp.save = _kill_in(dcp.save, n, rank, before=False)
    else:
        raise SystemExit(f"unknown kill point {where!r}")
    sys.exit(main(["train", *sys.argv[5:]]))

"""Where an iteration's time goes: named phases timed by the loop and the losses.

The loop opens a ``PhaseTimer`` per iteration and marks its phases (rollout, decode, reward,
advantage, backward, optimizer, log, eval, checkpoint); the losses mark the forwards of their
own terms (policy, data, reference) with ``phase(name)``, which is a no-op when no timer is
active. Each reading closes with a device synchronisation when ``sync`` is on (``ddrl bench``),
so GPU work is charged to the phase that queued it; training runs leave it off, because a sync
per phase would itself cost time. The backward of all terms is one call, so it is one phase.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

PHASES = (
    "rollout",  # sampling the trajectories (no gradient), prompt encoding included
    "decode",  # codec: model space → images
    "reward",  # reward models on the decoded images
    "advantage",  # gather, group advantages, data pairing, trained-step selection
    "policy",  # forward of the policy term (log-prob recomputation with gradient)
    "data",  # forward of the DDRL / SFT data term
    "reference",  # forward of the Flow-GRPO reference (no gradient)
    "backward",  # one backward over every term of a micro-batch
    "optimizer",  # gradient sync, clipping, optimizer step, EMA
    "log",  # metrics reduction, the one host sync, log rows
    "eval",  # periodic evaluation
    "checkpoint",  # checkpoint writes
)

_active: list[PhaseTimer] = []  # the timer of the iteration in progress (none outside)


class PhaseTimer:
    """Seconds per phase, accumulated until ``reset``; ``sync``: synchronise ``device`` at
    both ends of every phase (exact GPU attribution, at the cost of the syncs)."""

    def __init__(self, device: str | torch.device = "cpu", sync: bool = False):
        self.device = torch.device(device)
        self.sync = sync and self.device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self._open: str | None = None

    def _wait(self) -> None:
        if self.sync:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self._open is not None:  # nested (a reference forward inside a term): the outer
            yield  # phase keeps the time, so phases never double count
            return
        self._wait()
        self._open, t0 = name, time.perf_counter()
        try:
            yield
        finally:
            self._wait()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self._open = None

    def reset(self) -> dict[str, float]:
        """The seconds so far (phase → s), and start again from zero."""
        out, self.seconds = self.seconds, {}
        return out

    @contextlib.contextmanager
    def active(self) -> Iterator[PhaseTimer]:
        """Make this the timer ``phase()`` reports to for the block."""
        _active.append(self)
        try:
            yield self
        finally:
            _active.remove(self)


def phase(name: str) -> contextlib.AbstractContextManager:
    """Time the block as ``name`` on the active timer; nothing when none is active."""
    return _active[-1](name) if _active else contextlib.nullcontext()

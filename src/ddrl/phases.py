"""Where an iteration's time goes: named phases timed by the loop and the losses.

The loop opens a ``PhaseTimer`` per iteration and marks its phases (rollout, decode, reward,
advantage, backward, optimizer, log, eval, checkpoint); the losses mark the forwards of their
own terms (policy, data, reference) with ``phase(name)``, which is a no-op when no timer is
active. Each reading closes with a device synchronisation when ``sync`` is on (``ddrl bench``),
so GPU work is charged to the phase that queued it; training runs leave it off, because a sync
per phase would itself cost time. The backward of all terms is one call, so it is one phase.

``track_memory(device)`` (``ddrl bench``) also records each phase's peak memory (``PhaseMemory``):
on CUDA the allocator's peak (``reset_peak_memory_stats`` / ``max_memory_allocated``), on a CPU
the process's peak resident set, exact on Linux by resetting its high-water mark
(``/proc/self/clear_refs`` ← "5", then ``VmHWM`` of ``/proc/self/status``), else
``getrusage``'s lifetime maximum (a phase then shows only growth beyond every earlier peak).
"""

from __future__ import annotations

import contextlib
import resource
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
_memory: list[PhaseMemory] = []  # the memory recorder of ``track_memory`` (none outside)


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
        mem = _memory[-1] if _memory else None
        start = mem.begin() if mem else 0
        self._open, t0 = name, time.perf_counter()
        try:
            yield
        finally:
            self._wait()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            if mem:
                mem.end(name, start)
            self._open = None

    def reset(self) -> dict[str, float]:
        """The seconds so far (phase → s), and start again from zero (the memory recorder, if
        any, starts its next row too)."""
        out, self.seconds = self.seconds, {}
        if _memory:
            _memory[-1].next_row()
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


def _proc_status(key: str) -> int:
    """A ``/proc/self/status`` size line (kB) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def _hwm_resettable() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status("VmHWM")
        return True
    except OSError:
        return False


class PhaseMemory:
    """Peak memory per phase, in bytes: ``rows`` holds one dict per iteration (``next_row``,
    called by the timer's ``reset``), phase → {"peak": the phase's peak, "increase": that peak
    minus the memory held when the phase began (its own working set)}; a phase met twice in a
    row keeps the larger of each. ``peak``: the largest over the whole recording. ``method``:
    "cuda" (allocated tensors), "vmhwm" (resident set, high-water mark reset per phase) or
    "ru_maxrss" (resident set, lifetime maximum: no reset possible)."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.method = "cuda"
        else:
            self.method = "vmhwm" if _hwm_resettable() else "ru_maxrss"
        self.rows: list[dict[str, dict[str, int]]] = []
        self._row: dict[str, dict[str, int]] = {}
        self.peak = self._peak()

    def _current(self) -> int:
        if self.method == "cuda":
            return torch.cuda.memory_allocated(self.device)
        if self.method == "vmhwm":
            return _proc_status("VmRSS")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    def _peak(self) -> int:
        if self.method == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.method == "vmhwm":
            return _proc_status("VmHWM")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def begin(self) -> int:
        """Fold the peak so far into ``peak``, reset the high-water mark; the current bytes."""
        self.peak = max(self.peak, self._peak())
        if self.method == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method == "vmhwm":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return self._current()

    def end(self, name: str, start: int) -> None:
        peak = self._peak()
        self.peak = max(self.peak, peak)
        old = self._row.get(name, {"peak": 0, "increase": 0})
        self._row[name] = {
            "peak": max(old["peak"], peak),
            "increase": max(old["increase"], peak - start),
        }

    def next_row(self) -> dict[str, dict[str, int]]:
        out, self._row = self._row, {}
        self.rows.append(out)
        return out

    def total_peak(self) -> int:
        """The largest memory seen while recording (the phases' and everything between)."""
        return max(self.peak, self._peak())


@contextlib.contextmanager
def track_memory(device: str | torch.device = "cpu") -> Iterator[PhaseMemory]:
    """Record every phase's peak memory (``PhaseMemory``) for the block."""
    mem = PhaseMemory(device)
    _memory.append(mem)
    try:
        yield mem
    finally:
        _memory.remove(mem)

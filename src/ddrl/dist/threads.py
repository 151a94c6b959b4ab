"""How many CPU threads a ``ddrl`` process uses by default.

OpenMP threads spin while they wait for work, so two processes that each take every core slow
each other down many times over (measured on 2 cores: 2.19 s/iteration alone, 28 s each when
two run at once; docs/BENCHMARKS.md). The default therefore divides the cores this process may
use among the ``ddrl`` processes already running on the machine, and among torchrun's local
ranks. ``DDRL_THREADS`` overrides it.
"""

from __future__ import annotations

import os
from pathlib import Path


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _is_ddrl(cmdline: list[str]) -> bool:
    """A ``ddrl`` command, ``python -m ddrl``, or a torchrun worker of ``-m ddrl``."""
    if not cmdline:
        return False
    if any(Path(c).name == "ddrl" for c in cmdline[:2]):  # the script, or python running it
        return True
    pairs = zip(cmdline, cmdline[1:], strict=False)
    return any(a == "-m" and b in ("ddrl", "ddrl.cli") for a, b in pairs)


def other_ddrl_processes() -> int:
    """Running ``ddrl`` processes besides this one and its parents (0 where /proc is absent)."""
    mine = {os.getpid(), os.getppid()}
    n = 0
    for d in Path("/proc").glob("[0-9]*"):
        if int(d.name) in mine:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        n += _is_ddrl([c.decode(errors="replace") for c in cmd if c])
    return n


def default_threads() -> tuple[int, str]:
    """(threads, why): DDRL_THREADS if set; under torchrun, cores / local ranks; else the
    cores divided among this and the other running ddrl processes."""
    if os.environ.get("DDRL_THREADS"):
        return int(os.environ["DDRL_THREADS"]), "DDRL_THREADS"
    cores = _cores()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if local > 1:
        return max(1, cores // local), f"{cores} cores / {local} local ranks"
    others = other_ddrl_processes() if not local else 0
    if others:
        why = f"{cores} cores shared with {others} other ddrl process(es); set DDRL_THREADS"
        return max(1, cores // (others + 1)), why
    return cores, f"{cores} cores"

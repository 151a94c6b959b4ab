"""Run folders (created, moved aside, locked to one writer) and per-iteration logging:
metrics.jsonl, eval.jsonl, watch.jsonl, and the optional trackers (``training.trackers``)."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddrl.config import RunConfig
from ddrl.errors import DDRLError

if TYPE_CHECKING:  # this module stays torch-free: the CLI checks run folders before torch loads
    from torch import Tensor


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, check_only: bool = False) -> Path:
    """Create the run folder. An existing non-empty folder is an error unless resuming; with
    ``overwrite`` it is moved aside to ``<name>.bak-<time>`` (never deleted). ``check_only``:
    raise what it would raise, change nothing (callers check before expensive work)."""
    run_dir = Path(run_dir)
    # A file where the folder (or one of its parents) should be: mkdir/iterdir would traceback.
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise DDRLError(
            f"run folder {run_dir}: {blocker} is an existing file; allowed: a new folder or a run"
        )
    if resume:
        if not (run_dir / "config.json").is_file():
            raise DDRLError(f"cannot resume: {run_dir} has no config.json (not a ddrl run)")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise DDRLError(
                f"run folder {run_dir} already exists; pass --resume to continue it "
                "or --overwrite to start over (the old folder is kept as a backup)"
            )
        if check_only:
            return run_dir
        backup = run_dir.with_name(f"{run_dir.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(run_dir), backup)
    if not check_only:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


LOGS = ("metrics.jsonl", "eval.jsonl", "watch.jsonl")  # cut back to the checkpoint on resume
LOCK_FILE = ".lock"  # in the run folder; held by the one process that writes the run


class RunLock:
    """One writer per run folder: an exclusive ``flock`` on ``<run>/.lock``, held until
    ``release`` or the end of the process. The OS drops it when the holder dies (kill -9
    included), so a killed run never blocks its restart; the file names the holder (host, PID,
    since when) for the one-line refusal a second launch gets."""

    def __init__(self, run_dir: Path):
        self.path, self.fd = Path(run_dir) / LOCK_FILE, None

    def acquire(self) -> RunLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise DDRLError(
                    f"run folder {self.path.parent} is in use by {holder}; one process writes "
                    "a run (wait for it to finish, or stop it first)"
                ) from None
            try:  # a holder releasing meanwhile unlinks the file: lock the one at the path
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} PID {os.getpid()} since {since}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the file and drop the lock (a refused or finished command leaves nothing)."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def has_records(run_dir: Path) -> bool:
    """Whether a run folder holds anything a run produced: a checkpoint, a final model or a
    logged row (a folder with only config.json and empty logs holds nothing to lose)."""
    run_dir = Path(run_dir)
    logged = any(read_jsonl(run_dir / n) for n in ("metrics.jsonl", "eval.jsonl"))
    return logged or (run_dir / "checkpoints").exists() or (run_dir / "final").exists()


class RunLogger:
    """Appends one JSON object per line to metrics.jsonl, eval.jsonl and watch.jsonl, and hands
    the same to the trackers ``cfg.train`` turns on (TensorBoard, wandb). Rows past ``start``
    are cut when a run resumes, so a resumed log equals the uninterrupted one."""

    def __init__(self, run_dir: Path, start: int, cfg: RunConfig):
        self.run_dir = Path(run_dir)
        for name in LOGS:
            path = self.run_dir / name
            # Rows are numbered by completed iterations; the checkpoint at `start` covers them.
            rows = [r for r in read_jsonl(path) if r["iteration"] <= start]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        # Imported here, not at the top: the trackers load torch (see TYPE_CHECKING above).
        from ddrl.training.trackers import open_trackers

        self.trackers = open_trackers(self.run_dir, cfg)

    def _append(self, name: str, row: dict) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(finite_or_null(row)) + "\n")

    def metrics(self, row: dict) -> None:
        self._append("metrics.jsonl", row)
        self.trackers.scalars(row, "")

    def eval(self, row: dict) -> None:
        self._append("eval.jsonl", row)
        self.trackers.scalars(row, "eval/")

    def firing(self, row: dict) -> None:
        """A watch rule fired: ``row`` has iteration, rule, signal, value, threshold, action
        and reason (``ddrl.watch``)."""
        self._append("watch.jsonl", row)
        self.trackers.firing(row)

    def samples(self, iteration: int, images: Tensor, n_prompts: int) -> None:
        """An evaluation's samples, images [P·n, C, H, W] or videos [P·n, C, F, H, W] in
        [-1, 1], prompt-major, pictured for the trackers; without one, nothing at all."""
        self.trackers.samples(iteration, images, n_prompts)

    def close(self) -> None:
        self.trackers.close()


class NullLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's logs)."""

    def metrics(self, row: dict) -> None:
        pass

    def eval(self, row: dict) -> None:
        pass

    def firing(self, row: dict) -> None:
        pass

    def samples(self, iteration: int, images: Tensor, n_prompts: int) -> None:
        pass

    def close(self) -> None:
        pass


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def finite_or_null(row: dict) -> dict:
    """Non-finite floats as None, so JSON holds null, never the non-standard bare NaN."""
    return {k: _clean(v) for k, v in row.items()}


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

"""Run folders and per-iteration logging: metrics.jsonl, eval.jsonl, optional tensorboard."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from ddrl.errors import DDRLError


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


class RunLogger:
    """Appends one JSON object per line; truncates rows past ``start`` when a run resumes, so
    a resumed log equals the uninterrupted one."""

    def __init__(self, run_dir: Path, start: int, tensorboard: bool = False):
        self.run_dir = Path(run_dir)
        for name in ("metrics.jsonl", "eval.jsonl"):
            path = self.run_dir / name
            # Rows are numbered by completed iterations; the checkpoint at `start` covers them.
            rows = [r for r in read_jsonl(path) if r["iteration"] <= start]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise DDRLError(
                    "train.tensorboard=true needs the tensorboard package (pip install tensorboard)"
                ) from e
            self.tb = SummaryWriter(str(self.run_dir / "tb"))

    def _write(self, name: str, row: dict) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(finite_or_null(row)) + "\n")
        if self.tb is not None:
            prefix = "eval/" if name == "eval.jsonl" else ""
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.add_scalar(prefix + k, v, row["iteration"])

    def metrics(self, row: dict) -> None:
        self._write("metrics.jsonl", row)

    def eval(self, row: dict) -> None:
        self._write("eval.jsonl", row)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class NullLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's logs)."""

    def metrics(self, row: dict) -> None:
        pass

    def eval(self, row: dict) -> None:
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

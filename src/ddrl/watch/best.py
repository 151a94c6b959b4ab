"""``<run>/best/``: the weights of the best clean evaluation (the ``keep_best`` action), saved
like ``final/`` (so ``ddrl sample``, ``export`` and ``eval`` take it), with ``best.json``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ddrl.watch.config import WatchConfig


def save_best(gen, run_dir: Path, it: int, cfg: WatchConfig, metrics: dict) -> Path:
    """Write ``gen`` (the evaluated weights: the EMA when on) to ``run_dir/best``, replacing
    the previous best. Written beside it first, so a kill leaves the old best whole (or, at
    worst, ``best.old`` beside the new one)."""
    best = Path(run_dir) / "best"
    tmp, old = best.with_name(f"best.tmp{os.getpid()}"), best.with_name("best.old")
    shutil.rmtree(tmp, ignore_errors=True)
    gen.save_pretrained(tmp)
    record = {
        "iteration": it,
        "metric": cfg.best_metric,
        "mode": cfg.best_mode,
        "value": metrics[cfg.best_metric],
        "rules": [r.text for r in cfg.parsed() if r.action == "keep_best"],
    }
    (tmp / "best.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        best.rename(old)
    tmp.rename(best)
    shutil.rmtree(old, ignore_errors=True)
    return best

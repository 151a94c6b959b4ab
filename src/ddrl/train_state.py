"""Everything a run needs to continue exactly, as stateful objects keyed by parameter name.

Saved: the denoiser's trainable parameters, the EMA shadow, the optimizer state (by parameter
name, through torch.distributed.checkpoint's state-dict helpers), the torch RNG state, the
iteration, and the base model's fingerprint: a resumed run must start from the same base it
was launched from, or it would silently continue a different model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from .checkpoint import (
    fingerprint,
    load_checkpoint,
    load_into,
    load_newest_valid,
    remove_orphans,
    save_checkpoint,
)
from .ema import EMA, trainable
from .errors import DDRLError


class TrainState:
    def __init__(self, run_dir: Path, denoiser, opt, ema: EMA | None, algorithm: str, log=print):
        self.run_dir, self.denoiser, self.opt, self.ema = Path(run_dir), denoiser, opt, ema
        self.algorithm, self.log = algorithm, log
        self.base_fingerprint = fingerprint(denoiser)  # taken before any update

    def _remove_orphans(self) -> None:
        for p in remove_orphans(self.run_dir):
            self.log(f"removed {p}, left by a checkpoint write that was killed")

    def save(self, iteration: int, keep: int) -> Path:
        self._remove_orphans()
        parts = {
            "model": {k: p.detach() for k, p in trainable(self.denoiser).items()},
            "optimizer": get_optimizer_state_dict(self.denoiser, self.opt),
            "rng": {"torch": torch.get_rng_state()},
        }
        if self.ema is not None:
            parts["ema"] = self.ema.state_dict()
        meta = {"algorithm": self.algorithm, "base_fingerprint": self.base_fingerprint}
        return save_checkpoint(self.run_dir, iteration, parts, meta, keep)

    def restore(self, path: Path | None = None) -> int:
        """Load the newest valid (or the given) checkpoint in place; returns its iteration."""
        self._remove_orphans()
        if path is None:
            path, meta, parts = load_newest_valid(self.run_dir, self.log)
        else:
            meta, parts = load_checkpoint(path)
        if meta.get("base_fingerprint") != self.base_fingerprint:
            raise DDRLError(
                f"checkpoint {path} was trained from base {meta.get('base_fingerprint')}, but the "
                f"configured base is {self.base_fingerprint}; resume with the run's own base"
            )
        load_into(trainable(self.denoiser), parts["model"], f"checkpoint {path}")
        set_optimizer_state_dict(self.denoiser, self.opt, parts["optimizer"])
        if self.ema is not None:
            if "ema" not in parts:
                raise DDRLError(f"checkpoint {path} has no EMA but optim.ema_decay > 0")
            self.ema.load_state_dict(parts["ema"])
        torch.set_rng_state(parts["rng"]["torch"])
        return int(meta["iteration"])

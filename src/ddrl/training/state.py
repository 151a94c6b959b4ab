"""Everything a run needs to continue exactly, as stateful objects keyed by parameter name.

Saved: the denoiser's trainable parameters, the EMA shadow, the loss's own lagging weights
(NFT's old policy, AWM's KL target), the optimizer state (by parameter
name, through torch.distributed.checkpoint's state-dict helpers), every rank's torch (and
CUDA) RNG state, the iteration, the samples seen, the world size and strategy, and the base
model's fingerprint: a resumed run must start from the same base it was launched from, or it
would silently continue a different model. The rest of the run's state is a function of the
iteration and needs no saving: the learning-rate schedule (``ddrl.training.step``), the prompt
sampler and every noise stream (generators keyed by (seed, iteration[, rank]),
``ddrl.dist.rng``), and the reward normalisation (per-group statistics of the iteration's own
rewards, no running state).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ddrl.dist.checkpoint import (
    checkpoints,
    read_state,
    remove_orphans,
    restore_into,
    save_checkpoint,
    verify,
)
from ddrl.dist.group import barrier, is_main, world_size
from ddrl.errors import DDRLError
from ddrl.io import fingerprint, trainable
from ddrl.training.ema import EMA


def rng_state() -> dict[str, torch.Tensor]:
    """This process's default generators: CPU, and the current CUDA device's when there is one."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


class NoCheckpoint(DDRLError):
    """The run has no checkpoint at all (not even a damaged one)."""


class TrainState:
    """Saves and restores one run's state; ``meta`` goes into state.json as well. Under FSDP2
    the parameters, EMA shadow and optimizer state are this rank's shards (DTensors)."""

    def __init__(
        self,
        run_dir: Path,
        denoiser,
        opt,
        ema: EMA | None,
        algorithm: str,
        log=print,
        base_fingerprint: str | None = None,
        loss=None,
        **meta,
    ):
        self.run_dir, self.denoiser, self.opt, self.ema = Path(run_dir), denoiser, opt, ema
        # The loss's own state (lagging weights: NFT's old policy, AWM's KL target), if any.
        self.loss = loss if callable(getattr(loss, "state_dict", None)) else None
        self.algorithm, self.log, self.meta = algorithm, log, meta
        # Of the base, before any update; pass it in when the denoiser is sharded already.
        self.base_fingerprint = base_fingerprint or fingerprint(denoiser)

    def _remove_orphans(self) -> None:
        """Rank 0 deletes a killed write's leftovers while the others wait (a collective)."""
        if is_main():
            for p in remove_orphans(self.run_dir):
                self.log(f"removed {p}, left by a checkpoint write that was killed")
        barrier()

    def _parts(self) -> dict:
        parts = {
            "model": {k: p.detach() for k, p in trainable(self.denoiser).items()},
            "optimizer": get_optimizer_state_dict(self.denoiser, self.opt),
        }
        if self.ema is not None:
            parts["ema"] = self.ema.state_dict()
        if self.loss is not None and self.loss.state_dict():
            parts["loss"] = self.loss.state_dict()
        return parts

    def save(self, iteration: int, keep: int, **extra) -> Path:
        """Write checkpoint ``iteration`` (a collective: every rank calls it)."""
        self._remove_orphans()
        meta = {"algorithm": self.algorithm, "base_fingerprint": self.base_fingerprint}
        return save_checkpoint(
            self.run_dir,
            iteration,
            self._parts(),
            {**meta, **self.meta, **extra},
            keep,
            rng_state(),
        )

    def restore(self, path: Path | None = None) -> int:
        """Load the newest valid (or the given) checkpoint in place and say which; returns its
        iteration. A damaged newer one is passed over with a warning. A collective."""
        self._remove_orphans()
        found = [Path(path)] if path is not None else checkpoints(self.run_dir)
        if not found:
            raise NoCheckpoint(
                f"no checkpoint in {self.run_dir} (no {self.run_dir}/checkpoints/step-*)"
            )
        errors = []
        for cand in found:
            err = verify(cand)
            if err is None:
                break
            errors.append(err)
        else:
            raise DDRLError(f"no valid checkpoint in {self.run_dir}: {'; '.join(errors)}")
        if errors:
            self.log(
                f"warning: checkpoint {found[0]} is damaged ({errors[0]}); resuming from {cand}"
            )
        meta = read_state(cand)
        parts, rng = restore_into(cand, self._checked(cand, meta), meta)
        set_optimizer_state_dict(self.denoiser, self.opt, parts["optimizer"])
        if "loss" in parts:
            self.loss.load_state_dict(parts["loss"])
        if rng:  # none for a rank the writing run did not have (another world size)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        world, now = meta["world_size"], world_size()
        self.log(
            f"resuming from {cand} (iteration {meta['iteration']}, written by {world} rank(s))"
        )
        if world != now:  # the noise streams are keyed by (seed, iteration[, rank]): unchanged
            self.log(
                f"note: continuing on {now} rank(s); the model, EMA and optimizer state were "
                "resharded, and the trajectories' noise does not depend on the world size"
            )
        return int(meta["iteration"])

    def _checked(self, path: Path, meta: dict) -> dict:
        """The live state to load ``path`` (state.json ``meta``) into, once its base is known
        to be this run's."""
        if meta.get("base_fingerprint") != self.base_fingerprint:
            raise DDRLError(
                f"checkpoint {path} was trained from base {meta.get('base_fingerprint')}, but the "
                f"configured base is {self.base_fingerprint}; resume with the run's own base"
            )
        if self.ema is not None and "ema" not in meta["skeletons"]:
            raise DDRLError(f"checkpoint {path} has no EMA but optim.ema_decay > 0")
        if ("loss" in meta["skeletons"]) != ("loss" in self._parts()):
            raise DDRLError(
                f"checkpoint {path} and this run's loss disagree on whether the loss keeps "
                "weights of its own (the old policy or a lagging copy); resume with the run's "
                "own algorithm"
            )
        return self._parts()

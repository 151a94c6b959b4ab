"""A lagging copy of the trained weights: DiffusionNFT's "old" policy and AWM's "KL-EMA" target.

Both keep a second copy of the trainable parameters and, once per iteration after the updates,
move it towards the current weights: lag ← d·lag + (1 − d)·θ with d a function of the
optimizer steps taken so far, s: d = 0 for s < flat, then min((s − flat)·rate, cap)
(DiffusionNFT scripts/train_nft_sd3.py L169-189 ``return_decay`` and L1035-1039; AWM
scripts/train_sd3_awm.py L1409-1419 with flat 0). Its velocity is evaluated by swapping the
copy into the model under no gradient, so no second model is held in memory (the peers keep a
second LoRA adapter for the same reason); a swap must come before the forward that trains.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ddrl.io import trainable
from ddrl.models.base import guided_velocity


@contextmanager
def swapped_in(model: nn.Module, weights: dict[str, torch.Tensor]):
    """``weights`` (by trainable-parameter name) copied into ``model`` for the block, then
    the model's own back."""
    params = trainable(model)
    backup = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k])
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(backup[k])


class LaggingWeights:
    """lag ← d(s)·lag + (1 − d(s))·θ over the trainable parameters of ``model``. The copy is
    taken on first use, so it has the layout the loop gives the model (FSDP2 shards it after
    the loss is built); the first use comes before any update, so it starts as the base."""

    def __init__(self, model: nn.Module, flat: int, rate: float, cap: float):
        self.model, self.flat, self.rate, self.cap = model, flat, rate, cap
        self._lag: dict[str, torch.Tensor] | None = None

    @property
    def lag(self) -> dict[str, torch.Tensor]:
        if self._lag is None:
            self._lag = {k: p.detach().clone() for k, p in trainable(self.model).items()}
        return self._lag

    def decay(self, s: int) -> float:
        """d after ``s`` optimizer steps."""
        return 0.0 if s < self.flat else min((s - self.flat) * self.rate, self.cap)

    @torch.no_grad()
    def update(self, s: int) -> None:
        d = self.decay(s)
        for k, p in trainable(self.model).items():
            self.lag[k].mul_(d).add_(p.detach(), alpha=1 - d)

    def applied(self):
        """A context in which the model carries the lagging weights."""
        return swapped_in(self.model, self.lag)

    @torch.no_grad()
    def velocity(self, x_t, t, cond, null=None, scale: float = 1.0):
        """v_lag(x_t, t, c) [B, ...] without gradient, guided by ``scale`` when ``null``."""
        with self.applied():
            return guided_velocity(self.model, x_t, t, cond, null, scale)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.lag

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.lag[k].copy_(v)

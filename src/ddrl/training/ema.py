"""An exponential moving average of the trainable parameters only, keyed by parameter name."""

from __future__ import annotations

import torch
from torch import nn

from ddrl.io import trainable
from ddrl.losses.lagging import swapped_in


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Module EMA (pretraining): ema ← decay·ema + (1 − decay)·θ, parameter by parameter."""
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p.detach(), 1 - decay)


class EMA:
    """shadow ← d·shadow + (1 − d)·θ over the trainable parameters of ``model``, on flow_grpo's
    schedule when asked (flow_grpo/ema.py L33-49): a call with step count s updates only when
    (s + 1) % ``every`` == 0, with d = min((1 + s)/(10 + s), ``decay``) under ``warmup``, else
    d = ``decay``. The schedule is a function of s alone, so it needs no saved state."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup: bool = False):
        self.decay, self.every, self.warmup = decay, every, warmup
        self.shadow = {k: p.detach().clone() for k, p in trainable(model).items()}

    def decay_at(self, s: int) -> float:
        """The decay of a call with step count ``s``."""
        return min((1 + s) / (10 + s), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, s: int = 0, calls: int = 1) -> None:
        """``calls`` consecutive calls with step count ``s`` and the same θ: together
        shadow ← θ + d^calls·(shadow − θ) (flow_grpo repeats a call once per micro-batch)."""
        if (s + 1) % self.every:
            return
        keep = self.decay_at(s) ** calls
        for k, p in trainable(model).items():
            self.shadow[k].lerp_(p.detach(), 1 - keep)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def applied(self, model: nn.Module):
        """Swap the EMA weights into ``model`` for the block (evaluation, export), then back."""
        return swapped_in(model, self.shadow)

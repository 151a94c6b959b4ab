"""An exponential moving average of the trainable parameters only, keyed by parameter name."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ddrl.dist.checkpoint import trainable


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Module EMA (pretraining): ema ← decay·ema + (1 − decay)·θ, parameter by parameter."""
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p.detach(), 1 - decay)


class EMA:
    """shadow ← decay·shadow + (1 − decay)·θ over the trainable parameters of ``model``."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone() for k, p in trainable(model).items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, p in trainable(model).items():
            self.shadow[k].lerp_(p.detach(), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)

    @contextmanager
    def applied(self, model: nn.Module):
        """Swap the EMA weights into ``model`` for the block (evaluation, export), then back."""
        params = trainable(model)
        backup = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k])
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(backup[k])

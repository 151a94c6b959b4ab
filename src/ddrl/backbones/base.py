"""The Backbone protocol: what the loop needs from a velocity model.

A condition (``Cond``) is a tensor or a tuple of tensors whose first dim is the batch; the loop
only indexes and repeats it, so text-encoder outputs and class ids both fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

Cond = Tensor | tuple[Tensor, ...]


@runtime_checkable
class Backbone(Protocol):
    """A conditional velocity model v_θ(x_t, t, c) on the rectified-flow path (an nn.Module)."""

    sample_shape: tuple[int, ...]  # shape of one sample, e.g. (1, 8, 8)

    def encode(self, prompts: list[str]) -> Cond:
        """Prompts → condition with batch dim B (no gradient needed)."""

    def null_cond(self, n: int) -> Cond:
        """The unconditional condition for classifier-free guidance, batch n."""

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """v_θ(x_t, t, c): x_t [B, *sample_shape], t [B] in [0, 1] → [B, *sample_shape]."""

    def save_pretrained(self, path: str | Path) -> None:
        """Write weights (safetensors) and config so ``from_pretrained`` can rebuild it."""


def cond_index(cond: Cond, idx: Tensor) -> Cond:
    """Select rows ``idx`` [N] of every tensor in the condition."""
    if isinstance(cond, tuple):
        return tuple(c[idx] for c in cond)
    return cond[idx]


def cond_cat(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditions along the batch dim (for one CFG forward pass)."""
    if isinstance(a, tuple):
        return tuple(torch.cat([x, y]) for x, y in zip(a, b, strict=True))
    return torch.cat([a, b])


def guided_velocity(
    model: Backbone, x_t: Tensor, t: Tensor, cond: Cond, cfg_scale: float = 1.0
) -> Tensor:
    """v = v_u + w·(v_c − v_u); w = 1 is plain conditional (one pass, no null branch)."""
    if cfg_scale == 1.0:
        return model.velocity(x_t, t, cond)
    n = x_t.shape[0]
    v = model.velocity(torch.cat([x_t, x_t]), torch.cat([t, t]), cond_cat(cond, model.null_cond(n)))
    v_c, v_u = v[:n], v[n:]
    return v_u + cfg_scale * (v_c - v_u)

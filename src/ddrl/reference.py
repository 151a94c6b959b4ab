"""The reference model of KL-regularised baselines (Flow-GRPO), behind a small protocol.

Today the reference is a frozen copy of the starting denoiser; with LoRA it will be the same
denoiser with its adapters disabled (no second copy). DDRL needs no reference at all.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import Tensor, nn

from .models import Cond, guided_velocity


class Reference(Protocol):
    def velocity(
        self, x_t: Tensor, t: Tensor, cond: Cond, null: Cond | None, scale: float
    ) -> Tensor:
        """v_ref(x_t, t, c) with the same guidance as the policy, without gradient: like x_t."""


class FrozenCopy:
    """A deep copy of the denoiser taken before training starts, frozen and in eval mode."""

    def __init__(self, denoiser: nn.Module):
        self.model = copy.deepcopy(denoiser).eval().requires_grad_(False)

    @torch.no_grad()
    def velocity(self, x_t, t, cond, null, scale):
        return guided_velocity(self.model, x_t, t, cond, null, scale)


REFERENCES = {"frozen_copy": FrozenCopy}

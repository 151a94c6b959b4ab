"""DDRL: L = L_pg + data_beta · L_data (reward term + forward KL to the data).

The release (cosmos-rl) sums the clipped policy term and data_beta × the flow-matching loss on
data at every trained timestep; no reference model is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_range
from .base import DataTermConfig, LossOut, data_applies, data_term, policy_term


@dataclass
class DDRLConfig(DataTermConfig):
    """DDRL's knobs (the data term's, plus the policy term's clip)."""

    clip_range: float = 1e-4  # PPO ratio clip ε (release: 1e-4; the ratio is ≡ 1 on-policy)

    def check(self) -> None:
        super().check()
        check_range("loss.clip_range", self.clip_range, 0.0, 1.0)


class DDRLLoss:
    """Clipped policy term plus the flow-matching loss on data paired with the prompts."""

    Config = DDRLConfig

    def __init__(self, cfg: DDRLConfig, ctx):
        self.cfg, self.ctx = cfg, ctx

    def masks(self, b):
        return {"policy": b.valid, "data": torch.ones_like(b.valid)}

    def __call__(self, denoiser, b):
        pg, _, stats = policy_term(denoiser, b, self.ctx, self.cfg.clip_range)
        terms = {"policy": (pg, 1.0)}
        if self.cfg.data_beta > 0 and data_applies(self.cfg, b):
            terms["data"] = (data_term(denoiser, b, self.cfg), self.cfg.data_beta)
        return LossOut(terms, stats)

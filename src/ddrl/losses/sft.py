"""SFT: the data term alone, L = data_beta · L_data (rollouts are still drawn, for logging and so
that every algorithm sees the same prompts, noise and budget)."""

from __future__ import annotations

import torch

from .base import LossConfig, data_term


class SFTLoss:
    def __init__(self, cfg: LossConfig, sampler, base_model=None):
        self.cfg, self.sampler = cfg, sampler

    def __call__(self, model, b):
        if b.first or not self.cfg.data_on_first_only:
            d = data_term(model, b, self.cfg)
            return self.cfg.data_beta * d, {"data_loss": d.item()}
        return torch.zeros((), device=b.x_t.device), {}

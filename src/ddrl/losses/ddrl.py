"""DDRL: L = w_r · L_pg + data_beta · L_data (reward term + forward KL to the data)."""

from __future__ import annotations

import torch

from .base import LossConfig, data_term, policy_term


class DDRLLoss:
    """Clipped policy term plus the flow-matching loss on data paired with the prompts.

    With ``reward_weight = 0`` this is SFT; with ``data_beta = 0`` it is plain GRPO.
    """

    def __init__(self, cfg: LossConfig, sampler, base_model=None):
        self.cfg, self.sampler = cfg, sampler

    def __call__(self, model, b):
        cfg, metrics = self.cfg, {}
        loss = torch.zeros((), device=b.x_t.device)
        if cfg.reward_weight > 0:
            pg, _, metrics = policy_term(model, b, self.sampler, cfg.clip_range)
            metrics["policy_loss"] = pg.item()
            loss = loss + cfg.reward_weight * pg
        if cfg.data_beta > 0 and (b.first or not cfg.data_on_first_only):
            d = data_term(model, b, cfg)
            metrics["data_loss"] = d.item()
            loss = loss + cfg.data_beta * d
        return loss, metrics

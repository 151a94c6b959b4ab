"""DanceGRPO: the clipped policy term alone (no KL). Its other differences are sampler and loop
settings in its preset: the Dance-SDE step, shared initial noise per group, a random 60% of
timesteps trained."""

from __future__ import annotations

from .base import LossConfig, policy_term


class PolicyOnlyLoss:
    """L = w_r · L_pg: DanceGRPO, and plain GRPO with the Flow-SDE sampler."""

    def __init__(self, cfg: LossConfig, sampler, base_model=None):
        self.cfg, self.sampler = cfg, sampler

    def __call__(self, model, b):
        pg, _, metrics = policy_term(model, b, self.sampler, self.cfg.clip_range)
        metrics["policy_loss"] = pg.item()
        return self.cfg.reward_weight * pg, metrics

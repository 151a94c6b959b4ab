"""The clipped policy term alone: plain GRPO (Flow-SDE) and DanceGRPO (no KL). DanceGRPO's other
differences are sampler and loop settings in its preset: the Dance-SDE step, shared initial
noise per group, a random subset of timesteps per sample, its shifted linear grid."""

from __future__ import annotations

from ddrl.losses.base import LossOut, policy_term
from ddrl.losses.config import PolicyConfig


class PolicyOnlyLoss:
    """L = L_pg."""

    Config = PolicyConfig
    needs_data, needs_reference = False, False

    def __init__(self, cfg: PolicyConfig, ctx):
        self.cfg, self.ctx = cfg, ctx

    def masks(self, b):
        return {"policy": b.valid}

    def __call__(self, denoiser, b):
        pg, _, stats = policy_term(denoiser, b, self.ctx, self.cfg.clip_range, self.cfg.ratio)
        return LossOut({"policy": (pg, 1.0)}, stats)

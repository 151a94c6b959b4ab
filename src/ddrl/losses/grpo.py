"""The clipped policy term alone: plain GRPO (Flow-SDE) and DanceGRPO (no KL). DanceGRPO's other
differences are sampler and loop settings in its preset: the Dance-SDE step, shared initial
noise per group, a random subset of timesteps per sample, its shifted linear grid."""

from __future__ import annotations

from dataclasses import dataclass

from ddrl.errors import check_range
from ddrl.losses.base import LossOut, policy_term


@dataclass
class PolicyConfig:
    """The policy term's only knob."""

    clip_range: float = 1e-4  # PPO ratio clip ε (flow_grpo and DanceGRPO: 1e-4)

    def check(self) -> None:
        check_range("loss.clip_range", self.clip_range, 0.0, 1.0)


class PolicyOnlyLoss:
    """L = L_pg."""

    Config = PolicyConfig

    def __init__(self, cfg: PolicyConfig, ctx):
        self.cfg, self.ctx = cfg, ctx

    def masks(self, b):
        return {"policy": b.valid}

    def __call__(self, denoiser, b):
        pg, _, stats = policy_term(denoiser, b, self.ctx, self.cfg.clip_range)
        return LossOut({"policy": (pg, 1.0)}, stats)

"""Advantage-weighted matching (AWM; scxue/advantage_weighted_matching
scripts/train_sd3_awm.py; docs/CONFORMANCE.md §10): policy gradient through the flow-matching
loss on the policy's own samples.

The rollout keeps only the final samples x0; at a trained step's t (stratified over the
sampling grid, ``train.timestep_selection = "stratified"``) x0 is noised afresh, x_t = (1 − t)·x0
+ t·ε (L1215-1232), and its flow-matching error m = mean‖v_θ(x_t, t) − (ε − x0)‖² (in float64,
L237-239) becomes a log-likelihood surrogate, "ghuber": log p = −t·((m + 1e-10)^p − 1e-10^p)/p
(L240-251). The surrogate is PPO's with ρ = exp(log p − log p_old) where log p_old is the same
forward's value detached (its on-policy configs, L1282-1284: ρ ≡ 1, so the gradient is
−A·∇log p), and A = clamp(A, ±c)/c (L1293-1299). Its KL to the base and its "KL-EMA" are the
``reverse_kl`` and ``lagging_kl`` regularisers (L1336-1350).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddrl.flow import velocity_target
from ddrl.losses.base import (
    Extra,
    Forward,
    LossContext,
    ObjectiveOut,
    Point,
    StepBatch,
    clipped_surrogate,
    fresh_point,
    velocity_with,
)
from ddrl.losses.config import AWMConfig
from ddrl.phases import phase


def awm_log_prob(v: Tensor, target: Tensor, t: Tensor, weighting: str, power: float) -> Tensor:
    """The weighted log-likelihood surrogate [B] (float64) of velocity v against ε − x0."""
    m = (v.double() - target.double()).pow(2).flatten(1).mean(1)
    t = t.double()
    if weighting == "ghuber":
        return -((m + 1e-10) ** power - 1e-10**power) * t / power
    return -m * {"uniform": torch.ones_like(t), "t": t, "t2": t**2}[weighting]


class AWM:
    """The AWM objective (forward process: the rollout keeps only final samples)."""

    Config = AWMConfig
    transitions = False

    def __init__(self, cfg: AWMConfig, ctx: LossContext):
        self.cfg, self.ctx = cfg, ctx

    def masks(self, b: StepBatch, keep: Tensor) -> dict[str, Tensor]:
        return {"policy": keep}

    def inputs(self, b: StepBatch) -> Point:
        return fresh_point(b)  # conditional, no CFG (its train.cfg = False)

    def __call__(self, denoiser, b: StepBatch, at: Point, extra: Extra | None = None):
        x_t, t, cond = at.x_t, at.t, at.cond
        with phase("policy"):
            v, v_extra = velocity_with(denoiser, x_t, t, cond, None, 1.0, extra)
        c = self.cfg
        lp = awm_log_prob(v, velocity_target(b.x0, at.noise), t, c.weighting, c.ghuber_power)
        adv = b.advantages.double().clamp(-c.adv_clip_max, c.adv_clip_max) / c.adv_clip_max
        per, rho = clipped_surrogate(lp - lp.detach(), adv, c.clip_range)
        stats = {"fm_error": (-lp.detach()).float()}
        return ObjectiveOut({"policy": (per, 1.0)}, stats, Forward(x_t, t, cond, None, v), v_extra)

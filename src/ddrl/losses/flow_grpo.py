"""Flow-GRPO: clipped policy term + β_KL · reverse KL to a frozen copy of the base model.

Per step, both transitions are Gaussians with the same std, so
KL(p_θ ‖ p_ref) = ‖μ_θ − μ_ref‖² / (2·std²), averaged over dimensions like the log-prob.
"""

from __future__ import annotations

import copy

import torch

from ..backbones import guided_velocity
from ..errors import DDRLError
from ..sde import sde_step
from .base import LossConfig, masked_mean, policy_term


class FlowGRPOLoss:
    def __init__(self, cfg: LossConfig, sampler, base_model=None):
        self.cfg, self.sampler = cfg, sampler
        self.ref = None
        if cfg.beta_kl > 0:
            if base_model is None:
                raise DDRLError("flow_grpo with loss.beta_kl > 0 needs the base model as reference")
            self.ref = copy.deepcopy(base_model).eval().requires_grad_(False)

    def __call__(self, model, b):
        pg, step, metrics = policy_term(model, b, self.sampler, self.cfg.clip_range)
        metrics["policy_loss"] = pg.item()
        loss = self.cfg.reward_weight * pg
        if self.ref is not None:
            with torch.no_grad():
                v_ref = guided_velocity(self.ref, b.x_t, b.t, b.cond, self.sampler.cfg_scale)
                ref = sde_step(
                    self.sampler.sde,
                    b.x_t,
                    v_ref,
                    b.t,
                    b.t_next,
                    self.sampler.noise_level,
                    prev_sample=b.x_next,
                )
            kl = ((step.mean - ref.mean) ** 2 / (2 * step.std**2)).flatten(1).mean(1)
            kl = masked_mean(kl, b.valid.float())
            metrics["kl"] = kl.item()
            loss = loss + self.cfg.beta_kl * kl
        return loss, metrics

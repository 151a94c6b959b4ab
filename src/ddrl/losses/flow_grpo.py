"""Flow-GRPO: clipped policy term + β_KL · KL term to a frozen reference, in flow_grpo's units.

flow_grpo's KL line (scripts/train_sd3.py, docs/CONFORMANCE.md) is
    mean_dims(‖μ_θ − μ_ref‖²) / (2·σ_t²),  σ_t = a·sqrt(t/(1−t)) (its std_dev_t),
i.e. the exact per-step Gaussian KL (whose variance is σ_t²·|dt|) multiplied by |dt|. ``beta_kl``
multiplies exactly that, so a β copied from flow_grpo's configs (0.04 OCR, 0.01 PickScore) means
the same here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddrl.losses.base import LossOut, policy_term
from ddrl.losses.config import FlowGRPOConfig
from ddrl.phases import phase


def flow_grpo_kl(mean: Tensor, mean_ref: Tensor, sigma: Tensor) -> Tensor:
    """Per-sample KL term [B]: mean over dims of (μ_θ − μ_ref)² / (2·σ_t²)."""
    return ((mean - mean_ref) ** 2 / (2 * sigma**2)).flatten(1).mean(1)


class FlowGRPOLoss:
    Config = FlowGRPOConfig
    needs_data, needs_reference = False, True

    def __init__(self, cfg: FlowGRPOConfig, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.ref = ctx.make_reference(cfg.reference) if cfg.beta_kl > 0 else None

    def kept(self, advantages: Tensor, valid: Tensor) -> Tensor:
        """Trajectories [B] both terms cover: the valid ones; with ``drop_zero_advantage`` not
        those with A = 0, which flow_grpo removes before its loss (train_sd3.py L796-817)."""
        return valid & (advantages != 0) if self.cfg.drop_zero_advantage else valid

    def masks(self, b):
        keep = self.kept(b.advantages, b.valid)
        return {"policy": keep, "kl": keep}

    def __call__(self, denoiser, b):
        pg, step, stats = policy_term(denoiser, b, self.ctx, self.cfg.clip_range)
        terms = {"policy": (pg, 1.0)}
        if self.ref is not None:
            with torch.no_grad(), phase("reference"):
                v_ref = self.ref.velocity(b.x_t, b.t, b.cond, b.null, self.ctx.cfg_scale)
                ref = self.ctx.step(b.x_t, v_ref, b.t, b.t_next, prev_sample=b.x_next)
            terms["kl"] = (flow_grpo_kl(step.mean, ref.mean, step.sigma), self.cfg.beta_kl)
        return LossOut(terms, stats)

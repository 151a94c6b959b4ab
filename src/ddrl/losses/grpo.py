"""The clipped GRPO surrogate on recorded SDE transitions: the policy objective of DDRL,
Flow-GRPO, DanceGRPO and plain GRPO (they differ in regularisers, sampler and loop settings).

Per trained step it recomputes μ_θ, std and log p_θ(x_next | x_t) of the rollout's transition
and takes max(−A·ρ, −A·clip(ρ, 1 ± ε)). Options: the release's EDM log-ratio (``ratio``),
flow_grpo's zero-advantage filter (``drop_zero_advantage``) and GRPO-Guard's ratio
normalisation (``ratio_norm``; docs/CONFORMANCE.md §11).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddrl.losses.base import (
    Extra,
    Forward,
    LossContext,
    ObjectiveOut,
    Point,
    StepBatch,
    clipped_surrogate,
    velocity_with,
)
from ddrl.losses.config import GRPOConfig
from ddrl.phases import phase
from ddrl.sde import Step


def log_ratio(step: Step, b: StepBatch, kind: str = "log_density") -> Tensor:
    """log ρ [B] of a recomputed step against the rollout's record.

    "log_density": log p_θ(x' | x_t) − log p_old(x' | x_t), ddrl's per-dimension mean
    (``ddrl.sde``). "edm_squared_error": the DDRL release's −mean_dims[(x'_e − μ_θ,e)² −
    (x'_e − μ_old,e)²] in EDM space, x_e = x / (1 − t_next) (cosmos-rl wfm_trainer.py
    L471-490). Both Gaussians have the same std (it depends on t, t_next only), so
    log p_θ − log p_old = −mean[(x' − μ_θ)² − (x' − μ_old)²] / (2·std²) and the release's
    value is (log p_θ − log p_old)·2·std² / (1 − t_next)² exactly (docs/DECISIONS.md); std is
    the step's [B, 1, ...] (the same for every element of a sample, as for every built-in SDE).
    """
    d = step.log_prob - b.logp_old
    if kind == "log_density":
        return d
    return d * (2 * step_std(step) ** 2 / (1 - b.t_next.to(d)) ** 2)


def step_std(step: Step) -> Tensor:
    """The transition's std per sample [B] (one value per sample for every built-in SDE)."""
    return torch.broadcast_to(step.std, step.x_next.shape).flatten(1)[:, 0]


def guard_log_ratio(step: Step, b: StepBatch) -> Tensor:
    """GRPO-Guard's normalised log-ratio [B] (flow_grpo scripts/train_sd3_GRPO_Guard.py
    L915-921): s·(log ρ + mean‖μ_θ − μ_old‖²/(2s²)), s = the step's std σ_t·sqrt(Δt); i.e.
    mean(ε·(μ_θ − μ_old)) with ε the rollout's standardised noise. Per sample, as Flow-Factory
    and verl-omni compute it (the official line averages the bias over the batch:
    docs/DECISIONS.md)."""
    s = step_std(step)
    bias = (step.mean - b.mean_old).pow(2).flatten(1).mean(1) / (2 * s**2)
    return s * (step.log_prob - b.logp_old + bias)


def surrogate(step: Step, b: StepBatch, cfg: GRPOConfig) -> tuple[Tensor, dict]:
    """Clipped surrogate [B] of a recomputed step, and ratio statistics [B]. With
    ``ratio_norm`` the ratio is GRPO-Guard's and each step's loss is divided by its Δt = t −
    t_next (its gradient reweighting, L931-932)."""
    lr = guard_log_ratio(step, b) if cfg.ratio_norm else log_ratio(step, b, cfg.ratio)
    per, rho = clipped_surrogate(lr, b.advantages, cfg.clip_range)
    if cfg.ratio_norm:
        per = per / (b.t - b.t_next).to(per)
    dev = (rho.detach() - 1).abs()
    return per, {"ratio_dev": dev, "clipped": (dev > cfg.clip_range).float()}


def policy_transition(
    denoiser, b: StepBatch, ctx: LossContext, extra: Extra | None = None
) -> tuple[Step, Tensor, Tensor | None]:
    """The recorded transition recomputed under θ (μ_θ, std, log p_θ(x_next | x_t)), the
    velocity [B, ...] it used (guided as flow_grpo trains with CFG, ``velocity_with``), and
    the velocity of ``extra`` from the same forward."""
    v, v_extra = velocity_with(denoiser, b.x_t, b.t, b.cond, b.null, ctx.cfg_scale, extra)
    return ctx.step(b.x_t, v, b.t, b.t_next, prev_sample=b.x_next), v, v_extra


class GRPO:
    """The clipped surrogate of the trained step's recorded transition."""

    Config = GRPOConfig
    transitions = True

    def __init__(self, cfg: GRPOConfig, ctx: LossContext):
        self.cfg, self.ctx = cfg, ctx
        self.records_means = cfg.ratio_norm  # GRPO-Guard needs the rollout's μ_old

    def kept(self, advantages: Tensor, valid: Tensor) -> Tensor:
        """Trajectories [B] its terms cover: the valid ones; with ``drop_zero_advantage`` not
        those with A = 0, which flow_grpo removes before its loss (train_sd3.py L796-817)."""
        return valid & (advantages != 0) if self.cfg.drop_zero_advantage else valid

    def masks(self, b: StepBatch, keep: Tensor) -> dict[str, Tensor]:
        return {"policy": keep}

    def inputs(self, b: StepBatch) -> Point:
        return Point(b.x_t, b.t, b.cond, b.null)

    def __call__(self, denoiser, b: StepBatch, at: Point, extra: Extra | None = None):
        with phase("policy"):
            step, v, v_extra = policy_transition(denoiser, b, self.ctx, extra)
        per, stats = surrogate(step, b, self.cfg)
        fwd = Forward(b.x_t, b.t, b.cond, b.null, v, step)
        return ObjectiveOut({"policy": (per, 1.0)}, stats, fwd, v_extra)

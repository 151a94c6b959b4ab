"""Loss terms shared by the algorithms, and the per-step batch they all receive.

Every algorithm is ``loss(model, batch) -> (scalar, metrics)`` over one trained timestep of a
rollout; the loop accumulates gradients over the trained timesteps and steps once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..backbones import Backbone, Cond, guided_velocity
from ..errors import check_choice, check_range
from ..flow import flow_matching_loss, interpolate, sample_training_t
from ..rollout import SamplerConfig
from ..sde import Step, sde_step


@dataclass
class LossConfig:
    """Weights and options of the loss terms (each algorithm reads the ones it uses)."""

    reward_weight: float = 1.0  # weight of the policy-gradient term (SFT: 0)
    clip_range: float = 1e-4  # PPO ratio clip ε (DDRL release: 1e-4; ratio ≡ 1 on-policy)
    data_beta: float = 0.1  # DDRL/SFT: weight of the flow-matching loss on data (forward KL)
    data_t: str = "rollout"  # "rollout": data term at the rollout's t and initial noise; "random"
    data_on_first_only: bool = False  # data term once per item (first trained step) not per step
    beta_kl: float = 0.04  # Flow-GRPO: weight of the reverse KL to the frozen reference model

    def check(self) -> None:
        check_range("loss.reward_weight", self.reward_weight, 0.0)
        check_range("loss.clip_range", self.clip_range, 0.0, 1.0)
        check_range("loss.data_beta", self.data_beta, 0.0)
        check_range("loss.beta_kl", self.beta_kl, 0.0)
        check_choice("loss.data_t", self.data_t, ("rollout", "random"))


@dataclass
class StepBatch:
    """One trained timestep i for B trajectories."""

    x_t: Tensor  # [B, ...] state at t_i
    x_next: Tensor  # [B, ...] sampled state at t_{i+1}
    t: Tensor  # [B]
    t_next: Tensor  # [B]
    logp_old: Tensor  # [B] log-prob recorded at rollout time
    advantages: Tensor  # [B]
    valid: Tensor  # [B] bool: False for groups skipped (non-finite reward)
    cond: Cond  # batch B
    x0_data: Tensor  # [B, ...] data paired with each trajectory's prompt
    noise0: Tensor  # [B, ...] the trajectory's initial noise (x at t = 1)
    first: bool  # the first trained timestep of this update (for data_on_first_only)
    generator: torch.Generator  # for "random" data timesteps


class Loss(Protocol):
    def __call__(self, model: Backbone, batch: StepBatch) -> tuple[Tensor, dict[str, float]]: ...


def policy_step(model: Backbone, b: StepBatch, sampler: SamplerConfig) -> Step:
    """Recompute μ_θ, std and log p_θ(x_next | x_t) of the recorded transition."""
    v = guided_velocity(model, b.x_t, b.t, b.cond, sampler.cfg_scale)
    return sde_step(sampler.sde, b.x_t, v, b.t, b.t_next, sampler.noise_level, prev_sample=b.x_next)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [B] over mask [B]; 0 (with a graph) if the mask is empty. Masked-out entries
    may be NaN/inf (a diverged sample of a skipped group): where(), unlike x·0, drops them."""
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def clipped_policy_loss(
    logp: Tensor, logp_old: Tensor, adv: Tensor, clip: float
) -> tuple[Tensor, Tensor]:
    """PPO surrogate per sample [B]: max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(logp − logp_old)."""
    ratio = torch.exp(logp - logp_old)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)), ratio


def policy_term(
    model: Backbone, b: StepBatch, sampler: SamplerConfig, clip: float
) -> tuple[Tensor, Step, dict[str, float]]:
    step = policy_step(model, b, sampler)
    per, ratio = clipped_policy_loss(step.log_prob, b.logp_old, b.advantages, clip)
    r = ratio.detach()[b.valid] if b.valid.any() else ratio.detach()
    stats = {
        "ratio_mean": r.mean().item(),
        "ratio_max_dev": (r - 1).abs().max().item(),
        "clip_frac": ((r - 1).abs() > clip).float().mean().item(),
    }
    return masked_mean(per, b.valid.float()), step, stats


def data_term(model: Backbone, b: StepBatch, cfg: LossConfig) -> Tensor:
    """Flow-matching loss on paired data: x_t = (1−t)·x0 + t·ε, ‖v_θ(x_t, t, c) − (ε − x0)‖².

    ``data_t="rollout"`` uses the rollout's own t and initial noise (release:
    ``use_rl_sigma_and_noise``); ``"random"`` draws t ~ logit-normal and fresh ε.
    """
    if cfg.data_t == "rollout":
        t, noise = b.t, b.noise0
    else:
        n = b.x0_data.shape[0]
        t = sample_training_t(n, b.generator).to(b.x0_data.device)
        noise = torch.randn(b.x0_data.shape, generator=b.generator).to(b.x0_data.device)
    v = model.velocity(interpolate(b.x0_data, noise, t), t, b.cond)
    return flow_matching_loss(v, b.x0_data, noise).mean()

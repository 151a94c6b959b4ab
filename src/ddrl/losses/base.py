"""What every algorithm's loss receives and returns, and the terms they share.

A loss sees one trained timestep of a micro-batch (``StepBatch``) and returns per-sample terms
[B]; the loop reduces each term with a whole-iteration denominator, the number of samples its
mask covers over all trained timesteps, micro-batches and ranks. So the gradient does
not depend on how the iteration is split into micro-batches, and a skipped group never changes
the weight of the others. The masks depend only on the batch, never on the model, so the loop
counts them before the first forward (``Loss.masks``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import check_choice, check_range
from ..flow import flow_matching_loss, interpolate, sample_training_t
from ..models import Cond, guided_velocity
from ..phases import phase
from ..sde import Step


@dataclass
class StepBatch:
    """One trained timestep for B trajectories (t may differ per sample)."""

    x_t: Tensor  # [B, ...] state at t
    x_next: Tensor  # [B, ...] the state the rollout sampled at t_next
    t: Tensor  # [B]
    t_next: Tensor  # [B]
    logp_old: Tensor  # [B] log-prob recorded at rollout time
    advantages: Tensor  # [B]
    valid: Tensor  # [B] bool: False for groups skipped (non-finite reward)
    cond: Cond  # batch B
    null: Cond | None  # unconditional condition for CFG (None without CFG)
    x0_data: Tensor  # [B, ...] data (model space) paired with each trajectory's prompt
    noise0: Tensor  # [B, ...] the trajectory's initial noise (x at t = 1)
    first: bool  # this is the first trained timestep of the iteration
    generator: torch.Generator  # for "random" data timesteps
    data_cond: Cond | None = None  # the data items' own condition; None = ``cond`` (paired)


@dataclass
class LossContext:
    """What a loss may need besides its own config."""

    sde: Any  # the sampler's SDE object (FlowSDE / DanceSDE): ``step`` recomputes transitions
    cfg_scale: float  # classifier-free guidance weight used by the rollout
    make_reference: Callable[[str], Any]  # kind → the Reference (see ddrl.reference)


@dataclass
class LossOut:
    """Per-sample terms [B] with their coefficients, plus per-sample statistics [B]."""

    terms: dict[str, tuple[Tensor, float]]  # name → (values [B], coefficient)
    stats: dict[str, Tensor]  # name → values [B], logged as masked mean and max


class Loss(Protocol):
    """An algorithm: ``cls(cfg: cls.Config, ctx: LossContext)``."""

    Config: type

    def masks(self, b: StepBatch) -> dict[str, Tensor]:
        """term name → bool [B]: which samples each term covers in this batch."""

    def __call__(self, denoiser: torch.nn.Module, b: StepBatch) -> LossOut: ...

    # Optional: ``active(b) -> bool``, False where ``__call__`` returns no term for ``b`` (no
    # backward), so the loop knows which backward is the step's last and synchronises there.


def clipped_policy_loss(
    logp: Tensor, logp_old: Tensor, adv: Tensor, clip: float
) -> tuple[Tensor, Tensor]:
    """PPO surrogate per sample [B]: max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(logp − logp_old)."""
    ratio = torch.exp(logp - logp_old)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)), ratio


def policy_transition(denoiser, b: StepBatch, ctx: LossContext) -> Step:
    """Recompute μ_θ, std and log p_θ(x_next | x_t) of the recorded transition."""
    # As flow_grpo trains with CFG: the unconditional branch carries no gradient.
    v = guided_velocity(denoiser, b.x_t, b.t, b.cond, b.null, ctx.cfg_scale, detach_uncond=True)
    return ctx.sde.step(b.x_t, v, b.t, b.t_next, prev_sample=b.x_next)


def policy_term(denoiser, b: StepBatch, ctx: LossContext, clip: float) -> tuple[Tensor, Step, dict]:
    """Clipped surrogate [B], the recomputed step, and ratio statistics [B]."""
    with phase("policy"):
        step = policy_transition(denoiser, b, ctx)
    per, ratio = clipped_policy_loss(step.log_prob, b.logp_old, b.advantages, clip)
    dev = (ratio.detach() - 1).abs()
    return per, step, {"ratio_dev": dev, "clipped": (dev > clip).float()}


@dataclass
class DataTermConfig:
    """The flow-matching loss on data (DDRL's forward KL, SFT)."""

    data_beta: float = 0.1  # weight of the flow-matching loss on data (forward KL to p̃_data)
    data_t: str = "rollout"  # "rollout": the rollout's t and initial noise (release
    # use_rl_sigma_and_noise); "random": logit-normal t and fresh noise
    data_on_first_only: bool = False  # computed at the first trained timestep only, still
    # averaged over items × trained timesteps like the release (so weighted data_beta / n)

    def check(self) -> None:
        check_range("loss.data_beta", self.data_beta, 0.0)
        check_choice("loss.data_t", self.data_t, ("rollout", "random"))


def data_applies(cfg: DataTermConfig, b: StepBatch) -> bool:
    """Whether the data term is computed for this batch. Its mask is every sample at every
    trained step either way: with ``data_on_first_only`` the other steps contribute 0 to the
    same denominator, which is what the release's per-timestep normalisation does."""
    return b.first or not cfg.data_on_first_only


def data_term(denoiser, b: StepBatch, cfg: DataTermConfig) -> Tensor:
    """Flow matching on paired data [B]: x_t = (1−t)·x0 + t·ε, ‖v_θ(x_t, t, c) − (ε − x0)‖².

    ``data_t="rollout"`` uses the rollout's own t and initial noise; ``"random"`` draws
    t ~ logit-normal and fresh ε. The data term is conditional (no CFG), like pretraining.
    """
    if cfg.data_t == "rollout":
        t, noise = b.t, b.noise0
    else:
        n, dev = b.x0_data.shape[0], b.x0_data.device
        t = sample_training_t(n, b.generator).to(dev)
        noise = torch.randn(b.x0_data.shape, generator=b.generator).to(dev)
    cond = b.cond if b.data_cond is None else b.data_cond
    with phase("data"):
        v = denoiser.velocity(interpolate(b.x0_data, noise, t), t, cond)
        return flow_matching_loss(v, b.x0_data, noise)

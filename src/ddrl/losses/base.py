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

from ddrl.models.base import Cond, guided_velocity
from ddrl.phases import phase
from ddrl.sde import Step


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
    x0_data: Tensor | None  # [B, ...] data (model space) paired with each trajectory's prompt
    # (None when the loss uses no data)
    noise0: Tensor  # [B, ...] the trajectory's initial noise (x at t = 1)
    first: bool  # this is the first trained timestep of the iteration
    generator: torch.Generator  # for "random" data timesteps
    data_cond: Cond | None = None  # the data items' own condition; None = ``cond`` (paired)
    position: int = 0  # which of the iteration's trained steps this is (0 = first)
    positions: int = 1  # trained steps per trajectory this iteration
    plan: int = 0  # the iteration's shared seed for per-step choices (same on every rank)


@dataclass
class LossContext:
    """What a loss may need besides its own config."""

    step: Callable[..., Step]  # the sampler's SDE step (``ddrl.sde.stepper``); with
    # prev_sample= it recomputes a recorded transition
    cfg_scale: float  # classifier-free guidance weight used by the rollout
    make_reference: Callable[[str], Any] | None = None  # kind → the Reference
    # (``ddrl.losses.reference``); given to losses with ``needs_reference`` only


@dataclass
class LossOut:
    """Per-sample terms [B] with their coefficients, plus per-sample statistics [B]."""

    terms: dict[str, tuple[Tensor, float]]  # name → (values [B], coefficient)
    stats: dict[str, Tensor]  # name → values [B], logged as masked mean and max


class Loss(Protocol):
    """An algorithm: ``cls(cfg: cls.Config, ctx: LossContext)``. It says what it needs, so the
    loop pays only for that: ``needs_data`` (batches carry x0 from the data pool; otherwise no
    pool is built or drawn from and ``StepBatch.x0_data`` is None) and ``needs_reference``
    (``ctx.make_reference`` is given). A plugin without them gets both."""

    Config: type
    needs_data: bool
    needs_reference: bool

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
    return ctx.step(b.x_t, v, b.t, b.t_next, prev_sample=b.x_next)


def surrogate(step: Step, b: StepBatch, clip: float) -> tuple[Tensor, dict]:
    """Clipped surrogate [B] of a recomputed step, and ratio statistics [B]."""
    per, ratio = clipped_policy_loss(step.log_prob, b.logp_old, b.advantages, clip)
    dev = (ratio.detach() - 1).abs()
    return per, {"ratio_dev": dev, "clipped": (dev > clip).float()}


def policy_term(denoiser, b: StepBatch, ctx: LossContext, clip: float) -> tuple[Tensor, Step, dict]:
    """Clipped surrogate [B], the recomputed step, and ratio statistics [B]."""
    with phase("policy"):
        step = policy_transition(denoiser, b, ctx)
    per, stats = surrogate(step, b, clip)
    return per, step, stats

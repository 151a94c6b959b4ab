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
    # Optional: ``kept(advantages [B], valid [B]) -> bool [B]``, the trajectories its terms
    # cover (default: the valid ones), so a split into several optimizer steps shares them out
    # evenly (``training.step.split_rows``).


def clipped_surrogate(log_ratio: Tensor, adv: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """PPO surrogate per sample [B]: max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) with ρ = exp(log_ratio)."""
    ratio = torch.exp(log_ratio)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)), ratio


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
    std = torch.broadcast_to(step.std, step.x_next.shape).flatten(1)[:, 0]
    return d * (2 * std**2 / (1 - b.t_next.to(std)) ** 2)


def policy_transition(denoiser, b: StepBatch, ctx: LossContext) -> Step:
    """Recompute μ_θ, std and log p_θ(x_next | x_t) of the recorded transition."""
    # As flow_grpo trains with CFG: the unconditional branch carries no gradient.
    v = guided_velocity(denoiser, b.x_t, b.t, b.cond, b.null, ctx.cfg_scale, detach_uncond=True)
    return ctx.step(b.x_t, v, b.t, b.t_next, prev_sample=b.x_next)


def surrogate(
    step: Step, b: StepBatch, clip: float, ratio: str = "log_density"
) -> tuple[Tensor, dict]:
    """Clipped surrogate [B] of a recomputed step, and ratio statistics [B]; ``ratio``: how
    log ρ is measured (``log_ratio``)."""
    per, rho = clipped_surrogate(log_ratio(step, b, ratio), b.advantages, clip)
    dev = (rho.detach() - 1).abs()
    return per, {"ratio_dev": dev, "clipped": (dev > clip).float()}


def policy_term(
    denoiser, b: StepBatch, ctx: LossContext, clip: float, ratio: str = "log_density"
) -> tuple[Tensor, Step, dict]:
    """Clipped surrogate [B], the recomputed step, and ratio statistics [B]."""
    with phase("policy"):
        step = policy_transition(denoiser, b, ctx)
    per, stats = surrogate(step, b, clip, ratio)
    return per, step, stats

"""What every objective and regulariser receives and returns, and the terms they share.

The loop trains one loss (``ddrl.losses.compose.Composite``: a policy objective plus its
regularisers). It sees one trained timestep of a micro-batch (``StepBatch``) and returns
per-sample terms [B]; the loop reduces each term with a whole-iteration denominator, the number
of samples its mask covers over all trained timesteps, micro-batches and ranks. So the
gradient does not depend on how the iteration is split into micro-batches, and a skipped group
never changes the weight of the others. The masks depend only on the batch, never on the
model, so the loop counts them before the first forward (``Loss.masks``).

Two kinds of objective: transition objectives (GRPO) recompute a recorded SDE step x_t →
x_next and need its log-prob; forward-process objectives (NFT, AWM) need only the trajectory's
final sample x0, noised afresh at the trained step's t (``point_noise``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ddrl.flow import interpolate
from ddrl.models.base import Cond, guide, guided_velocity
from ddrl.sde import Step


@dataclass
class StepBatch:
    """One trained timestep for B trajectories (t may differ per sample)."""

    x_t: Tensor | None  # [B, ...] state at t (None: a rollout without transitions)
    x_next: Tensor | None  # [B, ...] the state the rollout sampled at t_next (likewise)
    t: Tensor  # [B]
    t_next: Tensor  # [B]
    logp_old: Tensor | None  # [B] log-prob recorded at rollout time (likewise)
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
    x0: Tensor | None = None  # [B, ...] the trajectory's final sample (forward-process objectives)
    ids: Tensor | None = None  # [B] each row's trajectory index in the whole iteration
    slots: Tensor | None = None  # [B] each row's trained-step position (0 = first)
    mean_old: Tensor | None = None  # [B, ...] the rollout's step mean μ_old (when recorded)


@dataclass
class LossContext:
    """What a loss may need besides its own config."""

    step: Callable[..., Step]  # the sampler's SDE step (``ddrl.sde.stepper``); with
    # prev_sample= it recomputes a recorded transition
    cfg_scale: float  # classifier-free guidance weight used by the rollout
    make_reference: Callable[[str], Any] | None = None  # kind → the Reference
    # (``ddrl.losses.reference``); given to losses with ``needs_reference`` only
    model: torch.nn.Module | None = None  # the trained denoiser itself (not a DDP wrapper),
    # for parts that keep a lagging copy of its weights (``ddrl.losses.lagging``)


@dataclass
class LossOut:
    """Per-sample terms [B] with their coefficients, plus per-sample statistics [B]."""

    terms: dict[str, tuple[Tensor, float]]  # name → (values [B], coefficient)
    stats: dict[str, Tensor]  # name → values [B], logged as masked mean and max


class Loss(Protocol):
    """What the loop trains: ``Composite`` for the built-in algorithms, or a user loss class
    ``cls(cfg: cls.Config, ctx: LossContext)``. It says what it needs, so the loop pays only
    for that: ``needs_data`` (batches carry x0 from the data pool; otherwise no pool is built
    or drawn from and ``StepBatch.x0_data`` is None), ``needs_reference`` (``ctx.make_reference``
    is given) and ``transitions`` (the rollout records every SDE step and its log-prob; a
    plugin without them gets all three)."""

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
    # Optional: ``sampling()``, a context in which the rollout samples (NFT: the old policy);
    # ``end_iteration(steps: int)`` after an iteration's updates (steps: optimizer steps taken
    # in the run so far); ``state_dict()`` / ``load_state_dict(d)``: state a resume needs.


class Objective(Protocol):
    """A policy objective, ``cls(cfg, ctx)`` ("module:Class" as ``objective=``). ``transitions``:
    it recomputes the rollout's recorded SDE steps (else the rollout keeps final samples only).
    Optional as on ``Loss``: ``kept``, ``active``, ``sampling``, ``end_iteration``,
    ``state_dict`` / ``load_state_dict``."""

    Config: type
    transitions: bool

    def masks(self, b: StepBatch, keep: Tensor) -> dict[str, Tensor]:
        """Its terms' masks [B] (``keep``: the rows its terms cover, from ``kept``)."""

    def inputs(self, b: StepBatch) -> Point | None:
        """Where it evaluates the policy for ``b``, decided before any forward."""

    def __call__(
        self, denoiser, b: StepBatch, at: Point | None, extra: Extra | None = None
    ) -> ObjectiveOut:
        """Its terms at ``at``, with ``extra``'s velocity from the same forward."""


class Regulariser(Protocol):
    """A regulariser, ``cls(cfg, ctx)`` ("module:Class" in ``regularisers=``), saying what it
    needs (``needs_data``, ``needs_reference``). Optional: ``active(b)``; ``before(b, at)``, a
    value computed without gradient before the objective's forward (other weights' velocity);
    ``batched(b)``, inputs (an ``Extra`` first) the objective evaluates in its own forward; and
    the optional methods of ``Loss``."""

    Config: type
    needs_data: bool
    needs_reference: bool

    def masks(self, b: StepBatch, keep: Tensor) -> dict[str, Tensor]: ...

    def __call__(self, denoiser, b: StepBatch, fwd: Forward | None, pre, batched) -> dict:
        """name → (values [B], coefficient), from the objective's ``fwd``, its ``before``
        value and (extra velocity, its ``batched`` inputs) or None."""


@dataclass
class Point:
    """Where an objective evaluates the policy for one batch, chosen before any forward (so a
    regulariser can evaluate other weights there first, ``before``)."""

    x_t: Tensor  # [B, ...]
    t: Tensor  # [B]
    cond: Cond
    null: Cond | None  # the CFG branch (None: conditional only)
    noise: Tensor | None = None  # [B, ...] the fresh ε of x_t (forward-process objectives)


@dataclass
class Forward:
    """An objective's training forward, for the regularisers on its own samples."""

    x_t: Tensor  # [B, ...] where the velocity was evaluated
    t: Tensor  # [B]
    cond: Cond
    null: Cond | None  # the CFG branch it used (None: conditional only)
    v: Tensor  # [B, ...] its velocity, with gradient
    step: Step | None = None  # the recomputed SDE transition (transition objectives)


@dataclass
class ObjectiveOut:
    """An objective's per-sample terms [B] with coefficients, statistics [B], its forward, and
    the velocity [n, ...] of extra inputs a regulariser asked it to evaluate in that forward."""

    terms: dict[str, tuple[Tensor, float]]
    stats: dict[str, Tensor]
    forward: Forward | None
    extra_v: Tensor | None = None


@dataclass
class Extra:
    """Inputs a regulariser has evaluated inside the objective's forward (one larger batch)."""

    x: Tensor  # [n, ...]
    t: Tensor  # [n]
    cond: Cond


def point_noise(b: StepBatch) -> Tensor:
    """Fresh ε [B, ...] for each row, a function of (iteration plan, trajectory, trained-step
    position) alone, so it does not depend on micro-batches, optimizer-step splits or ranks."""
    out = []
    for i, j in zip(b.ids.tolist(), b.slots.tolist(), strict=True):
        g = torch.Generator().manual_seed((b.plan * 1_000_003 + i * 1_009 + j) % (2**63 - 1))
        out.append(torch.randn(b.x0.shape[1:], generator=g))
    return torch.stack(out).to(b.x0)


def fresh_point(b: StepBatch) -> Point:
    """The forward-process objectives' point: x_t = (1 − t)·x0 + t·ε from the trajectory's
    final sample and fresh ε (``point_noise``), conditional, no CFG."""
    eps = point_noise(b)
    return Point(interpolate(b.x0, eps, b.t.to(b.x0)), b.t, b.cond, None, eps)


def velocity_with(
    denoiser,
    x: Tensor,
    t: Tensor,
    cond: Cond,
    null: Cond | None,
    scale: float,
    extra: Extra | None = None,
) -> tuple[Tensor, Tensor | None]:
    """v_θ [B, ...] at (x, t), guided by ``scale`` when ``null`` is given (no gradient through
    the unconditional branch, as flow_grpo trains with CFG), and the conditional velocity
    [n, ...] of ``extra`` from the same forward (None without)."""
    if extra is None:
        return guided_velocity(denoiser, x, t, cond, null, scale, detach_uncond=True), None
    guided = scale != 1.0 and null is not None
    n = x.shape[0]
    xs, ts, c = ([x, x], [t, t], cond.cat(null)) if guided else ([x], [t], cond)
    v = denoiser.velocity(torch.cat([*xs, extra.x]), torch.cat([*ts, extra.t]), c.cat(extra.cond))
    v_own = guide(denoiser, v[:n], v[n : 2 * n], t, scale, True) if guided else v[:n]
    return v_own, v[len(xs) * n :]


def clipped_surrogate(log_ratio: Tensor, adv: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """PPO surrogate per sample [B]: max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) with ρ = exp(log_ratio)."""
    ratio = torch.exp(log_ratio)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)), ratio

"""DiffusionNFT: online RL on the forward process (NVlabs/DiffusionNFT
scripts/train_nft_sd3.py; docs/CONFORMANCE.md §9).

The rollout samples with the *old* policy (a lagging copy of the weights, ``LaggingWeights``,
moved towards θ after each iteration; L640, L1035-1039) and keeps only the final samples x0.
At a trained step's t (the sampling grid's, a random subset per sample: L825-833) it noises x0
afresh, x_t = (1 − t)·x0 + t·ε (L871-876), and with β = ``nft_beta`` forms the implicit
policies v⁺ = β·v_θ + (1 − β)·v_old and v⁻ = (1 + β)·v_old − β·v_θ (L975-978). Each is scored
by its x0 prediction x̂0 = x_t − t·v against x0, divided by the detached mean |x̂0 − x0|
(L981-996, "adaptive weighting"), and mixed by the optimality probability
r = clamp(clamp(A, ±c)/c/2 + 1/2, 0, 1), c = ``adv_clip_max`` (L952-970):
    L = c·[r·‖x̂0⁺ − x0‖²/w⁺ + (1 − r)·‖x̂0⁻ − x0‖²/w⁻] / β        (L998-999)
per sample. Its KL to the reference is the ``reverse_kl`` regulariser (L1000-1004).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddrl.flow import batch_view
from ddrl.losses.base import (
    Extra,
    Forward,
    LossContext,
    ObjectiveOut,
    Point,
    StepBatch,
    fresh_point,
    velocity_with,
)
from ddrl.losses.config import NFTConfig
from ddrl.losses.lagging import LaggingWeights
from ddrl.phases import phase


def optimality(adv: Tensor, clip: float) -> Tensor:
    """r [B] = clamp(clamp(A, −c, c)/c/2 + 1/2, 0, 1)."""
    return ((adv.clamp(-clip, clip) / clip) / 2 + 0.5).clamp(0, 1)


def adaptive_x0_loss(x0_hat: Tensor, x0: Tensor) -> Tensor:
    """mean‖x̂0 − x0‖² / w per sample [B], w = mean|x̂0 − x0| (detached, in float64, ≥ 1e-5)."""
    dims = tuple(range(1, x0.dim()))
    with torch.no_grad():
        w = (x0_hat.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clip(min=1e-5)
    return ((x0_hat - x0) ** 2 / w).mean(dim=dims)


def nft_loss(
    v: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    t: Tensor,
    r: Tensor,
    beta: float,
    clip: float,
) -> Tensor:
    """DiffusionNFT's per-sample loss [B] from v_θ, v_old [B, ...] at x_t, t [B]."""
    tb = batch_view(t, x_t)
    pos = beta * v + (1 - beta) * v_old
    neg = (1 + beta) * v_old - beta * v
    lp = adaptive_x0_loss(x_t - tb * pos, x0)
    ln = adaptive_x0_loss(x_t - tb * neg, x0)
    return (r * lp / beta + (1 - r) * ln / beta) * clip


class NFT:
    """The NFT objective; the rollout samples with its old policy (``sampling``)."""

    Config = NFTConfig
    transitions = False

    def __init__(self, cfg: NFTConfig, ctx: LossContext):
        self.cfg, self.ctx = cfg, ctx
        self.old = LaggingWeights(ctx.model, cfg.old_flat, cfg.old_rate, cfg.old_cap)

    def sampling(self):
        return self.old.applied()

    def end_iteration(self, steps: int) -> None:
        self.old.update(steps)

    def state_dict(self) -> dict[str, Tensor]:
        return self.old.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.old.load_state_dict(state)

    def masks(self, b: StepBatch, keep: Tensor) -> dict[str, Tensor]:
        return {"policy": keep}

    def inputs(self, b: StepBatch) -> Point:
        return fresh_point(b)  # conditional, no CFG (CFG-free training)

    def __call__(self, denoiser, b: StepBatch, at: Point, extra: Extra | None = None):
        x_t, t, cond = at.x_t, at.t, at.cond
        with phase("reference"):  # the old policy's velocity, before the forward that trains
            v_old = self.old.velocity(x_t, t, cond)
        with phase("policy"):
            v, v_extra = velocity_with(denoiser, x_t, t, cond, None, 1.0, extra)
        c = self.cfg
        per = nft_loss(
            v,
            v_old,
            x_t,
            b.x0,
            t,
            optimality(b.advantages, c.adv_clip_max),
            c.nft_beta,
            c.adv_clip_max,
        )
        stats = {"old_deviation": (v.detach() - v_old).pow(2).flatten(1).mean(1)}
        return ObjectiveOut({"policy": (per, 1.0)}, stats, Forward(x_t, t, cond, None, v), v_extra)

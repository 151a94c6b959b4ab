"""Regularisers towards other weights, on the objective's own samples, in its peers' units.

``reverse_kl`` (to the start model, ``ddrl.losses.reference``):
- on SDE transitions (GRPO), flow_grpo's KL line (scripts/train_sd3.py, docs/CONFORMANCE.md)
      mean_dims(‖μ_θ − μ_ref‖²) / (2·σ_t²),  σ_t = a·sqrt(t/(1−t)) (its std_dev_t),
  i.e. the exact per-step Gaussian KL (whose variance is σ_t²·|dt|) multiplied by |dt|; so a
  β copied from flow_grpo's configs (0.04 OCR, 0.01 PickScore) means the same here;
- on the forward process (NFT, AWM), DiffusionNFT's and AWM's mean_dims(‖v_θ − v_ref‖²) at
  the objective's x_t (train_nft_sd3.py L1000-1004, train_sd3_awm.py L1336-1340): Girsanov's
  integrand of the path KL up to a time weight, in their units (their β: 1e-4 to 3e-3).
``lagging_kl``: AWM's "KL-EMA", mean_dims(‖v_θ − v_lag‖²) to a lagging copy of the weights
(``ddrl.losses.lagging``; train_sd3_awm.py L1276-1280, L1409-1419).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddrl.losses.base import Forward, LossContext, Point, StepBatch
from ddrl.losses.config import LaggingKLConfig, ReverseKLConfig
from ddrl.losses.lagging import LaggingWeights
from ddrl.phases import phase


def flow_grpo_kl(mean: Tensor, mean_ref: Tensor, sigma: Tensor) -> Tensor:
    """Per-sample KL term [B]: mean over dims of (μ_θ − μ_ref)² / (2·σ_t²)."""
    return ((mean - mean_ref) ** 2 / (2 * sigma**2)).flatten(1).mean(1)


def velocity_kl(v: Tensor, v_other: Tensor) -> Tensor:
    """Per-sample [B]: mean over dims of (v_θ − v_other)²."""
    return (v - v_other).pow(2).flatten(1).mean(1)


class ReverseKL:
    """beta_kl × the KL to the start model, on the samples the objective's terms cover."""

    Config = ReverseKLConfig
    needs_data, needs_reference = False, True

    def __init__(self, cfg: ReverseKLConfig, ctx: LossContext):
        self.cfg, self.ctx = cfg, ctx
        self.ref = ctx.make_reference(cfg.reference) if cfg.beta_kl > 0 else None

    def masks(self, b: StepBatch, keep: Tensor) -> dict[str, Tensor]:
        return {"kl": keep}

    def active(self, b: StepBatch) -> bool:
        return self.ref is not None

    def __call__(self, denoiser, b: StepBatch, fwd: Forward, pre, batched) -> dict:
        c = self.ctx
        with torch.no_grad(), phase("reference"):
            scale = c.cfg_scale if fwd.null is not None else 1.0
            v_ref = self.ref.velocity(fwd.x_t, fwd.t, fwd.cond, fwd.null, scale)
            if fwd.step is not None:
                ref = c.step(b.x_t, v_ref, b.t, b.t_next, prev_sample=b.x_next)
        if fwd.step is not None:
            kl = flow_grpo_kl(fwd.step.mean, ref.mean, fwd.step.sigma)
        else:
            kl = velocity_kl(fwd.v, v_ref)
        return {"kl": (kl, self.cfg.beta_kl)}


class LaggingKL:
    """lag_beta × mean‖v_θ − v_lag‖² at the objective's points; the lagging weights move
    towards θ after each iteration with d = min(lag_rate·s, lag_cap)."""

    Config = LaggingKLConfig
    needs_data, needs_reference = False, False

    def __init__(self, cfg: LaggingKLConfig, ctx: LossContext):
        self.cfg, self.ctx = cfg, ctx
        self.lag = LaggingWeights(ctx.model, 0, cfg.lag_rate, cfg.lag_cap)

    def masks(self, b: StepBatch, keep: Tensor) -> dict[str, Tensor]:
        return {"lag_kl": keep}

    def active(self, b: StepBatch) -> bool:
        return self.cfg.lag_beta > 0

    def before(self, b: StepBatch, at: Point) -> Tensor:
        """v_lag at the objective's point, before its forward (the swap must not touch
        weights a graph holds)."""
        with phase("reference"):
            return self.lag.velocity(at.x_t, at.t, at.cond, at.null, self.ctx.cfg_scale)

    def __call__(self, denoiser, b: StepBatch, fwd: Forward, v_lag: Tensor, batched) -> dict:
        return {"lag_kl": (velocity_kl(fwd.v, v_lag), self.cfg.lag_beta)}

    def end_iteration(self, steps: int) -> None:
        self.lag.update(steps)

    def state_dict(self) -> dict[str, Tensor]:
        return self.lag.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.lag.load_state_dict(state)

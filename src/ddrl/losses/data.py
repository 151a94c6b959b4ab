"""The flow-matching loss on data (DDRL's forward KL, SFT) and the ways to compute it.

The release (cosmos-rl) computes it at every trained timestep, paired with the rollout's own t
and initial noise. Cheaper options that keep its meaning (costs and results: docs/DECISIONS.md):
- ``data_on_first_only``: once per item, at the first trained step (weighted data_beta / n);
- ``data_steps`` < 1: on a random subset of the trained steps, the same on every rank, averaged
  over the chosen steps only: an unbiased estimate of the release's per-step average;
- ``data_batched``: in the same forward as the policy term (one larger batch; the same numbers
  to float rounding), which is cheaper per sample where a larger batch is (GPUs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddrl.flow import flow_matching_loss, interpolate, sample_training_t
from ddrl.losses.base import LossContext, StepBatch, surrogate
from ddrl.losses.config import DataTermConfig
from ddrl.models.base import Cond, cfg_mix
from ddrl.phases import phase


def chosen_positions(cfg: DataTermConfig, b: StepBatch) -> Tensor:
    """The trained-step positions [k] that carry the data term this iteration: k =
    max(1, round(data_steps · n)) of the n positions, drawn from the iteration's shared plan
    seed (the same on every rank)."""
    n = b.positions
    k = max(1, round(cfg.data_steps * n))
    g = torch.Generator().manual_seed(b.plan)
    return torch.randperm(n, generator=g)[:k]


def data_applies(cfg: DataTermConfig, b: StepBatch) -> bool:
    """Whether the data term is computed for this batch."""
    if cfg.data_on_first_only:
        return b.first
    if cfg.data_steps < 1:
        return bool((chosen_positions(cfg, b) == b.position).any())
    return True


def data_mask(cfg: DataTermConfig, b: StepBatch) -> Tensor:
    """Samples [B] the data term is averaged over. Every sample at every trained step (with
    ``data_on_first_only`` the other steps contribute 0 to that denominator, as the release's
    per-timestep normalisation does); with ``data_steps`` < 1, the chosen steps only."""
    on = not (cfg.data_steps < 1) or data_applies(cfg, b)
    return torch.full_like(b.valid, on)


def data_inputs(b: StepBatch, cfg: DataTermConfig) -> tuple[Tensor, Tensor, Tensor, Cond]:
    """(x_t [B, ...], t [B], ε [B, ...], condition) of the data term: x_t = (1−t)·x0 + t·ε with
    the rollout's t and initial noise (``data_t="rollout"``) or logit-normal t and fresh ε."""
    if cfg.data_t == "rollout":
        t, noise = b.t, b.noise0
    else:
        n, dev = b.x0_data.shape[0], b.x0_data.device
        t = sample_training_t(n, b.generator).to(dev)
        noise = torch.randn(b.x0_data.shape, generator=b.generator).to(dev)
    cond = b.cond if b.data_cond is None else b.data_cond
    return interpolate(b.x0_data, noise, t), t, noise, cond


def data_term(denoiser, b: StepBatch, cfg: DataTermConfig) -> Tensor:
    """Flow matching on paired data [B]: ‖v_θ(x_t, t, c) − (ε − x0)‖² (conditional, no CFG,
    like pretraining)."""
    x_t, t, noise, cond = data_inputs(b, cfg)
    with phase("data"):
        return flow_matching_loss(denoiser.velocity(x_t, t, cond), b.x0_data, noise)


def policy_and_data(denoiser, b: StepBatch, ctx: LossContext, cfg: DataTermConfig, clip: float):
    """``policy_term`` and ``data_term`` from one forward over [policy (cond, null), data]:
    (clipped surrogate [B], recomputed step, ratio statistics, data loss [B])."""
    x_d, t_d, noise, cond_d = data_inputs(b, cfg)
    guided = ctx.cfg_scale != 1.0 and b.null is not None
    xs = [b.x_t, b.x_t, x_d] if guided else [b.x_t, x_d]
    ts = [b.t, b.t, t_d] if guided else [b.t, t_d]
    cond = b.cond.cat(b.null).cat(cond_d) if guided else b.cond.cat(cond_d)
    n = b.x_t.shape[0]
    with phase("policy"):
        v = denoiser.velocity(torch.cat(xs), torch.cat(ts), cond)
        # As flow_grpo: the unconditional branch carries no gradient.
        v_pol = cfg_mix(v[:n], v[n : 2 * n], ctx.cfg_scale, True) if guided else v[:n]
        step = ctx.step(b.x_t, v_pol, b.t, b.t_next, prev_sample=b.x_next)
    per, stats = surrogate(step, b, clip)
    return per, step, stats, flow_matching_loss(v[-x_d.shape[0] :], b.x0_data, noise)

"""The data regulariser: the flow-matching loss on data (DDRL's forward KL, SFT) and the ways
to compute it.

The release (cosmos-rl) computes it at every trained timestep, paired with the rollout's own t
and initial noise. Cheaper options that keep its meaning (costs and results: docs/DECISIONS.md):
- ``data_on_first_only``: once per item, at the first trained step (weighted data_beta / n);
- ``data_steps`` < 1: on a random subset of the trained steps, the same on every rank, averaged
  over the chosen steps only: an unbiased estimate of the release's per-step average;
- ``data_batched``: in the same forward as the objective's (one larger batch; the same numbers
  to float rounding), which is cheaper per sample where a larger batch is (GPUs).
The release's own choices are options too (docs/CONFORMANCE.md §5): ``data_weight = "edm"`` (its
EDM-weighted x0 loss), ``data_caption_dropout`` (its text dropout) and ``data_t =
"edm_lognormal"`` (its pretraining σ draw). Each draws from ``b.generator`` only when it is on.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddrl.flow import flow_matching_loss, interpolate, sample_training_t
from ddrl.losses.base import Extra, LossContext, StepBatch
from ddrl.losses.config import DataTermConfig
from ddrl.models.base import Cond
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


# The release's pretraining σ draw (cosmos-rl policy/config/wfm/__init__.py L92-96: p_mean ln 4,
# p_std 1.2; L228-230: adjust_video_noise, × sqrt(state_t); Vid2VidModel's default
# high_sigma_strategy "LOGUNIFORM200_100000" at ratio 0.05, L242-243, v2v_model.py L95-109).
EDM_P_MEAN, EDM_P_STD = math.log(4.0), 1.2
EDM_HIGH_RATIO, EDM_HIGH_RANGE = 0.05, (200.0, 100000.0)


def edm_lognormal_t(n: int, frames: int, generator: torch.Generator) -> Tensor:
    """Rectified-flow t [n] = σ/(1 + σ) of the release's data σ (draw_training_sigma_and_epsilon,
    t2v_model.py L825-838): log σ ~ N(ln 4, 1.2²), × sqrt(frames) for a video of ``frames`` latent
    frames (0 = an image: × 1); for videos a fraction 0.05 is replaced by log-uniform σ on
    [200, 1e5] (v2v_model.py L95-109)."""
    sigma = torch.exp(
        EDM_P_MEAN + EDM_P_STD * torch.randn(n, generator=generator, dtype=torch.float64)
    )
    if frames > 0:
        sigma = sigma * math.sqrt(frames)
        high = torch.rand(n, generator=generator) < EDM_HIGH_RATIO
        lo, hi = (math.log(v) for v in EDM_HIGH_RANGE)
        log_high = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        sigma = torch.where(high, log_high.exp(), sigma)
    return (sigma / (1 + sigma)).float()


def drop_condition(cond: Cond, drop: Tensor) -> Cond:
    """``cond`` with the rows ``drop`` [B] bool zeroed in every batched tensor but conditional
    frames ("given") and masks, as the release's text dropout multiplies the embedding by a
    per-item Bernoulli keep mask and leaves masks alone (emb_models.py L84-97, L203-211)."""

    def zeroed(k: str, v: Tensor) -> Tensor:
        if k == "given" or "mask" in k:
            return v
        rows = drop.to(v.device).view(-1, *([1] * (v.dim() - 1)))
        return torch.where(rows, torch.zeros_like(v), v)

    return Cond({k: zeroed(k, v) for k, v in cond.batched.items()}, cond.shared)


def data_inputs(b: StepBatch, cfg: DataTermConfig) -> tuple[Tensor, Tensor, Tensor, Cond]:
    """(x_t [B, ...], t [B], ε [B, ...], condition) of the data term: x_t = (1−t)·x0 + t·ε with
    the rollout's t and initial noise (``data_t="rollout"``) or a drawn t (logit-normal, or the
    release's σ draw) and fresh ε; with ``data_caption_dropout`` p each item's condition is
    zeroed with probability p (drawn after t and ε)."""
    x0 = b.x0_data
    if cfg.data_t == "rollout":
        t, noise = b.t, b.noise0
    else:
        n, dev = x0.shape[0], x0.device
        if cfg.data_t == "edm_lognormal":
            t = edm_lognormal_t(n, x0.shape[2] if x0.dim() == 5 else 0, b.generator).to(dev)
        else:
            t = sample_training_t(n, b.generator).to(dev)
        noise = torch.randn(x0.shape, generator=b.generator).to(dev)
    cond = b.cond if b.data_cond is None else b.data_cond
    if cfg.data_caption_dropout > 0:
        cond = drop_condition(
            cond, torch.rand(x0.shape[0], generator=b.generator) < cfg.data_caption_dropout
        )
    return interpolate(x0, noise, t), t, noise, cond


def data_loss(v: Tensor, b: StepBatch, noise: Tensor, t: Tensor, cfg: DataTermConfig) -> Tensor:
    """The data term [B] from the predicted velocity v [B, ...]: ‖v − (ε − x0)‖² averaged over
    dimensions, × (t² + (1 − t)²) with ``data_weight="edm"``: the release's x0 error weighted by
    (σ² + σ_data²)/(σ·σ_data)², σ_data = 1, σ = t/(1 − t) (t2v_model.py L840-848, L1384-1394)."""
    fm = flow_matching_loss(v, b.x0_data, noise)
    if cfg.data_weight == "edm":
        t = t.to(fm)
        fm = fm * (t**2 + (1 - t) ** 2)
    return fm


def data_term(denoiser, b: StepBatch, cfg: DataTermConfig) -> Tensor:
    """Flow matching on paired data [B]: ‖v_θ(x_t, t, c) − (ε − x0)‖² (conditional, no CFG,
    like pretraining), weighted as ``data_loss``."""
    x_t, t, noise, cond = data_inputs(b, cfg)
    with phase("data"):
        return data_loss(denoiser.velocity(x_t, t, cond), b, noise, t, cfg)


class DataTerm:
    """DDRL's regulariser: data_beta × the flow-matching loss on data (the forward KL to
    p̃_data), on any objective; with ``data_batched`` it is evaluated in the objective's own
    forward (``batched``)."""

    Config = DataTermConfig
    needs_data, needs_reference = True, False

    def __init__(self, cfg: DataTermConfig, ctx: LossContext):
        self.cfg = cfg

    def masks(self, b: StepBatch, keep: Tensor) -> dict[str, Tensor]:
        return {"data": data_mask(self.cfg, b)}

    def active(self, b: StepBatch) -> bool:
        return self.cfg.data_beta > 0 and data_applies(self.cfg, b)

    def batched(self, b: StepBatch) -> tuple[Extra, Tensor, Tensor] | None:
        """With ``data_batched``: the data inputs for the objective's forward, and (t, ε)."""
        if not self.cfg.data_batched:
            return None
        x_t, t, noise, cond = data_inputs(b, self.cfg)
        return Extra(x_t, t, cond), t, noise

    def __call__(self, denoiser, b: StepBatch, fwd, pre, batched) -> dict:
        if batched is not None:
            extra_v, (_, t, noise) = batched
            fm = data_loss(extra_v, b, noise, t, self.cfg)
        else:
            fm = data_term(denoiser, b, self.cfg)
        return {"data": (fm, self.cfg.data_beta)}

"""One reverse-time step of the sampler, each a Gaussian transition with an exact log-prob.

Every step maps x_t → x_next = μ + std·z with z ~ N(0, I), and returns (x_next, μ, std, log p).
dt = t_next − t < 0 (integration runs from noise t = 1 to data t = 0).

Log-prob scale (a deliberate choice): ``log_prob`` is the exact Gaussian log-density of x_next
*divided by the number of dimensions D* (i.e. the mean over dimensions of the per-element
log-densities). flow_grpo does the same; it keeps the policy-gradient term's magnitude
independent of the resolution, so `data_beta` / `beta_kl` transfer between image sizes. The
ratio exp(logp − logp_old) is then the true likelihood ratio raised to 1/D; with one update per
rollout batch it is ≡ 1 and the gradient is REINFORCE up to the constant 1/D. ``reduce="sum"``
gives the exact log-density. (cosmos-rl's DDRL release uses an unnormalised squared error; we
do not.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .flow import _bcast


@dataclass
class Step:
    """Output of one sampler step; all tensors [B, ...] except log_prob [B]."""

    x_next: Tensor
    mean: Tensor
    std: Tensor  # broadcastable to x_next ([B, 1, ...]); 0 for the ODE step
    log_prob: Tensor


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduce: str = "mean") -> Tensor:
    """log N(x; μ, std²) per element, reduced over all but the batch dim: [B]."""
    var = std.pow(2)
    lp = -((x - mean) ** 2) / (2 * var) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    lp = lp.flatten(1)
    return lp.mean(1) if reduce == "mean" else lp.sum(1)


def _finish(
    x: Tensor,
    mean: Tensor,
    std: Tensor,
    noise: Tensor | None,
    prev_sample: Tensor | None,
    reduce: str,
) -> Step:
    if prev_sample is None:
        prev_sample = mean + std * noise
    return Step(prev_sample, mean, std, gaussian_log_prob(prev_sample, mean, std, reduce))


def ode_step(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor) -> Step:
    """Euler step x_next = x + v·dt (deterministic; log_prob is 0 by convention)."""
    dt = _bcast(t_next - t, x)
    x_next = x + v * dt
    return Step(x_next, x_next, torch.zeros_like(dt), torch.zeros(x.shape[0], device=x.device))


def flow_sde_step(
    x: Tensor,
    v: Tensor,
    t: Tensor,
    t_next: Tensor,
    noise_level: float = 0.7,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    reduce: str = "mean",
) -> Step:
    """Flow-GRPO's SDE step (same marginals as the ODE).

    σ_t = a·sqrt(t / (1 − t)) (at t = 1 the first grid point below 1 is used),
    μ = x + [v + σ_t²/(2t)·(x + (1 − t)·v)]·dt,  std = σ_t·sqrt(−dt).
    Pass ``noise`` to sample or ``prev_sample`` to score a given transition.
    """
    tb, dt = _bcast(t, x), _bcast(t_next - t, x)
    # σ_t diverges at t = 1; flow_grpo evaluates it at the next grid point there.
    t_sig = torch.where(tb >= 1.0, _bcast(t_next, x), tb).clamp(min=1e-6, max=1 - 1e-6)
    sigma = noise_level * torch.sqrt(t_sig / (1 - t_sig))
    tt = tb.clamp(min=1e-6)
    mean = x + (v + sigma**2 / (2 * tt) * (x + (1 - tb) * v)) * dt
    std = sigma * torch.sqrt(-dt)
    return _finish(x, mean, std, noise, prev_sample, reduce)


def dance_sde_step(
    x: Tensor,
    v: Tensor,
    t: Tensor,
    t_next: Tensor,
    eta: float = 0.25,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    reduce: str = "mean",
) -> Step:
    """DanceGRPO's SDE step.

    x̂0 = x − t·v,  score = −(x − (1 − t)·x̂0)/t²,  μ = x + dt·v − ½η²·score·dt,
    std = η·sqrt(−dt).
    """
    tb, dt = _bcast(t, x), _bcast(t_next - t, x)
    tt = tb.clamp(min=1e-6)
    x0_hat = x - tb * v
    score = -(x - (1 - tb) * x0_hat) / tt**2
    mean = x + dt * v - 0.5 * eta**2 * score * dt
    std = eta * torch.sqrt(-dt) * torch.ones_like(tb)
    return _finish(x, mean, std, noise, prev_sample, reduce)


SDE_STEPS = {"flow": flow_sde_step, "dance": dance_sde_step}


def sde_step(
    kind: str,
    x: Tensor,
    v: Tensor,
    t: Tensor,
    t_next: Tensor,
    noise_level: float,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    reduce: str = "mean",
) -> Step:
    """Dispatch to the named stochastic step; ``noise_level`` is a (flow) or η (dance)."""
    fn = SDE_STEPS[kind]
    kw = {"noise_level": noise_level} if kind == "flow" else {"eta": noise_level}
    return fn(x, v, t, t_next, noise=noise, prev_sample=prev_sample, reduce=reduce, **kw)

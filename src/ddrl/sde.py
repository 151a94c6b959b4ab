"""One reverse-time step of the sampler, each a Gaussian transition with an exact log-prob.

Every step maps x_t → x_next = μ + std·z with z ~ N(0, I), and returns (x_next, μ, std, log p,
σ). dt = t_next − t < 0 (integration runs from noise t = 1 to data t = 0).

Log-prob scale (a deliberate choice): ``log_prob`` is the exact Gaussian log-density of x_next
*divided by the number of dimensions D* (the mean over dimensions of the per-element
log-densities). flow_grpo and DanceGRPO do the same (docs/CONFORMANCE.md); it keeps the
policy term's magnitude independent of the resolution. The ratio exp(logp − logp_old) is then
the true likelihood ratio raised to 1/D; with one update per rollout batch it is ≡ 1 and the
gradient is REINFORCE up to the constant 1/D. ``reduce="sum"`` gives the exact log-density.
(cosmos-rl's DDRL release uses an unnormalised squared error in EDM space; the loss option
``loss.ratio = "edm_squared_error"`` rescales this log-ratio to it exactly, ``ddrl.losses.base``.)

The SDE kinds are small config objects (``FlowSDE(noise_level)``, ``DanceSDE(eta)``,
``CPSSDE(eta)``, ``ODESampler()``, ``ddrl.config.core``); ``stepper`` turns one into its step
function. CPS keeps its code's unnormalised log-prob (``cps_step``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ddrl.config.core import CPSSDE, DanceSDE, FlowSDE, ODESampler
from ddrl.flow import batch_view


@dataclass
class Step:
    """Output of one sampler step; all tensors [B, ...] except log_prob [B]."""

    x_next: Tensor
    mean: Tensor
    std: Tensor  # transition std, broadcastable to x_next ([B, 1, ...]); 0 for the ODE step
    log_prob: Tensor
    sigma: Tensor  # diffusion coefficient σ_t ([B, 1, ...]): std = σ_t·sqrt(−dt)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduce: str = "mean") -> Tensor:
    """log N(x; μ, std²) per element, reduced over all but the batch dim: [B]."""
    var = std.pow(2)
    lp = -((x - mean) ** 2) / (2 * var) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    lp = lp.flatten(1)
    return lp.mean(1) if reduce == "mean" else lp.sum(1)


def _finish(
    mean: Tensor,
    std: Tensor,
    sigma: Tensor,
    noise: Tensor | None,
    prev_sample: Tensor | None,
    reduce: str,
) -> Step:
    if prev_sample is None:
        prev_sample = mean + std * noise
    lp = gaussian_log_prob(prev_sample.detach(), mean, std, reduce)
    return Step(prev_sample, mean, std, lp, sigma)


def ode_step(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor) -> Step:
    """Euler step x_next = x + v·dt (deterministic; log_prob is 0 by convention)."""
    dt = batch_view(t_next - t, x)
    x_next = x + v * dt
    zero = torch.zeros_like(dt)
    return Step(x_next, x_next, zero, torch.zeros(x.shape[0], device=x.device), zero)


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
    """Flow-GRPO's SDE step (same marginals as the ODE), as flow_grpo's sde_step_with_logprob.

    σ_t = a·sqrt(t / (1 − t')) with t' = t except at t = 1, where t' is the next grid point
    (the numerator keeps t = 1), μ = x + [v + σ_t²/(2t)·(x + (1 − t)·v)]·dt,
    std = σ_t·sqrt(−dt). Pass ``noise`` to sample or ``prev_sample`` to score a transition.
    """
    tb, dt = batch_view(t, x), batch_view(t_next - t, x)
    # σ_t diverges at t = 1; flow_grpo substitutes the next grid point in the denominator only.
    t_den = torch.where(tb >= 1.0, batch_view(t_next, x), tb).clamp(max=1 - 1e-6)
    sigma = noise_level * torch.sqrt(tb / (1 - t_den))
    tt = tb.clamp(min=1e-6)
    mean = x + (v + sigma**2 / (2 * tt) * (x + (1 - tb) * v)) * dt
    std = sigma * torch.sqrt(-dt)
    return _finish(mean, std, sigma, noise, prev_sample, reduce)


def dance_sde_step(
    x: Tensor,
    v: Tensor,
    t: Tensor,
    t_next: Tensor,
    eta: float = 0.3,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    reduce: str = "mean",
) -> Step:
    """DanceGRPO's SDE step (its ``flux_step`` with sde_solver on).

    x̂0 = x − t·v,  score = −(x − (1 − t)·x̂0)/t²,  μ = x + dt·v − ½η²·score·dt,
    std = η·sqrt(−dt).
    """
    tb, dt = batch_view(t, x), batch_view(t_next - t, x)
    tt = tb.clamp(min=1e-6)
    x0_hat = x - tb * v
    score = -(x - (1 - tb) * x0_hat) / tt**2
    mean = x + dt * v - 0.5 * eta**2 * score * dt
    sigma = eta * torch.ones_like(tb)
    return _finish(mean, sigma * torch.sqrt(-dt), sigma, noise, prev_sample, reduce)


def cps_step(
    x: Tensor,
    v: Tensor,
    t: Tensor,
    t_next: Tensor,
    eta: float = 0.8,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> Step:
    """Coefficients-preserving sampling (FlowCPS sd3_sde_with_logprob.py L52-70; flow_grpo's
    ``sde_type = "cps"``).

    x̂0 = x − t·v, ε̂ = x + (1 − t)·v, σ_n = t'·sin(η·π/2), μ = (1 − t')·x̂0 + sqrt(t'² − σ_n²)·ε̂,
    x' = μ + σ_n·z: the noise coefficient stays t'. Its log_prob is its code's, not a density:
    −mean_dims (x' − μ)², "all constants removed" (so the ratio and the clip live on that
    scale). ``sigma`` is 1/√2, so the reverse-KL regulariser's mean(Δμ²)/(2σ²) is that code's
    KL, mean(Δμ²) (it dropped the 1/(2σ²) with the constants, FlowCPS train_sd3.py L900).
    """
    tb, tn = batch_view(t, x), batch_view(t_next, x)
    x0_hat, eps_hat = x - tb * v, x + (1 - tb) * v
    std = tn * math.sin(eta * math.pi / 2)
    mean = (1 - tn) * x0_hat + torch.sqrt((tn**2 - std**2).clamp(min=0)) * eps_hat
    if prev_sample is None:
        prev_sample = mean + std * noise
    lp = -((prev_sample.detach() - mean) ** 2).flatten(1).mean(1)
    return Step(prev_sample, mean, std, lp, torch.full_like(tb, math.sqrt(0.5)))


def ode_transition(x, v, t, t_next, noise=None, prev_sample=None) -> Step:
    """The Euler ODE step with the stochastic steps' signature (the noise is not used)."""
    return ode_step(x, v, t, t_next)


STEPS = {  # sampler.sde.kind → its step with the config's parameter bound
    "flow": lambda c: functools.partial(flow_sde_step, noise_level=c.noise_level),
    "dance": lambda c: functools.partial(dance_sde_step, eta=c.eta),
    "cps": lambda c: functools.partial(cps_step, eta=c.eta),
    "ode": lambda c: ode_transition,
}


def stepper(sde: FlowSDE | DanceSDE | CPSSDE | ODESampler) -> Callable[..., Step]:
    """The step function of a ``sampler.sde`` config: ``step(x, v, t, t_next, noise=None,
    prev_sample=None) -> Step``. A plugin SDE (``sampler.sde.kind = "module:Class"``) brings its
    own ``step`` method."""
    own = getattr(sde, "step", None)
    return own if callable(own) else STEPS[sde.kind](sde)

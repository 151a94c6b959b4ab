"""Rectified-flow path (t = σ ∈ [0, 1]; t = 0 is data, t = 1 is noise).

x_t = (1 − t)·x0 + t·ε,  target velocity v = dx_t/dt = ε − x0.
Sampling integrates from t = 1 to t = 0, so every step has dt = t_next − t < 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def batch_view(t: Tensor, x: Tensor) -> Tensor:
    """Reshape t [B] (or scalar) to broadcast against x [B, ...]."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() > 0 else t


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 − t)·x0 + t·ε.  x0, noise: [B, ...]; t: [B] or scalar."""
    t = batch_view(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Flow-matching regression target v = ε − x0, [B, ...]."""
    return noise - x0


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift: t' = s·t / (1 + (s − 1)·t); s = 1 is the identity."""
    return shift * t / (1 + (shift - 1) * t)


def linear_grid(num_steps: int, shift: float = 1.0) -> Tensor:
    """DanceGRPO's grid [N + 1]: shift(linspace(1, 0, N + 1)); every step has the same size
    before the shift, so the last step lands on 0 from shift(1/N)."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_timesteps(t, shift).float()


def scheduler_grid(
    num_steps: int, shift: float = 0.0, mu: float | None = None, scheduler=None
) -> Tensor:
    """The grid [N + 1] (1 → 0) of a diffusers scheduler: its ``sigmas`` after
    ``set_timesteps(N)``, from a copy built from its config (the instance is never modified).

    ``scheduler``: a real model's own (FlowMatchEulerDiscrete, UniPC, ...); None = diffusers'
    ``FlowMatchEulerDiscreteScheduler()`` (SD3/FLUX pipelines, flow_grpo): shift(linspace(1,
    σ_min, N)) then 0 with σ_min = shift(1/1000), so the last point is shifted twice (0.0089
    at shift 3, N = 10) and the last step is tiny. ``shift`` > 0 replaces the scheduler's shift
    (``shift``, or ``flow_shift`` for UniPC; static, dynamic shifting off). ``mu``: FLUX's
    resolution-dependent exponential shift on sigmas = linspace(1, 1/N, N), as ``FluxPipeline``
    passes them."""
    import numpy as np  # diffusers takes ~1.5 s to import: only grids need it
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler()
    over = {}
    if shift > 0:
        over["flow_shift" if "flow_shift" in base.config else "shift"] = shift
        if base.config.get("use_dynamic_shifting"):
            over["use_dynamic_shifting"] = False
    elif mu is not None and scheduler is None:
        over["use_dynamic_shifting"] = True
    sched = type(base).from_config(base.config, **over)
    if mu is not None:
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)
    else:
        sched.set_timesteps(num_steps)
    return sched.sigmas.float().cpu()


def flow_matching_loss(v_pred: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """Per-sample loss ‖v_θ − (ε − x0)‖² averaged over dimensions: [B]."""
    return (v_pred - velocity_target(x0, noise)).pow(2).flatten(1).mean(1)


def sample_training_t(
    n: int, generator: torch.Generator | None = None, kind: str = "logit_normal", device=None
) -> Tensor:
    """Training timesteps [n]: SD3's logit-normal (m=0, s=1) or uniform on (0, 1)."""
    if kind == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    else:
        t = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    return t.clamp(1e-4, 1 - 1e-4)

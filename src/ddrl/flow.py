"""Rectified-flow path (t = σ ∈ [0, 1]; t = 0 is data, t = 1 is noise).

x_t = (1 − t)·x0 + t·ε,  target velocity v = dx_t/dt = ε − x0.
Sampling integrates from t = 1 to t = 0, so every step has dt = t_next − t < 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """Reshape t [B] (or scalar) to broadcast against x [B, ...]."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() > 0 else t


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 − t)·x0 + t·ε.  x0, noise: [B, ...]; t: [B] or scalar."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Flow-matching regression target v = ε − x0, [B, ...]."""
    return noise - x0


def predict_x0(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """x̂0 = x_t − t·v (exact on the straight path)."""
    return x_t - _bcast(t, x_t) * v


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift: t' = s·t / (1 + (s − 1)·t); s = 1 is the identity."""
    return shift * t / (1 + (shift - 1) * t)


def timestep_grid(num_steps: int, shift: float = 1.0, t_max: float = 1.0) -> Tensor:
    """Sampling grid [num_steps + 1] from t_max down to 0, uniform before the shift."""
    t = torch.linspace(t_max, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_timesteps(t, shift).float()


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

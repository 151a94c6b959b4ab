"""Evaluation metrics: torch tensors in, Python floats out.

* :func:`pairwise_diversity` — mean L2 distance between samples generated for the same
  condition (prompt / class); collapsing to one mode per condition drives it to 0.
* :func:`frechet_distance` — Fréchet distance between Gaussians fitted to two feature sets
  (FID when the features come from Inception; here any feature extractor).
* :func:`out_of_range_rate` — fraction of raw model outputs well outside the valid pixel range,
  a symptom of a policy pushing pixels past what the data ever contained.
* :func:`saturation_rate` — fraction of (clamped) pixels at the white end, "blown-out" images.
* :func:`heldout_diffusion_loss` — the rectified-flow training loss on held-out data at fixed
  noise levels and fixed noise; a rise over the base model means the fine-tuned policy has
  drifted off the data distribution (an early warning of reward hacking).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

from ddrl.errors import DDRLError
from ddrl.flow import interpolate, velocity_target

__all__ = [
    "default_t_grid",
    "frechet_distance",
    "heldout_diffusion_loss",
    "out_of_range_rate",
    "pairwise_diversity",
    "saturation_rate",
]


def pairwise_diversity(x: Tensor, groups: Tensor) -> float:
    """Mean within-group pairwise L2 distance.

    x: [N, ...] samples (flattened per sample); groups: LongTensor [N] group id per sample.
    For every group g with n_g ≥ 2 members, d_g = mean_{i<j in g} ‖x_i − x_j‖₂;
    returns mean_g d_g (groups weighted equally). Raises DDRLError (a ValueError) if no group
    has two members.
    """
    if x.shape[0] != groups.shape[0]:
        raise DDRLError(f"x has {x.shape[0]} samples but groups has {groups.shape[0]} entries")
    flat = x.detach().reshape(x.shape[0], -1).to(torch.float64).cpu()
    groups = groups.detach().cpu()
    per_group = []
    for g in torch.unique(groups):
        members = flat[groups == g]
        if members.shape[0] < 2:
            continue
        # pdist returns exactly 0 for identical rows (cdist's matmul path would not).
        per_group.append(torch.pdist(members, p=2).mean())
    if not per_group:
        raise DDRLError("pairwise_diversity needs at least one group with >= 2 samples")
    return float(torch.stack(per_group).mean())


def _sqrtm_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> np.ndarray:
    covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.all(np.isfinite(covmean)):
        # Singular product (N ≤ D or collinear features): regularise as in the reference FID code.
        eps = 1e-6
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        # sqrtm of a product of PSD matrices is real up to round-off.
        covmean = covmean.real
    return covmean


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets.

    feats_a: [N, D], feats_b: [M, D] with N, M ≥ 2.
    FD = ‖μa − μb‖² + Tr(Σa + Σb − 2(Σa Σb)^{1/2}), covariances unbiased (ddof = 1);
    computed in float64 and clamped at 0.
    """
    a = feats_a.detach().reshape(feats_a.shape[0], -1).to(torch.float64).cpu().numpy()
    b = feats_b.detach().reshape(feats_b.shape[0], -1).to(torch.float64).cpu().numpy()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise DDRLError(f"frechet_distance needs >= 2 samples per set, got {len(a)} and {len(b)}")
    if a.shape[1] != b.shape[1]:
        raise DDRLError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a = np.atleast_2d(np.cov(a, rowvar=False))
    sigma_b = np.atleast_2d(np.cov(b, rowvar=False))
    covmean = _sqrtm_product(sigma_a, sigma_b)
    diff = mu_a - mu_b
    fd = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean)
    return max(float(fd), 0.0)


def out_of_range_rate(x: Tensor, low: float = -1.0, high: float = 1.0, tol: float = 0.05) -> float:
    """Fraction of elements of raw (unclamped) x strictly outside [low − tol, high + tol].

    x: any shape. rate = #{x < low − tol or x > high + tol} / x.numel().
    """
    x = x.detach()
    outside = (x < low - tol) | (x > high + tol)
    return float(outside.to(torch.float64).mean())


def saturation_rate(x: Tensor, high: float = 1.0, tol: float = 0.05, low: float = -1.0) -> float:
    """Fraction of elements at the bright end: #{clamp(x, low, high) ≥ high − tol} / x.numel().

    x: any shape, values nominally in [low, high].
    """
    clamped = x.detach().clamp(low, high)
    return float((clamped >= high - tol).to(torch.float64).mean())


def default_t_grid(n: int = 10) -> Tensor:
    """Midpoint grid [n]: t_i = (i + 0.5) / n, i = 0..n−1 (avoids the degenerate t = 0 and 1)."""
    if n < 1:
        raise DDRLError(f"default_t_grid needs n >= 1, got {n}")
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n


@torch.no_grad()
def heldout_diffusion_loss(
    velocity_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    x0: Tensor,
    t_grid: Sequence[float] | Tensor,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """Rectified-flow loss on held-out data at fixed noise levels and fixed noise.

    velocity_fn(x_t [B, ...], t [B] float, index [B] long) -> v [B, ...]: ``index`` holds the
    rows of ``x0`` in the batch, so the caller can look up per-sample conditioning (class
    labels, prompt embeddings) without knowing how the data was batched.
    x0: [N, ...] held-out data.

    For each t in t_grid (in order), ε ~ N(0, I) of x0's shape is drawn from a torch.Generator
    seeded once with ``seed``; x_t = (1 − t)·x0 + t·ε and
    loss_t = mean over all elements of (velocity_fn(x_t, t, index) − (ε − x0))².
    Returns mean_t loss_t. Fixed seed ⇒ the same value for the same model.
    """
    if x0.shape[0] == 0:
        raise DDRLError("heldout_diffusion_loss needs at least one held-out sample")
    if batch_size < 1:
        raise DDRLError(f"batch_size must be >= 1, got {batch_size}")
    ts = [float(t) for t in torch.as_tensor(t_grid, dtype=torch.float64).reshape(-1)]
    if not ts:
        raise DDRLError("t_grid is empty")
    dtype = x0.dtype if x0.is_floating_point() else torch.float32
    x0 = x0.to(dtype)
    n = x0.shape[0]
    # A CPU generator makes the noise identical whatever device the model runs on.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    losses = []
    for t in ts:
        noise = torch.randn(x0.shape, generator=gen, dtype=dtype).to(x0.device)
        sq_sum = 0.0
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n), device=x0.device)
            xb, nb = x0[idx], noise[idx]
            t_vec = torch.full((len(idx),), t, dtype=dtype, device=x0.device)
            v = velocity_fn(interpolate(xb, nb, t_vec), t_vec, idx)
            err = v.to(torch.float64) - velocity_target(xb, nb).to(torch.float64)
            sq_sum += float(err.pow(2).sum())
        losses.append(sq_sum / x0.numel())
    return float(np.mean(losses))

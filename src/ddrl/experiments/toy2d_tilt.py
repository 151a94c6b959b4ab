"""Theorem 3.1 on the 2-D toy: the reward-tilted mixture, measured mode weights, implied β.

DDRL's optimum is p*(x) ∝ p_data(x)·exp(r(x)/β). With p_data = Σ_k π_k N(c_k, s²I) and
r(x) = x₁ the tilt stays a Gaussian mixture (completing the square):

    N(x; c_k, s²I)·exp(x₁/β) = exp(c_k1/β + s²/(2β²)) · N(x; c_k + (s²/β)·e₁, s²I)

so p* has weights w_k ∝ π_k·exp(c_k1/β) (the s²/(2β²) factor is common to all k and cancels)
and every component is shifted right by s²/β. Mode order is the order of ``centres`` (CENTRES).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Circle
from scipy.optimize import brentq
from torch import Tensor

from ddrl.data.toy2d import CENTRES, STD

__all__ = [
    "implied_beta",
    "measured_mode_weights",
    "plot_toy2d_arms",
    "predicted_mode_weights",
    "sample_tilted",
    "tilt_shift",
    "tilt_table",
]


def _log_prior(k: int, prior: Tensor | None) -> Tensor:
    if prior is None:
        return torch.full((k,), -math.log(k), dtype=torch.float64)
    p = torch.as_tensor(prior, dtype=torch.float64)
    return (p / p.sum()).log()


def predicted_mode_weights(
    beta: float, centres: Tensor = CENTRES, std: float = STD, prior: Tensor | None = None
) -> Tensor:
    """Weights [K] of p* for r = x₁: w_k = π_k·exp(c_k1/β) / Σ_j π_j·exp(c_j1/β), float64.

    ``std`` does not enter (equal-variance components get the same s²/(2β²) factor); it is kept
    for symmetry with :func:`tilt_shift`. β = inf gives the prior.
    """
    c1 = torch.as_tensor(centres, dtype=torch.float64)[:, 0]
    # Log space: at small β, exp(c/β) overflows long before the normalised weights do.
    return torch.softmax(_log_prior(len(c1), prior) + c1 / beta, dim=0)


def tilt_shift(beta: float, std: float = STD) -> float:
    """Shift s²/β along x₁ of every tilted component's mean (its std stays s)."""
    return std**2 / beta


def sample_tilted(
    n: int,
    beta: float,
    seed: int = 0,
    centres: Tensor = CENTRES,
    std: float = STD,
    prior: Tensor | None = None,
) -> Tensor:
    """n exact samples [n, 2] of p*: mode k ~ w(β), then N(c_k + (s²/β)e₁, s²I)."""
    g = torch.Generator().manual_seed(seed)
    w = predicted_mode_weights(beta, centres, std, prior)
    k = torch.multinomial(w, n, replacement=True, generator=g)
    means = torch.as_tensor(centres, dtype=torch.float64).clone()
    means[:, 0] += tilt_shift(beta, std)
    return means[k] + std * torch.randn(n, 2, generator=g, dtype=torch.float64)


def measured_mode_weights(
    points: Tensor, centres: Tensor = CENTRES, std: float = STD, radius: float = 3.0
) -> dict:
    """Nearest-centre mode weights [K] of the on-support points of ``points`` [N, 2].

    On support = within radius·std of some *data* centre (not the shifted tilted ones): leaving
    the data's support is the diagnostic. Even exact data has off_support ≈ exp(-radius²/2)
    (2-D Rayleigh tail: 1.1% at radius 3), and exact p* has more as β shrinks (shift s²/β).
    Non-finite points (diverged samples) count as off support. Returns ``weights`` [K] (NaN if
    no point is on support), ``off_support`` (fraction of all N) and ``counts`` [K] (int64).
    """
    x = torch.as_tensor(points).detach().to("cpu", torch.float64).reshape(-1, 2)
    c = torch.as_tensor(centres, dtype=torch.float64)
    finite = torch.isfinite(x).all(1)
    d = torch.full((len(x), len(c)), math.inf, dtype=torch.float64)
    d[finite] = torch.cdist(x[finite], c)
    dmin, nearest = d.min(1)
    on = dmin <= radius * std
    counts = torch.bincount(nearest[on], minlength=len(c))
    n_on = int(counts.sum())
    weights = (
        counts.double() / n_on if n_on else torch.full((len(c),), math.nan, dtype=torch.float64)
    )
    off = 1.0 - n_on / len(x) if len(x) else math.nan
    return {"weights": weights, "off_support": off, "counts": counts}


def implied_beta(
    weights: Tensor,
    centres: Tensor = CENTRES,
    prior: Tensor | None = None,
    bounds: tuple[float, float] = (1e-2, 1e2),
) -> dict:
    """The β ∈ ``bounds`` minimising KL(m ‖ w(β)) between measured m [K] and predicted w(β).

    With t = 1/β, KL = log Σ_j π_j e^{t c_j1} - t·Σ_k m_k c_k1 + const is convex in t (a
    log-partition) with dKL/dt = E_w(t)[c₁] - ĉ, ĉ = E_m[c₁]. So the minimiser is the root of
    this moment match, or an end of ``bounds`` when there is none, e.g. every sample on the
    right (β → 0) or m_R ≤ ½ (β → ∞); ``at_bound`` flags this. The root is found (brentq) on
    g(t) = log Σ_{c_k1>ĉ} π_k e^{t c_k1}(c_k1-ĉ) - log Σ_{c_k1<ĉ} π_k e^{t c_k1}(ĉ-c_k1), which
    has the sign of dKL/dt and slope > 0 everywhere: a KL line search, or the moment gap itself,
    is flat to machine precision at small β. For CENTRES: right/left = exp(3/β), so
    β = 3/logit(m_R). The tilt is one parameter against K-1 free weights: ``kl`` and
    ``max_abs_err`` at β̂ measure the shape it cannot fit (e.g. unequal weights within the left
    or right pair). Also returns ``predicted`` = w(β̂) [K].
    """
    m = torch.as_tensor(weights, dtype=torch.float64)
    if not torch.isfinite(m).all() or m.sum() <= 0:
        nan = math.nan
        return {"beta": nan, "kl": nan, "max_abs_err": nan, "predicted": m * nan, "at_bound": False}
    m = m / m.sum()
    c1 = torch.as_tensor(centres, dtype=torch.float64)[:, 0]
    # d_k = c_k1 - ĉ as Σ_j m_j (c_k1 - c_j1): no cancellation when m puts ~1e-14 on the left.
    lp, d = _log_prior(len(c1), prior), (c1[:, None] - c1[None, :]) @ m
    pos, neg = d > 0, d < 0

    def g(t: float) -> float:
        up = torch.logsumexp(lp[pos] + t * c1[pos] + d[pos].log(), 0)
        return float(up - torch.logsumexp(lp[neg] + t * c1[neg] + (-d[neg]).log(), 0))

    t_lo, t_hi = 1.0 / bounds[1], 1.0 / bounds[0]
    # KL increasing in t on the whole interval -> smallest t (largest β), and conversely.
    if not neg.any() or g(t_lo) >= 0:
        beta, at_bound = bounds[1], True
    elif not pos.any() or g(t_hi) <= 0:
        beta, at_bound = bounds[0], True
    else:
        beta, at_bound = 1.0 / brentq(g, t_lo, t_hi, xtol=1e-14, rtol=1e-14), False
    w = predicted_mode_weights(beta, centres, prior=prior)
    # 0·log 0 = 0: modes the samples never visit contribute nothing.
    kl = float(torch.where(m > 0, m * (m.log() - w.log()), 0.0).sum())
    return {
        "beta": beta,
        "kl": max(kl, 0.0),
        "max_abs_err": float((m - w).abs().max()),
        "predicted": w,
        "at_bound": at_bound,
    }


def tilt_table(
    samples: dict[str, Tensor], centres: Tensor = CENTRES, std: float = STD, radius: float = 3.0
) -> list[dict]:
    """Per arm: measured weights, off-support fraction, implied β̂ + residual, w(β̂); JSON-able."""
    rows = []
    for arm, pts in samples.items():
        meas = measured_mode_weights(pts, centres, std, radius)
        fit = implied_beta(meas["weights"], centres)
        rows.append(
            {
                "arm": arm,
                "n": int(torch.as_tensor(pts).reshape(-1, 2).shape[0]),
                "weights": meas["weights"].tolist(),
                "counts": meas["counts"].tolist(),
                "off_support": meas["off_support"],
                "implied_beta": fit["beta"],
                "kl": fit["kl"],
                "max_abs_err": fit["max_abs_err"],
                "at_bound": fit["at_bound"],
                "predicted_at_beta": fit["predicted"].tolist(),
            }
        )
    return rows


def plot_toy2d_arms(
    samples: dict[str, Tensor],
    path,
    predicted: dict[str, Tensor] | None = None,
    title: str | None = None,
    *,
    centres: Tensor = CENTRES,
    std: float = STD,
    radius: float = 3.0,
    ncols: int = 3,
    xlim: tuple[float, float] = (-4.0, 8.0),
    ylim: tuple[float, float] = (-4.0, 4.0),
) -> Path:
    """One scatter panel per arm, data centres and radius·std circles, weights in a table
    under each panel; rows of at most ``ncols`` panels, filled evenly (six arms: 2 × 3, four:
    2 × 2), so that the figure stays readable at a page's width instead of one thin strip.

    The view is fixed (runaway samples would otherwise rescale every panel); the count of
    points outside it is printed in the panel. Returns the written path.
    """
    c = torch.as_tensor(centres, dtype=torch.float64)
    n = max(len(samples), 1)
    rows = math.ceil(n / ncols)
    cols = math.ceil(n / rows)
    fig = Figure(figsize=(4.4 * cols, 4.3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[len(samples) :]:
        ax.set_visible(False)
    for ax, (arm, pts) in zip(axes, samples.items(), strict=False):
        x = torch.as_tensor(pts).detach().to("cpu", torch.float64).reshape(-1, 2)
        inside = (x[:, 0] >= xlim[0]) & (x[:, 0] <= xlim[1]) & (x[:, 1] >= ylim[0])
        inside &= x[:, 1] <= ylim[1]  # NaN/inf fail every comparison, so count as outside
        xi = x[inside].numpy()
        ax.scatter(xi[:, 0], xi[:, 1], s=2, alpha=0.3, color="C0", rasterized=True)
        for k, (cx, cy) in enumerate(c.tolist()):
            ax.add_patch(Circle((cx, cy), radius * std, fill=False, color="k", lw=0.8, ls="--"))
            ax.plot(cx, cy, "r+", ms=8)
            ax.annotate(str(k), (cx, cy), xytext=(4, 4), textcoords="offset points", fontsize=8)
        meas = measured_mode_weights(x, c, std, radius)
        pred = None if predicted is None or arm not in predicted else predicted[arm]
        # A table under the panel, not a box inside it: runaway points must never be hidden.
        lines = ["mode " + "".join(f"{k:>6}" for k in range(len(c)))]
        if torch.isfinite(meas["weights"]).all():
            lines.append("meas " + "".join(f"{w:6.3f}" for w in meas["weights"].tolist()))
        else:
            lines.append("meas  none: no sample on the data's support")
        if pred is not None and torch.isfinite(torch.as_tensor(pred)).all():
            lines.append("pred " + "".join(f"{float(w):6.3f}" for w in pred))
        lines.append(
            f"off-support {meas['off_support']:.3f}  outside view {int((~inside).sum())}/{len(x)}"
        )
        ax.text(0.5, -0.1, "\n".join(lines), transform=ax.transAxes, ha="center", va="top",
                family="monospace", fontsize=9, multialignment="left")  # fmt: skip
        ax.set(xlim=xlim, ylim=ylim, title=arm, aspect="equal")
        ax.grid(alpha=0.2)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A bare Figure (no pyplot) renders with Agg and leaves the caller's backend untouched.
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path

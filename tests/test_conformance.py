"""Conformance with the peers' published code (docs/CONFORMANCE.md has the citations).

Every test re-derives the published formula by hand, here, with plain numpy/torch arithmetic
(never through ddrl helpers), and compares ddrl's function with it. Step formulas are checked at
the first step (t = 1), an interior step and the last step of the actual grid (the scheduler
grid with 10 steps and shift 3, whose last step is the tiny 0.0089 → 0), on float64 tensors.

Tolerances: float64 formulas rtol 1e-10, atol 1e-12 (only rounding differs between two
arrangements of the same expression); grids rtol 0, atol 1e-6 (diffusers returns float32, the
hand derivation is float64).

Commits read: flow_grpo ac4c86e8cae0, DanceGRPO 15cc71d53cc2, cosmos-rl 89f2e5b5c817,
diffusers v0.33.1 and the installed 0.42.1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

F64 = dict(rtol=1e-10, atol=1e-12)
GRID_TOL = dict(rtol=0.0, atol=1e-6)
N_STEPS, SHIFT = 10, 3.0


# --------------------------------------------------------------------------------------------
# Hand derivations of the published grids (numpy, float64).
# --------------------------------------------------------------------------------------------


def _shift(t, s):
    """SD3 shift s·t/(1 + (s − 1)·t) (diffusers scheduler L133/L357; DanceGRPO L127–128)."""
    return s * t / (1.0 + (s - 1.0) * t)


def _diffusers_grid_by_hand(n: int, s: float) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(n).sigmas, from the formula:
    __init__ shifts the training sigmas k/1000 (so sigma_max = shift(1) = 1 and
    sigma_min = shift(1/1000)); set_timesteps takes linspace(sigma_max, sigma_min, n), shifts it
    again and appends 0 (0.42.1 L127–144, L340–357, L386)."""
    sigma_max, sigma_min = _shift(1.0, s), _shift(1.0 / 1000.0, s)
    sig = _shift(np.linspace(sigma_max, sigma_min, n), s)
    return np.concatenate([sig, [0.0]])


def _flux_dynamic_grid_by_hand(n: int, mu: float) -> np.ndarray:
    """FluxPipeline: sigmas = linspace(1, 1/n, n) (pipeline_flux.py L823), exponential time
    shift e^μ / (e^μ + (1/σ − 1)) (scheduler L655–656), then 0 (L386)."""
    sig = np.linspace(1.0, 1.0 / n, n)
    sig = math.exp(mu) / (math.exp(mu) + (1.0 / sig - 1.0) ** 1.0)
    return np.concatenate([sig, [0.0]])


def _dance_grid_by_hand(n: int, s: float) -> np.ndarray:
    """DanceGRPO train_grpo_flux.py L311–313: shift(linspace(1, 0, n + 1))."""
    return _shift(np.linspace(1.0, 0.0, n + 1), s)


def _calculate_shift(seq_len, base_seq=256, max_seq=4096, base_shift=0.5, max_shift=1.15):
    """FluxPipeline's μ (pipeline_flux.py L73–83): linear in the packed image sequence length."""
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return seq_len * m + (base_shift - m * base_seq)


def _grid_points() -> torch.Tensor:
    """The scheduler grid's actual (float32) points for 10 steps, shift 3, as float64."""
    return torch.tensor(_diffusers_grid_by_hand(N_STEPS, SHIFT), dtype=torch.float32).double()


# The steps checked: first (t = 1), interior, last (tiny, to 0).
STEPS = [0, 4, N_STEPS - 1]


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


# diffusers 0.42.1 scheduling_flow_match_euler_discrete.py L127–144 (__init__ shift, sigma_min),
# L340–357 (linspace then shift again), L386 (terminal 0); v0.33.1 L114–131, L297–341.
# flow_grpo sd3_pipeline_with_logprob.py L119–127 uses this via retrieve_timesteps(sigmas=None).
@pytest.mark.parametrize("n,s", [(10, 3.0), (40, 3.0), (10, 1.0), (28, 5.0)])
def test_scheduler_grid_matches_diffusers_formula_and_object(n, s):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ddrl.flow import scheduler_grid

    ours = scheduler_grid(n, s).double().numpy()
    assert ours.shape == (n + 1,)
    # (1) against the published formula, derived by hand
    np.testing.assert_allclose(ours, _diffusers_grid_by_hand(n, s), **GRID_TOL)
    # (2) against diffusers' own scheduler object
    sched = FlowMatchEulerDiscreteScheduler(shift=s)
    sched.set_timesteps(n)
    np.testing.assert_allclose(ours, sched.sigmas.double().numpy(), rtol=0, atol=1e-7)
    assert ours[0] == 1.0 and ours[-1] == 0.0


def test_scheduler_grid_last_step_is_tiny():
    """10 steps, shift 3: the endpoint is shift(shift(1/1000)) ≈ 0.0089286 (shifted twice)."""
    from ddrl.flow import scheduler_grid

    g = scheduler_grid(N_STEPS, SHIFT).double()
    twice = _shift(_shift(1e-3, SHIFT), SHIFT)
    assert abs(g[-2].item() - twice) < 1e-6
    assert abs(twice - 0.0089286) < 1e-6
    assert (g[:-1] - g[1:]).min().item() == pytest.approx(twice, abs=1e-6)


# diffusers 0.42.1 pipeline_flux.py L73–83 (calculate_shift), L823 (sigmas=linspace(1, 1/N, N)),
# L826–842 (mu passed to set_timesteps); scheduler L354–355, L655–656 (exponential time shift).
@pytest.mark.parametrize("n,seq_len", [(10, 4096), (28, 1024), (4, 256)])
def test_scheduler_grid_dynamic_shift_matches_flux_pipeline(n, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ddrl.flow import scheduler_grid

    mu = _calculate_shift(seq_len)
    ours = scheduler_grid(n, mu=mu).double().numpy()
    np.testing.assert_allclose(ours, _flux_dynamic_grid_by_hand(n, mu), **GRID_TOL)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)
    np.testing.assert_allclose(ours, sched.sigmas.double().numpy(), rtol=0, atol=1e-7)


def test_calculate_shift_values():
    """μ = 1.15 at 1024² (4096 packed tokens) and 0.63 at 512² (1024 tokens), by hand; ours
    (``dynamic_mu`` from a scheduler config, FLUX's and SD3's defaults) gives the same."""
    from ddrl.models.hf import dynamic_mu

    assert _calculate_shift(4096) == pytest.approx(1.15)
    assert _calculate_shift(1024) == pytest.approx(0.63)
    flux = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5}
    for seq in (256, 1024, 3000, 4096):
        assert dynamic_mu(flux, seq, max_shift=1.15) == pytest.approx(_calculate_shift(seq))
    # a config without the keys takes the pipeline's defaults; SD3's max_shift is 1.16
    assert dynamic_mu({}, 4096, max_shift=1.16) == pytest.approx(1.16)
    assert dynamic_mu({}, 1024, max_shift=1.16) == pytest.approx(
        _calculate_shift(1024, max_shift=1.16)
    )


# DanceGRPO fastvideo/train_grpo_flux.py L127–128 (sd3_time_shift), L311–313 (the schedule).
@pytest.mark.parametrize("n,s", [(16, 3.0), (16, 5.0), (10, 1.0)])
def test_linear_grid_matches_dancegrpo(n, s):
    from ddrl.flow import linear_grid

    ours = linear_grid(n, s).double().numpy()
    np.testing.assert_allclose(ours, _dance_grid_by_hand(n, s), **GRID_TOL)


def test_timestep_grid_kinds():
    from ddrl.config.core import SamplerConfig
    from ddrl.models.base import EulerSchedulerGrid
    from ddrl.sampling import time_grid

    def timestep_grid(n, shift, kind):
        return time_grid(SamplerConfig(grid=kind, shift=shift), EulerSchedulerGrid(), n)

    np.testing.assert_allclose(
        timestep_grid(N_STEPS, SHIFT, kind="scheduler").double().numpy(),
        _diffusers_grid_by_hand(N_STEPS, SHIFT),
        **GRID_TOL,
    )
    np.testing.assert_allclose(
        timestep_grid(N_STEPS, SHIFT, kind="linear").double().numpy(),
        _dance_grid_by_hand(N_STEPS, SHIFT),
        **GRID_TOL,
    )


# --------------------------------------------------------------------------------------------
# flow_grpo's SDE step
# --------------------------------------------------------------------------------------------


def _flow_grpo_step_by_hand(x, v, t, t_next, sigma_1, a, noise=None, prev_sample=None):
    """flow_grpo sd3_sde_with_logprob.py L40–68, written out per sample.

    t, t_next: [B]; sigma_1: the grid's second point (flow_grpo's `sigma_max = sigmas[1]`).
    Returns (x_next, log_prob [B], mean, std_dev_t [B,1,..])."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    t, t_next = t.reshape(shape), t_next.reshape(shape)
    dt = t_next - t
    # L47: t == 1 → the next grid point in the denominator only
    den = 1 - torch.where(t == 1, torch.full_like(t, sigma_1), t)
    std_dev_t = torch.sqrt(t / den) * a
    # L50: flow_grpo's own arrangement of the mean
    mean = x * (1 + std_dev_t**2 / (2 * t) * dt) + v * (1 + std_dev_t**2 * (1 - t) / (2 * t)) * dt
    if prev_sample is None:
        prev_sample = mean + std_dev_t * torch.sqrt(-dt) * noise  # L59
    sd = std_dev_t * torch.sqrt(-dt)
    lp = -((prev_sample.detach() - mean) ** 2) / (2 * sd**2) - torch.log(sd)
    lp = lp - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi, dtype=x.dtype)))  # L61–65
    return prev_sample, lp.mean(dim=tuple(range(1, lp.dim()))), mean, std_dev_t  # L67–68


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


B, SHAPE = 4, (3, 4, 4)


# flow_grpo flow_grpo/diffusers_patch/sd3_sde_with_logprob.py L40–47 (σ_t and the t = 1 rule),
# L50 (mean), L59 (x_next), L61–68 (log-prob, detached sample, mean over dims).
@pytest.mark.parametrize("i", STEPS)
def test_flow_sde_step_matches_flow_grpo(i):
    from ddrl.sde import flow_sde_step

    g = _grid_points()
    x, v, z = _rand(B, *SHAPE, seed=1), _rand(B, *SHAPE, seed=2), _rand(B, *SHAPE, seed=3)
    t, tn = g[i].repeat(B), g[i + 1].repeat(B)
    ref_x, ref_lp, ref_mean, ref_sig = _flow_grpo_step_by_hand(x, v, t, tn, g[1].item(), 0.7, z)

    st = flow_sde_step(x, v, t, tn, noise_level=0.7, noise=z)
    torch.testing.assert_close(st.mean, ref_mean, **F64)
    torch.testing.assert_close(st.x_next, ref_x, **F64)
    torch.testing.assert_close(st.log_prob, ref_lp, **F64)
    assert st.log_prob.shape == (B,)
    sig = st.sigma.expand(B, 1, 1, 1).reshape(B)
    torch.testing.assert_close(sig, ref_sig.reshape(B), **F64)
    std = torch.broadcast_to(st.std, x.shape)
    torch.testing.assert_close(
        std,
        torch.broadcast_to(ref_sig * torch.sqrt(-(tn - t)).reshape(-1, 1, 1, 1), x.shape),
        **F64,
    )


def test_flow_sde_step_sigma_at_t1_uses_next_point_in_denominator_only():
    """σ_0 = a·sqrt(1/(1 − t_1)) (numerator keeps t = 1), sd3_sde_with_logprob.py L44, L47."""
    from ddrl.sde import flow_sde_step

    g = _grid_points()
    x, v = _rand(2, *SHAPE, seed=4), _rand(2, *SHAPE, seed=5)
    st = flow_sde_step(x, v, g[0].repeat(2), g[1].repeat(2), 0.7, noise=torch.zeros_like(x))
    expect = 0.7 * math.sqrt(1.0 / (1.0 - g[1].item()))
    assert st.sigma.flatten()[0].item() == pytest.approx(expect, rel=1e-12)


def test_flow_sde_step_per_sample_times():
    """Each sample at its own grid step (first, interior, last, another): row by row equal to
    the hand derivation at that step."""
    from ddrl.sde import flow_sde_step

    g = _grid_points()
    idx = torch.tensor([0, 4, N_STEPS - 1, 2])
    t, tn = g[idx], g[idx + 1]
    x, v, z = _rand(4, *SHAPE, seed=6), _rand(4, *SHAPE, seed=7), _rand(4, *SHAPE, seed=8)
    ref_x, ref_lp, ref_mean, _ = _flow_grpo_step_by_hand(x, v, t, tn, g[1].item(), 0.7, z)
    st = flow_sde_step(x, v, t, tn, noise_level=0.7, noise=z)
    torch.testing.assert_close(st.mean, ref_mean, **F64)
    torch.testing.assert_close(st.x_next, ref_x, **F64)
    torch.testing.assert_close(st.log_prob, ref_lp, **F64)


@pytest.mark.parametrize("i", STEPS)
def test_flow_sde_step_scores_given_sample_detached(i):
    """prev_sample given: x_next is it, log_prob as flow_grpo (L62 detaches the sample), and the
    gradient reaches v but not prev_sample. reduce="sum" is the exact log-density (D × mean)."""
    from ddrl.sde import flow_sde_step

    g = _grid_points()
    x = _rand(B, *SHAPE, seed=9)
    v = _rand(B, *SHAPE, seed=10).requires_grad_(True)
    prev = _rand(B, *SHAPE, seed=11).requires_grad_(True)
    t, tn = g[i].repeat(B), g[i + 1].repeat(B)
    _, ref_lp, _, _ = _flow_grpo_step_by_hand(x, v.detach(), t, tn, g[1].item(), 0.7, None, prev)

    st = flow_sde_step(x, v, t, tn, noise_level=0.7, prev_sample=prev)
    assert torch.equal(st.x_next.detach(), prev.detach())
    torch.testing.assert_close(st.log_prob.detach(), ref_lp.detach(), **F64)
    st.log_prob.sum().backward()
    assert prev.grad is None or torch.count_nonzero(prev.grad) == 0
    assert v.grad is not None and torch.count_nonzero(v.grad) > 0

    d = math.prod(SHAPE)
    st_sum = flow_sde_step(x, v.detach(), t, tn, 0.7, prev_sample=prev.detach(), reduce="sum")
    torch.testing.assert_close(st_sum.log_prob, ref_lp.detach() * d, **F64)


@pytest.mark.parametrize("i", STEPS)
def test_flow_sde_class_equals_function(i):
    from ddrl.config.core import FlowSDE
    from ddrl.sde import flow_sde_step, stepper

    g = _grid_points()
    x, v, z = _rand(B, *SHAPE, seed=12), _rand(B, *SHAPE, seed=13), _rand(B, *SHAPE, seed=14)
    t, tn = g[i].repeat(B), g[i + 1].repeat(B)
    a = flow_sde_step(x, v, t, tn, noise_level=0.5, noise=z)
    b = stepper(FlowSDE(noise_level=0.5))(x, v, t, tn, noise=z)
    for f in ("x_next", "mean", "std", "log_prob", "sigma"):
        torch.testing.assert_close(getattr(b, f), getattr(a, f), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# DanceGRPO's SDE step
# --------------------------------------------------------------------------------------------


def _dance_step_by_hand(x, v, t, t_next, eta, noise=None, prev_sample=None):
    """DanceGRPO train_grpo_flux.py flux_step L141–167 (sde_solver=True, grpo=True)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    t, t_next = t.reshape(shape), t_next.reshape(shape)
    dsigma = t_next - t  # L142
    mean = x + dsigma * v  # L143
    x0 = x - t * v  # L145
    std = eta * torch.sqrt(t - t_next)  # L147–148
    score = -(x - x0 * (1 - t)) / t**2  # L151
    mean = mean + (-0.5 * eta**2 * score) * dsigma  # L152–153
    if prev_sample is None:
        prev_sample = mean + noise * std  # L156
    lp = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std)
    lp = lp - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi, dtype=x.dtype)))  # L161–164
    return prev_sample, lp.mean(dim=tuple(range(1, lp.dim()))), mean, std  # L167


# DanceGRPO fastvideo/train_grpo_flux.py L131–170 (flux_step); its grid is L311–313, and the
# same step is in train_grpo_hunyuan.py L57–79. Checked on the scheduler grid (first, interior,
# tiny last step) and on DanceGRPO's own linear grid (16 steps, shift 3).
@pytest.mark.parametrize("grid", ["scheduler", "linear"])
@pytest.mark.parametrize("where", ["first", "interior", "last"])
def test_dance_sde_step_matches_dancegrpo(grid, where):
    from ddrl.sde import dance_sde_step

    if grid == "scheduler":
        g = _grid_points()
    else:
        g = torch.tensor(_dance_grid_by_hand(16, 3.0), dtype=torch.float32).double()
    n = len(g) - 1
    i = {"first": 0, "interior": n // 2, "last": n - 1}[where]
    x, v, z = _rand(B, *SHAPE, seed=20), _rand(B, *SHAPE, seed=21), _rand(B, *SHAPE, seed=22)
    t, tn = g[i].repeat(B), g[i + 1].repeat(B)
    ref_x, ref_lp, ref_mean, ref_std = _dance_step_by_hand(x, v, t, tn, 0.3, z)

    st = dance_sde_step(x, v, t, tn, eta=0.3, noise=z)
    torch.testing.assert_close(st.mean, ref_mean, **F64)
    torch.testing.assert_close(st.x_next, ref_x, **F64)
    torch.testing.assert_close(st.log_prob, ref_lp, **F64)
    torch.testing.assert_close(
        torch.broadcast_to(st.std, x.shape), torch.broadcast_to(ref_std, x.shape), **F64
    )
    torch.testing.assert_close(
        torch.broadcast_to(st.sigma, (B, 1, 1, 1)).reshape(B),
        torch.full((B,), 0.3, dtype=torch.float64),
        **F64,
    )


def test_dance_sde_step_per_sample_times_and_scoring():
    from ddrl.sde import dance_sde_step

    g = _grid_points()
    idx = torch.tensor([0, 4, N_STEPS - 1, 7])
    t, tn = g[idx], g[idx + 1]
    x, v = _rand(4, *SHAPE, seed=23), _rand(4, *SHAPE, seed=24)
    prev = _rand(4, *SHAPE, seed=25)
    _, ref_lp, ref_mean, _ = _dance_step_by_hand(x, v, t, tn, 0.25, prev_sample=prev)
    st = dance_sde_step(x, v, t, tn, eta=0.25, prev_sample=prev)
    torch.testing.assert_close(st.mean, ref_mean, **F64)
    torch.testing.assert_close(st.log_prob, ref_lp, **F64)


def test_dance_mean_is_flow_grpo_mean_with_constant_sigma():
    """Algebra check: DanceGRPO's μ equals flow_grpo's μ with σ_t ≡ η (both hand-derived)."""
    g = _grid_points()
    x, v = _rand(B, *SHAPE, seed=26), _rand(B, *SHAPE, seed=27)
    for i in STEPS:
        t, tn = g[i].repeat(B), g[i + 1].repeat(B)
        _, _, m_dance, _ = _dance_step_by_hand(x, v, t, tn, 0.3, prev_sample=x)
        tb, dt = t.reshape(-1, 1, 1, 1), (tn - t).reshape(-1, 1, 1, 1)
        m_flow = x * (1 + 0.09 / (2 * tb) * dt) + v * (1 + 0.09 * (1 - tb) / (2 * tb)) * dt
        torch.testing.assert_close(m_dance, m_flow, **F64)


@pytest.mark.parametrize("i", STEPS)
def test_dance_sde_class_equals_function(i):
    from ddrl.config.core import DanceSDE
    from ddrl.sde import dance_sde_step, stepper

    g = _grid_points()
    x, v, z = _rand(B, *SHAPE, seed=28), _rand(B, *SHAPE, seed=29), _rand(B, *SHAPE, seed=30)
    t, tn = g[i].repeat(B), g[i + 1].repeat(B)
    a = dance_sde_step(x, v, t, tn, eta=0.25, noise=z)
    b = stepper(DanceSDE(eta=0.25))(x, v, t, tn, noise=z)
    for f in ("x_next", "mean", "std", "log_prob", "sigma"):
        torch.testing.assert_close(getattr(b, f), getattr(a, f), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# flow_grpo's KL term
# --------------------------------------------------------------------------------------------


# flow_grpo scripts/train_sd3.py L894–897: mean over (C,H,W) of (μ_θ − μ_ref)², divided by
# 2·std_dev_t², where std_dev_t is the 4th return of sde_step_with_logprob (L206–215), i.e.
# a·sqrt(t/(1 − t')) — not the transition std. flow_grpo then averages over the batch.
@pytest.mark.parametrize("i", STEPS)
def test_flow_grpo_kl_matches_train_sd3(i):
    from ddrl.losses.kl import flow_grpo_kl
    from ddrl.sde import flow_sde_step

    g = _grid_points()
    x, v, v_ref = _rand(B, *SHAPE, seed=40), _rand(B, *SHAPE, seed=41), _rand(B, *SHAPE, seed=42)
    prev = _rand(B, *SHAPE, seed=43)
    t, tn = g[i].repeat(B), g[i + 1].repeat(B)
    _, _, mean, std_dev_t = _flow_grpo_step_by_hand(x, v, t, tn, g[1].item(), 0.7, None, prev)
    _, _, mean_ref, _ = _flow_grpo_step_by_hand(x, v_ref, t, tn, g[1].item(), 0.7, None, prev)
    ref_kl = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2)
    ref_kl = ref_kl.reshape(B)

    st = flow_sde_step(x, v, t, tn, 0.7, prev_sample=prev)
    st_ref = flow_sde_step(x, v_ref, t, tn, 0.7, prev_sample=prev)
    kl = flow_grpo_kl(st.mean, st_ref.mean, st.sigma)
    assert kl.shape == (B,)
    torch.testing.assert_close(kl, ref_kl, **F64)
    # flow_grpo's batch reduction (L896) is the plain mean of these per-sample values
    torch.testing.assert_close(kl.mean(), ref_kl.mean(), **F64)
    # and it is the exact per-dimension Gaussian KL times |dt|
    exact = (mean - mean_ref) ** 2 / (
        2 * (std_dev_t * torch.sqrt(-(tn - t)).reshape(-1, 1, 1, 1)) ** 2
    )
    torch.testing.assert_close(kl, exact.mean(dim=(1, 2, 3)) * (t - tn), **F64)


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def _groups(sizes, seed):
    """Interleaved group ids (groups need not be contiguous) and float64 rewards."""
    ids = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    ids = ids[perm]
    r = _rand(len(ids), seed=seed + 1)
    return r, ids


def _z_by_hand(r, ids, eps):
    """(r − mean_g)/(std_g + eps) with the population std (np.std, ddof 0), as flow_grpo's
    PerPromptStatTracker (stat_tracking.py L25–31, per-prompt std)."""
    out = np.zeros(len(r))
    rn, idn = r.numpy(), ids.numpy()
    for k in np.unique(idn):
        m = idn == k
        out[m] = (rn[m] - rn[m].mean()) / (np.std(rn[m]) + eps)
    return torch.from_numpy(out)


def _release_exp_reward(a, lo=-5.0, hi=5.0):
    """cosmos-rl wfm_trainer.py L548–555: A ← −exp(−A), then clamp to [adv_clip_min, max]."""
    return torch.clamp(-torch.exp(-a), min=lo, max=hi)


# flow_grpo flow_grpo/stat_tracking.py L25–31 (per-prompt mean, np.std, + 1e-4) and
# scripts/train_sd3.py L881–885 (clamp to ±adv_clip_max = 5); cosmos-rl wfm_trainer.py L551–555.
def test_group_advantages_plain_matches_flow_grpo_tracker():
    from ddrl.advantages import group_advantages
    from ddrl.config.core import AdvantageConfig

    r, ids = _groups([8, 8, 5], seed=50)
    adv, valid = group_advantages(r, ids, AdvantageConfig(std="population", eps=1e-4))
    torch.testing.assert_close(adv, _z_by_hand(r, ids, 1e-4).clamp(-5, 5), **F64)
    assert valid.all()


def test_group_advantages_plain_clamps_outliers():
    """A group of 40 with one high outlier: its z ≈ sqrt(39) ≈ 6.2 is clamped to 5."""
    from ddrl.advantages import group_advantages
    from ddrl.config.core import AdvantageConfig

    r = torch.zeros(40, dtype=torch.float64)
    r[3] = 1.0
    ids = torch.zeros(40, dtype=torch.long)
    z = _z_by_hand(r, ids, 1e-4)
    assert z.max() > 6.0
    adv, _ = group_advantages(r, ids, AdvantageConfig(std="population", eps=1e-4, clamp=5.0))
    torch.testing.assert_close(adv, z.clamp(-5, 5), **F64)


# cosmos-rl cosmos_rl/policy/trainer/wfm_trainer.py L548–555 (exp_reward then clamp ±5,
# config/wfm/__init__.py L138–139). Same normalisation convention as ddrl on both sides (the
# release's unbiased std is a separate, documented difference, docs/CONFORMANCE.md §6).
def test_exp_transform_beta1_matches_release():
    from ddrl.advantages import group_advantages
    from ddrl.config.core import AdvantageConfig

    r, ids = _groups([8, 8, 8, 8], seed=60)
    z = _z_by_hand(r, ids, 1e-4)
    assert z.min() < -math.log(5) and z.max() < 5  # both the lower clamp and no upper clamp
    cfg = AdvantageConfig(std="population", eps=1e-4, exp_transform=True, beta=1.0, clamp=5.0)
    adv, _ = group_advantages(r, ids, cfg)
    torch.testing.assert_close(adv, _release_exp_reward(z), **F64)


def test_exp_transform_beta1_matches_release_above_clamp():
    """A > clamp (needs a group ≥ 27 with an outlier): the release never caps it, since its
    clamp acts after −exp(−A) < 0; the outlier's advantage is −exp(−6.2), not −exp(−5)."""
    from ddrl.advantages import group_advantages
    from ddrl.config.core import AdvantageConfig

    r = torch.zeros(40, dtype=torch.float64)
    r[3], r[7] = 1.0, -0.2
    ids = torch.zeros(40, dtype=torch.long)
    z = _z_by_hand(r, ids, 1e-4)
    assert z.max() > 5
    cfg = AdvantageConfig(std="population", eps=1e-4, exp_transform=True, beta=1.0, clamp=5.0)
    adv, _ = group_advantages(r, ids, cfg)
    torch.testing.assert_close(adv, _release_exp_reward(z), **F64)


def test_exp_transform_beta_is_a_temperature():
    """β = 0.3: A ← −exp(−max(A, −ln 5)/β); distinct A in (−ln 5, 0) stay distinct (the output
    is not clamped to ±5, only λ's argument is)."""
    from ddrl.advantages import group_advantages
    from ddrl.config.core import AdvantageConfig

    r, ids = _groups([8, 8, 8, 8], seed=70)
    z = _z_by_hand(r, ids, 1e-4)
    cfg = AdvantageConfig(std="population", eps=1e-4, exp_transform=True, beta=0.3, clamp=5.0)
    adv, _ = group_advantages(r, ids, cfg)
    expect = -torch.exp(-z.clamp(min=-math.log(5)) / 0.3)
    torch.testing.assert_close(adv, expect, **F64)
    inside = (z > -math.log(5)) & (z < 0)
    assert inside.sum() >= 4
    a_in = adv[inside]
    assert len(torch.unique(a_in)) == len(a_in)
    # monotone: larger A, larger advantage; and below −5 for A < −0.3·ln 5 (not output-clamped)
    order = torch.argsort(z[inside])
    assert torch.all(a_in[order][1:] > a_in[order][:-1])
    assert (adv[z < -0.3 * math.log(5) - 1e-9] < -5).any()


# --------------------------------------------------------------------------------------------
# DiffusionNFT (NVlabs/DiffusionNFT 24af555, scripts/train_nft_sd3.py)
# --------------------------------------------------------------------------------------------


def _nft_by_hand(forward_prediction, old_prediction, xt, x0, t, advantages, beta, adv_clip_max):
    """train_nft_sd3.py L952-999, line by line (their batch .mean() is the loop's mean)."""
    advantages_clip = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    normalized_advantages_clip = (advantages_clip / adv_clip_max) / 2.0 + 0.5
    r = torch.clamp(normalized_advantages_clip, 0, 1)
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (
        1.0 + beta
    ) * old_prediction.detach() - beta * forward_prediction
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = (
            torch.abs(x0_prediction.double() - x0.double())
            .mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            .clip(min=0.00001)
        )
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (
            torch.abs(negative_x0_prediction.double() - x0.double())
            .mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            .clip(min=0.00001)
        )
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(
        dim=tuple(range(1, x0.ndim))
    )
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    return ori_policy_loss * adv_clip_max


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_and_gradient_match_train_nft_sd3(beta):
    from ddrl.losses.nft import nft_loss, optimality

    x0, eps = _rand(B, *SHAPE, seed=60), _rand(B, *SHAPE, seed=61)
    t = torch.tensor([0.9, 0.5, 0.2, 0.05], dtype=torch.float64)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps  # L871-876
    old = _rand(B, *SHAPE, seed=62)
    adv = torch.tensor([7.0, 1.3, -0.4, -6.0], dtype=torch.float64)  # two beyond the clip
    v1 = (old + 0.1 * _rand(B, *SHAPE, seed=63)).requires_grad_()
    v2 = v1.detach().clone().requires_grad_()
    want = _nft_by_hand(v1, old, xt, x0, t, adv, beta, 5.0)
    got = nft_loss(v2, old, xt, x0, t, optimality(adv, 5.0), beta, 5.0)
    torch.testing.assert_close(got, want, **F64)
    (g1,) = torch.autograd.grad(want.mean(), v1)
    (g2,) = torch.autograd.grad(got.mean(), v2)
    torch.testing.assert_close(g2, g1, **F64)
    # r saturates at ±adv_clip_max: the first sample is all positive, the last all negative
    assert optimality(adv, 5.0).tolist() == pytest.approx([1.0, 0.63, 0.46, 0.0])


def _return_decay(step, decay_type):
    """train_nft_sd3.py L169-189."""
    if decay_type == 0:
        flat, uprate, uphold = 0, 0.0, 0.0
    elif decay_type == 1:
        flat, uprate, uphold = 0, 0.001, 0.5
    elif decay_type == 2:
        flat, uprate, uphold = 75, 0.0075, 0.999
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


@pytest.mark.parametrize("decay_type, knobs", [(1, (0, 0.001, 0.5)), (2, (75, 0.0075, 0.999))])
def test_nft_old_policy_decay_and_update_match_return_decay(decay_type, knobs):
    """The old policy's decay after s optimizer steps (L169-189) and its update after each
    epoch, old ← old·d + θ·(1 − d) (L1035-1039)."""
    from ddrl.losses.lagging import LaggingWeights

    model = torch.nn.Linear(3, 2)
    lag = LaggingWeights(model, *knobs)
    for s in [0, 1, 74, 75, 76, 100, 500, 1000, 5000]:
        assert lag.decay(s) == pytest.approx(_return_decay(s, decay_type), abs=1e-15), s
    old = {k: v.clone() for k, v in lag.lag.items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    lag.update(200)
    d = _return_decay(200, decay_type)
    torch.testing.assert_close(lag.lag["weight"], old["weight"] * d + model.weight * (1 - d))


def test_nft_objective_trains_the_rollouts_final_samples_with_fresh_noise(tiny_model):
    """The objective's per-sample term is the hand loss at x_t = (1 − t)·x0 + t·ε, ε drawn by
    (plan, trajectory, position) alone; at the start the old policy is θ itself."""
    from ddrl.config.core import ODESampler
    from ddrl.losses import build_loss, loss_config
    from ddrl.losses.base import LossContext, StepBatch
    from ddrl.sde import stepper

    n = 6
    den = tiny_model.denoiser.double()
    cond = tiny_model.conditioner.encode(["a"] * n)
    x0 = _rand(n, 2, seed=70)
    t = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    b = StepBatch(
        None, None, t, t * 0.8, None, torch.linspace(-2, 2, n, dtype=torch.float64),
        torch.ones(n, dtype=torch.bool), cond, None, None, _rand(n, 2, seed=71), True,
        torch.Generator(), plan=5, x0=x0, ids=torch.arange(n) + 10, slots=torch.zeros(n).long(),
    )  # fmt: skip
    ctx = LossContext(stepper(ODESampler()), 1.0, None, den)
    loss = build_loss("nft", loss_config("nft", "", "none")(), ctx, "", "none")
    out = loss(den, b)
    eps = torch.stack(  # the same draw, by hand
        [
            torch.randn(2, generator=torch.Generator().manual_seed(5 * 1_000_003 + i * 1_009))
            for i in range(10, 10 + n)
        ]  # fmt: skip
    ).double()
    xt = (1 - t[:, None]) * x0 + t[:, None] * eps
    v = den.velocity(xt, t, cond)
    want = _nft_by_hand(v, v.detach(), xt, x0, t, b.advantages, 1.0, 5.0)
    torch.testing.assert_close(out.terms["policy"][0], want, **F64)


# --------------------------------------------------------------------------------------------
# AWM (scxue/advantage_weighted_matching be51372, scripts/train_sd3_awm.py)
# --------------------------------------------------------------------------------------------


def _awm_by_hand(v, x0, eps, sigma, advantages, power=0.25, clip_range=1.0, adv_clip_max=5.0):
    """compute_log_prob_awm L237-251 (ghuber) and the loss L1293-1327, on-policy
    (old_log_probs = log_prob.detach(), L1282-1284)."""
    target = eps - x0
    mse = ((v.double() - target.double()) ** 2).mean(dim=tuple(range(1, v.ndim)))
    log_prob = -((mse + 1e-10) ** power - 1e-10**power) * sigma.double() / power
    old_log_probs = log_prob.detach()
    a = torch.clamp(advantages, -adv_clip_max, adv_clip_max) / adv_clip_max * 1.0
    ratio = torch.exp(log_prob - old_log_probs)
    unclipped = -a * ratio
    clipped = -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped)


def test_awm_loss_and_gradient_match_train_sd3_awm():
    from ddrl.losses.awm import awm_log_prob
    from ddrl.losses.base import clipped_surrogate

    x0, eps = _rand(B, *SHAPE, seed=80), _rand(B, *SHAPE, seed=81)
    sigma = torch.tensor([0.97, 0.72, 0.48, 0.36], dtype=torch.float64)
    adv = torch.tensor([9.0, 2.0, -1.0, -0.5], dtype=torch.float64)
    v1 = (eps - x0 + 0.3 * _rand(B, *SHAPE, seed=82)).requires_grad_()
    v2 = v1.detach().clone().requires_grad_()
    want = _awm_by_hand(v1, x0, eps, sigma, adv)
    lp = awm_log_prob(v2, eps - x0, sigma, "ghuber", 0.25)
    got, ratio = clipped_surrogate(lp - lp.detach(), adv.clamp(-5, 5) / 5, 1.0)
    torch.testing.assert_close(got, want, **F64)
    assert torch.equal(ratio, torch.ones(B, dtype=torch.float64))  # on-policy: ρ ≡ 1
    (g1,) = torch.autograd.grad(want.mean(), v1)
    (g2,) = torch.autograd.grad(got.mean(), v2)
    torch.testing.assert_close(g2, g1, **F64)


def test_awm_stratified_timesteps_match_discrete_wo_init():
    """train_sd3_awm.py L1197-1205 with 14 steps, fraction 0.9, 6 strata: boundaries
    linspace(1, int(14·0.9), 7).long() = [1, 2, 4, 6, 8, 10, 12]; one index per stratum."""
    from ddrl.training.iteration import select_timesteps

    boundaries = torch.linspace(1, int(14 * 0.9), 6 + 1).long()
    assert boundaries.tolist() == [1, 2, 4, 6, 8, 10, 12]
    got = select_timesteps(14, 0.9, "stratified", 4000, torch.Generator().manual_seed(0),
                           skip_first=True, count=6)  # fmt: skip
    assert got.shape == (4000, 6)
    for k in range(6):
        seen = set(got[:, k].tolist())
        assert seen == set(range(boundaries[k].item(), boundaries[k + 1].item())), (k, seen)
    g = torch.Generator().manual_seed(3)
    u = torch.rand(5, 6, generator=torch.Generator().manual_seed(3))
    lower, upper = boundaries[:-1], boundaries[1:]
    want = lower + torch.floor(u * (upper - lower)).long()
    assert torch.equal(select_timesteps(14, 0.9, "stratified", 5, g, skip_first=True, count=6),
                       want)  # fmt: skip
    with_init = select_timesteps(14, 0.9, "stratified", 4000, torch.Generator(), count=6)
    assert set(with_init[:, 0].tolist()) == {0, 1}  # "discrete": linspace(0, 12, 7)


# --------------------------------------------------------------------------------------------
# CPS (IamCreateAI/FlowCPS b402c7a, flow_grpo/diffusers_patch/sd3_sde_with_logprob.py L52-70)
# --------------------------------------------------------------------------------------------


def _cps_by_hand(sample, model_output, sigma, sigma_prev, noise_level, noise=None, prev=None):
    shape = (-1,) + (1,) * (sample.dim() - 1)
    sigma, sigma_prev = sigma.reshape(shape), sigma_prev.reshape(shape)
    std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
    pred_original_sample = sample - sigma * model_output
    noise_estimate = sample + model_output * (1 - sigma)
    prev_sample_mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * torch.sqrt(
        sigma_prev**2 - std_dev_t**2
    )
    prev_sample = prev_sample_mean + std_dev_t * noise if prev is None else prev
    log_prob = -((prev_sample.detach() - prev_sample_mean) ** 2)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


@pytest.mark.parametrize("i", STEPS)
@pytest.mark.parametrize("eta", [0.8, 0.5])
def test_cps_step_matches_flowcps(i, eta):
    from ddrl.losses.kl import flow_grpo_kl
    from ddrl.sde import cps_step

    g = _grid_points()
    x, v, z = _rand(B, *SHAPE, seed=90), _rand(B, *SHAPE, seed=91), _rand(B, *SHAPE, seed=92)
    t, tn = g[i].repeat(B), g[i + 1].repeat(B)
    ref_x, ref_lp, ref_mean, ref_std = _cps_by_hand(x, v, t, tn, eta, noise=z)
    st = cps_step(x, v, t, tn, eta, noise=z)
    for got, want in [(st.x_next, ref_x), (st.log_prob, ref_lp), (st.mean, ref_mean)]:
        torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(torch.broadcast_to(st.std, ref_std.shape), ref_std, **F64)
    prev = _rand(B, *SHAPE, seed=93)  # scoring a given sample
    _, lp2, _, _ = _cps_by_hand(x, v, t, tn, eta, prev=prev)
    torch.testing.assert_close(cps_step(x, v, t, tn, eta, prev_sample=prev).log_prob, lp2, **F64)
    # its KL drops flow_grpo's 1/(2σ²) (FlowCPS train_sd3.py L900): mean(Δμ²)
    other = cps_step(x, _rand(B, *SHAPE, seed=94), t, tn, eta, noise=z)
    kl = flow_grpo_kl(st.mean, other.mean, st.sigma)
    torch.testing.assert_close(kl, ((st.mean - other.mean) ** 2).mean(dim=(1, 2, 3)), **F64)


# --------------------------------------------------------------------------------------------
# GRPO-Guard (flow_grpo 2e2f712, scripts/train_sd3_GRPO_Guard.py L915-932)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", STEPS[:2])
def test_grpo_guard_ratio_norm_matches_train_sd3_grpo_guard(i):
    """RatioNorm: exp((log p − log p_old + mean‖μ_θ − μ_old‖²/(2(√Δt·σ_t)²))·√Δt·σ_t), the
    PPO clip, then ÷ (√Δt)² (per sample, as Flow-Factory; the official line's bias is a batch
    mean, docs/DECISIONS.md)."""
    from ddrl.config.core import FlowSDE
    from ddrl.losses.base import StepBatch
    from ddrl.losses.config import GRPOConfig
    from ddrl.losses.grpo import surrogate
    from ddrl.sde import stepper

    g = _grid_points()
    x, v_old, z = _rand(B, *SHAPE, seed=95), _rand(B, *SHAPE, seed=96), _rand(B, *SHAPE, seed=97)
    v = v_old + 0.05 * _rand(B, *SHAPE, seed=98)
    t, tn = g[i].repeat(B), g[i + 1].repeat(B)
    prev, lp_old, mean_old, _ = _flow_grpo_step_by_hand(x, v_old, t, tn, g[1].item(), 0.7, z)
    _, lp, mean, std_dev_t = _flow_grpo_step_by_hand(x, v, t, tn, g[1].item(), 0.7, None, prev)
    adv = torch.tensor([1.5, -0.7, 0.2, -2.0], dtype=torch.float64)
    clip = 2e-6
    sqrt_dt = torch.sqrt(t - tn)  # its return_sqrt_dt: sqrt(−dt)
    s = sqrt_dt * std_dev_t.flatten()
    bias = (mean - mean_old).pow(2).mean(dim=(1, 2, 3)) / (2 * s**2)
    ratio = torch.exp((lp - lp_old + bias) * s)
    per = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip))
    want = per / sqrt_dt**2

    step = stepper(FlowSDE(0.7))(x, v, t, tn, prev_sample=prev)
    b = StepBatch(x, prev, t, tn, lp_old, adv, torch.ones(B, dtype=torch.bool), None, None,
                  None, x, True, torch.Generator(), mean_old=mean_old)  # fmt: skip
    got, _ = surrogate(step, b, GRPOConfig(clip_range=clip, ratio_norm=True))
    torch.testing.assert_close(got, want, **F64)


# --------------------------------------------------------------------------------------------
# MixGRPO's sliding window (Tencent-Hunyuan/MixGRPO e5cdd6a, fastvideo/utils/grpo_states.py)
# --------------------------------------------------------------------------------------------


class _GRPOTrainingStates:
    """grpo_states.py L29-53, L87-99, L136-139, L148 with the FLUX scripts' flags
    (progressive, prog_overlap, roll_back)."""

    def __init__(self, iters_per_group, group_size, max_timesteps, prog_overlap_step):
        self.iters_per_group, self.group_size = iters_per_group, group_size
        self.max_timesteps, self.prog_overlap_step = max_timesteps, prog_overlap_step
        self.cur_timestep, self.cur_iter_in_group, self.init_timestep = 0, 0, 0

    def update_iteration(self):
        self.cur_iter_in_group += 1
        if self.cur_iter_in_group >= self.iters_per_group:
            self.cur_iter_in_group = 0
            self.cur_timestep += self.prog_overlap_step
        if self.cur_timestep > self.max_timesteps:
            self.cur_timestep, self.cur_iter_in_group = self.init_timestep, 0

    def get_current_timesteps(self):
        end = min(self.cur_timestep + self.group_size, self.max_timesteps)
        return list(range(self.cur_timestep, end))


@pytest.mark.parametrize("every, stride", [(25, 1), (20, 1), (20, 0), (3, 2)])
def test_mixgrpo_window_matches_grpo_training_states(every, stride):
    """25 sampling steps (max_timesteps = 23, train_grpo_flux.py L915-928): the same window at
    every iteration, except where MixGRPO's is empty for one group before it rolls back; ddrl
    rolls back there at once (docs/DECISIONS.md), so from then on it runs one group ahead."""
    from ddrl.training.iteration import window_steps

    states, shift = _GRPOTrainingStates(every, 4, 25 - 2, stride), 0
    for it in range(1200):
        theirs = states.get_current_timesteps()  # read, then advance (L945-947)
        states.update_iteration()
        if not theirs:  # the empty group: ddrl has already rolled back
            shift += 1
            continue
        assert window_steps(it - shift, 25, 4, every, stride).tolist() == theirs, it
    if (every, stride) == (25, 1):  # MixGRPO.sh: empty over iterations 575-599, then [0..3]
        assert shift == 2 * 25  # two passes in 1200 iterations
        assert window_steps(574, 25, 4, 25, 1).tolist() == [22]
        assert window_steps(575, 25, 4, 25, 1).tolist() == [0, 1, 2, 3]

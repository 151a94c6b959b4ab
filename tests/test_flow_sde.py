"""The rectified-flow path and the Gaussian sampler steps (DESIGN.md §2–3)."""

import math

import pytest
import torch

from ddrl.flow import (
    flow_matching_loss,
    interpolate,
    predict_x0,
    shift_timesteps,
    timestep_grid,
    velocity_target,
)
from ddrl.sde import dance_sde_step, flow_sde_step, gaussian_log_prob, ode_step, sde_step

# (t, t_next) per sample: the first step from t = 1, a middle step, and the last step to t = 0.
T_PAIRS = [(1.0, 0.9), (0.6, 0.5), (0.6, 0.45), (0.25, 0.0)]


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _bt(vals, ref):
    """A [B] tensor broadcast to ref's shape [B, ...]."""
    t = torch.tensor(vals, dtype=ref.dtype)
    return t.reshape(-1, *([1] * (ref.dim() - 1)))


def _state(seed=0, dtype=torch.float64):
    """x [4, 3, 5], v, z and per-sample t, t_next covering every pair in T_PAIRS."""
    x, v, z = (_randn(len(T_PAIRS), 3, 5, seed=seed + k, dtype=dtype) for k in range(3))
    t = torch.tensor([p[0] for p in T_PAIRS], dtype=dtype)
    tn = torch.tensor([p[1] for p in T_PAIRS], dtype=dtype)
    return x, v, z, t, tn


def _flow_ref(x, v, t, tn, a):
    """DESIGN §3 Flow-SDE, written independently: σ at t=1 is evaluated at t_next."""
    t_b, tn_b = _bt(t.tolist(), x), _bt(tn.tolist(), x)
    t_sig = torch.where(t_b >= 1.0, tn_b, t_b)
    sig2 = a**2 * t_sig / (1 - t_sig)
    dt = tn_b - t_b
    mean = x + (v + sig2 / (2 * t_b) * (x + (1 - t_b) * v)) * dt
    return mean, torch.sqrt(sig2 * -dt)


def _dance_ref(x, v, t, tn, eta):
    """DESIGN §3 Dance-SDE, written independently."""
    t_b, tn_b = _bt(t.tolist(), x), _bt(tn.tolist(), x)
    dt = tn_b - t_b
    x0 = x - t_b * v
    score = -(x - (1 - t_b) * x0) / t_b**2
    mean = x + dt * v - 0.5 * eta**2 * score * dt
    return mean, eta * torch.sqrt(-dt)


# ---------------------------------------------------------------------------- the flow path


def test_interpolate_velocity_and_x0_identities():
    x0, eps = _randn(5, 2, 3, seed=1), _randn(5, 2, 3, seed=2)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    xt = interpolate(x0, eps, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[-1], eps[-1])
    assert torch.allclose(xt[2], 0.5 * x0[2] + 0.5 * eps[2])
    v = velocity_target(x0, eps)
    assert torch.allclose(v, eps - x0)
    # x̂0 from the exact velocity recovers x0 at every t, including t = 1 (pure noise).
    assert torch.allclose(predict_x0(xt, v, t), x0, atol=1e-12)
    # the path is straight: x_t moves with velocity v, so x_s = x_t + (s − t)·v.
    s = torch.full((5,), 0.3, dtype=torch.float64)
    assert torch.allclose(interpolate(x0, eps, s), xt + (s - t).view(-1, 1, 1) * v, atol=1e-12)
    # a scalar t broadcasts against the whole batch.
    assert torch.allclose(interpolate(x0, eps, torch.tensor(0.25)), 0.75 * x0 + 0.25 * eps)


def test_flow_matching_loss_is_per_sample_mean_square():
    x0, eps, vp = _randn(3, 4, seed=1), _randn(3, 4, seed=2), _randn(3, 4, seed=3)
    want = ((vp - (eps - x0)) ** 2).mean(1)
    assert torch.allclose(flow_matching_loss(vp, x0, eps), want)
    assert torch.equal(flow_matching_loss(eps - x0, x0, eps), torch.zeros(3, dtype=x0.dtype))


# ---------------------------------------------------------------------------- timestep grid


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_timestep_grid_endpoints_and_monotone(shift):
    g = timestep_grid(7, shift)
    assert g.shape == (8,) and g.dtype == torch.float32
    assert g[0].item() == 1.0 and g[-1].item() == 0.0
    assert (g[1:] < g[:-1]).all()


def test_timestep_grid_shift_one_is_uniform_and_shift_formula():
    u = torch.linspace(1.0, 0.0, 11, dtype=torch.float64)
    assert torch.allclose(timestep_grid(10, 1.0), u.float(), atol=1e-7)
    for s in (3.0, 0.5):
        want = s * u / (1 + (s - 1) * u)
        assert torch.allclose(timestep_grid(10, s), want.float(), atol=1e-7)
    # one hand value: s = 3 at u = 0.5 gives 1.5 / 2 = 0.75.
    assert timestep_grid(2, 3.0)[1].item() == pytest.approx(0.75, abs=1e-7)
    assert shift_timesteps(torch.tensor(0.2), 3.0).item() == pytest.approx(0.6 / 1.4, abs=1e-7)


# ---------------------------------------------------------------------------- SDE steps


@pytest.mark.parametrize("kind", ["flow", "dance"])
def test_step_mean_std_match_design_formulas(kind):
    x, v, z, t, tn = _state()
    if kind == "flow":
        step, (mean, std) = flow_sde_step(x, v, t, tn, 0.7, noise=z), _flow_ref(x, v, t, tn, 0.7)
    else:
        step, (mean, std) = (
            dance_sde_step(x, v, t, tn, 0.25, noise=z),
            _dance_ref(x, v, t, tn, 0.25),
        )
    assert torch.allclose(step.mean, mean, atol=1e-10)
    assert torch.allclose(step.std.expand_as(x), std.expand_as(x), atol=1e-10)
    assert torch.allclose(step.x_next, step.mean + step.std * z, atol=1e-12)


@pytest.mark.parametrize("kind", ["flow", "dance"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_log_prob_is_normal_density_reduced(kind, reduce):
    x, v, z, t, tn = _state(seed=5, dtype=torch.float32)
    fn = flow_sde_step if kind == "flow" else dance_sde_step
    step = fn(x, v, t, tn, 0.7 if kind == "flow" else 0.25, noise=z, reduce=reduce)
    per = torch.distributions.Normal(step.mean, step.std.expand_as(x)).log_prob(step.x_next)
    want = per.flatten(1).mean(1) if reduce == "mean" else per.flatten(1).sum(1)
    assert step.log_prob.shape == (x.shape[0],)
    assert torch.allclose(step.log_prob, want, atol=1e-5, rtol=0)
    assert torch.isfinite(step.log_prob).all()


def test_sum_log_prob_is_dims_times_mean():
    x, v, z, t, tn = _state(seed=9)
    m = flow_sde_step(x, v, t, tn, noise=z).log_prob
    s = flow_sde_step(x, v, t, tn, noise=z, reduce="sum").log_prob
    assert torch.allclose(s, 15 * m, atol=1e-10)


def test_gaussian_log_prob_hand_value():
    # N(1; 0, 2²) = −1/8 − log 2 − ½ log 2π per element.
    lp = gaussian_log_prob(torch.ones(1, 3), torch.zeros(1, 3), torch.full((1, 1), 2.0))
    assert lp.item() == pytest.approx(-0.125 - math.log(2) - 0.5 * math.log(2 * math.pi), abs=1e-6)


@pytest.mark.parametrize("kind", ["flow", "dance"])
def test_scoring_the_sampled_transition_reproduces_log_prob(kind):
    x, v, z, t, tn = _state(seed=3, dtype=torch.float32)
    sampled = sde_step(kind, x, v, t, tn, 0.5, noise=z)
    scored = sde_step(kind, x, v, t, tn, 0.5, prev_sample=sampled.x_next)
    assert torch.equal(scored.x_next, sampled.x_next)
    assert torch.equal(scored.log_prob, sampled.log_prob)
    # a different transition scores differently (the log-prob depends on x_next).
    other = sde_step(kind, x, v, t, tn, 0.5, prev_sample=sampled.x_next + 0.1)
    assert not torch.allclose(other.log_prob, sampled.log_prob)


def test_sde_step_dispatch_passes_noise_level():
    x, v, z, t, tn = _state(seed=4)
    assert torch.equal(
        sde_step("flow", x, v, t, tn, 0.3, noise=z).x_next,
        flow_sde_step(x, v, t, tn, noise_level=0.3, noise=z).x_next,
    )
    assert torch.equal(
        sde_step("dance", x, v, t, tn, 0.3, noise=z).x_next,
        dance_sde_step(x, v, t, tn, eta=0.3, noise=z).x_next,
    )


def _scalar(val):
    return torch.tensor([[val]], dtype=torch.float64)


def _t(val):
    return torch.tensor([val], dtype=torch.float64)


def test_flow_sde_hand_mean_middle_step():
    # x = 0.5, v = −1, t = 0.6 → 0.5, a = 0.7:
    # σ² = 0.49·0.6/0.4 = 0.735; x + (1 − t)v = 0.1; drift = −1 + 0.735/1.2·0.1 = −0.93875
    # μ = 0.5 + (−0.93875)(−0.1) = 0.593875; std = sqrt(0.735·0.1) = sqrt(0.0735).
    s = flow_sde_step(_scalar(0.5), _scalar(-1.0), _t(0.6), _t(0.5), noise=_scalar(0.0))
    assert s.mean.item() == pytest.approx(0.593875, abs=1e-12)
    assert s.std.item() == pytest.approx(math.sqrt(0.0735), abs=1e-12)
    assert s.x_next.item() == pytest.approx(0.593875, abs=1e-12)


def test_flow_sde_hand_mean_first_step_uses_next_sigma():
    # t = 1 → 0.75: σ² evaluated at 0.75 is 0.49·3 = 1.47; x + 0·v = 0.5;
    # drift = −1 + 1.47/2·0.5 = −0.6325; μ = 0.5 + 0.6325·0.25 = 0.658125; std = sqrt(0.3675).
    s = flow_sde_step(_scalar(0.5), _scalar(-1.0), _t(1.0), _t(0.75), noise=_scalar(2.0))
    assert s.mean.item() == pytest.approx(0.658125, abs=1e-12)
    assert s.std.item() == pytest.approx(math.sqrt(0.3675), abs=1e-12)
    assert s.x_next.item() == pytest.approx(0.658125 + 2 * math.sqrt(0.3675), abs=1e-12)


def test_dance_sde_hand_mean():
    # x = 0.5, v = −1, t = 0.6 → 0.5, η = 0.25: x̂0 = 1.1; score = −(0.5 − 0.44)/0.36 = −1/6;
    # μ = 0.5 + 0.1 − ½·0.0625·(−1/6)·(−0.1) = 0.6 − 0.03125/60; std = 0.25·sqrt(0.1).
    s = dance_sde_step(_scalar(0.5), _scalar(-1.0), _t(0.6), _t(0.5), noise=_scalar(0.0))
    assert s.mean.item() == pytest.approx(0.6 - 0.03125 / 60, abs=1e-12)
    assert s.std.item() == pytest.approx(0.25 * math.sqrt(0.1), abs=1e-12)


@pytest.mark.parametrize("kind", ["flow", "dance"])
def test_vanishing_noise_recovers_ode_step(kind):
    x, v, z, t, tn = _state(seed=7, dtype=torch.float32)
    ode = ode_step(x, v, t, tn)
    assert torch.allclose(ode.x_next, x + v * (tn - t).view(-1, 1, 1))
    assert torch.equal(ode.log_prob, torch.zeros(x.shape[0]))
    sde = sde_step(kind, x, v, t, tn, 1e-6, noise=z)
    assert (sde.x_next - ode.x_next).abs().max().item() < 1e-4
    # with the default noise level the SDE step is genuinely different.
    noisy = sde_step(kind, x, v, t, tn, 0.7 if kind == "flow" else 0.25, noise=z)
    assert (noisy.x_next - ode.x_next).abs().max().item() > 1e-2


def test_marginal_preserving_identity_and_flow_drift():
    x0, eps, z = _randn(4, 6, seed=11), _randn(4, 6, seed=12), _randn(4, 6, seed=13)
    t = torch.tensor([0.9, 0.6, 0.3, 0.1], dtype=torch.float64)
    tn = t - 0.1
    x, v = interpolate(x0, eps, t), velocity_target(x0, eps)
    tb = t.view(-1, 1)
    assert torch.allclose(x + (1 - tb) * v, eps, atol=1e-12)
    # so on the exact path the Flow-SDE drift is v + σ²/(2t)·ε.
    a = 0.7
    sig2 = a**2 * tb / (1 - tb)
    step = flow_sde_step(x, v, t, tn, a, noise=z)
    want = x + (v + sig2 / (2 * tb) * eps) * (tn - t).view(-1, 1)
    assert torch.allclose(step.mean, want, atol=1e-12)

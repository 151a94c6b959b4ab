"""The rectified-flow path and the Gaussian sampler steps (docs/CONFORMANCE.md)."""

import math
import typing

import pytest
import torch

from ddrl.config.core import SDES, DanceSDE, FlowSDE, SamplerConfig
from ddrl.errors import DDRLError, choices
from ddrl.flow import (
    flow_matching_loss,
    interpolate,
    linear_grid,
    scheduler_grid,
    shift_timesteps,
    velocity_target,
)
from ddrl.models.base import EulerSchedulerGrid
from ddrl.sampling import time_grid
from ddrl.sde import dance_sde_step, flow_sde_step, gaussian_log_prob, ode_step, stepper

# (t, t_next) per sample: the first step from t = 1, a middle step, and the last step to t = 0.
T_PAIRS = [(1.0, 0.9), (0.6, 0.5), (0.6, 0.45), (0.25, 0.0)]
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


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
    """DESIGN §3 Flow-SDE, written independently, with flow_grpo's rule at t = 1
    (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py L47, docs/CONFORMANCE.md §1):
    σ_t = a·sqrt(t/(1 − t')), t' = t_next where t = 1 (denominator only; the numerator keeps
    t = 1), t' = t elsewhere. Returns (mean, transition std, σ_t)."""
    t_b, tn_b = _bt(t.tolist(), x), _bt(tn.tolist(), x)
    t_den = torch.where(t_b >= 1.0, tn_b, t_b)
    sig2 = a**2 * t_b / (1 - t_den)
    dt = tn_b - t_b
    mean = x + (v + sig2 / (2 * t_b) * (x + (1 - t_b) * v)) * dt
    return mean, torch.sqrt(sig2 * -dt), torch.sqrt(sig2)


def _dance_ref(x, v, t, tn, eta):
    """DESIGN §3 Dance-SDE, written independently. Returns (mean, transition std, σ = η)."""
    t_b, tn_b = _bt(t.tolist(), x), _bt(tn.tolist(), x)
    dt = tn_b - t_b
    x0 = x - t_b * v
    score = -(x - (1 - t_b) * x0) / t_b**2
    mean = x + dt * v - 0.5 * eta**2 * score * dt
    return mean, eta * torch.sqrt(-dt), torch.full_like(t_b, eta)


def _ref(kind, x, v, t, tn, level):
    return (_flow_ref if kind == "flow" else _dance_ref)(x, v, t, tn, level)


def _normal_log_prob(x_next, mean, std, reduce="mean"):
    """Reference log-density: torch.distributions.Normal per element, reduced over dims."""
    per = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).flatten(1)
    return per.mean(1) if reduce == "mean" else per.sum(1)


LEVEL = {"flow": 0.7, "dance": 0.25}


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
    assert torch.allclose(xt - t.view(-1, 1, 1) * v, x0, atol=1e-12)
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
def timestep_grid(n: int, shift: float, kind: str = "scheduler") -> torch.Tensor:
    """The sampler's grid of kind ``kind`` for a model with diffusers' default scheduler."""
    return time_grid(SamplerConfig(grid=kind, shift=shift), EulerSchedulerGrid(), n)


@pytest.mark.parametrize("kind", ["scheduler", "linear"])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_timestep_grid_endpoints_and_monotone(kind, shift):
    g = timestep_grid(7, shift, kind=kind)
    assert g.shape == (8,) and g.dtype == torch.float32
    assert g[0].item() == 1.0 and g[-1].item() == 0.0
    assert (g[1:] < g[:-1]).all()
    assert (g[1:-1] > 0).all()  # only the last point is 0


def test_timestep_grid_kinds_and_default():
    assert set(choices(typing.get_type_hints(SamplerConfig)["grid"])) == {"scheduler", "linear"}
    # the default is diffusers' scheduler grid (flow_grpo, SD3/FLUX pipelines).
    assert torch.equal(timestep_grid(7, 3.0), scheduler_grid(7, 3.0))
    assert torch.equal(timestep_grid(7, 3.0, kind="scheduler"), scheduler_grid(7, 3.0))
    assert torch.equal(timestep_grid(7, 3.0, kind="linear"), linear_grid(7, 3.0))
    assert not torch.allclose(scheduler_grid(7, 3.0), linear_grid(7, 3.0))


def test_linear_grid_shift_one_is_uniform_and_shift_formula():
    u = torch.linspace(1.0, 0.0, 11, dtype=torch.float64)
    assert torch.allclose(linear_grid(10, 1.0), u.float(), atol=1e-7)
    assert torch.allclose(timestep_grid(10, 1.0, kind="linear"), u.float(), atol=1e-7)
    for s in (3.0, 0.5):
        want = s * u / (1 + (s - 1) * u)
        assert torch.allclose(linear_grid(10, s), want.float(), atol=1e-7)
        assert torch.allclose(timestep_grid(10, s, kind="linear"), want.float(), atol=1e-7)
    # one hand value: s = 3 at u = 0.5 gives 1.5 / 2 = 0.75.
    assert linear_grid(2, 3.0)[1].item() == pytest.approx(0.75, abs=1e-7)
    assert shift_timesteps(torch.tensor(0.2), 3.0).item() == pytest.approx(0.6 / 1.4, abs=1e-7)


def test_scheduler_grid_hand_values():
    # shift 1: linspace(1, σ_min = 1/1000, N) then 0 — the last step is tiny.
    g = scheduler_grid(4, 1.0)
    want = torch.tensor([1.0, 1 - 0.999 / 3, 1 - 2 * 0.999 / 3, 0.001, 0.0])
    assert torch.allclose(g, want, atol=1e-6)
    # shift s: s(linspace(1, s(1/1000), N)) then 0 (diffusers shifts its σ_min, then the grid).
    s = 3.0
    lo = s * 1e-3 / (1 + (s - 1) * 1e-3)
    u = torch.linspace(1.0, lo, 4, dtype=torch.float64)
    want = torch.cat([s * u / (1 + (s - 1) * u), torch.zeros(1, dtype=torch.float64)])
    assert torch.allclose(scheduler_grid(4, s).double(), want, atol=1e-6)
    assert scheduler_grid(4, s)[-2].item() < 0.01  # vs 0.25·s-shifted on the linear grid


# ---------------------------------------------------------------------------- SDE steps


@pytest.mark.parametrize("kind", ["flow", "dance"])
def test_step_mean_std_sigma_match_design_formulas(kind):
    x, v, z, t, tn = _state()
    level = LEVEL[kind]
    step = stepper(SDES[kind](**{"noise_level" if kind == "flow" else "eta": level}))(
        x, v, t, tn, noise=z
    )
    mean, std, sigma = _ref(kind, x, v, t, tn, level)
    assert torch.allclose(step.mean, mean, atol=1e-10)
    assert torch.allclose(step.std.expand_as(x), std.expand_as(x), atol=1e-10)
    assert torch.allclose(step.sigma.expand_as(x), sigma.expand_as(x), atol=1e-10)
    # std = σ_t·sqrt(−dt)
    dt = _bt((tn - t).tolist(), x)
    assert torch.allclose(step.std, step.sigma * torch.sqrt(-dt), atol=1e-12)
    assert torch.allclose(step.x_next, mean + std * z, atol=1e-10)


@pytest.mark.parametrize("kind", ["flow", "dance"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_log_prob_is_normal_density_reduced(kind, reduce):
    x, v, z, t, tn = _state(seed=5, dtype=torch.float32)
    fn = flow_sde_step if kind == "flow" else dance_sde_step
    step = fn(x, v, t, tn, LEVEL[kind], noise=z, reduce=reduce)
    # the reference density uses the hand-written mean and std, not the step's own.
    mean, std, _ = _ref(kind, x.double(), v.double(), t.double(), tn.double(), LEVEL[kind])
    want = _normal_log_prob(step.x_next.double(), mean, std, reduce)
    assert step.log_prob.shape == (x.shape[0],)
    assert torch.allclose(step.log_prob.double(), want, atol=1e-4 if reduce == "sum" else 1e-5)
    assert torch.isfinite(step.log_prob).all()
    # at x_next = μ + std·z the density is −z²/2 − log std − log sqrt(2π), per element.
    by_z = (-(z.double() ** 2) / 2 - torch.log(std.expand_as(x)) - LOG_SQRT_2PI).flatten(1)
    by_z = by_z.mean(1) if reduce == "mean" else by_z.sum(1)
    assert torch.allclose(step.log_prob.double(), by_z, atol=1e-4 if reduce == "sum" else 1e-5)


def test_sum_log_prob_is_dims_times_mean():
    x, v, z, t, tn = _state(seed=9)
    m = flow_sde_step(x, v, t, tn, noise=z).log_prob
    s = flow_sde_step(x, v, t, tn, noise=z, reduce="sum").log_prob
    assert torch.allclose(s, 15 * m, atol=1e-10)


def test_gaussian_log_prob_hand_value():
    # N(1; 0, 2²) = −1/8 − log 2 − ½ log 2π per element.
    lp = gaussian_log_prob(torch.ones(1, 3), torch.zeros(1, 3), torch.full((1, 1), 2.0))
    assert lp.item() == pytest.approx(-0.125 - math.log(2) - LOG_SQRT_2PI, abs=1e-6)
    s = gaussian_log_prob(torch.ones(1, 3), torch.zeros(1, 3), torch.full((1, 1), 2.0), "sum")
    assert s.item() == pytest.approx(3 * (-0.125 - math.log(2) - LOG_SQRT_2PI), abs=1e-6)


@pytest.mark.parametrize("kind", ["flow", "dance"])
def test_scoring_a_transition_is_the_independent_normal_density(kind):
    """prev_sample given: the step returns it unchanged and scores it with the density of the
    hand-written Gaussian (not with the step's own sampling path)."""
    x, v, z, t, tn = _state(seed=3)
    sde = SDES[kind](**{"noise_level" if kind == "flow" else "eta": 0.5})
    mean, std, sigma = _ref(kind, x, v, t, tn, 0.5)
    sampled = stepper(sde)(x, v, t, tn, noise=z)
    for prev in (sampled.x_next, sampled.x_next + 0.1, mean + std * _randn(*x.shape, seed=99)):
        scored = stepper(sde)(x, v, t, tn, prev_sample=prev)
        assert torch.equal(scored.x_next, prev)
        assert torch.allclose(scored.mean, mean, atol=1e-10)
        assert torch.allclose(scored.sigma.expand_as(x), sigma.expand_as(x), atol=1e-10)
        assert torch.allclose(scored.log_prob, _normal_log_prob(prev, mean, std), atol=1e-10)
    # a different transition scores differently (the log-prob depends on x_next).
    other = stepper(sde)(x, v, t, tn, prev_sample=sampled.x_next + 0.1)
    assert not torch.allclose(other.log_prob, sampled.log_prob)


def test_sde_objects_registry_defaults_and_checks():
    from ddrl.config.core import CPSSDE, ODESampler
    from ddrl.sde import cps_step, ode_step

    assert SDES == {"flow": FlowSDE, "dance": DanceSDE, "cps": CPSSDE, "ode": ODESampler}
    assert CPSSDE().kind == "cps" and CPSSDE().eta == 0.8  # flow_grpo's CPS configs
    x0, v0, z0, t0, tn0 = _state(seed=5)
    cps = stepper(CPSSDE(eta=0.5))(x0, v0, t0, tn0, noise=z0)
    assert torch.equal(cps.x_next, cps_step(x0, v0, t0, tn0, 0.5, z0).x_next)
    ode = stepper(ODESampler())(x0, v0, t0, tn0, noise=z0)  # the noise is not used
    assert torch.equal(ode.x_next, ode_step(x0, v0, t0, tn0).x_next)
    assert FlowSDE().kind == "flow" and FlowSDE().noise_level == 0.7  # flow_grpo's a
    assert DanceSDE().kind == "dance" and DanceSDE().eta == 0.3  # DanceGRPO's FLUX η
    x, v, z, t, tn = _state(seed=4)
    # each object passes its own parameter to its step function.
    for got, want in [
        (
            stepper(FlowSDE(noise_level=0.3))(x, v, t, tn, noise=z),
            flow_sde_step(x, v, t, tn, 0.3, z),
        ),  # noqa: E501
        (stepper(DanceSDE(eta=0.3))(x, v, t, tn, noise=z), dance_sde_step(x, v, t, tn, 0.3, z)),
    ]:
        for f in ("x_next", "mean", "std", "log_prob", "sigma"):
            assert torch.equal(getattr(got, f), getattr(want, f)), f
    default = stepper(FlowSDE())(x, v, t, tn, noise=z).x_next
    assert not torch.equal(stepper(FlowSDE(noise_level=0.3))(x, v, t, tn, noise=z).x_next, default)
    FlowSDE().check()
    DanceSDE().check()
    with pytest.raises(DDRLError, match="sampler.sde.noise_level"):
        FlowSDE(noise_level=0.0).check()
    with pytest.raises(DDRLError, match="sampler.sde.eta"):
        DanceSDE(eta=-1.0).check()


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
    assert s.sigma.item() == pytest.approx(math.sqrt(0.735), abs=1e-12)
    assert s.x_next.item() == pytest.approx(0.593875, abs=1e-12)


def test_flow_sde_hand_mean_first_step_next_point_in_denominator_only():
    # flow_grpo sd3_sde_with_logprob.py L47: at t = 1 → 0.75 the numerator keeps t = 1 and the
    # denominator uses the next point: σ² = 0.49·1/(1 − 0.75) = 1.96 (σ = 1.4); x + 0·v = 0.5;
    # drift = −1 + 1.96/2·0.5 = −0.51; μ = 0.5 + 0.51·0.25 = 0.6275; std = sqrt(1.96·0.25) = 0.7.
    s = flow_sde_step(_scalar(0.5), _scalar(-1.0), _t(1.0), _t(0.75), noise=_scalar(2.0))
    assert s.sigma.item() == pytest.approx(1.4, abs=1e-12)
    assert s.mean.item() == pytest.approx(0.6275, abs=1e-12)
    assert s.std.item() == pytest.approx(0.7, abs=1e-12)
    assert s.x_next.item() == pytest.approx(0.6275 + 2 * 0.7, abs=1e-12)
    # log p of that sample: z = 2 → −2 − log 0.7 − ½ log 2π.
    assert s.log_prob.item() == pytest.approx(-2 - math.log(0.7) - LOG_SQRT_2PI, abs=1e-12)


def test_dance_sde_hand_mean():
    # x = 0.5, v = −1, t = 0.6 → 0.5, η = 0.25: x̂0 = 1.1; score = −(0.5 − 0.44)/0.36 = −1/6;
    # μ = 0.5 + 0.1 − ½·0.0625·(−1/6)·(−0.1) = 0.6 − 0.03125/60; std = 0.25·sqrt(0.1).
    s = dance_sde_step(_scalar(0.5), _scalar(-1.0), _t(0.6), _t(0.5), 0.25, noise=_scalar(0.0))
    assert s.mean.item() == pytest.approx(0.6 - 0.03125 / 60, abs=1e-12)
    assert s.std.item() == pytest.approx(0.25 * math.sqrt(0.1), abs=1e-12)
    assert s.sigma.item() == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("kind", ["flow", "dance"])
def test_vanishing_noise_recovers_ode_step(kind):
    x, v, z, t, tn = _state(seed=7, dtype=torch.float32)
    ode = ode_step(x, v, t, tn)
    assert torch.allclose(ode.x_next, x + v * (tn - t).view(-1, 1, 1))
    assert torch.equal(ode.log_prob, torch.zeros(x.shape[0]))
    assert torch.equal(ode.std, torch.zeros_like(ode.std))
    assert torch.equal(ode.sigma, torch.zeros_like(ode.sigma))
    param = "noise_level" if kind == "flow" else "eta"
    sde = stepper(SDES[kind](**{param: 1e-6}))(x, v, t, tn, noise=z)
    assert (sde.x_next - ode.x_next).abs().max().item() < 1e-4
    # with the default noise level the SDE step is genuinely different.
    noisy = stepper(SDES[kind](**{param: LEVEL[kind]}))(x, v, t, tn, noise=z)
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

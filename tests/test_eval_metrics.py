"""Hand-computed checks of the evaluation metrics on tiny inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddrl.evaluation.metrics import (
    default_t_grid,
    frechet_distance,
    heldout_diffusion_loss,
    out_of_range_rate,
    pairwise_diversity,
    saturation_rate,
)


def test_diversity_identical_samples_is_exactly_zero():
    x = torch.full((4, 1, 8, 8), 0.37)
    assert pairwise_diversity(x, torch.zeros(4, dtype=torch.long)) == 0.0


def test_diversity_two_samples_3_4_5_triangle():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert pairwise_diversity(x, torch.tensor([0, 0])) == pytest.approx(5.0, abs=1e-12)


def test_diversity_groups_weighted_equally():
    # Group 0: three points on a line at 0, 1, 2 -> pair distances 1, 2, 1 -> mean 4/3.
    # Group 1: two points 10 apart -> 10. Group 2: a singleton, ignored.
    x = torch.tensor([[0.0], [1.0], [2.0], [5.0], [15.0], [99.0]])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    assert pairwise_diversity(x, groups) == pytest.approx((4 / 3 + 10) / 2, abs=1e-12)


def test_diversity_needs_a_pair():
    with pytest.raises(ValueError, match="at least one group"):
        pairwise_diversity(torch.randn(3, 2), torch.tensor([0, 1, 2]))


def test_fd_of_a_set_against_itself_is_zero():
    feats = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(feats, feats)) < 1e-6


def test_fd_gaussians_with_identity_covariance_is_mean_gap():
    g = torch.Generator().manual_seed(1)
    d, n = 4, 20000
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0])
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64) + shift
    # Sampling noise in the covariance terms is O(d/sqrt(n)) ~ 0.03 at this size.
    assert frechet_distance(a, b) == pytest.approx(float(shift @ shift), abs=0.1)


def test_fd_one_dimensional_matches_closed_form():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(50, 1, generator=g, dtype=torch.float64) * 2.0 + 1.0
    b = torch.randn(70, 1, generator=g, dtype=torch.float64) * 0.5 - 3.0
    mu1, mu2 = a.mean().item(), b.mean().item()
    s1, s2 = a.std(unbiased=True).item(), b.std(unbiased=True).item()
    assert frechet_distance(a, b) == pytest.approx((mu1 - mu2) ** 2 + (s1 - s2) ** 2, rel=1e-9)


def test_fd_rejects_single_sample():
    with pytest.raises(ValueError):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


def test_out_of_range_rate_hand_built():
    # tol = 0.25 keeps the bounds [-1.25, 1.25] exactly representable; the boundary values
    # themselves are inside (the test is strict).
    x = torch.tensor([-2.0, -1.25, -1.0, 0.0, 1.0, 1.25, 1.5, 3.0])
    assert out_of_range_rate(x, tol=0.25) == pytest.approx(3 / 8)
    assert out_of_range_rate(x, tol=0.0) == pytest.approx(5 / 8)
    assert out_of_range_rate(x) == pytest.approx(5 / 8)  # default tol 0.05
    assert out_of_range_rate(torch.tensor([0.5, 2.5]), low=0.0, high=2.0, tol=0.0) == 0.5


def test_saturation_rate_hand_built():
    # After clamping to [-1, 1] with tol = 0.25: 0.75, 1.0, 1.0 are >= 0.75; 0.5, 0, -1 are not.
    x = torch.tensor([[-3.0, 0.0, 0.5], [0.75, 1.0, 7.0]])
    assert saturation_rate(x, tol=0.25) == pytest.approx(3 / 6)
    assert saturation_rate(x, tol=0.0) == pytest.approx(2 / 6)
    assert saturation_rate(x, low=0.0, high=0.5, tol=0.0) == pytest.approx(4 / 6)


def test_default_t_grid_midpoints():
    torch.testing.assert_close(
        default_t_grid(4), torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64)
    )


def _zero_velocity(x_t, t, index):
    return torch.zeros_like(x_t)


def test_heldout_loss_is_deterministic_for_a_seed():
    x0 = torch.randn(37, 1, 4, 4, generator=torch.Generator().manual_seed(3))

    def fn(x_t, t, index):
        return 0.5 * x_t + t.view(-1, 1, 1, 1)

    grid = default_t_grid(5)
    a = heldout_diffusion_loss(fn, x0, grid, seed=7, batch_size=10)
    assert a == heldout_diffusion_loss(fn, x0, grid, seed=7, batch_size=10)
    # Batching must not change the noise each sample sees.
    assert a == pytest.approx(heldout_diffusion_loss(fn, x0, grid, seed=7, batch_size=37), rel=1e-9)
    assert a != heldout_diffusion_loss(fn, x0, grid, seed=8, batch_size=10)


def test_heldout_loss_zero_velocity_on_zero_data_is_noise_power():
    # v = 0, x0 = 0 -> loss = E[eps^2] = 1.
    x0 = torch.zeros(200, 64)
    loss = heldout_diffusion_loss(_zero_velocity, x0, [0.2, 0.5, 0.8], seed=0, batch_size=64)
    assert loss == pytest.approx(1.0, abs=0.05)


def test_heldout_loss_oracle_for_point_mass_is_zero():
    # x_t = (1 - t) c + t eps  =>  eps = (x_t - (1 - t) c) / t,  target = eps - c.
    c = 0.3
    x0 = torch.full((50, 2, 3), c, dtype=torch.float64)
    seen = []

    def oracle(x_t, t, index):
        seen.append(index.clone())
        tt = t.view(-1, 1, 1)
        return (x_t - (1 - tt) * c) / tt - c

    loss = heldout_diffusion_loss(oracle, x0, default_t_grid(10), seed=0, batch_size=16)
    assert loss < 1e-10
    # Every sample is visited once per grid point, with its own row index.
    assert torch.equal(torch.cat(seen[:4]), torch.arange(50))
    assert len(seen) == 10 * math.ceil(50 / 16)


def test_heldout_loss_t_vector_shape_and_value():
    x0 = torch.zeros(5, 3)
    got = []

    def fn(x_t, t, index):
        got.append((t.shape, float(t[0])))
        return torch.zeros_like(x_t)

    heldout_diffusion_loss(fn, x0, torch.tensor([0.25]), batch_size=2)
    assert got == [((2,), 0.25), ((2,), 0.25), ((1,), 0.25)]
    assert np.isfinite(heldout_diffusion_loss(fn, x0, [0.5]))


# ------------------------------------------------------------------ evaluate()
EXTRA_GOLD = {"gold_reward", "gold_accuracy", "diversity_feature", "fd"}


def _evaluate(gen, data_name, reward, gold, n=8):
    from ddrl.config.core import SamplerConfig
    from ddrl.data.pools import load_data
    from ddrl.evaluation.config import EvalConfig
    from ddrl.evaluation.evaluate import evaluate

    cfg = EvalConfig(samples_per_prompt=n, loss_t_points=2)
    return evaluate(gen, load_data(data_name), reward, gold, cfg, SamplerConfig(eval_steps=3))


def test_evaluate_unbounded_codec_has_no_saturation_and_no_gold_without_evaluator(tiny_model):
    from ddrl.rewards.toy2d import RightReward

    m, raw, prompts = _evaluate(tiny_model, "toy2d", RightReward(), None, n=16)
    assert set(m) == {"proxy_reward", "diversity", "heldout_diffusion_loss", "out_of_range_rate"}
    assert raw.shape == (16, 2) and prompts == [""] * 16
    assert m["out_of_range_rate"] == 0.0  # no valid range: nothing is out of it
    # Without a range the reward sees the raw samples: r = mean x coordinate.
    assert m["proxy_reward"] == pytest.approx(raw[:, 0].mean().item(), rel=1e-6)


def test_evaluate_gold_metrics_only_with_a_gold_evaluator(tiny_model):
    from ddrl.rewards.toy2d import RightReward, Toy2DGold

    plain, raw, _ = _evaluate(tiny_model, "toy2d", RightReward(), None)
    judged, raw_g, _ = _evaluate(tiny_model, "toy2d", RightReward(), Toy2DGold())
    assert set(judged) == set(plain) | EXTRA_GOLD
    assert torch.equal(raw, raw_g)  # the judge changes no sample and no other number
    assert {k: judged[k] for k in plain} == plain
    assert 0.0 <= judged["gold_accuracy"] <= 1.0 and judged["fd"] >= 0.0


def test_evaluate_bounded_codec_clamps_for_rewards_and_reports_saturation(tiny_digits):
    seen = []

    def reward(images, prompts):
        seen.append(images.clone())
        return images.flatten(1).mean(1)

    den = tiny_digits.denoiser.train()
    m, raw, prompts = _evaluate(tiny_digits, "digits", reward, None, n=2)
    assert den.training  # evaluate restores the mode it found
    assert raw.shape == (20, 1, 8, 8) and prompts == [str(i) for i in range(10) for _ in "ab"]
    assert set(m) == {
        "proxy_reward",
        "diversity",
        "heldout_diffusion_loss",
        "out_of_range_rate",
        "saturation_rate",
    }
    lo, hi = tiny_digits.codec.value_range
    # An untrained model leaves the range, so the clamp is visible: rewards see clamped
    # images, the range metrics are taken on the raw (unclamped) samples.
    assert float(raw.abs().max()) > hi
    assert torch.equal(seen[0], raw.clamp(lo, hi))
    assert m["proxy_reward"] == pytest.approx(seen[0].mean().item(), rel=1e-6)
    assert m["out_of_range_rate"] == out_of_range_rate(raw, lo, hi) > 0
    assert m["saturation_rate"] == saturation_rate(raw, hi, low=lo)
    # Fixed evaluation seed: the same model gives the same numbers.
    assert _evaluate(tiny_digits, "digits", reward, None, n=2)[0] == m


def test_eval_cfg_scale_guides_evaluation_only(tiny_digits):
    """eval.cfg_scale = w evaluates exactly as a sampler at CFG w would, whatever the training
    sampler's guidance; 0 keeps the sampler's."""
    import dataclasses

    from ddrl.config.core import SamplerConfig
    from ddrl.data.pools import load_data
    from ddrl.evaluation.config import EvalConfig
    from ddrl.evaluation.evaluate import evaluate
    from ddrl.rewards.digits import InkReward

    data = load_data("digits")
    cfg = EvalConfig(samples_per_prompt=2, loss_t_points=2)
    train = SamplerConfig(eval_steps=3, cfg_scale=1.0)
    guided = evaluate(
        tiny_digits, data, InkReward(), None, dataclasses.replace(cfg, cfg_scale=3.0), train
    )
    same = evaluate(
        tiny_digits, data, InkReward(), None, cfg, dataclasses.replace(train, cfg_scale=3.0)
    )
    plain = evaluate(tiny_digits, data, InkReward(), None, cfg, train)
    assert torch.equal(guided[1], same[1]) and not torch.equal(guided[1], plain[1])
    assert EvalConfig().sampler(train).cfg_scale == 1.0
    assert EvalConfig(cfg_scale=4.5).sampler(train) == dataclasses.replace(train, cfg_scale=4.5)

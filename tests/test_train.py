"""Integration tests of the one training loop on the embedded digits task (tiny budgets)."""

import json

import pytest
import torch
from helpers_quick import quick
from safetensors.torch import load_file

from ddrl.components import load_base
from ddrl.config import build_config
from ddrl.runlog import prepare_run_dir, read_jsonl
from ddrl.train import train


def _run(tmp_path, name, *ov):
    cfg = build_config(overrides=quick(*ov))
    out = prepare_run_dir(tmp_path / name, resume=False, overwrite=False)
    return cfg, out, train(cfg, out, log=lambda *a: None)


@pytest.mark.parametrize("algorithm", ["ddrl", "flow_grpo", "dance_grpo", "sft"])
def test_every_parameter_changes(tmp_path, algorithm):
    cfg, out, row = _run(
        tmp_path, algorithm, f"algorithm={algorithm}", "optim.weight_decay=0", "optim.lr=1e-3"
    )
    base, _ = load_base(cfg, log=lambda *a: None)
    before = base.state_dict()
    after = load_file(out / "checkpoints" / "step-000002" / "model.safetensors")
    assert set(after) == set(before)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == [], f"{algorithm}: parameters not trained: {unchanged}"
    assert row["iteration"] == 2 and torch.isfinite(torch.tensor(row["loss"]))


def test_on_policy_ratio_is_exactly_one(tmp_path):
    _, out, _ = _run(tmp_path, "r", "algorithm=ddrl")
    for r in read_jsonl(out / "metrics.jsonl"):
        assert r["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        assert r["ratio_max_dev"] < 1e-5 and r["clip_frac"] == 0.0


def test_resume_reproduces_uninterrupted_run(tmp_path):
    ov = ("algorithm=ddrl", "train.iterations=4", "train.checkpoint_every=2", "optim.ema_decay=0.9")
    cfg, full, _ = _run(tmp_path, "full", *ov)
    cfg_half = build_config(overrides=quick(*ov, "train.iterations=2"))
    half = prepare_run_dir(tmp_path / "half", resume=False, overwrite=False)
    train(cfg_half, half, log=lambda *a: None)
    cfg_half.train.iterations = 4
    train(cfg_half, half, resume=True, log=lambda *a: None)
    for name in ("model", "ema", "optimizer"):
        a = load_file(full / "checkpoints" / "step-000004" / f"{name}.safetensors")
        b = load_file(half / "checkpoints" / "step-000004" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs after resume"
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]  # noqa: E731
    assert strip(read_jsonl(full / "metrics.jsonl")) == strip(read_jsonl(half / "metrics.jsonl"))


def test_toy_reward_rises(tmp_path):
    """GRPO on the 2-D toy with reward = x: the mean reward must go up."""
    cfg, out, _ = _run(
        tmp_path,
        "toy",
        "task=toy2d",
        "algorithm=grpo",
        "pretrain.steps=400",
        "pretrain.batch_size=256",
        "train.iterations=15",
        "train.prompts_per_iter=4",
        "train.group_size=16",
        "optim.lr=3e-3",
        "sampler.num_steps=6",
    )
    rows = read_jsonl(out / "metrics.jsonl")
    first = sum(r["reward_mean"] for r in rows[:3]) / 3
    last = sum(r["reward_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.2, (first, last)


def test_nan_reward_group_is_skipped_and_logged(tmp_path):
    logs = []
    cfg = build_config(overrides=quick("reward.name=plugins_for_tests:nan_first_group"))
    out = prepare_run_dir(tmp_path / "nan", resume=False, overwrite=False)
    row = train(cfg, out, log=logs.append)
    assert row["skipped_groups"] == 1
    assert any("skipped 1 group" in m for m in logs)
    assert all(
        json.loads(line)["skipped_groups"] == 1
        for line in (out / "metrics.jsonl").read_text().splitlines()
    )

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


def _params_with_gradient(model) -> set[str]:
    """Parameters that receive a non-zero gradient from the flow-matching loss."""
    x, t = torch.randn(8, 1, 8, 8), torch.rand(8)
    model.velocity(x, t, torch.arange(8) % 10).pow(2).mean().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    return got


@pytest.mark.parametrize("algorithm", ["ddrl", "flow_grpo", "dance_grpo", "sft"])
def test_every_parameter_changes(tmp_path, algorithm):
    cfg, out, row = _run(
        tmp_path, algorithm, f"algorithm={algorithm}", "optim.weight_decay=0", "optim.lr=1e-3"
    )
    base, _ = load_base(cfg, log=lambda *a: None)
    params = dict(base.named_parameters())
    # SD3's last joint block is context_pre_only: its context-stream query never reaches the
    # output, so diffusers' model has two parameters no loss can train (true of real SD3 too).
    last = base.arch.num_layers - 1
    dead = {
        f"transformer.transformer_blocks.{last}.attn.add_q_proj.{w}" for w in ("weight", "bias")
    }
    assert set(params) - _params_with_gradient(base) == dead
    after = load_file(out / "checkpoints" / "step-000002" / "model.safetensors")
    unchanged = [k for k in params if k not in dead and torch.equal(params[k].detach(), after[k])]
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


def test_heldout_loss_of_trained_base_beats_random_init(tmp_path):
    """The held-out diffusion loss must rank a (briefly) trained base above a random model."""
    from ddrl.backbones.digits import DigitsBackbone
    from ddrl.data import load_task_data
    from ddrl.eval.metrics import default_t_grid, heldout_diffusion_loss

    cfg = build_config(overrides=quick())
    base, _ = load_base(cfg, log=lambda *a: None)
    torch.manual_seed(0)
    random_model = DigitsBackbone(base.arch).eval()
    held = load_task_data("digits").heldout

    def loss(model):
        cond = model.encode(held.prompts)
        with torch.no_grad():
            return heldout_diffusion_loss(
                lambda x, t, i: model.velocity(x, t.float(), cond[i]), held.x, default_t_grid(5)
            )

    trained, rand = loss(base), loss(random_model)
    assert trained < 0.8 * rand, (trained, rand)


def test_toy2d_eval_writes_scatter(tmp_path):
    cfg, out, _ = _run(
        tmp_path,
        "toy_eval",
        "task=toy2d",
        "algorithm=ddrl",
        "pretrain.steps=50",
        "eval.every=1",
        "eval.samples_per_prompt=50",
    )
    assert (out / "samples_final.png").stat().st_size > 0
    rows = read_jsonl(out / "eval.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert 0.0 <= rows[-1]["gold_accuracy"] <= 1.0


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = _run(tmp_path, "tb", "train.tensorboard=true", "eval.every=1")
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"reward_mean", "grad_norm", "eval/gold_accuracy"} <= tags
    assert [e.step for e in acc.Scalars("reward_mean")] == [1, 2]

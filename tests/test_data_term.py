"""DDRL's data-term options (``ddrl.losses.data``): one forward with the policy term gives the
same terms and gradients; a subset of the trained steps is chosen the same way on every rank
and makes exactly the recorded backbone calls; a mask averages over the chosen steps only."""

import dataclasses
import json

import pytest
import torch
from named_losses import DDRLConfig, DDRLLoss
from test_advantages_losses import _batch, _ctx

from ddrl.cli import main
from ddrl.errors import DDRLError
from ddrl.losses.data import chosen_positions, data_mask


@pytest.mark.parametrize("null", [False, True], ids=["no-cfg", "cfg-4.5"])
def test_batched_data_term_equals_two_forwards(tiny_digits, null):
    tiny_digits.conditioner.requires_grad_(False)  # frozen, as in training
    b = _batch(tiny_digits, prompts=[str(i % 10) for i in range(6)], null=null)
    ctx = _ctx(cfg_scale=4.5 if null else 1.0)
    out, grads = {}, {}
    for batched in (False, True):
        tiny_digits.denoiser.zero_grad(set_to_none=True)
        loss = DDRLLoss(DDRLConfig(data_batched=batched), ctx)
        o = loss(tiny_digits.denoiser, b)
        sum(v.sum() * c for v, c in o.terms.values()).backward()
        out[batched] = {k: v.detach() for k, (v, _) in o.terms.items()}
        grads[batched] = {n: p.grad.clone() for n, p in tiny_digits.denoiser.named_parameters()}
    for k in ("policy", "data"):
        torch.testing.assert_close(out[True][k], out[False][k], rtol=1e-5, atol=1e-6)
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_data_steps_subset_is_shared_and_averaged_over_itself(tiny_digits):
    b = _batch(tiny_digits, prompts=["3"] * 6)
    cfg = DDRLConfig(data_steps=0.5)
    at = lambda j, plan=7: dataclasses.replace(b, position=j, positions=4, plan=plan)  # noqa: E731
    chosen = chosen_positions(cfg, at(0))
    assert len(chosen) == 2 and torch.equal(chosen, chosen_positions(cfg, at(3)))  # per plan
    masks = [data_mask(cfg, at(j)) for j in range(4)]
    assert [bool(m.all()) for m in masks] == [j in chosen.tolist() for j in range(4)]
    assert sum(int(m.sum()) for m in masks) == 2 * b.valid.numel()  # denominator: chosen only
    plans = {tuple(sorted(chosen_positions(cfg, at(0, p)).tolist())) for p in range(20)}
    assert len(plans) > 1  # the subset changes from iteration to iteration
    with pytest.raises(DDRLError, match="one of them"):
        DDRLConfig(data_steps=0.5, data_on_first_only=True).check()


def _calls(tmp_path, capsys, *overrides):
    out = tmp_path / "b.json"
    argv = ["bench", "--quick", "--algorithms", "ddrl", "--json", str(out), *overrides]
    assert main(argv) == 0, capsys.readouterr().err
    (r,) = json.loads(out.read_text())["results"]
    return sorted((p["batch_shape"][0], p["grad"], p["calls"]) for p in r["passes"])


def test_data_options_make_the_expected_backbone_calls(tmp_path, capsys):
    """--quick: 8 trajectories, 4 steps all trained; rollout = 4 forwards at batch 8."""
    roll = (8, False, 4.0)
    assert _calls(tmp_path, capsys) == [roll, (8, True, 8.0)]  # 4 policy + 4 data
    assert _calls(tmp_path, capsys, "loss.data_steps=0.5") == [roll, (8, True, 6.0)]
    assert _calls(tmp_path, capsys, "loss.data_on_first_only=true") == [roll, (8, True, 5.0)]
    assert _calls(tmp_path, capsys, "loss.data_batched=true") == [roll, (16, True, 4.0)]


def test_stacked_trained_steps_take_the_same_step(tmp_path, capsys):
    """train.steps_per_forward=k: k trained steps in one forward (k× the batch) make the same
    losses and gradient as one step per forward; the recorded calls show the stacking."""
    from helpers_quick import quick

    from ddrl.config import build_config
    from ddrl.training.loop import train
    from ddrl.training.runlog import prepare_run_dir, read_jsonl

    rows = {}
    for k in (1, 2, 4):
        cfg = build_config(overrides=quick(f"train.steps_per_forward={k}", "optim.ema_decay=0"))
        run = prepare_run_dir(tmp_path / f"k{k}", resume=False, overwrite=False)
        train(cfg, run, log=lambda *a: None)
        rows[k] = read_jsonl(run / "metrics.jsonl")
    for k in (2, 4):
        for a, b in zip(rows[1], rows[k], strict=True):
            for key in ("reward_mean", "loss_data", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (k, key)
            # −mean(A·ρ) with ρ ≡ 1 is ~0: its value is the rounding of the advantages' sum
            assert b["loss_policy"] == pytest.approx(a["loss_policy"], abs=1e-5), k
    roll = (8, False, 4.0)  # 4 trained steps × (policy + data) → 2 stacked forwards of each
    assert _calls(tmp_path, capsys, "train.steps_per_forward=2") == [roll, (16, True, 4.0)]
    with pytest.raises(DDRLError, match="stacks trained steps"):
        build_config(overrides=["train.steps_per_forward=2", "loss.data_steps=0.5"])

"""``ddrl doctor`` and the preflight checks (``ddrl.training.preflight``): every check passes
on digits and a tiny diffusers preset, says why where it does not apply, leaves the training
state alone, and fails with its one-line message on a defect planted in the real objects."""

import dataclasses
import itertools
import time

import pytest
import torch
from conftest import one_line_error
from helpers_quick import quick

import ddrl.losses.grpo as grpo
import ddrl.sde as sde
from ddrl.cli import main
from ddrl.config import PRESET_NAMES, build_config
from ddrl.data.pools import PairedPool
from ddrl.training.components import build_components
from ddrl.training.loop import prepare_learner
from ddrl.training.preflight import preflight

DIGITS = quick("sampler.cfg_scale=2.0")  # CFG on: every check applies
QUIET = lambda *a, **k: None  # noqa: E731
NAMES = [
    "SDE at zero noise = ODE",
    "CFG convention",
    "on-policy ratio",
    "reward determinism",
    "data pairing",
]


def doctor_lines(capsys, *argv: str) -> list[str]:
    assert main(["doctor", *argv]) == 0
    return capsys.readouterr().out.strip().splitlines()


@pytest.fixture(scope="module")
def run():
    """DDRL on digits with CFG: (config, components, loss) as training builds them."""
    cfg = build_config(overrides=DIGITS)
    c = build_components(cfg, QUIET)
    learner, _, _ = prepare_learner(cfg, c, "cpu", QUIET)
    return cfg, c, learner.loss_fn


def check(run, *match: str) -> str:
    """The preflight's one-line error on ``run``, containing every ``match``."""
    cfg, c, loss = run
    return one_line_error(preflight, cfg, c, loss, "cpu", QUIET, match=match)


def test_doctor_passes_on_digits(capsys):
    lines = doctor_lines(capsys, *DIGITS)
    assert [line.split(":")[0][5:] for line in lines[:5]] == NAMES
    assert all(line.startswith("ok   ") for line in lines[:5]), lines
    assert lines[5] == "doctor: all 5 checks passed"
    assert "(bound 1e-04, float32;" in lines[2]


def test_doctor_passes_on_tiny_sd3(capsys):
    lines = doctor_lines(
        capsys, "--preset", "tiny-sd3", "data.synthetic_per_prompt=1", "sampler.num_steps=2"
    )
    assert all(line.startswith("ok   ") for line in lines[:5]), lines  # CFG 4.5, data term
    assert lines[5] == "doctor: all 5 checks passed"


def test_objectives_without_a_ratio_say_so(run):
    cfg, c, _ = run
    nft = build_config(overrides=[*DIGITS, "algorithm=nft"])
    c = dataclasses.replace(c, pool=None, needs_data=False)
    loss = prepare_learner(nft, c, "cpu", QUIET)[0].loss_fn
    lines = preflight(nft, c, loss, "cpu", QUIET)
    assert lines[0].startswith("n/a  SDE at zero noise = ODE: sampler.sde.kind = ode")
    assert lines[2] == "n/a  on-policy ratio: objective nft has no likelihood ratio"
    assert lines[4] == "n/a  data pairing: the loss of algorithm nft uses no data"


def test_preflight_leaves_training_state_alone(run):
    _, c, loss = run
    den = c.gen.denoiser.train()
    weights = {k: v.clone() for k, v in den.state_dict().items()}
    rng = torch.get_rng_state()
    preflight(*run[:2], loss, "cpu", QUIET)
    assert den.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, weights[k]) for k, v in den.state_dict().items())


def test_shifted_log_prob_fails_the_ratio(run, monkeypatch):
    ctx, real = run[2].objective.ctx, run[2].objective.ctx.step

    def shifted(*a, **k):
        s = real(*a, **k)
        return dataclasses.replace(s, log_prob=s.log_prob + 1e-3)

    monkeypatch.setattr(ctx, "step", shifted)
    msg = check(run, "preflight on-policy ratio: max |r-1| = 1.0e-03 (bound 1e-04, float32;")
    assert "does not recompute the rollout's log-probs" in msg and "more failing" not in msg


def test_sde_not_euler_at_zero_noise_fails(run, monkeypatch):
    real = sde.flow_sde_step
    monkeypatch.setattr(sde, "flow_sde_step", lambda x, v, *a, **k: real(x, 1.01 * v, *a, **k))
    msg = check(run, "preflight SDE at zero noise = ODE:", "not the Euler step")
    assert msg.endswith("(1 more failing, listed above)")  # the rollout's log-probs moved too


@pytest.mark.parametrize("bad", ["drifting", "nan"])
def test_reward_nondeterministic_or_nan_fails(run, monkeypatch, bad):
    reward, calls = run[1].reward, itertools.count()

    def scores(images, prompts, real=reward.rewards[0]):
        out = real(images, prompts)
        if bad == "nan":
            return torch.where(torch.arange(len(out)) == 1, float("nan"), out)
        return out + 1e-3 * next(calls)

    monkeypatch.setattr(reward, "rewards", [scores])
    if bad == "nan":
        check(run, "preflight reward determinism: sample 1 ('", "reward 'ink' gave nan", "finite")
    else:
        check(run, "preflight reward determinism: sample 0", "|Δ| = 1.0e-03", "(1 more)")


@pytest.mark.parametrize(
    "defect, cause",
    [
        ("scale", "the loss guides with scale ≈ 3, the rollout with 2"),
        ("swapped", "the loss guides with cond and null swapped"),
        ("no_cfg", "the loss's velocity is the conditional one (a training path without CFG)"),
    ],
)
def test_training_cfg_unlike_rollout_fails(run, monkeypatch, defect, cause):
    real = grpo.velocity_with
    if defect == "scale":
        monkeypatch.setattr(run[2].objective.ctx, "cfg_scale", 3.0)
    elif defect == "swapped":
        monkeypatch.setattr(
            grpo, "velocity_with", lambda d, x, t, c, u, *a: real(d, x, t, u, c, *a)
        )
    else:
        monkeypatch.setattr(
            grpo, "velocity_with", lambda d, x, t, c, u, *a: real(d, x, t, c, None, *a)
        )
    msg = check(run, "preflight CFG convention: max |v_loss − v_rollout| =", cause)
    assert msg.endswith("(1 more failing, listed above)")  # and so the ratio


def test_pool_missing_a_prompt_fails(run, monkeypatch):
    pool = run[1].pool
    keep = torch.tensor([p != "3" for p in pool.prompts])
    kept = [p for p in pool.prompts if p != "3"]
    monkeypatch.setattr(run[1], "pool", PairedPool(pool.x[keep], kept))
    check(run, "preflight data pairing: 1 of 10 training prompts have no data item ('3')")


def test_unpaired_captions_are_said(run, monkeypatch):
    cfg, c, loss = run
    pool = PairedPool(c.pool.x[:5], [f"caption {i}" for i in range(5)])  # not the prompts
    monkeypatch.setattr(c, "pool", pool)
    monkeypatch.setattr(c.data, "train", None)  # a caption set, not the embedded one
    line = preflight(cfg, c, loss, "cpu", QUIET)[4]
    assert line == (
        "ok   data pairing: unpaired: the data term draws x0 uniformly from 5 items with their "
        "own captions (0 of 10 prompts are among them)"
    )


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(p for p in PRESET_NAMES if p.startswith("tiny-")))
def test_doctor_passes_on_every_tiny_preset(capsys, preset):
    t0 = time.perf_counter()
    lines = doctor_lines(capsys, "--preset", preset, "data.synthetic_per_prompt=2")
    assert lines[-1].startswith("doctor: all 5 checks passed"), lines
    print(f"{preset}: {time.perf_counter() - t0:.1f} s", *lines, sep="\n")

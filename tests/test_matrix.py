"""Objectives × regularisers (``ddrl.losses``): the named algorithms give the numbers they gave
before the matrix, any cell can be chosen by key, bad cells fail in one line, and each new
objective trains, on digits and toy2d (resuming exactly: ``test_loop``)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import one_line_error, run_quick

from ddrl.config import build_config, load_config, save_config
from ddrl.dist.checkpoint import latest_checkpoint, load_checkpoint
from ddrl.losses import ALGORITHMS, needs
from ddrl.training.loop import train
from ddrl.training.runlog import prepare_run_dir

sys.path.insert(0, str(Path(__file__).with_name("golden")))
from record_algorithms import CASES, run_case  # noqa: E402

GOLDEN = json.loads((Path(__file__).parent / "data" / "algorithms_before_matrix.json").read_text())
QUIET = {"log": lambda *a, **k: None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_named_algorithms_give_the_numbers_of_the_code_before_the_matrix(tmp_path, case):
    """Two iterations of each named algorithm (and its options: one forward for the data and
    policy terms, the release's ratio, two steps per batch, CFG, micro-batches): every metric
    and a checksum of the trained weights equal those the code before the objective ×
    regulariser split wrote (tests/data/algorithms_before_matrix.json, commit 9a844c9)."""
    got, want = run_case(CASES[case], tmp_path / case), GOLDEN[case]
    assert [set(r) for r in got["rows"]] == [set(r) for r in want["rows"]]
    for g, w in zip(got["rows"], want["rows"], strict=True):
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-9), (case, k)
    assert got["weights"] == pytest.approx(want["weights"], rel=1e-9)


def test_any_cell_by_key_and_written_out():
    cfg = build_config(overrides=["algorithm=nft", "regularisers=data,reverse_kl"])
    assert (cfg.objective, cfg.regularisers) == ("nft", "data,reverse_kl")
    assert cfg.loss.nft_beta == 1.0 and cfg.loss.beta_kl == 1e-4 and cfg.loss.data_beta == 0.1
    assert cfg.sampler.sde.kind == "ode"  # the nft algorithm preset still applies
    ddrl = build_config(overrides=["objective=awm"])  # ddrl's preset and regulariser
    assert (ddrl.algorithm, ddrl.objective, ddrl.regularisers) == ("ddrl", "awm", "data")
    assert not hasattr(ddrl.loss, "clip_range") or ddrl.loss.clip_range == 1.0  # AWM's own
    sft = build_config(overrides=["algorithm=sft"])
    assert (sft.objective, sft.regularisers) == ("none", "data")
    alone = build_config(overrides=["algorithm=nft", "regularisers=none"])
    assert alone.regularisers == "none" and not hasattr(alone.loss, "beta_kl")
    assert needs("nft", "", "none") == {"data": False, "reference": False, "transitions": False}
    for name, (obj, regs) in ALGORITHMS.items():
        c = build_config(overrides=[f"algorithm={name}"])
        assert (c.objective, c.regularisers) == (obj, ",".join(regs) or "none"), name


def test_config_json_round_trips_a_composed_cell(tmp_path):
    cfg = build_config(overrides=["algorithm=awm_data", "loss.lag_beta=0.5"])
    save_config(cfg, tmp_path / "config.json")
    back = load_config(tmp_path / "config.json")
    assert back == cfg and type(back.loss) is type(cfg.loss)


def test_preset_settings_of_absent_parts_do_not_apply_but_a_users_are_errors():
    """A run preset written for DDRL keeps its data term settings when the objective changes,
    and its policy settings (absent from NFT) do not apply; a user's key of an absent part is an
    error naming the cell's keys."""
    cfg = build_config(overrides=["preset=tiny-sd3", "objective=nft"])
    assert cfg.objective == "nft" and hasattr(cfg.loss, "data_beta")
    one_line_error(
        build_config,
        overrides=["algorithm=nft", "loss.clip_range=0.1"],
        match=("'loss.clip_range' is not a setting of algorithm 'nft'", "nft_beta"),
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["objective=ppo"], ("unknown objective 'ppo'", "grpo, nft, awm, none")),
        (["regularisers=data,l2"], ("unknown regulariser 'l2'", "data, reverse_kl, lagging_kl")),
        (["regularisers=data,data"], ("regularisers='data,data' names one twice",)),
        (
            ["algorithm=grpo", "sampler.sde.kind=ode"],
            ("objective 'grpo'", "sampler.sde.kind='ode'"),
        ),
        (["algorithm=test_loop:Recorder", "objective=nft"], ("whole loss class",)),
        (["algorithm=sft", "regularisers=data,lagging_kl"], ("'lagging_kl'", "objective='none'")),
        (["algorithm=nft", "sampler.sde.kind=cps", "sampler.sde.eta=1.5"], ("sampler.sde.eta",)),
        (["algorithm=awm", "train.timestep_count=0"], ("train.timestep_count",)),
        (["algorithm=awm", "train.timestep_count=9"], ("timestep_count=9",)),
    ],
)
def test_bad_cells_are_one_line_errors(overrides, match):
    one_line_error(build_config, overrides=overrides, match=match)


@pytest.mark.parametrize(
    "algorithm, terms",
    [
        ("nft", {"loss_policy", "loss_kl"}),
        ("nft_data", {"loss_policy", "loss_data"}),
        ("awm", {"loss_policy", "loss_kl", "loss_lag_kl"}),
        ("awm_data", {"loss_policy", "loss_data", "loss_lag_kl"}),
    ],
)
def test_forward_process_algorithms_train_on_digits(tmp_path, algorithm, terms):
    """Each new algorithm trains: finite losses with exactly its terms, the weights move."""
    # 2 strata: the quick runs sample 4 steps (AWM's 6 need 8 of int(0.9·N) from step 1)
    cfg, out, row = run_quick(tmp_path, algorithm, f"algorithm={algorithm}", "optim.lr=1e-3",
                              "train.timestep_count=2")  # fmt: skip
    assert {k for k in row if k.startswith("loss_")} == terms
    assert all(torch.isfinite(torch.tensor(row[k])) for k in terms)
    assert row["grad_norm"] > 0
    _, parts = load_checkpoint(latest_checkpoint(out))
    assert "loss" in parts  # the lagging weights (old policy / KL-EMA target) are saved


def test_nft_with_every_regulariser_and_an_sde_rollout_on_toy2d(tmp_path):
    ov = ["preset=toy2d", "objective=nft", "regularisers=data,reverse_kl,lagging_kl",
          "sampler.sde.kind=flow", "train.iterations=2", "train.progress=false",
          "pretrain.steps=50", "eval.samples_per_prompt=20"]  # fmt: skip
    cfg = build_config(overrides=ov)
    out = prepare_run_dir(tmp_path / "toy", resume=False, overwrite=False)
    row = train(cfg, out, **QUIET)
    assert {k for k in row if k.startswith("loss_")} == {
        "loss_policy", "loss_data", "loss_kl", "loss_lag_kl"}  # fmt: skip


def test_mixgrpo_window_rolls_out_the_sde_inside_it_and_trains_only_there(tiny_model, tmp_path):
    """Outside the window every step is the Euler ODE (log-prob 0); inside, the SDE; the loop
    trains exactly the window's steps and moves it with the iteration."""
    from ddrl.config.core import SamplerConfig
    from ddrl.sampling import rollout
    from ddrl.training.iteration import window_steps

    cfg = SamplerConfig(num_steps=6)
    mask = torch.tensor([False, False, True, True, False, False])
    ro = rollout(tiny_model, ["a"], 3, cfg, torch.Generator().manual_seed(0), sde_steps=mask)
    for i in range(6):
        x, t, tn = ro.states[i], ro.timesteps[i].expand(3), ro.timesteps[i + 1].expand(3)
        euler = x + tiny_model.denoiser.velocity(x, t, ro.cond) * (tn - t)[:, None]
        same = torch.allclose(ro.states[i + 1], euler, atol=1e-6)
        assert same == (not mask[i]), i
        assert (ro.log_probs[i] == 0).all() == (not mask[i]), i
    assert window_steps(0, 10, 2, 1, 1).tolist() == [0, 1]
    assert window_steps(3, 10, 2, 1, 1).tolist() == [3, 4]
    mix = build_config(overrides=["algorithm=mix_grpo"])  # MixGRPO.sh's values
    assert (mix.objective, mix.train.timestep_selection, mix.sampler.sde.noise_level) == (
        "grpo", "window", 0.7)  # fmt: skip
    t = mix.train
    assert (t.window_size, t.window_every, t.window_stride, t.updates_per_batch) == (4, 25, 1, 4)
    _, out, row = run_quick(tmp_path, "mix", "algorithm=mix_grpo", "train.window_size=2",
                            "train.window_every=1")  # fmt: skip
    assert row["loss_policy"] == row["loss_policy"]  # finite, trained


def test_a_user_regulariser_joins_any_objective(tmp_path):
    """ "module:Class" in regularisers=: its config's keys join loss.*, it gets the objective's
    forward, and its term is trained and logged like the built-ins'."""
    from plugins_for_tests import VelocityNorm

    VelocityNorm.seen.clear()
    reg = "plugins_for_tests:VelocityNorm"
    cfg, _, row = run_quick(tmp_path, "plug", "algorithm=nft", f"regularisers=data,{reg}",
                            "loss.vn_beta=0.25")  # fmt: skip
    assert cfg.loss.vn_beta == 0.25 and cfg.regularisers == f"data,{reg}"
    assert {"loss_policy", "loss_data", "loss_vnorm"} <= set(row)
    assert VelocityNorm.seen and row["loss_vnorm"] > 0

"""The `ddrl` command end to end in quick mode, and its one-line errors for bad input."""

import json
import shutil

import pytest
from helpers_quick import quick

from ddrl.cli import main

SCHEMA_KEYS = {"proxy_reward", "gold_accuracy", "diversity", "heldout_diffusion_loss", "fd"}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(capsys, *argv):
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("ddrl: error:"), err
    assert "Traceback" not in err
    return lines[0]


def test_train_eval_resume_cli(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", "--out", run_dir, *quick())[0] == 0
    assert (run_dir / "config.json").is_file() and (run_dir / "final" / "backbone.json").is_file()
    assert run(capsys, "eval", run_dir)[0] == 0
    first = (run_dir / "eval.json").read_text()
    assert run(capsys, "eval", run_dir)[0] == 0
    assert (run_dir / "eval.json").read_text() == first, "eval.json must be deterministic"
    # overrides may follow options; eval.seed changes the samples, so the file must change
    assert run(capsys, "eval", run_dir, "--out", tmp_path / "e.json", "eval.seed=7")[0] == 0
    assert json.loads((tmp_path / "e.json").read_text())["eval_seed"] == 7
    assert run(capsys, "eval", run_dir, "eval.seed=8", "--out", tmp_path / "g.json")[0] == 0
    assert json.loads((tmp_path / "g.json").read_text())["eval_seed"] == 8
    assert "may only change" in error_line(
        capsys, "eval", run_dir, "--out", tmp_path / "f.json", "train.iterations=3"
    )
    ev = json.loads(first)
    assert SCHEMA_KEYS <= set(ev) and ev["iteration"] == 2
    assert (run_dir / "eval_samples.png").stat().st_size > 0
    assert run(capsys, "train", "--out", run_dir, "--resume", "train.iterations=3")[0] == 0
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in rows] == [1, 2, 3]
    assert "--resume may only change train.iterations" in error_line(
        capsys, "train", "--out", run_dir, "--resume", "optim.lr=1"
    )
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(run_dir), "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    code, _, err = run(capsys, "demo", "--quick", "--out", out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    for name in ("base", "ddrl", "flow_grpo", "dance_grpo"):
        assert {"proxy_reward", "gold_accuracy", "diversity", "seconds"} <= set(summary[name])
    assert (out / "report.html").is_file() and (out / "samples_base.png").is_file()


def test_compare_quick_schema(tmp_path, capsys):
    out = tmp_path / "cmp"
    code, _, err = run(capsys, "compare", "--quick", "--rewards", "ink,classifier", "--out", out)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert SCHEMA_KEYS <= set(m["base"])
    assert m["arms"] and set(m["regimes"]) == {"ink", "classifier"}
    for arm in m["arms"]:
        assert isinstance(arm["algorithm"], str) and isinstance(arm["setting"], dict)
        assert SCHEMA_KEYS <= set(arm["final"])
        assert arm["curve"] and all(
            "iteration" in p and SCHEMA_KEYS <= set(p) for p in arm["curve"]
        )
    for f in (
        "report.html",
        "reward_curves_ink.png",
        "pareto_ink.png",
        "heldout_loss_ink.png",
        "reward_curves_classifier.png",
    ):
        assert (out / f).stat().st_size > 0, f


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--out", "{tmp}/a", "algorithm=nope"], "'nope'"),
        (["train", "--out", "{tmp}/a", "reward.name=nope"], "'nope'"),
        (["train", "--out", "{tmp}/a", "model.backbone=nope", "model.base={tmp}"], "'nope'"),
        (["train", "--out", "{tmp}/a", "train.iterations=abc"], "'abc'"),
        (["train", "--out", "{tmp}/a", "train.group_size=1"], "train.group_size=1"),
        (["train", "--out", "{tmp}/a", "sampler.sde=ode"], "'ode'"),
        (["train", "--out", "{tmp}/a", "train.bogus=1"], "'train.bogus'"),
        (["train", "--out", "{tmp}/a", "--config", "{tmp}/missing.toml"], "missing.toml"),
        (["train", "--out", "{tmp}/a", "model.base={tmp}/nomodel"], "nomodel"),
        (["eval", "{tmp}/nothing"], "nothing"),
    ],
)
def test_bad_input_one_line_errors(tmp_path, capsys, argv, needle):
    argv = [a.format(tmp=tmp_path) for a in argv]
    # Quick settings keep a failure from pretraining a full base, but never mask the bad value.
    keys = {a.split("=")[0] for a in argv if "=" in a}
    line = error_line(capsys, *argv, *[q for q in quick() if q.split("=")[0] not in keys])
    assert needle in line


@pytest.mark.parametrize(
    "plugin, needle", [("wrong_shape", "shape (8, 2)"), ("not_a_tensor", "returned list")]
)
def test_bad_reward_output(tmp_path, capsys, plugin, needle):
    line = error_line(
        capsys, "train", "--out", tmp_path / "r", *quick(f"reward.name=plugins_for_tests:{plugin}")
    )
    assert needle in line


def test_run_folder_never_overwritten_and_checkpoints_checked(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", "--out", run_dir, *quick())[0] == 0
    assert "already exists" in error_line(capsys, "train", "--out", run_dir, *quick())
    # --overwrite keeps the old run as a backup
    assert run(capsys, "train", "--out", run_dir, "--overwrite", *quick())[0] == 0
    assert len(list(tmp_path.glob("run.bak-*"))) == 1
    ckpt = run_dir / "checkpoints" / "step-000002"
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    assert "corrupt" in error_line(capsys, "eval", run_dir)
    assert "no checkpoint for step 7" in error_line(capsys, "eval", run_dir, "--step", "7")
    shutil.rmtree(run_dir / "checkpoints")
    assert "no checkpoint" in error_line(capsys, "train", "--out", run_dir, "--resume")


def test_synth_then_train_on_synthetic_data(tmp_path, capsys):
    pool = tmp_path / "synthetic.safetensors"
    code, out, err = run(capsys, "synth", "--per-prompt", 3, "--out", pool, *quick())
    assert code == 0, err
    from safetensors.torch import load_file

    t = load_file(pool)
    assert t["x"].shape == (30, 1, 8, 8) and sorted(set(t["prompt_ids"].tolist())) == list(
        range(10)
    )
    assert float(t["x"].abs().max()) <= 1.0  # stored clamped, like a decoded image
    run_dir = tmp_path / "syn"
    code, _, err = run(
        capsys,
        "train",
        "--out",
        run_dir,
        "data.source=synthetic",
        f"data.synthetic_path={pool}",
        *quick(),
    )
    assert code == 0, err
    assert "no synthetic data" in error_line(
        capsys,
        "train",
        "--out",
        tmp_path / "x",
        "data.source=synthetic",
        f"data.synthetic_path={tmp_path}/none.safetensors",
        *quick(),
    )

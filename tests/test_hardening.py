"""Issue 7 (hardening): bad input is one line and exit code 2 before any work or change on
disk; damaged checkpoints fall back; resume says when there is nothing to do and records the
new length; SIGTERM checkpoints and exits 143; `ddrl config`, --help, --version; the summary."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from helpers_quick import quick

from ddrl.cli import main
from ddrl.config import build_config, describe, to_dict
from ddrl.training.loop import train
from ddrl.training.runlog import finite_or_null, prepare_run_dir, read_jsonl


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for folders): "nothing on disk changed"."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


def refused(capsys, root: Path, *argv, allowed: bool = True) -> str:
    """Run argv; assert exit 2, one `ddrl: error:` line (naming what is allowed for a bad
    value), no traceback, and nothing under root created, changed or moved. Returns the line."""
    before = tree(root)
    code, _, err = run(capsys, *argv)
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("ddrl: error: "), err
    assert "Traceback" not in err and ("allowed" in lines[0] or not allowed), lines[0]
    assert tree(root) == before, "a refused command changed the disk"
    return lines[0]


def no_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


# -- 1. one-line errors, before any work -------------------------------------------------------

BAD = [
    ("reward.name=:", "':'"),
    ("reward.name=.json:x", "'.json:x'"),
    ("algorithm=:", "':'"),
    ("model.name=:", "':'"),
    ("reward.name=os:getcwd", "'os:getcwd'"),
    ("algorithm=os:getcwd", "'os:getcwd'"),
    ("reward.name=os:sep", "'os:sep'"),
    ("model.name=os:sep", "'os:sep'"),
    ("seed=99999999999999999999999", "seed=99999999999999999999999"),
    ("eval.seed=99999999999999999999999", "eval.seed=99999999999999999999999"),
    ("reward.scale=nan", "reward.scale=nan"),
]


@pytest.mark.parametrize("override, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_one_line_before_any_work(tmp_path, capsys, override, needle):
    key = override.split("=")[0]
    rest = [q for q in quick() if q.split("=")[0] != key]
    line = refused(capsys, tmp_path, "train", "--out", tmp_path / "run", override, *rest)
    assert needle in line


def test_out_that_is_a_file_or_empty_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    for extra in ([], ["--overwrite"], ["--resume"]):
        line = refused(capsys, tmp_path, "train", "--out", tmp_path / "afile", *extra, *quick())
        assert "afile is an existing file" in line
    line = refused(capsys, tmp_path, "train", "--out", tmp_path / "afile" / "run", *quick())
    assert "afile is an existing file" in line
    for extra in ([], ["--overwrite"]):
        line = refused(capsys, tmp_path, "train", "--out", "", *extra, *quick())
        assert "--out '' is empty" in line


@pytest.fixture
def toy_model_dir(tmp_path):
    from ddrl.models.toy2d import Toy2DGenerator

    torch.manual_seed(0)
    Toy2DGenerator(hidden=16).save_pretrained(tmp_path / "toy")
    return tmp_path / "toy"


def test_eval_out_is_checked_before_the_evaluation(tmp_path, capsys, toy_model_dir):
    (tmp_path / "adir").mkdir()
    toy = ("--preset", "toy2d", "eval.samples_per_prompt=3", "sampler.eval_steps=4")
    line = refused(capsys, tmp_path, "eval", toy_model_dir, "--out", tmp_path / "adir", *toy)
    assert "adir is a folder" in line
    line = refused(capsys, tmp_path, "synth", "--per-prompt", 3, "--out", tmp_path / "adir")
    assert "adir is a folder" in line
    missing = tmp_path / "missing" / "e.json"
    line = refused(capsys, tmp_path, "eval", toy_model_dir, "--out", missing, *toy)
    assert f"missing folder ({tmp_path / 'missing'})" in line


# -- 2. the device is checked before an old run is moved aside ---------------------------------


def test_overwrite_with_an_unavailable_device_moves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    argv = ("train", "--out", tmp_path / "run", "--overwrite", "train.device=cuda", *quick())
    assert "train.device='cuda'" in refused(capsys, tmp_path, *argv)


def test_failures_while_building_leave_an_old_run_in_place(tmp_path, capsys):
    """A plugin reward of the wrong kind, or missing synthetic data, fails after the base is
    built but before an old run folder is moved aside (or a new one created)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    train = ("train", "--out", tmp_path / "run", "--overwrite", *quick())
    line = refused(capsys, tmp_path, *train, "reward.name=plugins_for_tests:returns_a_number")
    assert "its factory returned a int, not a callable" in line
    missing = f"data.synthetic_path={tmp_path / 'none.safetensors'}"
    line = refused(capsys, tmp_path, *train, "data.source=synthetic", missing, allowed=False)
    assert "no synthetic data" in line


# -- 3. a reward that is NaN everywhere stops the run ------------------------------------------


def test_every_group_skipped_stops_after_max_skipped_iterations(tmp_path, capsys):
    argv = ["train", "--out", tmp_path / "nan", "reward.name=plugins_for_tests:all_nan"]
    # the preflight refuses such a reward before iteration 1, on one line
    code, _, err = run(capsys, *argv, *quick("train.iterations=6"))
    assert code == 2 and "preflight reward determinism" in err and "not finite" in err, err
    # without it, the loop's own guard stops the run
    argv.append("train.preflight=false")
    code, out, err = run(capsys, *argv, *quick("train.iterations=6"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "every group had a NaN/inf reward in 3 consecutive iterations" in lines[0]
    assert "train.max_skipped_iterations=3" in lines[0]
    rows = read_jsonl(tmp_path / "nan" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2, 3] and rows[-1]["reward_mean"] is None
    # A higher limit lets the run finish; its summary prints the NaN reward as "nan".
    code, out, err = run(
        capsys, *argv[:2], tmp_path / "nan1", *argv[3:], *quick("train.max_skipped_iterations=5")
    )
    assert code == 0, err
    assert "reward mean (last iteration): nan (std 0)" in out.splitlines() and "{" not in out


# -- 4. damaged newest checkpoint: fall back; orphans removed ----------------------------------

TWO_CKPT = ("train.iterations=2", "train.checkpoint_every=1")


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A finished 2-iteration run with checkpoints step-1 and step-2 (copied by each test)."""
    cfg = build_config(overrides=quick(*TWO_CKPT))
    out = prepare_run_dir(tmp_path_factory.mktemp("base_run") / "run", False, False)
    train(cfg, out, log=lambda *a: None)
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    shutil.copytree(src, tmp_path / "run")
    return tmp_path / "run"


def _damage(step: Path, how: str) -> None:
    if how == "sha256":
        f = step / "dcp" / "__0_0.distcp"
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        f.write_bytes(bytes(raw))
    elif how == "truncated":
        f = step / "dcp" / ".metadata"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        (step / "state.json").unlink()


@pytest.mark.parametrize("how", ["sha256", "truncated", "no_state_json"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, capsys, two_checkpoints, how):
    run_dir = _copy(two_checkpoints, tmp_path)
    ckpts = run_dir / "checkpoints"
    _damage(ckpts / "step-000002", how)
    orphan = ckpts / ".tmp-step-000003-4242"  # a checkpoint write killed midway
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half")
    code, out, err = run(capsys, "train", "--out", run_dir, "--resume", "train.iterations=3")
    assert code == 0, err
    assert f"warning: checkpoint {ckpts / 'step-000002'} is damaged" in out
    assert f"resuming from {ckpts / 'step-000001'}" in out
    assert f"removed {orphan}" in out and not orphan.exists()
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    # Iteration 2, redone from step 1, equals the original iteration 2 exactly.
    assert no_time(rows[:2]) == no_time(read_jsonl(two_checkpoints / "metrics.jsonl"))


def test_no_valid_checkpoint_is_one_line_naming_each(tmp_path, capsys, two_checkpoints):
    run_dir = _copy(two_checkpoints, tmp_path)
    _damage(run_dir / "checkpoints" / "step-000002", "sha256")
    _damage(run_dir / "checkpoints" / "step-000001", "no_state_json")
    argv = ("train", "--out", run_dir, "--resume", "train.iterations=3")
    line = refused(capsys, tmp_path, *argv, allowed=False)
    assert "no valid checkpoint" in line and "SHA-256 mismatch" in line
    assert "step-000001" in line and "step-000002" in line


# -- 5. resume: nothing to do, and the new length is recorded ----------------------------------


def test_resume_with_nothing_to_do_says_so(tmp_path, capsys, two_checkpoints):
    run_dir = _copy(two_checkpoints, tmp_path)
    before = tree(tmp_path)
    for extra, said in (
        ([], "nothing to do: run is at iteration 2 of 2"),
        (["train.iterations=1"], "nothing to do: run is at iteration 2, beyond train.iterations=1"),
    ):
        code, out, err = run(capsys, "train", "--out", run_dir, "--resume", *extra)
        lines = out.strip().splitlines()
        assert code == 0 and lines[-1] == said and "{}" not in out, (out, err)
        assert lines[0].startswith(f"resuming from {run_dir / 'checkpoints' / 'step-000002'}")
    assert tree(tmp_path) == before
    # Killed after its last checkpoint but before the final model was saved: saved now.
    shutil.rmtree(run_dir / "final")
    assert run(capsys, "train", "--out", run_dir, "--resume")[0] == 0
    assert tree(run_dir / "final") == tree(two_checkpoints / "final")


def test_resume_records_the_new_length(tmp_path, capsys, two_checkpoints):
    run_dir = _copy(two_checkpoints, tmp_path)
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "train.iterations=3")
    assert code == 0, err
    assert json.loads((run_dir / "config.json").read_text())["train"]["iterations"] == 3
    assert not list(run_dir.glob(".config.json*"))  # written atomically, nothing left over
    # Killed before its last checkpoint: a resume without arguments goes on to the new length.
    shutil.rmtree(run_dir / "checkpoints" / "step-000003")
    code, out, err = run(capsys, "train", "--out", run_dir, "--resume")
    assert code == 0 and "trained" in out and "to iteration 3" in out, (out, err)
    assert [r["iteration"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]


# -- 6. SIGTERM: finish the iteration, checkpoint, exit 143; resume is exact -------------------

SIGTERM_RUN = ("train.iterations=12", "train.checkpoint_every=5")


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path, capsys, monkeypatch):
    # One thread in this process and in the child, so their float results can agree exactly.
    monkeypatch.setenv("DDRL_THREADS", "1")
    threads = torch.get_num_threads()
    try:
        code, _, err = run(capsys, "train", "--out", tmp_path / "full", *quick(*SIGTERM_RUN))
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    run_dir = tmp_path / "cut"
    env = {**os.environ, "DDRL_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ddrl", "train", "--out", str(run_dir), *quick(*SIGTERM_RUN)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "latest").is_file():  # the first checkpoint exists
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    line = err.strip().splitlines()[-1]
    done = len(read_jsonl(run_dir / "metrics.jsonl"))
    ckpt = run_dir / "checkpoints" / f"step-{done:06d}"
    assert 5 <= done < 12 and (ckpt / "state.json").is_file()
    assert line == f"ddrl: terminated (SIGTERM) after checkpoint {ckpt}; continue with --resume"
    assert "Traceback" not in err
    cmd = [sys.executable, "-m", "ddrl", "train", "--out", str(run_dir), "--resume"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert no_time(read_jsonl(run_dir / "metrics.jsonl")) == no_time(full)
    assert len(full) == 12


# -- 7. discoverability: ddrl config, --help, --version ----------------------------------------


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


def test_config_prints_every_key_with_type_value_and_comment(tmp_path, capsys):
    code, out, err = run(capsys, "config", "algorithm=flow_grpo")
    assert code == 0, err
    lines = out.strip().splitlines()
    keys = [ln.split(":")[0] for ln in lines]
    assert keys == _leaf_keys(to_dict(build_config(overrides=["algorithm=flow_grpo"])))
    assert all("  # " in ln for ln in lines), [ln for ln in lines if "  # " not in ln]
    assert 'algorithm: str = "flow_grpo" (default "ddrl")  # ddrl | flow_grpo' in out
    assert "loss.beta_kl: float = 0.04  # weight: on SDE transitions flow_grpo" in out
    assert "train.max_skipped_iterations: int = 3  # consecutive iterations" in out
    assert "optim.betas: tuple[float, float] = [0.9, 0.99]  # AdamW betas" in out
    # a comment continued on the next lines is kept whole
    assert '"strided" (every k-th from 0' in out
    code, out, err = run(capsys, "config", "--preset", "toy2d")
    assert code == 0 and 'model.name: str = "toy2d" (default "digits")' in out, err
    assert "'nope'" in refused(capsys, tmp_path, "config", "algorithm=nope")


def test_every_config_field_has_a_one_line_help():
    """Each leaf of every section, for every algorithm and SDE kind, carries help metadata of
    one line, and ``ddrl config`` prints it after the value."""
    import dataclasses

    from ddrl.losses import ALGORITHMS

    def leaves(cfg, prefix=""):
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if dataclasses.is_dataclass(value):
                yield from leaves(value, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name, f.metadata.get("help", "")

    seen = 0
    for algorithm in ALGORITHMS:
        for kind in ("flow", "dance", "cps", "ode"):
            if kind == "ode" and ALGORITHMS[algorithm][0] == "grpo":
                continue  # needs recorded transitions (an error, tested in test_matrix)
            cfg = build_config(overrides=[f"algorithm={algorithm}", f"sampler.sde.kind={kind}"])
            text = describe(cfg)
            for key, help_ in leaves(cfg):
                assert help_ and "\n" not in help_, key
                line = next(ln for ln in text.splitlines() if ln.startswith(f"{key}:"))
                assert line.endswith(f"  # {help_}"), key
                seen += 1
    assert seen > 100


def test_help_lists_names_and_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for name in ("ddrl", "flow_grpo", "dance_grpo", "sft", "ink", "classifier", "right"):
        assert name in out, name
    assert "models:     digits, toy2d, sd3, flux, cosmos, wan" in out
    assert "presets:    " in out and "tiny-sd3" in out and "digits" in out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"ddrl {version('ddrl')}"


# -- 8. train ends with a summary; no bare NaN in JSON -----------------------------------------


def test_train_ends_with_a_summary(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--out", run_dir, *quick("eval.every=2"))
    assert code == 0, err
    last = read_jsonl(run_dir / "metrics.jsonl")[-1]
    acc = read_jsonl(run_dir / "eval.jsonl")[-1]["gold_accuracy"]
    assert out.strip().splitlines()[-6:] == [
        f"trained {run_dir} to iteration 2",
        f"reward mean (last iteration): {last['reward_mean']:.4g} (std {last['reward_std']:.4g})",
        f"gold accuracy (last evaluation, iteration 2): {acc:.4g}",
        f"model:   {run_dir / 'final'}",
        f"metrics: {run_dir / 'metrics.jsonl'}",
        f"samples: {run_dir / 'samples_final.png'}",
    ]
    assert "{" not in out


def test_json_output_never_holds_bare_nan():
    row = finite_or_null({"a": float("nan"), "b": float("inf"), "c": 1.5, "d": "x"})
    assert json.dumps(row, allow_nan=False) == '{"a": null, "b": null, "c": 1.5, "d": "x"}'


@pytest.mark.parametrize("command", ["demo", "compare", "long"])
def test_overwrite_of_a_report_folder_checks_the_device_first(tmp_path, capsys, command):
    """demo/compare/long --overwrite with an unavailable device: the old folder stays put."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    old = tmp_path / "out"
    old.mkdir()
    (old / "keep.txt").write_text("user's file")
    argv = [command, "--quick", "--out", str(old), "--overwrite", "train.device=cuda"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "cuda" in err and "Traceback" not in err
    assert (old / "keep.txt").read_text() == "user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

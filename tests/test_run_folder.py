"""One writer per run folder, nothing left behind by a failed start, honest --resume errors, and
the values that used to pass silently (the issue "Hardening, part 2", items 1, 3, 4, 5)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import one_line_error
from helpers_quick import quick

from ddrl.cli import main
from ddrl.config import build_config
from ddrl.training.runlog import LOCK_FILE, RunLock, read_jsonl


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_of(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("ddrl: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def launch(out: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ddrl", "train", "--out", str(out), *args]
    env = {**os.environ, "DDRL_THREADS": "1", "OMP_NUM_THREADS": "1"}  # the session's cache
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_holder(out: Path, proc: subprocess.Popen, timeout: float = 120) -> str:
    """The lock file's holder line once ``proc`` holds it."""
    deadline = time.time() + timeout
    while True:
        text = (out / LOCK_FILE).read_text() if (out / LOCK_FILE).is_file() else ""
        if f"PID {proc.pid} " in text:
            return text
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


# -- 1. one writer per run ---------------------------------------------------------------------


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    lock = RunLock(tmp_path).acquire()
    msg = one_line_error(RunLock(tmp_path).acquire, match="is in use by")
    assert f"{socket.gethostname()} PID {os.getpid()} since " in msg
    lock.release()
    RunLock(tmp_path).acquire().release()  # free again once released
    # a holder killed with SIGKILL leaves the file but not the lock
    code = f"from ddrl.training.runlog import RunLock; RunLock({str(tmp_path)!r}).acquire(); " + (
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    assert (tmp_path / LOCK_FILE).is_file()
    RunLock(tmp_path).acquire().release()
    assert not (tmp_path / LOCK_FILE).exists()  # a released lock leaves nothing behind


def test_a_second_launch_on_a_running_run_is_refused_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--out", out, *quick())
    assert code == 0, err
    first = launch(out, "--resume", "auto", *quick("train.iterations=8"))
    holder = wait_for_holder(out, first)
    t0 = time.time()
    second = launch(out, "--resume", "auto", *quick("train.iterations=8"))
    _, err2 = second.communicate(timeout=120)
    assert second.returncode == 2, err2
    line = error_of(err2)
    assert f"run folder {out} is in use by {holder}" in line
    assert time.time() - t0 < 30  # before any model is built
    _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert [r["iteration"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, 9))


def test_two_fresh_launches_give_one_run(tmp_path):
    out = tmp_path / "run"
    procs = [launch(out, "--resume", "auto", *quick("train.iterations=3")) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is in use by" in error_of(loser) or "already exists" in error_of(loser)
    assert [r["iteration"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_a_killed_run_restarts(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--out", out, *quick("train.checkpoint_every=1"))
    assert code == 0, err
    proc = launch(
        out, "--resume", "auto", *quick("train.iterations=40", "train.checkpoint_every=1")
    )
    wait_for_holder(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    code, _, err = run(capsys, "train", "--out", out, "--resume", "auto", "train.iterations=4")
    assert code == 0, err
    assert [r["iteration"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]


# -- 3. a start that fails leaves no folder ----------------------------------------------------


@pytest.mark.parametrize(
    "override, needle",
    [
        ("reward.url=http://127.0.0.1:9", "reward service http://127.0.0.1:9 is not healthy"),
        ("parallel.strategy=fsdp", "parallel.strategy=fsdp needs torchrun"),
    ],
)
def test_a_failed_start_leaves_no_folder(tmp_path, capsys, override, needle):
    out = tmp_path / "run"
    extra = (
        ["reward.name=remote", "reward.retries=0", "reward.timeout=2"] if "url" in override else []
    )
    code, _, err = run(capsys, "train", "--out", out, *quick(override, *extra))
    assert code == 2 and needle in error_of(err)
    assert not out.exists()
    # the same command, fixed, then starts normally: nothing was left to say "already exists"
    code, _, err = run(capsys, "train", "--out", out, *quick())
    assert code == 0, err


def test_a_start_failing_after_the_folder_exists_removes_it(tmp_path, capsys, monkeypatch):
    """A failure raised inside the loop's setup (after the folder is created, before anything
    is recorded): the folder made by this command goes; an older run moved aside stays."""
    import ddrl.training.loop as loop

    def refuse(*a, **k):
        from ddrl.errors import DDRLError

        raise DDRLError("refused in setup")

    out = tmp_path / "run"
    assert run(capsys, "train", "--out", out, *quick())[0] == 0
    monkeypatch.setattr(loop, "prepare_learner", refuse)
    code, _, err = run(capsys, "train", "--out", out, "--overwrite", *quick())
    assert code == 2 and "refused in setup" in error_of(err)
    assert not out.exists()
    backups = list(tmp_path.glob("run.bak-*"))
    assert len(backups) == 1 and (backups[0] / "metrics.jsonl").is_file()


# -- 4. --resume compares what the user typed against the run's own config ---------------------


def test_resume_takes_display_keys_and_names_the_typed_key(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, "train", "--out", out, *quick("algorithm=ddrl", "data.name=digits"))[0] == 0
    # display-only keys may change; the run's own config is the base (no --preset repeated)
    code, _, err = run(
        capsys, "train", "--out", out, "--resume", "train.progress=true", "train.iterations=3"
    )
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["progress"] is True and saved["train"]["iterations"] == 3
    # a typed key that differs is the one named
    for typed, named in [
        ("algorithm=flow_grpo", "algorithm='ddrl', the command line gives algorithm='flow_grpo'"),
        ("optim.lr=0.5", "optim.lr=0.0001, the command line gives optim.lr=0.5"),
    ]:
        code, _, err = run(capsys, "train", "--out", out, "--resume", typed)
        assert code == 2 and named in error_of(err), err
    # the same values as the run's are fine (a restart script repeats the first command)
    code, _, err = run(capsys, "train", "--out", out, "--resume", *quick("train.iterations=3"))
    assert code == 0, err


# -- 5. values that used to pass silently ------------------------------------------------------


def test_lr_that_parses_as_zero_is_refused(tmp_path, capsys):
    for lr in ("1e-400", "0", "-1e-4", "inf", "nan"):
        code, _, err = run(capsys, "train", "--out", tmp_path / "r", *quick(f"optim.lr={lr}"))
        assert code == 2 and "optim.lr=" in error_of(err) and "(0, 1]" in err, err
    assert build_config(overrides=["optim.lr=1e-6"]).optim.lr == 1e-6


def test_an_empty_caption_file_is_refused_like_an_empty_table_caption(tmp_path):
    from PIL import Image

    from ddrl.data.files import list_items

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "a.txt").write_text("  \n")
    one_line_error(list_items, folder, match=("a.txt", "caption must be non-empty text"))
    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps({"file_name": "data/a.png", "text": ""}) + "\n")
    one_line_error(list_items, table, match="non-empty text")


def test_reward_server_port_out_of_range(capsys):
    code, _, err = run(capsys, "reward-server", "--reward", "brightness", "--port", "99999")
    assert code == 2 and error_of(err).endswith("allowed: 0..65535 (0 = a free one)")

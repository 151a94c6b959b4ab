"""`ddrl score` on image files, and `ddrl reward-server` in its own process scoring a training
run through `reward.name=remote`."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from ddrl.cli import main


def _png(path, value: int):
    Image.new("RGB", (8, 6), (value, value, value)).save(path)
    return str(path)


def test_score_prints_one_score_per_image(tmp_path, capsys):
    dark, light = _png(tmp_path / "d.png", 0), _png(tmp_path / "l.png", 255)
    assert main(["score", "--reward", "brightness", dark, light]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [float(x.split("\t")[0]) for x in lines] == [0.0, 1.0]
    assert main(["score", "--reward", "brightness", "--json", "--prompt", "a cat", dark]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"image": dark, "prompt": "a cat", "score": 0.0}]


@pytest.mark.parametrize(
    "args, says",
    [
        (["--reward", "nope", "x.png"], "nope"),
        (["--reward", "brightness", "missing.png"], "missing.png"),
        (["--reward", "brightness", "reward.batch=0", "x.png"], "reward.batch"),
        (["--reward", "brightness", "train.iterations=3", "x.png"], "reward.* settings only"),
    ],
)
def test_score_bad_input_is_one_line(tmp_path, capsys, monkeypatch, args, says):
    _png(tmp_path / "x.png", 10)
    monkeypatch.chdir(tmp_path)
    assert main(["score", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_a_training_run_scores_through_a_reward_server_process(tmp_path):
    from ddrl.config import build_config
    from ddrl.training.loop import train
    from ddrl.training.runlog import prepare_run_dir, read_jsonl

    cmd = [sys.executable, "-m", "ddrl", "reward-server", "--reward", "brightness"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving brightness at http://"), line
        url = line.split(" at ")[1].strip()
        common = ["preset=tiny-sd3", "train.iterations=1", "train.progress=false"]
        rows = {}
        for name, ov in (("local", []), ("remote", ["reward.name=remote", f"reward.url={url}"])):
            out = prepare_run_dir(tmp_path / name, resume=False, overwrite=False)
            train(build_config(overrides=common + ov), out, log=lambda *a: None)
            rows[name] = read_jsonl(out / "metrics.jsonl")[0]
        # The service sees 8-bit images: equal to 1/255 of the in-process reward.
        assert rows["remote"]["reward_mean"] == pytest.approx(
            rows["local"]["reward_mean"], abs=4e-3
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # The service is gone: the next run fails with one line naming the URL.
    from ddrl.errors import DDRLError

    cfg = build_config(
        overrides=common
        + ["reward.name=remote", f"reward.url={url}", "reward.retries=1", "reward.backoff=0.01"]
    )
    out = prepare_run_dir(tmp_path / "dead", resume=False, overwrite=False)
    with pytest.raises(DDRLError, match=url.replace(".", r"\.")):
        train(cfg, out, log=lambda *a: None)

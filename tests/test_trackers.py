"""The trackers (``training/trackers.py``): TensorBoard and an offline wandb run receive the
scalars, the watch's firings and the evaluation pictures, read back from what they wrote; a
resume cuts watch.jsonl and continues the same wandb run; no tracker, no work; one-line errors.
Nothing here reaches the network: wandb runs offline only."""

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import one_line_error

from ddrl.config import build_config, to_dict
from ddrl.training import trackers
from ddrl.training.runlog import RunLogger, read_jsonl

FIRING = {
    "iteration": 1,
    "rule": "heldout_loss_rise > 0.3 : warn",
    "signal": "heldout_loss_rise",
    "value": 0.4,
    "threshold": 0.3,
    "action": "warn",
    "patience": 1,
    "reason": "heldout_loss_rise 0.4 > 0.3",
}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb offline, quiet, with its caches and settings under tmp_path."""
    for k, v in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_DIR": tmp_path / "wandb_dir",
        "WANDB_CACHE_DIR": tmp_path / "wandb_cache",
        "WANDB_CONFIG_DIR": tmp_path / "wandb_config",
        "WANDB_DATA_DIR": tmp_path / "wandb_data",
    }.items():
        monkeypatch.setenv(k, str(v))
    return pytest.importorskip("wandb")


def wandb_records(path: Path):
    """The protobuf records of an offline run's ``.wandb`` file: wandb's LevelDB-style log
    (a 7-byte header, then 32 KiB blocks of chunks: crc32, length, type 1 full / 2 first /
    3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little left in the block for a header: padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk, pos = chunk + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def test_tensorboard_and_offline_wandb_receive_everything(tmp_path, offline_wandb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = build_config(overrides=["train.tensorboard=true", "train.wandb=offline"])
    run = tmp_path / "myrun"
    run.mkdir()
    log = RunLogger(run, 0, cfg)
    log.eval({"iteration": 0, "gold_accuracy": 0.5})
    log.metrics({"iteration": 1, "reward_mean": 0.25, "loss": 1.5})
    log.eval({"iteration": 1, "gold_accuracy": 0.75})
    log.firing(FIRING)
    log.samples(1, torch.rand(6, 1, 8, 8) * 2 - 1, 2)  # 2 prompts × 3 digits
    log.samples(2, torch.rand(4, 3, 5, 16, 24) * 2 - 1, 2)  # 2 prompts × 2 videos of 5 frames
    log.close()
    assert read_jsonl(run / "watch.jsonl") == [FIRING]

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward_mean")] == [(1, 0.25)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/gold_accuracy")] == [(0, 0.5), (1, 0.75)]
    assert [e.step for e in acc.Scalars("watch/heldout_loss_rise")] == [1]
    (text,) = acc.Tensors("watch/text_summary")  # add_text's tag
    assert text.step == 1 and b"heldout_loss_rise 0.4 > 0.3" in text.tensor_proto.string_val[0]
    grids = acc.Images("eval/samples")
    assert [e.step for e in grids] == [1, 2]
    # digits: 2 rows of 3 cells, each 8 px enlarged ×6 to 48, 1-px gutters (also ×6)
    assert (grids[0].width, grids[0].height) == ((3 * 9 + 1) * 6, (2 * 9 + 1) * 6)
    (video,) = acc.Images("eval/video")
    assert video.step == 2 and video.encoded_image_string.startswith(b"GIF89a")

    (wdir,) = (run / "wandb").glob("offline-run-*")
    records = list(wandb_records(next(wdir.glob("run-*.wandb"))))
    info = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert info.run_id == (run / "wandb_id.txt").read_text().strip()
    assert info.display_name == "myrun"
    config = {i.key: json.loads(i.value_json) for i in info.config.update}
    assert config["train"]["wandb"] == "offline" and config["algorithm"] == cfg.algorithm
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = r.history.item
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            history[row["_step"]] = row
    assert sorted(history) == [0, 1, 2]
    assert history[0]["eval/gold_accuracy"] == 0.5
    assert history[1]["reward_mean"] == 0.25 and history[1]["eval/gold_accuracy"] == 0.75
    assert history[1]["watch/heldout_loss_rise"] == 0.4
    assert history[1]["watch/fired"] == FIRING["rule"]
    assert history[1]["eval/samples/_type"] == "image-file"
    assert (wdir / "files" / history[1]["eval/samples/path"]).is_file()
    assert history[2]["eval/video/path"].endswith(".gif")
    assert (wdir / "files" / history[2]["eval/video/path"]).read_bytes().startswith(b"GIF89a")
    assert not any(r.WhichOneof("record_type") == "alert" for r in records)  # online only


def test_an_online_run_resumes_its_wandb_run_and_alerts(tmp_path, monkeypatch):
    """A resumed run's logger asks wandb for the run id the first one saved, in the run folder;
    a firing is logged and, online, alerted (wandb.init is stubbed: what it is asked is the
    point, and nothing may reach the network)."""
    wandb = pytest.importorskip("wandb")
    calls, logged, alerts = [], [], []

    class Run:
        name = "r"

        def log(self, data, step):
            logged.append((step, data))

        def alert(self, **kw):
            alerts.append(kw)

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or Run())
    cfg = build_config(overrides=["train.wandb=online", "train.wandb_project=p"])
    run = tmp_path / "r"
    run.mkdir()
    RunLogger(run, 0, cfg).close()
    log = RunLogger(run, 1, cfg)
    log.firing({**FIRING, "action": "stop"})
    log.close()
    first, again = calls
    assert first == again
    assert first["id"] == (run / "wandb_id.txt").read_text().strip()
    assert first["resume"] == "allow" and first["dir"] == str(run) and first["name"] == "r"
    assert first["project"] == "p" and first["mode"] == "online"
    assert first["config"] == to_dict(cfg)
    assert logged == [(1, {"watch/heldout_loss_rise": 0.4, "watch/fired": FIRING["rule"]})]
    (alert,) = alerts
    assert alert["level"] == "ERROR" and FIRING["reason"] in alert["text"]
    assert len(alert["title"]) < 64


def test_resume_cuts_watch_jsonl(tmp_path):
    cfg = build_config(overrides=[])
    log = RunLogger(tmp_path, 0, cfg)
    for it in (2, 4, 6):
        log.firing({**FIRING, "iteration": it})
    log.close()
    RunLogger(tmp_path, 4, cfg).close()  # resumed from the checkpoint at iteration 4
    assert [r["iteration"] for r in read_jsonl(tmp_path / "watch.jsonl")] == [2, 4]


def test_samples_without_a_tracker_do_nothing(tmp_path, monkeypatch):
    def draw(*a):
        raise AssertionError("drew a picture with no tracker on")

    monkeypatch.setattr(trackers, "sample_pictures", draw)
    log = RunLogger(tmp_path, 0, build_config(overrides=[]))
    log.samples(1, object(), 2)  # not a tensor: touching it would raise


def test_bad_or_missing_wandb_is_one_line(tmp_path, monkeypatch):
    one_line_error(build_config, overrides=["train.wandb=yes"], match=("train.wandb", "offline"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name)
    )
    cfg = build_config(overrides=["train.wandb=offline"])  # evaluating a run needs no wandb
    one_line_error(cfg.train.require_trackers, match="pip install 'ddrl[wandb]'")
    one_line_error(RunLogger, tmp_path, 0, cfg, match="pip install 'ddrl[wandb]'")
    assert not (tmp_path / "wandb_id.txt").exists()


def test_the_run_folder_module_stays_torch_free():
    """``ddrl train`` checks the run folder through runlog before torch loads; the trackers
    (torch, pillow, wandb) come in only when a logger is built."""
    code = "import sys, ddrl.training.runlog; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

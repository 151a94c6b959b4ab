"""``ddrl bench --quick --json F``: every field is there and the recorded backbone calls are the
ones each algorithm makes (counted by hand below). No timing is asserted. Per-phase memory: a
phase that allocates a known tensor shows it as its own increase."""

import json
import math
import sys

import pytest
import torch

from ddrl.cli import main
from ddrl.phases import PHASES, PhaseTimer, phase, track_memory

FIELDS = {
    "algorithm",
    "phases_s",
    "iteration_s",
    "floor_s",
    "floor_forward_s",
    "floor_forward_backward_s",
    "overhead_ratio",
    "samples_per_iteration",
    "rollout_samples_per_s",
    "onpolicy_ratio_dev_max",
    "peak_memory_mb",
    "phases_memory",
    "memory_method",
    "model_tflop_per_iteration",
    "achieved_tflops",
    "mfu",
    "passes",
}


def test_bench_quick_json_has_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--algorithms", "ddrl,flow_grpo", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "overhead ratio" in printed and "vs ddrl" in printed
    report = json.loads(out.read_text())
    assert {"preset", "device", "torch", "threads", "iterations", "warmup"} <= set(report)
    ddrl, flow = report["results"]
    for r in (ddrl, flow):
        assert set(r) == FIELDS
        assert set(r["phases_s"]) == set(PHASES)
        for k in FIELDS - {
            "algorithm",
            "phases_s",
            "passes",
            "mfu",
            "phases_memory",
            "memory_method",
            "samples_per_iteration",
            "onpolicy_ratio_dev_max",
        }:
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, k
        assert r["samples_per_iteration"] == 2 * 4  # QUICK: 2 prompts × a group of 4
        assert 0 <= r["onpolicy_ratio_dev_max"] < 1e-4  # on-policy in float32 on the CPU
        assert r["mfu"] is None  # CPU: no known peak
        assert r["floor_s"] == r["floor_forward_s"] + r["floor_forward_backward_s"]
        assert r["phases_s"]["rollout"] > 0 and r["phases_s"]["backward"] > 0
        assert set(r["phases_memory"]) == set(PHASES)
        assert r["memory_method"] in ("vmhwm", "ru_maxrss")
        for p in ("rollout", "backward"):
            mem = r["phases_memory"][p]
            assert mem["peak_mb"] > 0 and mem["increase_mb"] >= 0
            assert mem["peak_mb"] <= r["peak_memory_mb"] + 1e-6
    assert "memory by phase, MiB" in printed
    # --quick: 2 prompts × 4 samples, 4 sampling steps, no CFG on digits. DDRL trains all 4
    # steps (fraction 1): 4 rollout forwards, 4 policy + 4 data-term forward+backwards.
    calls = lambda r, g: sum(p["calls"] for p in r["passes"] if p["grad"] is g)  # noqa: E731
    assert all(p["batch_shape"] == [8, 1, 8, 8] for p in ddrl["passes"])
    assert (calls(ddrl, False), calls(ddrl, True)) == (4, 8)
    assert ddrl["phases_s"]["data"] > 0 and ddrl["phases_s"]["reference"] == 0
    # Flow-GRPO trains floor(0.99 · 4) = 3 steps in each of its 2 optimizer steps, on halves
    # of 4 samples: 6 policy passes with gradient and 6 reference forwards of 4, on top of the
    # 4 rollout forwards of 8.
    by_size = lambda r, g: {  # noqa: E731
        n: sum(p["calls"] for p in r["passes"] if p["grad"] is g and p["batch_shape"][0] == n)
        for n in (4, 8)
    }
    assert (by_size(flow, False), by_size(flow, True)) == ({4: 6, 8: 4}, {4: 6, 8: 0})
    assert flow["phases_s"]["reference"] > 0 and flow["phases_s"]["data"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="exact RSS peaks: Linux /proc")
def test_phase_memory_sees_a_known_allocation():
    """A phase that fills a 200 MB tensor (and frees it) shows a peak increase of 200 MB
    (±10%), while a phase that allocates nothing stays near 0; the recorder resets the
    high-water mark per phase (the second phase does not inherit the first's peak)."""
    size = 200 * 10**6
    timer = PhaseTimer("cpu")
    with track_memory("cpu") as mem, timer.active():
        assert mem.method == "vmhwm"
        with phase("rollout"):
            x = torch.ones(size // 4)  # float32: touched pages, resident
            del x
        with phase("reward"):
            y = torch.ones(10)
            del y
        timer.reset()
    row = mem.rows[0]
    assert abs(row["rollout"]["increase"] - size) <= 0.1 * size, row
    assert row["reward"]["increase"] < 0.05 * size, row
    assert row["reward"]["peak"] < row["rollout"]["peak"] - 0.5 * size
    assert mem.total_peak() >= row["rollout"]["peak"]


def test_default_threads(monkeypatch):
    """DDRL_THREADS wins; torchrun's local ranks divide the cores; ddrl processes are found by
    their command line (the script, python running it, or -m ddrl)."""
    from ddrl.dist import threads

    assert threads._is_ddrl(["/v/bin/python", "/v/bin/ddrl", "train"])
    assert threads._is_ddrl(["ddrl", "bench"])
    assert threads._is_ddrl(["python", "-u", "-m", "ddrl", "train"])
    assert not threads._is_ddrl(["python", "-m", "pytest", "ddrl"])
    monkeypatch.setattr(threads, "_cores", lambda: 8)
    monkeypatch.setenv("DDRL_THREADS", "3")
    assert threads.default_threads()[0] == 3
    monkeypatch.delenv("DDRL_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.default_threads() == (2, "8 cores / 4 local ranks")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(threads, "other_ddrl_processes", lambda: 3)
    assert threads.default_threads()[0] == 2
    monkeypatch.setattr(threads, "other_ddrl_processes", lambda: 0)
    assert threads.default_threads() == (8, "8 cores")

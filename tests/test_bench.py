"""``ddrl bench --quick --json F``: every field is there and the recorded backbone calls are the
ones each algorithm makes (counted by hand below). No timing is asserted."""

import json
import math

from ddrl.cli import main
from ddrl.phases import PHASES

FIELDS = {
    "algorithm",
    "phases_s",
    "iteration_s",
    "floor_s",
    "floor_forward_s",
    "floor_forward_backward_s",
    "overhead_ratio",
    "rollout_samples_per_s",
    "peak_memory_mb",
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
        for k in FIELDS - {"algorithm", "phases_s", "passes", "mfu"}:
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, k
        assert r["mfu"] is None  # CPU: no known peak
        assert r["floor_s"] == r["floor_forward_s"] + r["floor_forward_backward_s"]
        assert r["phases_s"]["rollout"] > 0 and r["phases_s"]["backward"] > 0
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

"""benchmarks/gpu_check.sh --dry: the GPU check's own code path (cases as separate processes,
``ddrl plan`` + ``ddrl bench``, FSDP2 under torchrun with one rank, the JSON and the markdown
table) at toy size on the CPU, so that CI keeps it working (docs/BENCHMARKS.md). CI runs the
torchrun case only (the others are the same path without torchrun; ``make gpu-check-dry`` runs
them all but compile)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 18 s: `make gpu-check-dry` and `make test-slow` run it
def test_the_dry_gpu_check_writes_every_figure(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = [str(ROOT / "benchmarks/gpu_check.sh"), str(tmp_path / "out"), "--dry"]
    done = subprocess.run(
        [*cmd, "--skip", "sd35,wan,compile"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "out/gpu_check.json").read_text())
    cases = {c["case"]: c for c in report["cases"]}
    assert {cases[n]["status"] for n in ("sd35", "wan", "compile")} == {"skipped (asked)"}
    c = cases["fsdp1"]
    assert c["status"] == "ok", c["status"]
    assert "parallel.strategy=fsdp" in c["overrides"]
    (r,) = c["bench"]["results"]
    assert r["algorithm"] == "ddrl" and r["iteration_s"] > 0 and r["samples_per_iteration"] == 2
    assert r["peak_memory_mb"] > 0 and r["phases_memory"]["policy"]["peak_mb"] > 0
    assert r["onpolicy_ratio_dev_max"] < 1e-4
    assert c["plan_gib"]["ddrl"] > 0  # ddrl plan's prediction of the same config
    table = (tmp_path / "out/gpu_check.md").read_text()
    assert "| fsdp1 | ddrl | 0." in table and "| sd35 | ddrl,flow_grpo,nft | skipped" in table

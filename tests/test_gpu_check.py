"""benchmarks/gpu_check.sh --dry: the GPU check's own code path (cases as separate processes,
``ddrl plan`` + ``ddrl bench``, FSDP2 under torchrun with one rank, the JSON and the markdown
table) at toy size on the CPU, so that CI keeps it working (docs/BENCHMARKS.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_gpu_check_writes_every_figure(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = [str(ROOT / "benchmarks/gpu_check.sh"), str(tmp_path / "out"), "--dry"]
    done = subprocess.run(
        [*cmd, "--skip", "wan,compile"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "out/gpu_check.json").read_text())
    cases = {c["case"]: c for c in report["cases"]}
    assert cases["wan"]["status"] == cases["compile"]["status"] == "skipped (asked)"
    for name, algorithms in (("sd35", ["ddrl", "flow_grpo", "nft"]), ("fsdp1", ["ddrl"])):
        c = cases[name]
        assert c["status"] == "ok", c["status"]
        results = {r["algorithm"]: r for r in c["bench"]["results"]}
        assert sorted(results) == sorted(algorithms)
        for alg, r in results.items():
            assert r["iteration_s"] > 0 and r["peak_memory_mb"] > 0 and r["phases_memory"]
            assert c["plan_gib"][alg] > 0  # ddrl plan's prediction of the same config
            if alg != "nft":  # NFT's forward-process objective logs no on-policy ratio
                assert r["onpolicy_ratio_dev_max"] < 1e-4
    table = (tmp_path / "out/gpu_check.md").read_text()
    assert table.count("| sd35 |") == 3 and "| fsdp1 | ddrl | 0." in table

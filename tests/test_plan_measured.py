"""``ddrl plan``'s activation term against memory measured on this CPU (docs/MODELS.md §3).

The coefficients in ``ddrl.plan.activations.ACTIVATION_FITS`` were fitted on SD3.5-Medium and
Wan2.1-1.3B at their real width and depth (``benchmarks/memory_fit.py``: line residuals 0.6–12%).
Here, in CI time, the same measurement runs on SD3.5-Medium's real width with 3 of its 24
blocks (the published structure: dual attention in the first two, qk-norm) at 173 and 685
tokens, each in a fresh process; the plan must predict the growth of a training pass's memory
between the two sizes within 25% (the growth: a size-independent part, e.g. oneDNN workspaces,
is left out; a shallow model's transient buffers weigh more than a full model's: hence 25%).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ddrl.plan.activations import activation_bytes

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.25


def _measure(resolution: int, cache: Path) -> dict:
    shrink = {"transformer": {"num_layers": 3, "dual_attention_layers": [0, 1]}}
    size = [f"model.resolution={resolution}", f"model.cache_dir={cache}"]
    one = json.dumps(["sd3", size, "lora", False, shrink])
    cmd = [sys.executable, str(ROOT / "benchmarks/memory_fit.py"), "--out", "-", "--one", one]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # 24 s: `make test` stays under its 10 minutes (`make test-slow` runs it)
def test_plans_activation_growth_agrees_with_the_measured_cpu_peak(tmp_path):
    small, large = _measure(128, tmp_path), _measure(384, tmp_path)
    assert (small["tokens"], large["tokens"]) == (173, 685)  # 8², 24² patches + 77 + 32 text
    assert small["layers"] == 3 and small["hidden"] == 1536  # the real width
    measured = large["activation_bytes"] - small["activation_bytes"]

    def plan(r):
        return r["samples"] * activation_bytes(
            "sd3", r["tokens"], layers=3, hidden=1536, finetune="lora"
        )

    predicted = plan(large) - plan(small)
    assert abs(predicted - measured) / measured < TOLERANCE, (predicted, measured)

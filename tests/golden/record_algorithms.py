"""Record what the named algorithms compute, so a refactor can be checked against the code
before it: ``python tests/golden/record_algorithms.py OUT.json`` writes, for every case of
``CASES``, the metrics rows of a quick digits run (``helpers_quick``) and a checksum of the
trained weights. tests/test_matrix.py reruns the cases and compares (float rounding only).
The committed file was written by the code at commit 9a844c9 (before the objective ×
regulariser matrix, docs/DECISIONS.md)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

CASES = {  # name → overrides on top of helpers_quick.quick()
    "ddrl": ["algorithm=ddrl"],
    "ddrl_batched_random_edm": [
        "algorithm=ddrl",
        "loss.data_batched=true",
        "loss.data_t=random",
        "loss.ratio=edm_squared_error",
        "train.updates_per_batch=2",
    ],
    "ddrl_first_only": ["algorithm=ddrl", "loss.data_on_first_only=true", "sampler.cfg_scale=2.0"],
    "flow_grpo": ["algorithm=flow_grpo"],
    "flow_grpo_keep_zero": ["algorithm=flow_grpo", "loss.drop_zero_advantage=false"],
    "dance_grpo": ["algorithm=dance_grpo"],
    "grpo": ["algorithm=grpo", "train.micro_batch=3"],
    "sft": ["algorithm=sft"],
}
KEYS = (
    "loss",
    "loss_policy",
    "loss_data",
    "loss_kl",
    "grad_norm",
    "reward_mean",
    "ratio_dev_mean",
    "clipped_mean",
    "onpolicy_ratio_dev_max",
)


def checksum(model: torch.nn.Module) -> list[float]:
    """Σθ and Σθ·u (u: fixed pseudo-random weights) over every parameter, in float64."""
    g = torch.Generator().manual_seed(1234)
    s = w = 0.0
    for _, p in sorted(model.named_parameters()):
        x = p.detach().double().flatten()
        s += float(x.sum())
        w += float((x * torch.rand(x.shape, generator=g, dtype=torch.float64)).sum())
    return [s, w]


def run_case(overrides: list[str], root: Path) -> dict:
    from helpers_quick import quick

    from ddrl.config import build_config
    from ddrl.training.components import build_components
    from ddrl.training.loop import train
    from ddrl.training.runlog import prepare_run_dir, read_jsonl

    cfg = build_config(overrides=quick(*overrides, "eval.every=0"))
    out = prepare_run_dir(root, resume=False, overwrite=False)
    c = build_components(cfg, log=lambda *a, **k: None)
    train(cfg, out, log=lambda *a, **k: None, components=c)
    rows = read_jsonl(out / "metrics.jsonl")
    return {
        "rows": [{k: r[k] for k in KEYS if k in r} for r in rows],
        "weights": checksum(c.gen.denoiser),
    }


if __name__ == "__main__":
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for name, ov in CASES.items():
            results[name] = run_case(ov, Path(d) / name)
            print(name, results[name]["rows"][-1])
    Path(sys.argv[1]).write_text(json.dumps(results, indent=1) + "\n")

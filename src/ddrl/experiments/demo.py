"""`ddrl demo`: the embedded default end to end, in minutes, with no downloads.

Pretrain (or reuse) the digits base model, train DDRL and the same objective without its data
term (``grpo``: the ablation that isolates what the data term does) from it on the ``ink``
(brightness) reward under one budget, evaluate each, and write summary.json, sample grids and
a report into the output folder. The peers' algorithms (Flow-GRPO, DanceGRPO at their own
settings), regulariser sweeps and the classifier reward are in ``ddrl compare``; two arms keep
the demo under 6 minutes on 2 cores from an empty cache.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ddrl.experiments.compare import (
    QUICK_COMMON,
    arm_overrides,
    check_overrides,
    evaluate_base,
    run_arm,
)
from ddrl.experiments.report import write_report
from ddrl.training.runlog import prepare_run_dir
from ddrl.vote.prepare import prepare_votes

DEMO_ARMS = [("ddrl", {}), ("grpo", {})]  # each at its preset defaults
DEMO_COMMON = {"train.iterations": 30, "eval.every": 10}
KEYS = (
    "proxy_reward",
    "gold_accuracy",
    "diversity",
    "heldout_diffusion_loss",
    "fd",
    "saturation_rate",
)


def run_demo(
    out: Path, quick: bool = False, overwrite: bool = False, overrides: list[str] = (), log=print
) -> dict:
    """Writes ``out/summary.json``: {base|ddrl|grpo: {metric: value, seconds}, votes_seconds,
    total_seconds}, and ``out/votes``: the blind vote's folder of ddrl against grpo
    (``ddrl vote``), ready to serve."""
    t_start = time.time()
    common = QUICK_COMMON if quick else DEMO_COMMON
    ink = ["reward.name=ink", *overrides]
    check_overrides(overrides, {"ink": [arm_overrides(a, s, common, ink) for a, s in DEMO_ARMS]})
    out = prepare_run_dir(out, resume=False, overwrite=overwrite)
    t0 = time.time()
    base = evaluate_base(common, "ink", list(overrides), out, log)
    pre = json.loads((Path(base["base_path"]) / "pretrain.json").read_text())
    summary = {
        "base": {
            **{k: base[k] for k in KEYS},
            "seconds": time.time() - t0,
            "pretrain_seconds": pre["seconds"],
        }
    }
    arms, grids = [], {"base": out / "samples_base.png"}
    for algorithm, setting in DEMO_ARMS:
        log(f"[demo] training {algorithm}")
        arm = run_arm(algorithm, setting, common, out / algorithm, ink, log)
        arms.append(arm)
        summary[algorithm] = {
            **{k: arm["final"][k] for k in KEYS},
            "seconds": arm["seconds"],
            "time_per_iteration": arm["time_per_iteration"],
        }
        grids[algorithm] = out / algorithm / "samples_final.png"
    t0 = time.time()  # the blind vote's folder: `ddrl vote serve --out OUT/votes` serves it
    votes = prepare_votes([out / a for a, _ in DEMO_ARMS], out / "votes", log=log)
    summary["votes_seconds"] = time.time() - t0
    log(
        f"[demo] {len(votes.questions)} blind questions rendered in "
        f"{summary['votes_seconds']:.1f}s; rate them: ddrl vote serve --out {out / 'votes'}"
    )
    summary["total_seconds"] = time.time() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_report(
        {"base": {k: base[k] for k in KEYS}, "arms": arms},
        out,
        grids=grids,
        title="ddrl demo: ink reward on digits",
        notes="Same base, same budget (" + ", ".join(f"{k}={v}" for k, v in common.items()) + ").",
    )
    header = f"{'':12}" + "".join(f"{k:>24}" for k in (*KEYS, "seconds"))
    lines = [header] + [
        f"{name:12}" + "".join(f"{row[k]:>24.3f}" for k in (*KEYS, "seconds"))
        for name, row in summary.items()
        if isinstance(row, dict)
    ]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    log(
        f"[demo] wrote {out / 'summary.json'}, {out / 'report.html'} "
        f"({summary['total_seconds']:.0f}s in all)"
    )
    return summary

"""`ddrl long`: the paper's long-training claim in miniature.

DDRL's argument (the paper) is about long training: a reverse KL to a reference model is
evaluated on the policy's own samples, where the reference is itself unreliable off the data
manifold, so it only slows the drift; the forward KL to data holds an equilibrium. At 30
iterations a tuned reverse KL matches DDRL on digits; this runs both at matched settings for
many more iterations, on both rewards and several seeds, with evaluation every ``eval_every``,
and plots gold accuracy, proxy reward, diversity and held-out diffusion loss against iteration.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ddrl.experiments.compare import (
    REGIME_KEYS,
    arm_overrides,
    check_overrides,
    evaluate_base,
    run_arm,
)
from ddrl.experiments.figures import legend_if_labelled, save_figure
from ddrl.experiments.hacking import arm_slug
from ddrl.experiments.report import write_report
from ddrl.training.runlog import prepare_run_dir

# The settings where DDRL and Flow-GRPO matched at 30 iterations (docs/LOG.md, 2026-11-24).
LONG_ARMS: list[tuple[str, dict[str, Any]]] = [
    ("ddrl", {"loss.data_beta": 0.1}),
    ("flow_grpo", {"loss.beta_kl": 4.0}),  # flow_grpo's units
]
QUICK = {
    "train.prompts_per_iter": 2,
    "train.group_size": 4,
    "sampler.num_steps": 4,
    "sampler.eval_steps": 4,
    "eval.samples_per_prompt": 3,
    "pretrain.steps": 20,
    "pretrain.batch_size": 32,
}
PANELS = [
    ("gold_accuracy", "gold accuracy"),
    ("proxy_reward", "proxy reward"),
    ("diversity", "diversity (pixels)"),
    ("heldout_diffusion_loss", "held-out diffusion loss"),
]


def plot_long_curves(regime: dict, path) -> Path:
    """Four panels against iteration, one line per (arm, seed): a colour per algorithm, a line
    style per seed; the base model dashed black."""
    fig = Figure(figsize=(13, 9))
    axes = fig.subplots(2, 2).flatten()
    colours = {"ddrl": "tab:blue", "flow_grpo": "tab:red"}
    styles = ["-", "--", ":", "-."]
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        for arm in regime["arms"]:
            pts = [(r["iteration"], r[key]) for r in arm["curve"] if r.get(key) is not None]
            ax.plot(
                *zip(*pts, strict=True),
                color=colours.get(arm["algorithm"], "tab:gray"),
                ls=styles[arm.get("seed", 0) % len(styles)],
                label=arm["label"],
            )
        ax.axhline(regime["base"][key], color="k", ls="--", lw=1, label="base")
        ax.set(xlabel="iteration", ylabel=key, title=f"{title} ({regime['reward']})")
        ax.grid(alpha=0.3)
    legend_if_labelled(axes[0], fontsize=7, loc="best")
    return save_figure(fig, path)


def run_long(
    out: Path,
    iterations: int = 200,
    seeds: tuple[int, ...] = (0, 1),
    rewards: tuple[str, ...] = ("ink", "classifier"),
    eval_every: int = 10,
    arms: list[tuple[str, dict]] = LONG_ARMS,
    quick: bool = False,
    overwrite: bool = False,
    overrides: list[str] = (),
    log=print,
) -> dict:
    """Train every (reward, arm, seed) for ``iterations``; write long.json, report.html and
    long_curves_<reward>.png. The base model is the same for every seed (pretrain.seed)."""
    common = {"train.iterations": iterations, "eval.every": eval_every, **(QUICK if quick else {})}
    plans = {
        r: [
            arm_overrides(a, s, common, [f"reward.name={r}", f"seed={seed}", *overrides])
            for a, s in arms
            for seed in seeds
        ]
        for r in rewards
    }
    # Each run sets its own seed (--seeds): a seed=... override would make them one run.
    check_overrides(overrides, plans, fixed=(*REGIME_KEYS, "seed"))
    out = prepare_run_dir(out, resume=False, overwrite=overwrite)
    regimes, t0 = {}, time.time()
    for reward in rewards:
        rdir = out / reward
        rdir.mkdir()
        base = evaluate_base(common, reward, list(overrides), rdir, log)
        runs = []
        for algorithm, setting in arms:
            for seed in seeds:
                name = f"{arm_slug(algorithm, setting)}_seed{seed}"
                ov = [f"reward.name={reward}", f"seed={seed}", *overrides]
                arm = run_arm(algorithm, {**setting}, common, rdir / name, ov, log)
                arm.update(reward=reward, seed=seed, label=f"{arm['label']} seed {seed}")
                f = arm["final"]
                log(
                    f"[long] {reward} {arm['label']}: proxy {f['proxy_reward']:.3f} gold "
                    f"{f['gold_accuracy']:.3f} div {f['diversity']:.3f} ({arm['seconds']:.0f}s)"
                )
                runs.append(arm)
        regimes[reward] = {"reward": reward, "base": base, "arms": runs}
        plot_long_curves(regimes[reward], out / f"long_curves_{reward}.png")
    result = {
        "regimes": regimes,
        "budget": common,
        "seeds": list(seeds),
        "seconds": time.time() - t0,
    }
    (out / "long.json").write_text(json.dumps(result, indent=1))
    write_report(
        {"regimes": regimes},
        out,
        grids={f"{r}: curves": out / f"long_curves_{r}.png" for r in regimes},
        title="ddrl: long training, DDRL vs Flow-GRPO",
        notes="Every run starts from the same base; settings: "
        + ", ".join(f"{k}={v}" for k, v in common.items()),
    )
    log(f"[long] wrote {out / 'report.html'} ({result['seconds']:.0f}s)")
    return result

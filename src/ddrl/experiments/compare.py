"""`ddrl compare`: every arm from one base under one budget, a sweep of each regulariser, and
a report that says which arm hacked and when.

Budget (full run, per reward regime): ``FULL_COMMON`` below, identical for every arm — same
iterations, prompts per iteration, group size, learning rate and evaluation schedule — and
the evaluation seed is fixed, so every arm is scored on the same prompts and noise. The ink
regime's DDRL, Flow-GRPO and DanceGRPO arms (``VOTE_ARMS``) also get a blind vote's folder,
``ink/votes`` (``ddrl vote serve --out OUT/ink/votes``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ddrl.config import build_config
from ddrl.config.resolve import parse_overrides
from ddrl.errors import DDRLError
from ddrl.evaluation.evaluate import evaluate_components
from ddrl.evaluation.pictures import save_prompt_grid
from ddrl.experiments.hacking import arm_label, arm_slug
from ddrl.experiments.report import write_report
from ddrl.experiments.toy2d import (
    TOY_ARMS,
    TOY_COMMON,
    TOY_QUICK_ARMS,
    run_toy2d,
    toy2d_html,
    toy_arm_overrides,
)
from ddrl.training.components import build_components, device_of
from ddrl.training.loop import train
from ddrl.training.runlog import prepare_run_dir, read_jsonl
from ddrl.vote.prepare import prepare_votes

# Arms of the full comparison: (algorithm, setting). DanceGRPO and plain GRPO have no
# regulariser; DDRL sweeps data_beta, Flow-GRPO sweeps beta_kl over comparable ranges. The
# forward-process objectives run at their published settings on two seeds, and once tuned
# (docs/LOG.md 2026-12-07: the published settings hack the digits rewards within 30
# iterations; tuned: the regulariser of a pilot that kept gold accuracy and still gained reward).
FULL_ARMS: list[tuple[str, dict[str, Any]]] = [
    *[("ddrl", {"loss.data_beta": b}) for b in (0.03, 0.1, 0.3)],
    *[("flow_grpo", {"loss.beta_kl": b}) for b in (0.04, 0.4, 4.0, 40.0)],  # flow_grpo units
    ("dance_grpo", {}),
    ("grpo", {}),
    *[(a, s) for a in ("nft", "nft_data", "awm", "awm_data") for s in ({}, {"seed": 1})],
    ("nft", {"loss.beta_kl": 1.0}),
    ("nft_data", {"loss.data_beta": 1.0}),
    ("awm", {"loss.beta_kl": 0.1}),
]
# 30 iterations: unregularised GRPO/DanceGRPO hack the ink reward by ~20-30 (docs/LOG.md).
FULL_COMMON = {"train.iterations": 30, "eval.every": 5}
QUICK_ARMS = [
    ("ddrl", {"loss.data_beta": 0.3}),
    ("flow_grpo", {"loss.beta_kl": 0.04}),
    ("dance_grpo", {}),
]
# The ink arms a blind human vote compares: DDRL (data_beta 0.1) and the peers at their papers'
# settings (Flow-GRPO's β 0.04, DanceGRPO's defaults).
VOTE_ARMS = [
    ("ddrl", {"loss.data_beta": 0.1}),
    ("flow_grpo", {"loss.beta_kl": 0.04}),
    ("dance_grpo", {}),
]
QUICK_COMMON = {
    "train.iterations": 2,
    "train.prompts_per_iter": 2,
    "train.group_size": 4,
    "sampler.num_steps": 4,
    "sampler.eval_steps": 4,
    "eval.every": 1,
    "eval.samples_per_prompt": 3,
    "pretrain.steps": 20,
    "pretrain.batch_size": 32,
}


# What `--quick` can and cannot show, said once at the top of its report.
QUICK_BANNER = (
    "QUICK MODE: the digits regimes are a smoke test (a 20-step base that the gold evaluator "
    "cannot read, 2 iterations per arm), so no arm can hack or differ there and their bullets "
    "and figures say nothing about the algorithms; the 2-D section runs at full size with "
    "three arms and does show the mechanism (`ddrl compare` without --quick runs everything "
    "at full size)."
)
QUICK_TOY_BANNER = "QUICK MODE: the 2-D picture at full size, with three of its five arms."
# Keys a regime or its arms set themselves: a user's value would silently turn a regime into
# another (reward.name on ink) or every arm into one algorithm, so it is refused.
REGIME_KEYS = ("preset", "model.name", "data.name", "reward.name", "algorithm")


def _ov(d: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


def arm_overrides(
    algorithm: str, setting: dict, common: dict, overrides: list[str] = ()
) -> list[str]:
    """An arm's whole override list: algorithm, ``common``, its setting, then ``overrides``."""
    own = [f"algorithm={algorithm}", *_ov(common), *_ov(setting), "train.progress=false"]
    return [*own, *overrides]


def run_arm(
    algorithm: str, setting: dict, common: dict, out: Path, overrides: list[str] = (), log=print
) -> dict:
    """Train one arm into ``out`` and return its metrics.json entry (curve from eval.jsonl)."""
    cfg = build_config(overrides=arm_overrides(algorithm, setting, common, overrides))
    t0 = time.time()
    train(cfg, prepare_run_dir(out, resume=False, overwrite=False), log=log)
    seconds = time.time() - t0
    curve = read_jsonl(out / "eval.jsonl")
    rows = read_jsonl(out / "metrics.jsonl")
    arm = {
        "algorithm": algorithm,
        "setting": {k.split(".")[-1]: v for k, v in setting.items()},
        "final": curve[-1],
        "curve": curve,
        "watch": read_jsonl(out / "watch.jsonl"),
        "seconds": seconds,
        "run": str(out),
        "time_per_iteration": sum(r["time_iteration"] for r in rows) / max(len(rows), 1),
        "reward_curve": [
            {"iteration": r["iteration"], "reward_mean": r["reward_mean"]} for r in rows
        ],
    }
    arm["label"] = arm_label(arm)
    return arm


def evaluate_base(common: dict, reward: str, overrides: list[str], out: Path, log=print) -> dict:
    cfg = build_config(overrides=[*_ov(common), f"reward.name={reward}", *overrides])
    if not cfg.gold.name:
        raise DDRLError("comparisons judge hacking with a gold evaluator; gold.name is empty")
    c = build_components(cfg, log)
    metrics, raw, _ = evaluate_components(c.gen, c, cfg)
    save_prompt_grid(raw, len(c.data.prompts), out / "samples_base.png", "base")
    return {**metrics, "base_path": str(c.base_path)}


def run_compare(
    out: Path,
    quick: bool = False,
    rewards: list[str] = ("ink", "classifier", "toy2d"),
    overwrite: bool = False,
    overrides: list[str] = (),
    log=print,
    algorithms: list[str] | None = None,
) -> dict:
    """Run every arm (of ``algorithms`` only, when given) for every reward regime (digits
    rewards, and "toy2d" for the 2-D tilt picture); write metrics.json, report.html and
    figures."""
    arms_spec, common = (QUICK_ARMS, QUICK_COMMON) if quick else (FULL_ARMS, FULL_COMMON)
    toy_arms = TOY_QUICK_ARMS if quick else TOY_ARMS
    if algorithms:
        known = {a for a, _ in FULL_ARMS} | {a for _, a, _ in TOY_ARMS}
        bad = [a for a in algorithms if a not in known]
        if bad:
            raise DDRLError(
                f"--algorithms names {', '.join(bad)}, which has no arm here; allowed: "
                f"{', '.join(sorted(known))}"
            )
        arms_spec = [(a, s) for a, s in arms_spec if a in algorithms]
        toy_arms = [arm for arm in toy_arms if arm[1] in algorithms]
    digits = [r for r in rewards if r != "toy2d"]
    plans = {
        r: [arm_overrides(a, s, common, [f"reward.name={r}", *overrides]) for a, s in arms_spec]
        for r in digits
    }
    if "toy2d" in rewards:
        plans["toy2d"] = toy_arm_overrides(toy_arms, TOY_COMMON, overrides)
    check_overrides(overrides, plans)
    out = prepare_run_dir(out, resume=False, overwrite=overwrite)
    regimes, grids, toy = {}, {}, None
    if "toy2d" in rewards:
        log("[compare] toy2d: the reward-tilted mixture in two dimensions")
        toy = run_toy2d(out / "toy2d", toy_arms, TOY_COMMON, list(overrides), log)
    for reward in digits:
        rdir = out / reward
        rdir.mkdir()
        log(f"[compare] {reward}: evaluating the base model")
        base = evaluate_base(common, reward, list(overrides), rdir, log)
        grids[f"{reward}: base"] = rdir / "samples_base.png"
        arms = []
        for algorithm, setting in arms_spec:
            arm = run_arm(
                algorithm,
                setting,
                common,
                rdir / arm_slug(algorithm, setting),
                [f"reward.name={reward}", *overrides],
                log,
            )
            arm["reward"] = reward
            f = arm["final"]
            log(
                f"[compare] {reward} {arm['label']}: proxy {f['proxy_reward']:.3f} gold "
                f"{f['gold_accuracy']:.3f} diversity {f['diversity']:.3f} "
                f"({arm['seconds']:.0f}s)"
            )
            arms.append(arm)
            grid = Path(arm["run"]) / "samples_final.png"
            if grid.is_file():
                grids[f"{reward}: {arm['label']}"] = grid
        regimes[reward] = {"reward": reward, "base": base, "arms": arms}
        if reward == "ink":  # the blind vote's folder (docs/VOTE.md): ddrl vote serve --out
            voted = [rdir / arm_slug(a, s) for a, s in (QUICK_ARMS if quick else VOTE_ARMS)]
            if sum(r.is_dir() for r in voted) >= 2:
                prepare_votes([r for r in voted if r.is_dir()], rdir / "votes", log=log)
    first = next(iter(regimes.values()), {"base": {}})
    metrics = {
        "base": first["base"],
        "arms": [a for r in regimes.values() for a in r["arms"]],
        "regimes": regimes,
        "budget": common,
        "quick": quick,
        "toy2d": toy,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    notes = (
        "Every arm starts from the same base model and gets the same budget: "
        + ", ".join(f"{k}={v}" for k, v in common.items())
        + ". Gold accuracy comes from a PCA+SVC evaluator trained on a half of the digits "
        "that the proxy reward never saw; the held-out diffusion loss uses 297 held-out "
        "images that no model trained on."
    )
    write_report(
        {"regimes": regimes},
        out,
        grids=grids,
        title="ddrl: reward hacking comparison",
        notes=notes,
        extra_html=toy2d_html(toy, out) if toy else "",
        banner=(QUICK_BANNER if digits else QUICK_TOY_BANNER) if quick else "",
    )
    log(f"[compare] wrote {out / 'report.html'}")
    return metrics


def check_overrides(
    overrides: list[str],
    plans: dict[str, list[list[str]]] | None = None,
    fixed: tuple[str, ...] = REGIME_KEYS,
) -> None:
    """Resolve the user's overrides and check the device before any folder is moved aside: a
    bad key or an absent GPU must not cost the user their old output.

    ``plans`` maps each regime to the whole override lists of its arms (the user's included,
    as the runs will use them): every one is resolved, so a key that an arm of a regime cannot
    take (``loss.data_beta`` on a Flow-GRPO arm) is a one-line error naming that regime before
    anything runs, and a key in ``fixed`` (set by the regime or its arms) is refused.
    """
    given = parse_overrides(list(overrides))
    for regime, arm_lists in (plans or {}).items():
        key = next((k for k in given if k in fixed), None)
        if key is not None:
            raise DDRLError(
                f"override {key}={given[key]} cannot apply to the {regime} regime: its runs set "
                f"{key} themselves; allowed: keys other than {', '.join(fixed)}"
            )
        for ov in arm_lists:
            try:
                build_config(overrides=ov)
            except DDRLError as e:
                raise DDRLError(f"regime {regime}: {e}") from None
    device_of(build_config(overrides=list(overrides)))

"""The reward-hacking story in two dimensions, for the comparison report.

Four Gaussian modes, r = x. DDRL should keep all four modes and move weight toward the right
pair, as Theorem 3.1's tilted mixture p* ∝ p_data·exp(r/β) predicts; Flow-GRPO at a moderate
β tends to empty the left modes; GRPO leaves the data. Each arm trains for a few seconds, then
``TILT_SAMPLES`` ODE samples are scored against the data's modes (``toy2d_tilt``).
"""

from __future__ import annotations

import html
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from ddrl.config import build_config
from ddrl.dist.checkpoint import latest_checkpoint, load_trained
from ddrl.experiments.hacking import arm_slug
from ddrl.experiments.toy2d_tilt import plot_toy2d_arms, predicted_mode_weights, tilt_table
from ddrl.sampling import sample_ode
from ddrl.training.components import build_components
from ddrl.training.loop import train
from ddrl.training.runlog import prepare_run_dir

TOY_ARMS: list[tuple[str, str, dict[str, Any]]] = [
    ("DDRL (data_beta 0.1)", "ddrl", {"loss.data_beta": 0.1}),
    ("DDRL (data_beta 0.03)", "ddrl", {"loss.data_beta": 0.03}),
    ("Flow-GRPO (beta_kl 4)", "flow_grpo", {"loss.beta_kl": 4.0}),
    ("Flow-GRPO (beta_kl 0.4)", "flow_grpo", {"loss.beta_kl": 0.4}),
    ("GRPO (no regulariser)", "grpo", {}),
    ("NFT (published)", "nft", {}),
    ("NFT + data (data_beta 0.1)", "nft_data", {"loss.data_beta": 0.1}),
    ("AWM (published)", "awm", {}),
    ("AWM + data (data_beta 0.1)", "awm_data", {"loss.data_beta": 0.1}),
]
# 200 iterations at lr 1e-3: about 3 s per arm on one CPU core, long enough for every arm to
# reach its regime (docs/LOG.md 2026-11-24).
TOY_COMMON = {"train.iterations": 200, "optim.lr": 1e-3, "train.progress": "false"}
# `ddrl compare --quick`: the three regimes of the picture (keeps the modes, empties the left
# pair, leaves the data) at the full size above, which takes seconds (docs/LOG.md 2026-12-06).
TOY_QUICK_ARMS = [TOY_ARMS[0], TOY_ARMS[2], TOY_ARMS[4]]
TILT_SAMPLES = 4000


def _samples(cfg, out: Path | None, seed: int = 7) -> torch.Tensor:
    """ODE samples [TILT_SAMPLES, 2] of the run's final weights (the base if ``out`` is None)."""
    c = build_components(cfg, log=lambda *a: None, training=False)
    if out is not None:
        load_trained(c.gen.denoiser.requires_grad_(True), latest_checkpoint(out))
    g = torch.Generator().manual_seed(seed)
    return sample_ode(c.gen, [""] * TILT_SAMPLES, cfg.sampler, g)


def _base_overrides(common: dict, overrides: list[str]) -> list[str]:
    return ["preset=toy2d", *[f"{k}={v}" for k, v in common.items()], *overrides]


def toy_arm_overrides(
    arms=TOY_ARMS, common: dict = TOY_COMMON, overrides: list[str] = ()
) -> list[list[str]]:
    """Each arm's whole override list: the toy preset, ``common``, the user's ``overrides``
    (they reach every arm), then the arm's algorithm and setting."""
    ov = _base_overrides(common, list(overrides))
    return [
        [*ov, f"algorithm={algorithm}", *[f"{k}={v}" for k, v in setting.items()]]
        for _, algorithm, setting in arms
    ]


def run_toy2d(
    out: Path, arms=TOY_ARMS, common: dict = TOY_COMMON, overrides: list[str] = (), log=print
) -> dict:
    """Train every arm on the toy, write toy2d_tilt.png; returns {"table", "figure", "seconds"}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    samples = {"base": _samples(build_config(overrides=_base_overrides(common, overrides)), None)}
    arm_ovs = toy_arm_overrides(arms, common, overrides)
    for (label, algorithm, setting), ov in zip(arms, arm_ovs, strict=True):
        cfg = build_config(overrides=ov)
        run = prepare_run_dir(out / arm_slug(algorithm, setting), resume=False, overwrite=False)
        train(cfg, run, log=lambda *a: None)
        samples[label] = _samples(cfg, run)
        log(f"[toy2d] {label} done ({time.time() - t0:.0f}s)")
    table = tilt_table(samples)
    predicted = {
        row["arm"]: torch.tensor(row["predicted_at_beta"])
        for row in table
        if row["arm"] != "base" and row["predicted_at_beta"] is not None
    }
    title = "toy2d, r = x: measured mode weights vs the tilted mixture"
    fig = plot_toy2d_arms(samples, out / "toy2d_tilt.png", predicted=predicted, title=title)
    prior = predicted_mode_weights(float("inf")).tolist()
    return {"table": table, "figure": str(fig), "seconds": time.time() - t0, "prior": prior}


def toy2d_html(toy: dict, out_dir: Path) -> str:
    """The report section: the figure and a table of measured vs predicted mode weights."""
    # No sample on the data's support leaves no weights to measure: a dash, not "nan".
    num = lambda x, spec: format(x, spec) if math.isfinite(x) else "\u2014"  # noqa: E731
    fmt = lambda w: " / ".join(num(x, ".3f") for x in w)  # noqa: E731
    rows = "".join(
        f"<tr><td>{html.escape(r['arm'])}</td><td>{fmt(r['weights'])}</td>"
        f"<td>{num(r['off_support'], '.3f')}</td><td>{num(r['implied_beta'], '.3g')}</td>"
        f"<td>{fmt(r['predicted_at_beta'])}</td><td>{num(r['kl'], '.4f')}</td></tr>\n"
        for r in toy["table"]
    )
    rel = os.path.relpath(Path(toy["figure"]).resolve(), Path(out_dir).resolve())
    return (
        "<h2>Two dimensions: the reward-tilted mixture</h2>\n<p>Data: four Gaussian modes "
        "(left-bottom, left-top, right-bottom, right-top), reward r = x. Theorem 3.1: the "
        "optimum is p* ∝ p_data·exp(r/β), whose mode weights are ∝ exp(c_x/β) and whose "
        "components stay on the data's modes. β̂ is the temperature whose tilted weights are "
        "closest to the measured ones (KL at β̂ in the last column: how well the tilt family "
        "fits). Off-support: fraction of samples farther than 3 std from every mode.</p>\n"
        '<div class="wide"><table><tr><th>arm</th><th>measured weights</th><th>off-support</th>'
        "<th>β̂</th><th>tilt weights at β̂</th><th>KL</th></tr>\n"
        f"{rows}</table></div>\n"
        f'<figure><img src="{html.escape(rel)}" alt="toy2d arms"></figure>\n'
    )

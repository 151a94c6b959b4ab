"""`ddrl report`: the comparison report (docs format of `ddrl compare`) from any run folders.

Each run's ``eval.jsonl`` is its curve (``eval.every``), its last row its final metrics, its
iteration-0 row the base; ``samples_final.png`` its sample grid. Real-model runs have no gold
evaluator: the report then judges by the held-out diffusion loss and lists the out-of-domain
rewards (``eval.rewards`` → ``ood_<name>``) in the metrics table beside the training reward.
A run evaluated without held-out images (``data.eval_images``) has no held-out loss either:
its figures say so and its table shows a dash. The folder appears whole or not at all.
"""

from __future__ import annotations

import json
from pathlib import Path

from ddrl.config import load_config
from ddrl.errors import DDRLError
from ddrl.experiments.report import write_report
from ddrl.io import atomic_dir
from ddrl.training.runlog import read_jsonl
from ddrl.vote.summary import summarise, summary_html


def runs_metrics(runs: list[Path]) -> tuple[dict, dict[str, Path]]:
    """(metrics.json-style dict, sample grids by caption) for ``runs``."""
    arms, grids, base = [], {}, None
    for run in map(Path, runs):
        curve = read_jsonl(run / "eval.jsonl")
        if not (run / "config.json").is_file() or not curve:
            raise DDRLError(
                f"{run} is not an evaluated run (needs config.json and eval.jsonl: train it "
                "with eval.every > 0)"
            )
        cfg = load_config(run / "config.json")
        zero = next((r for r in curve if r.get("iteration") == 0), None)
        if base is None and zero is not None:
            base = zero
        arm = {"algorithm": cfg.algorithm, "setting": {}, "label": run.name}
        watch = read_jsonl(run / "watch.jsonl")
        arms.append({**arm, "final": curve[-1], "curve": curve, "run": str(run), "watch": watch})
        if (run / "samples_final.png").is_file():
            grids[run.name] = run / "samples_final.png"
    reward = load_config(Path(runs[0]) / "config.json").reward.name
    return {"base": base or {}, "reward": reward, "arms": arms}, grids


def report_runs(
    runs: list[Path], out: Path, loss_rise: float = 0.10, votes: Path | None = None
) -> Path:
    """Write ``out/report.html`` (+ figures and ``metrics.json``) comparing ``runs``; with
    ``votes`` (a ``ddrl vote`` folder) also its summary, as a section and ``votes.json``.

    ``out`` must not exist (a report never replaces anything); it is built in a temporary
    sibling folder and renamed into place at the end, so a failure leaves no ``out`` at all.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise DDRLError(f"--out {out} already exists; allowed: a new folder (never overwritten)")
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise DDRLError(f"--out {out}: {blocker} is a file; allowed: a folder path")
    metrics, grids = runs_metrics(runs)
    voted = summarise(Path(votes)) if votes is not None else None  # its refusal names the folder
    names = ", ".join(a["label"] for a in metrics["arms"])
    # The sibling sits beside ``out``, so the relative links to the runs' grids stay right.
    with atomic_dir(out, race_ok=False) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if voted is not None:
            (tmp / "votes.json").write_text(json.dumps(voted, indent=1))
        write_report(
            metrics,
            tmp,
            grids,
            title=f"ddrl runs: {names}",
            loss_rise=loss_rise,
            extra_html=summary_html(voted) if voted is not None else "",
        )
    return out / "report.html"

"""Watching a run for the paper's sign of reward hacking: the held-out diffusion loss rising
over its value at iteration 0 (``eval.loss_warn``)."""

from __future__ import annotations

from pathlib import Path

from ddrl.training.runlog import read_jsonl


class LossRiseWatch:
    """Adds ``heldout_loss_rise`` = loss / loss₀ − 1 to each evaluation's metrics and warns
    above ``threshold``. loss₀ is iteration 0's, read back from ``eval.jsonl`` after a resume."""

    def __init__(self, run_dir: Path, threshold: float, log=print):
        self.threshold, self.log = threshold, log
        self.base = next(
            (
                r["heldout_diffusion_loss"]
                for r in read_jsonl(Path(run_dir) / "eval.jsonl")
                if r.get("iteration") == 0 and r.get("heldout_diffusion_loss")
            ),
            None,
        )

    def __call__(self, it: int, metrics: dict) -> None:
        loss = metrics.get("heldout_diffusion_loss")
        if loss is None:
            return
        self.base = self.base or loss
        metrics["heldout_loss_rise"] = rise = loss / self.base - 1
        if rise > self.threshold:
            self.log(
                f"warning: iteration {it}: held-out diffusion loss {rise:+.0%} over "
                f"iteration 0 (eval.loss_warn {self.threshold:.0%}): the paper's sign "
                "of reward hacking"
            )

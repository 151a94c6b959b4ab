"""The loss of a built-in algorithm: one policy objective plus its regularisers, summed.

Per batch: the objective chooses where it evaluates the policy (``inputs``: the recorded
transition's x_t, or x0 noised afresh); regularisers that need other weights there evaluate
them first (``before``, no gradient; a lagging copy is swapped into the model, which must not
happen under a graph); a regulariser may have its own inputs evaluated in the objective's
forward (``batched``: the data term with ``data_batched``); then the objective's forward and
terms, then each regulariser's terms from that forward. The terms are per sample [B], each with
its own mask and coefficient (``ddrl.losses.base``).
"""

from __future__ import annotations

import contextlib

from torch import Tensor

from ddrl.losses.base import Extra, LossOut, Objective, ObjectiveOut, Regulariser, StepBatch
from ddrl.losses.config import NoObjectiveConfig


class NoObjective:
    """No policy term (SFT): only the regularisers train; the rollouts are still drawn, for
    logging and so that every algorithm sees the same prompts, noise and budget."""

    Config = NoObjectiveConfig
    transitions = False

    def __init__(self, cfg, ctx):
        pass

    def masks(self, b: StepBatch, keep: Tensor) -> dict[str, Tensor]:
        return {}

    def active(self, b: StepBatch) -> bool:
        return False

    def inputs(self, b: StepBatch):
        return None

    def __call__(self, denoiser, b: StepBatch, at, extra: Extra | None = None) -> ObjectiveOut:
        # A batched regulariser's inputs are evaluated alone.
        v_extra = denoiser.velocity(extra.x, extra.t, extra.cond) if extra is not None else None
        return ObjectiveOut({}, {}, None, v_extra)


def _on(part, b: StepBatch) -> bool:
    return getattr(part, "active", lambda b: True)(b)


class Composite:
    """objective + Σ regularisers (each ``cls(cfg, ctx)`` on the same composed config)."""

    def __init__(self, objective: Objective, regularisers: list[Regulariser]):
        self.objective, self.regularisers = objective, regularisers
        self.parts = [objective, *regularisers]
        self.needs_data = any(getattr(r, "needs_data", False) for r in regularisers)
        self.needs_reference = any(getattr(r, "needs_reference", False) for r in regularisers)
        self.transitions = getattr(objective, "transitions", True)
        self.records_means = getattr(objective, "records_means", False)

    def kept(self, advantages: Tensor, valid: Tensor) -> Tensor:
        """The trajectories [B] the objective's terms (and the regularisers on its samples)
        cover."""
        return getattr(self.objective, "kept", lambda a, v: v)(advantages, valid)

    def masks(self, b: StepBatch) -> dict[str, Tensor]:
        keep = self.kept(b.advantages, b.valid)
        out: dict[str, Tensor] = {}
        for p in self.parts:
            out.update(p.masks(b, keep))
        return out

    def active(self, b: StepBatch) -> bool:
        return any(_on(p, b) for p in self.parts)

    def __call__(self, denoiser, b: StepBatch) -> LossOut:
        regs = [r for r in self.regularisers if _on(r, b)]
        if not _on(self.objective, b) and not regs:
            return LossOut({}, {})
        at = self.objective.inputs(b)
        pre = [r.before(b, at) if hasattr(r, "before") else None for r in regs]
        own = [r.batched(b) if hasattr(r, "batched") else None for r in regs]
        asked = [i for i, o in enumerate(own) if o is not None]
        extra = own[asked[0]][0] if asked else None  # one batched regulariser (the data term)
        out = self.objective(denoiser, b, at, extra)
        terms = dict(out.terms)
        for i, (r, p) in enumerate(zip(regs, pre, strict=True)):
            batched = (out.extra_v, own[i]) if own[i] is not None else None
            terms.update(r(denoiser, b, out.forward, p, batched))
        return LossOut(terms, out.stats)

    def sampling(self):
        """The context the rollout samples in: the objective's (NFT: its old policy)."""
        return getattr(self.objective, "sampling", contextlib.nullcontext)()

    def end_iteration(self, steps: int) -> None:
        for p in self.parts:
            if hasattr(p, "end_iteration"):
                p.end_iteration(steps)

    def state_dict(self) -> dict[str, Tensor]:
        """Every part's own state (lagging weights), keyed "<part index>.<name>"."""
        return {
            f"{i}.{k}": v
            for i, p in enumerate(self.parts)
            if hasattr(p, "state_dict")
            for k, v in p.state_dict().items()
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for i, p in enumerate(self.parts):
            if hasattr(p, "state_dict"):
                own = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{i}.")}
                p.load_state_dict(own)

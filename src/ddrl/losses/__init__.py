"""Algorithms are loss objects over the one loop, each with its own typed ``Config``;
"module:Class" names a user loss class with the same shape."""

from __future__ import annotations

from ddrl.errors import DDRLError, lookup
from ddrl.losses.base import (
    Loss,
    LossContext,
    LossOut,
    StepBatch,
    clipped_policy_loss,
    policy_transition,
)
from ddrl.losses.ddrl import DDRLLoss
from ddrl.losses.flow_grpo import FlowGRPOLoss
from ddrl.losses.grpo import PolicyOnlyLoss
from ddrl.losses.sft import SFTLoss

LOSSES = {
    "ddrl": DDRLLoss,
    "flow_grpo": FlowGRPOLoss,
    "dance_grpo": PolicyOnlyLoss,
    "grpo": PolicyOnlyLoss,
    "sft": SFTLoss,
}

__all__ = [
    "LOSSES",
    "Loss",
    "LossContext",
    "LossOut",
    "StepBatch",
    "build_loss",
    "clipped_policy_loss",
    "loss_class",
    "policy_transition",
]


def loss_class(algorithm: str):
    """The loss class of a registered algorithm or a "module:Class" plugin (with ``Config``)."""
    cls = lookup("algorithm", algorithm, LOSSES)
    if not isinstance(cls, type) or not hasattr(cls, "Config") or not callable(cls):
        raise DDRLError(
            f"algorithm {algorithm!r} is not a loss class with a Config dataclass attribute; "
            f"allowed: {', '.join(LOSSES)} or 'module:Class' naming one"
        )
    return cls


def build_loss(algorithm: str, cfg, ctx: LossContext) -> Loss:
    """Instantiate the algorithm's loss: cls(its config, context)."""
    return loss_class(algorithm)(cfg, ctx)

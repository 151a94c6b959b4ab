"""Algorithms are loss objects over the one loop; "module:attr" names a user loss class."""

from __future__ import annotations

import importlib

from ..errors import DDRLError
from .base import Loss, LossConfig, StepBatch, clipped_policy_loss, policy_step
from .dance_grpo import PolicyOnlyLoss
from .ddrl import DDRLLoss
from .flow_grpo import FlowGRPOLoss
from .sft import SFTLoss

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
    "LossConfig",
    "StepBatch",
    "build_loss",
    "clipped_policy_loss",
    "policy_step",
]


def build_loss(algorithm: str, cfg: LossConfig, sampler, base_model=None) -> Loss:
    """Instantiate the algorithm's loss: cls(loss_cfg, sampler_cfg, base_model)."""
    if algorithm in LOSSES:
        cls = LOSSES[algorithm]
    elif ":" in algorithm:
        mod, attr = algorithm.split(":", 1)
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise DDRLError(f"cannot import loss {algorithm!r}: {e}") from e
    else:
        raise DDRLError(
            f"unknown algorithm {algorithm!r}; allowed: {', '.join(LOSSES)} or 'module:attr'"
        )
    return cls(cfg, sampler, base_model)

"""Algorithms are loss objects over the one loop; "module:attr" names a user loss class."""

from __future__ import annotations

from ..errors import lookup
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
    cls = lookup("algorithm", algorithm, LOSSES)
    return cls(cfg, sampler, base_model)

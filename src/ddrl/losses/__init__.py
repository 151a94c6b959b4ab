"""Algorithms are loss objects over the one loop, each with its own typed config
(``ddrl.losses.config``). Built-ins are "module:Class" strings imported on use; "module:Class"
also names a user loss class with the same shape (``ddrl.losses.base.Loss``)."""

from __future__ import annotations

from ddrl.errors import DDRLError, lookup
from ddrl.losses.config import DDRLConfig, FlowGRPOConfig, PolicyConfig, SFTConfig

LOSSES = {  # algorithm → ("module:Loss", its config class)
    "ddrl": ("ddrl.losses.ddrl:DDRLLoss", DDRLConfig),
    "flow_grpo": ("ddrl.losses.flow_grpo:FlowGRPOLoss", FlowGRPOConfig),
    "dance_grpo": ("ddrl.losses.grpo:PolicyOnlyLoss", PolicyConfig),
    "grpo": ("ddrl.losses.grpo:PolicyOnlyLoss", PolicyConfig),
    "sft": ("ddrl.losses.sft:SFTLoss", SFTConfig),
}


def loss_class(algorithm: str):
    """The loss class of a registered algorithm or a "module:Class" plugin (with ``Config``)."""
    target = LOSSES[algorithm][0] if algorithm in LOSSES else algorithm
    cls = lookup("algorithm", target, {}, allowed=list(LOSSES))
    if not isinstance(cls, type) or not hasattr(cls, "Config") or not callable(cls):
        raise DDRLError(
            f"algorithm {algorithm!r} is not a loss class with a Config dataclass attribute; "
            f"allowed: {', '.join(LOSSES)} or 'module:Class' naming one"
        )
    return cls


def loss_config(algorithm: str) -> type:
    """The config class of ``algorithm`` (a built-in's without importing its loss)."""
    return LOSSES[algorithm][1] if algorithm in LOSSES else loss_class(algorithm).Config


def build_loss(algorithm: str, cfg, ctx):
    """Instantiate the algorithm's loss: cls(its config, context)."""
    return loss_class(algorithm)(cfg, ctx)

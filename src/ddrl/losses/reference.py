"""The reference model of KL-regularised baselines (Flow-GRPO), behind a small protocol.

Full fine-tuning: a frozen copy of the starting denoiser. LoRA: the same denoiser with its
adapters switched off (the base weights never change, so no second copy is kept). DDRL needs
no reference at all.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import Tensor, nn

from ddrl.errors import DDRLError
from ddrl.models.base import Cond, guided_velocity


class Reference(Protocol):
    def velocity(
        self, x_t: Tensor, t: Tensor, cond: Cond, null: Cond | None, scale: float
    ) -> Tensor:
        """v_ref(x_t, t, c) with the same guidance as the policy, without gradient: like x_t."""


class FrozenCopy:
    """A deep copy of the denoiser taken before training starts, frozen and in eval mode;
    ``place``: lays it out like the policy (FSDP2 shards it, ``ddrl.dist.parallel``)."""

    def __init__(self, denoiser: nn.Module, place=lambda m: m):
        self.model = place(copy.deepcopy(denoiser).eval().requires_grad_(False))

    @torch.no_grad()
    def velocity(self, x_t, t, cond, null, scale):
        return guided_velocity(self.model, x_t, t, cond, null, scale)


class AdapterDisabled:
    """The LoRA denoiser with its peft adapters disabled for the call: the base model."""

    def __init__(self, denoiser: nn.Module, place=None):
        self.model = denoiser  # the policy itself: already laid out

    @torch.no_grad()
    def velocity(self, x_t, t, cond, null, scale):
        adapted = adapted_modules(self.model)  # every transformer (Wan2.2: both experts)
        was_training = self.model.training
        self.model.eval()  # no adapter dropout; the base has none of its own
        for m in adapted:
            m.disable_adapters()
        try:
            return guided_velocity(self.model, x_t, t, cond, null, scale)
        finally:
            for m in adapted:
                m.enable_adapters()
            self.model.train(was_training)


def adapted_modules(denoiser: nn.Module) -> list[nn.Module]:
    """The denoiser's diffusers models that carry peft adapters (model.finetune = "lora")."""
    return [m for m in denoiser.modules() if getattr(m, "_hf_peft_config_loaded", False)]


def has_adapters(denoiser: nn.Module) -> bool:
    """Whether any of the denoiser's transformers carries peft adapters."""
    return bool(adapted_modules(denoiser))


REFERENCES = {"auto": None, "frozen_copy": FrozenCopy, "adapter_disabled": AdapterDisabled}


def make_reference(denoiser: nn.Module, kind: str = "auto", place=lambda m: m) -> Reference:
    """The reference (built before any update or resume): "auto" is AdapterDisabled under
    LoRA, else a FrozenCopy laid out by ``place``."""
    if kind == "auto":
        kind = "adapter_disabled" if has_adapters(denoiser) else "frozen_copy"
    if kind == "adapter_disabled" and not has_adapters(denoiser):
        raise DDRLError(
            "loss.reference='adapter_disabled' needs model.finetune=lora; allowed here: "
            "auto, frozen_copy"
        )
    return REFERENCES[kind](denoiser, place)

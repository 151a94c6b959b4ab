"""The model protocol in three parts, and the condition that flows between them.

- ``Denoiser``: the trainable velocity model v_θ(x_t, t, c) on the rectified-flow path.
- ``Conditioner``: frozen; prompts → ``Cond`` (and the null condition for CFG). Cacheable.
- ``Codec``: images ↔ model space (identity for digits and toy2d, a VAE for latent models).
  Rewards and evaluation only ever see decoded images.

A ``Generator`` bundles the three with the sample shape (from config) and the save/load path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ddrl.flow import scheduler_grid


@dataclass
class Cond:
    """A batch of conditions: ``batched`` tensors are [B, ...]; ``shared`` ones are the same for
    every sample (e.g. FLUX's position ids) and pass through index/cat/repeat unchanged."""

    batched: dict[str, Tensor]
    shared: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.batched.values())).shape[0]

    def index(self, idx: Tensor) -> Cond:
        """Rows ``idx`` [N] of every batched tensor."""
        return Cond({k: v[idx] for k, v in self.batched.items()}, self.shared)

    def cat(self, other: Cond) -> Cond:
        """Concatenate along the batch (for one CFG forward pass over cond and null)."""
        return Cond(
            {k: torch.cat([v, other.batched[k]]) for k, v in self.batched.items()}, self.shared
        )

    def to(self, device) -> Cond:
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return Cond(move(self.batched), move(self.shared))


@runtime_checkable
class Denoiser(Protocol):
    """An nn.Module: v_θ(x_t, t, c) with x_t [B, *sample_shape], t [B] ∈ [0, 1] → like x_t."""

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor: ...

    # Optional: ``shard_units() -> list[nn.Module]``, the blocks FSDP2 shards one by one (each
    # family names its own; ``ddrl.dist.parallel`` falls back to every "*blocks" ModuleList).


class Conditioner(Protocol):
    """Frozen prompt encoder."""

    def encode(self, prompts: list[str]) -> Cond:
        """Prompts [B] → condition with batch B (no gradient)."""

    def null(self, n: int) -> Cond:
        """The unconditional condition for classifier-free guidance, batch n."""

    def prepare(self, prompts: list[str]) -> None:
        """Called once before training with every prompt the run will use: a conditioner may
        encode them now and free its text encoders (diffusers families)."""

    # Optional, for conditioners whose null condition depends on the prompt's inputs (an edit
    # model's negative prompt is encoded with the prompt's condition image):
    # ``null_for(prompts) -> Cond`` (batch len(prompts)); see ``null_cond``.
    # Optional, for families conditioned on one image per prompt (``data.condition_images``):
    # ``set_images(images: dict[str, Tensor [3, H, W] in [-1, 1]])``, called before ``prepare``.


class Codec(Protocol):
    """Images ↔ model space."""

    value_range: tuple[float, float] | None  # valid range of decoded images; None = unbounded

    def encode(self, images: Tensor) -> Tensor:
        """Images [B, ...] → model-space samples [B, *sample_shape]."""

    def decode(self, z: Tensor) -> Tensor:
        """Model-space samples → raw images (not clamped; see ``decode_images``)."""


class Generator(Protocol):
    """A model family instance: the three parts plus how to save and reload them."""

    denoiser: torch.nn.Module
    conditioner: Conditioner
    codec: Codec
    sample_shape: tuple[int, ...]  # one model-space sample, from config (resolution, frames)

    def timestep_grid(self, num_steps: int, shift: float = 0.0) -> Tensor:
        """The model's own scheduler's grid [num_steps + 1] from 1 to 0 (``shift`` > 0 replaces
        the scheduler's shift)."""

    def save_pretrained(self, path: str | Path) -> None:
        """Write everything ``from_pretrained`` needs (safetensors + JSON) into ``path``."""

    @classmethod
    def from_pretrained(cls, path: str | Path, config=None) -> Generator:
        """Load from ``path``; ``config``: the run's ModelConfig (resolution, LoRA, precision)."""

    # Optional: ``condition_frames(cond, x0 [B, ...], k [B]) -> Cond``, ``cond`` conditioned on
    # the first k_i frames of the clean sample x0_i (``model.cond_frames``; Cosmos).


class EulerSchedulerGrid:
    """The grid of diffusers' FlowMatchEulerDiscreteScheduler(shift=1) for the embedded models
    (digits, toy2d), which have no scheduler of their own."""

    def timestep_grid(self, num_steps: int, shift: float = 0.0) -> Tensor:
        return scheduler_grid(num_steps, shift)


class IdentityCodec:
    """Model space = image space (digits, toy2d)."""

    def __init__(self, value_range: tuple[float, float] | None = None):
        self.value_range = value_range

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, z: Tensor) -> Tensor:
        return z


def to_pil(image: Tensor):
    """[3, H, W] in [-1, 1] → an RGB PIL image, u = round((clamp(x, -1, 1) + 1) · 127.5) (the
    reward wire's quantisation; a non-finite pixel as 0, +1 or -1 first, as there)."""
    from PIL import Image

    x = image.detach().float().nan_to_num(0.0, 1.0, -1.0).clamp(-1, 1)
    x = ((x + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy())


def clamp_images(codec: Codec, x: Tensor) -> Tensor:
    """Raw decoded images clamped to the codec's valid range (unchanged if it has none)."""
    return x if codec.value_range is None else x.clamp(*codec.value_range)


def decode_images(codec: Codec, z: Tensor) -> Tensor:
    """What rewards and evaluators see: decoded images clamped to the codec's valid range."""
    return clamp_images(codec, codec.decode(z))


class CondCache:
    """Encodes each distinct prompt once and reuses it (the conditioner is frozen)."""

    def __init__(self, conditioner: Conditioner):
        self.conditioner, self.rows = conditioner, {}

    def __call__(self, prompts: list[str]) -> Cond:
        new = sorted({p for p in prompts if p not in self.rows})
        if new:
            c = self.conditioner.encode(new)
            self.shared = c.shared
            for i, p in enumerate(new):
                self.rows[p] = {k: v[i : i + 1] for k, v in c.batched.items()}
        keys = self.rows[prompts[0]].keys()
        return Cond({k: torch.cat([self.rows[p][k] for p in prompts]) for k in keys}, self.shared)


def null_cond(conditioner: Conditioner, prompts: list[str]) -> Cond:
    """The CFG null condition for ``prompts`` [B]: the conditioner's ``null_for(prompts)`` where
    it has one (prompt-dependent negatives), else ``null(B)``."""
    per_prompt = getattr(conditioner, "null_for", None)
    return per_prompt(list(prompts)) if callable(per_prompt) else conditioner.null(len(prompts))


def guided_velocity(
    denoiser: Denoiser,
    x_t: Tensor,
    t: Tensor,
    cond: Cond,
    null: Cond | None,
    scale: float = 1.0,
    detach_uncond: bool = False,
) -> Tensor:
    """v = v_u + w·(v_c − v_u) (or the family's own mix, ``guide``); w = 1 (or no null) is
    plain conditional: one pass. ``detach_uncond``: no gradient through v_u (flow_grpo's
    training-time CFG)."""
    if scale == 1.0 or null is None:
        return denoiser.velocity(x_t, t, cond)
    n = x_t.shape[0]
    v = denoiser.velocity(torch.cat([x_t, x_t]), torch.cat([t, t]), cond.cat(null))
    return guide(denoiser, v[:n], v[n:], t, scale, detach_uncond)


def guide(
    denoiser, v_c: Tensor, v_u: Tensor, t: Tensor, scale: float, detach_uncond: bool = False
) -> Tensor:
    """The guided velocity [B, ...] from v_c, v_u [B, ...] at t [B]: the denoiser's own
    ``cfg_mix(v_c, v_u, t, scale, detach_uncond)`` where its family's pipeline guides otherwise
    (Qwen-Image's norm-rescaled true CFG, Wan2.2's per-expert scale), else ``cfg_mix``."""
    own = getattr(getattr(denoiser, "module", denoiser), "cfg_mix", None)  # DDP wraps it
    if callable(own):
        return own(v_c, v_u, t, scale, detach_uncond)
    return cfg_mix(v_c, v_u, scale, detach_uncond)


def cfg_mix(v_c: Tensor, v_u: Tensor, scale: float | Tensor, detach_uncond: bool = False) -> Tensor:
    """Classifier-free guidance v = v_u + w·(v_c − v_u) of conditional and unconditional
    velocities [B, ...], w one float or one per sample [B]; ``detach_uncond``: no gradient
    through v_u."""
    if detach_uncond:
        v_u = v_u.detach()
    if torch.is_tensor(scale):
        scale = scale.to(v_c.device, v_c.dtype).view(-1, *[1] * (v_c.dim() - 1))
    return v_u + scale * (v_c - v_u)

"""The embedded default: a tiny SD3 transformer for class-conditional 8×8 digits.

The denoiser is diffusers' real ``SD3Transformer2DModel`` built from a small config, loaded and
saved through its own ``from_pretrained``/``save_pretrained`` and called with SD3's timestep
convention (t·1000). The conditioner is a learned class-token table standing in for SD3's text
encoders (prompts "0"…"9", null class 10 for CFG): trained jointly during pretraining, frozen
during RL like a real text encoder. The codec is the identity on [-1, 1].
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ddrl.errors import DDRLError, first_line
from ddrl.models.base import Cond, EulerSchedulerGrid, IdentityCodec

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES
NATIVE = 8  # pixels per side of sklearn's digits


@dataclass
class DigitsArch:
    """Size of the tiny SD3 transformer (defaults: ~0.6 M parameters, ~0.1 s fwd+bwd at B=80)."""

    num_layers: int = 4  # SD3 joint blocks
    attention_head_dim: int = 16  # per-head width
    num_attention_heads: int = 4  # inner width = heads × head dim = 64
    cond_tokens: int = 2  # class tokens fed as encoder_hidden_states


class DigitsDenoiser(nn.Module):
    """v_θ(x_t, t, c) for images [B, 1, 8, 8]; c = Cond(tokens [B, T, W], pooled [B, W])."""

    def __init__(self, transformer: SD3Transformer2DModel):
        super().__init__()
        self.transformer = transformer

    def shard_units(self) -> list[nn.Module]:
        """The SD3 joint blocks, each its own FSDP2 unit."""
        return list(self.transformer.transformer_blocks)

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        out = self.transformer(
            hidden_states=x_t,
            encoder_hidden_states=cond.batched["tokens"],
            pooled_projections=cond.batched["pooled"],
            timestep=t.expand(x_t.shape[0]) * 1000,
            return_dict=False,
        )
        return out[0]


class DigitsConditioner(nn.Module):
    """Prompts "0".."9" → learned class tokens (the stand-in for SD3's text encoders)."""

    def __init__(self, arch: DigitsArch, width: int):
        super().__init__()
        self.tokens_per_class = arch.cond_tokens
        self.class_tokens = nn.Embedding(NUM_CLASSES + 1, arch.cond_tokens * width)
        self.class_pooled = nn.Embedding(NUM_CLASSES + 1, width)
        nn.init.normal_(self.class_tokens.weight, std=0.5)
        nn.init.normal_(self.class_pooled.weight, std=0.5)

    def ids(self, prompts: list[str]) -> Tensor:
        """Class ids [B] of prompts "0".."9"."""
        try:
            ids = [int(p) for p in prompts]
        except ValueError:
            raise DDRLError(f"digits prompts must be '0'..'9'; got {prompts[:4]!r}...") from None
        if any(not 0 <= i < NUM_CLASSES for i in ids):
            raise DDRLError(f"digits prompts must be '0'..'9'; got {sorted(set(ids))}")
        return torch.tensor(ids, dtype=torch.long, device=self.class_pooled.weight.device)

    def from_ids(self, ids: Tensor) -> Cond:
        b = ids.shape[0]
        tokens = self.class_tokens(ids).view(b, self.tokens_per_class, -1)
        return Cond({"tokens": tokens, "pooled": self.class_pooled(ids)})

    def encode(self, prompts: list[str]) -> Cond:
        return self.from_ids(self.ids(prompts))

    def null(self, n: int) -> Cond:
        dev = self.class_pooled.weight.device
        return self.from_ids(torch.full((n,), NULL_CLASS, dtype=torch.long, device=dev))

    def prepare(self, prompts: list[str]) -> None:
        """Nothing to precompute."""


class DigitsGenerator(EulerSchedulerGrid, nn.Module):
    """Denoiser + conditioner + identity codec for 8×8 digits in [-1, 1]."""

    def __init__(self, arch: DigitsArch | None = None, transformer=None, resolution: int = 0):
        super().__init__()
        if resolution not in (0, NATIVE):
            raise DDRLError(f"model.resolution={resolution} for digits; allowed: 0 or {NATIVE}")
        self.arch = arch or DigitsArch()
        width = self.arch.attention_head_dim * self.arch.num_attention_heads
        self.denoiser = DigitsDenoiser(
            transformer
            or SD3Transformer2DModel(
                sample_size=NATIVE,
                patch_size=1,
                in_channels=1,
                out_channels=1,
                num_layers=self.arch.num_layers,
                attention_head_dim=self.arch.attention_head_dim,
                num_attention_heads=self.arch.num_attention_heads,
                joint_attention_dim=width,
                caption_projection_dim=width,
                pooled_projection_dim=width,
                pos_embed_max_size=NATIVE,
            )
        )
        self.conditioner = DigitsConditioner(self.arch, width)
        self.codec = IdentityCodec((-1.0, 1.0))
        self.sample_shape = (1, NATIVE, NATIVE)

    def save_pretrained(self, path: str | Path) -> None:
        """transformer/ (diffusers format), conditioner.safetensors, generator.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.denoiser.transformer.save_pretrained(path / "transformer", safe_serialization=True)
        c = self.conditioner
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in c.state_dict().items()},
            path / "conditioner.safetensors",
        )
        (path / "generator.json").write_text(json.dumps({"type": "digits", **asdict(self.arch)}))

    @classmethod
    def from_pretrained(cls, path: str | Path, config=None) -> DigitsGenerator:
        """Load through diffusers' ``SD3Transformer2DModel.from_pretrained`` like a real model."""
        path, resolution = Path(path), config.resolution if config is not None else 0
        try:
            meta = json.loads((path / "generator.json").read_text())
            meta.pop("type", None)
            transformer = SD3Transformer2DModel.from_pretrained(path / "transformer")
            cond_state = load_file(path / "conditioner.safetensors")
        except Exception as e:  # missing files, bad JSON, truncated safetensors
            raise DDRLError(f"cannot load digits model from {path}: {first_line(e)}") from e
        gen = cls(DigitsArch(**meta), transformer=transformer, resolution=resolution)
        gen.conditioner.load_state_dict(cond_state)
        return gen

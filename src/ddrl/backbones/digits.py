"""The embedded default: a tiny SD3 transformer for class-conditional 8×8 digits.

It is diffusers' real ``SD3Transformer2DModel`` built from a small config, with a learned
class-token table in place of SD3's text encoders (classes 0–9 and a null class 10 for CFG), so
the embedded default runs through the same model code, save/load path and timestep convention
(t·1000) as a real SD3 checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import DDRLError

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES


@dataclass
class DigitsArch:
    """Size of the tiny SD3 transformer (defaults: ~0.6 M parameters, ~0.1 s fwd+bwd at B=80)."""

    num_layers: int = 4  # SD3 joint blocks
    attention_head_dim: int = 16  # per-head width
    num_attention_heads: int = 4  # inner width = heads × head dim = 64
    cond_tokens: int = 2  # class tokens fed as encoder_hidden_states


class DigitsBackbone(nn.Module):
    """v_θ(x_t, t, class) for images [B, 1, 8, 8] in [-1, 1]; prompts are "0"…"9"."""

    sample_shape = (1, 8, 8)

    def __init__(
        self, arch: DigitsArch | None = None, transformer: SD3Transformer2DModel | None = None
    ):
        super().__init__()
        self.arch = arch or DigitsArch()
        width = self.arch.attention_head_dim * self.arch.num_attention_heads
        self.transformer = transformer or SD3Transformer2DModel(
            sample_size=8,
            patch_size=1,
            in_channels=1,
            out_channels=1,
            num_layers=self.arch.num_layers,
            attention_head_dim=self.arch.attention_head_dim,
            num_attention_heads=self.arch.num_attention_heads,
            joint_attention_dim=width,
            caption_projection_dim=width,
            pooled_projection_dim=width,
            pos_embed_max_size=8,
        )
        self.class_tokens = nn.Embedding(NUM_CLASSES + 1, self.arch.cond_tokens * width)
        self.class_pooled = nn.Embedding(NUM_CLASSES + 1, width)
        nn.init.normal_(self.class_tokens.weight, std=0.5)
        nn.init.normal_(self.class_pooled.weight, std=0.5)

    def encode(self, prompts: list[str]) -> Tensor:
        """Prompts "0".."9" → class ids [B] (long)."""
        try:
            ids = [int(p) for p in prompts]
        except ValueError as e:
            raise DDRLError(f"digits prompts must be '0'..'9'; got {prompts[:4]!r}...") from e
        if any(not 0 <= i < NUM_CLASSES for i in ids):
            raise DDRLError(f"digits prompts must be '0'..'9'; got {sorted(set(ids))}")
        return torch.tensor(ids, dtype=torch.long, device=self.class_pooled.weight.device)

    def null_cond(self, n: int) -> Tensor:
        return torch.full(
            (n,), NULL_CLASS, dtype=torch.long, device=self.class_pooled.weight.device
        )

    def velocity(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """x_t [B, 1, 8, 8], t [B] ∈ [0, 1] (SD3 takes t·1000), cond class ids [B]."""
        b = x_t.shape[0]
        tokens = self.class_tokens(cond).view(b, self.arch.cond_tokens, -1)
        out = self.transformer(
            hidden_states=x_t,
            encoder_hidden_states=tokens,
            pooled_projections=self.class_pooled(cond),
            timestep=t.expand(b) * 1000,
            return_dict=False,
        )
        return out[0]

    def save_pretrained(self, path: str | Path) -> None:
        """Writes transformer/ (diffusers format), class_embeddings.safetensors, backbone.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(path / "transformer", safe_serialization=True)
        save_file(
            {
                "class_tokens": self.class_tokens.weight.detach().contiguous().cpu(),
                "class_pooled": self.class_pooled.weight.detach().contiguous().cpu(),
            },
            path / "class_embeddings.safetensors",
        )
        (path / "backbone.json").write_text(json.dumps({"type": "digits", **asdict(self.arch)}))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DigitsBackbone:
        """Load through diffusers' ``SD3Transformer2DModel.from_pretrained`` like a real model."""
        path = Path(path)
        try:
            meta = json.loads((path / "backbone.json").read_text())
            meta.pop("type", None)
            transformer = SD3Transformer2DModel.from_pretrained(path / "transformer")
            emb = load_file(path / "class_embeddings.safetensors")
        except Exception as e:  # missing files, bad JSON, truncated safetensors
            raise DDRLError(f"cannot load digits backbone from {path}: {e}".splitlines()[0]) from e
        model = cls(DigitsArch(**meta), transformer=transformer)
        model.class_tokens.weight.data.copy_(emb["class_tokens"])
        model.class_pooled.weight.data.copy_(emb["class_pooled"])
        return model

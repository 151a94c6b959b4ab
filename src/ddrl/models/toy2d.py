"""A 2-D toy generator: a small MLP velocity model on points, for fast tests and pictures."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ddrl.errors import DDRLError, first_line
from ddrl.models.base import Cond, EulerSchedulerGrid, IdentityCodec


class Toy2DDenoiser(nn.Module):
    """v_θ(x_t, t) for points [B, 2]; unconditional (the condition is ignored)."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.hidden = hidden
        # sin/cos features of t let a small MLP represent the t-dependence of the field.
        self.net = nn.Sequential(
            nn.Linear(2 + 8, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def shard_units(self) -> list[nn.Module]:
        """None: the small MLP is one FSDP2 unit (the root)."""
        return []

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        freqs = torch.arange(1, 5, device=x_t.device, dtype=x_t.dtype) * torch.pi
        tt = t.expand(x_t.shape[0])[:, None] * freqs
        return self.net(torch.cat([x_t, torch.sin(tt), torch.cos(tt)], dim=1))


class EmptyConditioner:
    """Every prompt maps to the same (empty) condition: a [B, 0] placeholder."""

    def __init__(self, device="cpu"):
        self.device = device

    def encode(self, prompts: list[str]) -> Cond:
        return Cond({"none": torch.zeros(len(prompts), 0, device=self.device)})

    def null(self, n: int) -> Cond:
        return self.encode([""] * n)

    def prepare(self, prompts: list[str]) -> None:
        """Nothing to precompute."""


class Toy2DGenerator(EulerSchedulerGrid, nn.Module):
    """MLP denoiser, no conditioning, identity codec on unbounded R²."""

    def __init__(self, hidden: int = 128, resolution: int = 0):
        super().__init__()
        if resolution != 0:
            raise DDRLError(f"model.resolution={resolution} for toy2d; allowed: 0 (points)")
        self.denoiser = Toy2DDenoiser(hidden)
        self.conditioner = EmptyConditioner()
        self.codec = IdentityCodec(None)
        self.sample_shape = (2,)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = self.denoiser.state_dict()
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in sd.items()}, path / "model.safetensors"
        )
        meta = {"type": "toy2d", "hidden": self.denoiser.hidden}
        (path / "generator.json").write_text(json.dumps(meta))

    @classmethod
    def from_pretrained(cls, path: str | Path, config=None) -> Toy2DGenerator:
        path, resolution = Path(path), config.resolution if config is not None else 0
        try:
            meta = json.loads((path / "generator.json").read_text())
            gen = cls(hidden=meta["hidden"], resolution=resolution)
            gen.denoiser.load_state_dict(load_file(path / "model.safetensors"))
        except DDRLError:
            raise
        except Exception as e:
            raise DDRLError(f"cannot load toy2d model from {path}: {first_line(e)}") from e
        return gen

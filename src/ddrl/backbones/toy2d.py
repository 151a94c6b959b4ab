"""A 2-D toy backbone: a small MLP velocity model for fast tests and plots."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import DDRLError


class Toy2DBackbone(nn.Module):
    """v_θ(x_t, t) for points [B, 2]; unconditional (every prompt is the empty string)."""

    sample_shape = (2,)

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

    def encode(self, prompts: list[str]) -> Tensor:
        return torch.zeros(len(prompts), dtype=torch.long, device=self.net[0].weight.device)

    def null_cond(self, n: int) -> Tensor:
        return self.encode([""] * n)

    def velocity(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        freqs = torch.arange(1, 5, device=x_t.device, dtype=x_t.dtype) * torch.pi
        tt = t.expand(x_t.shape[0])[:, None] * freqs
        return self.net(torch.cat([x_t, torch.sin(tt), torch.cos(tt)], dim=1))

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.state_dict().items()}, path / "model.safetensors"
        )
        (path / "backbone.json").write_text(json.dumps({"type": "toy2d", "hidden": self.hidden}))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Toy2DBackbone:
        path = Path(path)
        try:
            meta = json.loads((path / "backbone.json").read_text())
            model = cls(hidden=meta["hidden"])
            model.load_state_dict(load_file(path / "model.safetensors"))
        except Exception as e:
            raise DDRLError(f"cannot load toy2d backbone from {path}: {e}".splitlines()[0]) from e
        return model

"""The 2-D toy: a mixture of four Gaussians (fast tests and pictures)."""

from __future__ import annotations

import torch

from ddrl.data.config import DataConfig
from ddrl.data.pools import PairedPool, TaskData

CENTRES = torch.tensor([[-1.5, -1.5], [-1.5, 1.5], [1.5, -1.5], [1.5, 1.5]])
STD = 0.25


def toy2d_sample(n: int, seed: int) -> torch.Tensor:
    """n points [n, 2] from the mixture."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(len(CENTRES), (n,), generator=g)
    return CENTRES[k] + STD * torch.randn(n, 2, generator=g)


def toy2d_data(cfg: DataConfig | None = None) -> TaskData:
    """Unconditional: the only prompt is the empty string."""
    train, held = toy2d_sample(4000, seed=1), toy2d_sample(1000, seed=2)
    return TaskData([""], PairedPool(train, [""] * len(train)), PairedPool(held, [""] * len(held)))

"""The Reward protocol and the checks every reward output goes through."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ddrl.errors import DDRLError
from ddrl.rewards.config import RewardConfig


@dataclass
class RewardContext:
    """What a reward factory receives: the data set's name (a reward may apply to some only),
    the cache folder for its models, the device it runs on, and the run's ``reward.*`` settings
    (``config.model``: hub id or folder of a learned reward; ``config.batch``: images per call;
    ``config.seed``; ``config.url``/``timeout``/``retries``/``backoff``: a reward service)."""

    data: str
    cache_dir: Path
    device: str = "cpu"
    config: RewardConfig = field(default_factory=RewardConfig)


@runtime_checkable
class Reward(Protocol):
    """r(x0, c): images [B, ...] (clamped to the valid range) and prompts [B] → Tensor [B]."""

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...


def finite_mean(x: Tensor) -> Tensor:
    """Mean of the finite entries of ``x`` (a scalar tensor; NaN when none is finite): rewards
    may be NaN/inf for skipped samples."""
    ok = torch.isfinite(x)
    return x[ok].mean() if ok.any() else x.new_tensor(float("nan"))


def checked_reward(reward: Reward, name: str, images: Tensor, prompts: list[str]) -> Tensor:
    """Call ``reward`` and insist on a float Tensor [B]; NaN/inf are allowed through (the loop
    skips those groups) but the wrong type or shape is the reward's bug and stops the run."""
    out = reward(images, prompts)
    if not isinstance(out, Tensor):
        raise DDRLError(f"reward {name!r} returned {type(out).__name__}; expected a Tensor [B]")
    if out.shape != (images.shape[0],):
        raise DDRLError(
            f"reward {name!r} returned shape {tuple(out.shape)}; expected ({images.shape[0]},)"
        )
    return out.detach().float()


class GoldEvaluator(Protocol):
    """A held-out judge the training loop never sees (different model, different data)."""

    def reward(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Gold reward [B] (digits: P_gold(prompted class))."""

    def correct(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Bool [B]: is the sample what the prompt asked for (digits: gold argmax == class)."""

    def features(self, images: Tensor) -> Tensor:
        """Feature vectors [B, D] for diversity and Fréchet distance."""


def flat_numpy(images: Tensor):
    return images.detach().float().cpu().reshape(images.shape[0], -1).numpy()

"""Analytic rewards for the 2-D toy."""

from __future__ import annotations

import torch
from torch import Tensor

from ddrl.data.toy2d import CENTRES, STD


class RightReward:
    """r = x-coordinate: rewards the right-hand modes and, unregularised, running off to +∞."""

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return images[:, 0]


def right_reward(ctx) -> RightReward:
    return RightReward()


class Toy2DGold:
    """Gold: a point is "correct" within 3 std of a mixture centre; features are the points."""

    def __init__(self, seed: int = 0):  # analytic: nothing to seed
        pass

    def _dist(self, x: Tensor) -> Tensor:
        return torch.cdist(x.float(), CENTRES).min(1).values

    def reward(self, images: Tensor, prompts: list[str]) -> Tensor:
        return torch.exp(-self._dist(images).pow(2) / (2 * STD**2))

    def correct(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self._dist(images) < 3 * STD

    def features(self, images: Tensor) -> Tensor:
        return images.float()

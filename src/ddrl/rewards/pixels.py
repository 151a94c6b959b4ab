"""Pixel-statistics rewards for any RGB image or video model (the tiny presets' reward).

Brightness is the real models' analogue of the digits "ink" reward: trivially hackable (wash
the picture out to white), so a run on it shows reward hacking within a few iterations.
"""

from __future__ import annotations

from torch import Tensor


class BrightnessReward:
    """r(x) = mean pixel intensity in [0, 1]: images [B, 3, H, W] or videos [B, 3, F, H, W]
    in [-1, 1] → [B]."""

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return ((images.float() + 1) / 2).flatten(1).mean(1)


def brightness_reward(ctx) -> BrightnessReward:
    return BrightnessReward()

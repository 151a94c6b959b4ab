"""Several rewards at once, and image rewards applied to videos.

``MultiReward`` scores decoded samples with K rewards ([B, K], each checked like a single
reward) and weighs them; how the K scores become advantages is ``reward.aggregate``
(``ddrl.advantages.combine_advantages``). An image reward scores a video [B, 3, F, H, W] frame
by frame (``reward.frames``: the mean over all frames, or the mean over chosen frames) unless
it declares ``accepts_video = True`` (a whole-video model, e.g. behind the reward service).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddrl.errors import DDRLError
from ddrl.rewards.base import Reward, checked_reward


def chosen_frames(spec: str, n_frames: int) -> list[int] | None:
    """reward.frames → the frames scored (None = all)."""
    if spec == "mean":
        return None
    idx = [int(i) for i in spec.split(",")]
    if any(not -n_frames <= i < n_frames for i in idx):
        raise DDRLError(f"reward.frames={spec!r}: the videos have {n_frames} frames")
    return idx


def video_frames(x: Tensor) -> Tensor:
    """Videos [B, 3, F, H, W] → their frames [B·F, 3, H, W] (each sample's frames together);
    images [B, 3, H, W] pass unchanged."""
    return x.permute(0, 2, 1, 3, 4).flatten(0, 1) if x.dim() == 5 else x


def per_frame(reward: Reward, name: str, videos: Tensor, prompts: list[str], spec: str) -> Tensor:
    """An image reward on videos [B, 3, F, H, W]: the mean of its per-frame scores → [B]."""
    b, f = videos.shape[0], videos.shape[2]
    idx = chosen_frames(spec, f)
    frames = videos if idx is None else videos[:, :, idx]
    k = frames.shape[2]
    flat = video_frames(frames)
    scores = checked_reward(reward, name, flat, [p for p in prompts for _ in range(k)])
    return scores.view(b, k).mean(1)


def clip_rewards(rewards: Tensor, clip: float) -> Tensor:
    """r ← clamp(r, −clip, clip) elementwise ([B, K]; NaN stays NaN, so the group is still
    skipped); ``clip`` = 0 leaves them as they are. The DDRL release clamps each remote reward
    to ±5 before scaling (reward_models.py L224-227, wfm config L122-123)."""
    return rewards.clamp(-clip, clip) if clip > 0 else rewards


class MultiReward:
    """K named rewards with weights: ``each`` → [B, K]; calling it → Σ_k w_k·r_k [B]."""

    def __init__(
        self, names: list[str], rewards: list[Reward], weights: list[float], frames="mean"
    ):
        self.names, self.rewards, self.frames = names, rewards, frames
        self.weights = torch.tensor(weights, dtype=torch.float32)

    def each(self, images: Tensor, prompts: list[str]) -> Tensor:
        cols = []
        for name, r in zip(self.names, self.rewards, strict=True):
            if images.dim() == 5 and not getattr(r, "accepts_video", False):
                cols.append(per_frame(r, name, images, prompts, self.frames))
            else:
                cols.append(checked_reward(r, name, images, prompts))
        return torch.stack(cols, 1)

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.each(images, prompts) @ self.weights

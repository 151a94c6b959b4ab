"""Third-party reward models, each in its own environment behind ``ddrl reward-server --reward
ddrl.rewards.recipes:NAME`` (docs/REWARDS.md), the trainer using ``reward.name=remote``.

Each factory imports its package when the reward is built (a missing one is a one-line DDRLError
saying what to install) and adapts ddrl's images [B, 3, H, W] / videos [B, 3, F, H, W] in
[-1, 1] and B prompts to the package's own scoring call; the scores come back float32 [B] on the
CPU, NaN for a sample with a non-finite pixel. Images reach the models as 8-bit RGB PIL images
(``vlm_judge.pil_images``), as their own examples load them from files.

- ``imagereward``: THUDM/ImageReward, ``RM.load(reward.model or "ImageReward-v1.0", device,
  download_root=<cache>/ImageReward).score(prompt, [PIL images])``, one call per distinct prompt
  (the call takes one prompt for a list of images).
- ``hpsv3``: MizzenAI/HPSv3, ``HPSv3RewardInferencer(checkpoint_path=reward.model or None,
  device).reward(prompts=..., image_paths=[PIL images])`` in chunks of reward.batch; the score
  is the first logit (the preference mean mu; the second is its sigma).
- ``videoalign`` (and ``videoalign_vq`` / ``_mq`` / ``_ta``): KwaiVGI/VideoAlign's VideoReward,
  ``VideoVLMRewardInference(reward.model, device=...).reward(video_paths, prompts,
  use_norm=True)`` in chunks of reward.batch; its inputs are video files, so each video is
  written as an mp4 (OpenCV, ``VIDEO_FPS`` frames per second) into a temporary folder, and the
  model samples frames from it at its checkpoint's own fps. The score is "Overall" (VQ + MQ +
  TA, each normalised by the checkpoint's statistics) or the one dimension named.

The image models score videos frame by frame (``reward.frames`` of the server: the mean over all
frames, or over the chosen ones), as ``MultiReward`` does for them in a trainer.
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ddrl.errors import DDRLError, first_line
from ddrl.rewards.base import RewardContext
from ddrl.rewards.multi import per_frame
from ddrl.rewards.remote.wire import quantize
from ddrl.rewards.vlm_judge import pil_images

VIDEO_FPS = 16.0  # Wan2.1/2.2's output rate; VideoAlign resamples at its checkpoint's own fps
VIDEOALIGN_HINT = (
    "git clone https://github.com/KwaiVGI/VideoAlign, create its environment "
    "(environment.yaml) and start the server from that folder (or with it on PYTHONPATH)"
)


def require(module: str, reward: str, install: str):
    """``module`` imported, or a one-line DDRLError naming the reward and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # the package itself, or a library it loads
        raise DDRLError(
            f"reward {reward!r} needs the module {module!r}, which cannot be imported "
            f"({first_line(e)}); install it: {install}"
        ) from None


def _checked(name: str, images: Tensor, prompts: list[str], ndim: int) -> list[str]:
    prompts = list(prompts)
    shape = "[B, 3, H, W]" if ndim == 4 else "[B, 3, F, H, W] with F >= 2"
    if not isinstance(images, Tensor) or images.ndim != ndim or images.shape[1] != 3:
        raise DDRLError(
            f"reward {name!r}: inputs of shape {tuple(getattr(images, 'shape', ()))}; "
            f"allowed: {shape} in [-1, 1]"
        )
    if len(prompts) != images.shape[0]:
        raise DDRLError(f"reward {name!r}: {len(prompts)} prompts for {images.shape[0]} samples")
    return prompts


def _scores(name: str, got, n: int) -> Tensor:
    """A model's output (a float, a list, a tensor) as float32 [n], or a one-line DDRLError."""
    try:
        out = torch.as_tensor(got, dtype=torch.float64).detach().cpu().reshape(-1).float()
    except (TypeError, ValueError, RuntimeError):
        raise DDRLError(f"reward {name!r}: the model returned {type(got).__name__}") from None
    if out.numel() != n:
        raise DDRLError(f"reward {name!r}: the model returned {out.numel()} scores for {n}")
    return out


def _finite(x: Tensor) -> Tensor:
    return x.detach().flatten(1).isfinite().all(1).cpu()


class ImageModel:
    """An image reward behind a package's scoring call ``score(pil_images, prompts) -> [n]``;
    videos go frame by frame (``reward.frames``)."""

    def __init__(self, name: str, score: Callable, frames: str = "mean"):
        self.name, self.score, self.frames = name, score, frames

    def __repr__(self) -> str:
        return f"ImageModel({self.name!r})"

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        if isinstance(images, Tensor) and images.ndim == 5:
            return per_frame(self, self.name, images, prompts, self.frames)
        prompts = _checked(self.name, images, prompts, 4)
        with torch.no_grad():
            out = _scores(self.name, self.score(pil_images(images), prompts), len(prompts))
        out[~_finite(images)] = float("nan")
        return out


def imagereward(ctx: RewardContext) -> ImageModel:
    """THUDM/ImageReward (``pip install image-reward``); reward.model: a name ImageReward knows
    ("" = "ImageReward-v1.0") or a checkpoint file."""
    rm = require("ImageReward", "imagereward", "pip install image-reward")
    model = rm.load(
        ctx.config.model or "ImageReward-v1.0",
        device=ctx.device,
        download_root=str(Path(ctx.cache_dir) / "ImageReward"),
    )

    def score(pics, prompts):
        out = [0.0] * len(pics)
        for prompt in dict.fromkeys(prompts):  # one call per distinct prompt, in order
            idx = [i for i, p in enumerate(prompts) if p == prompt]
            got = _scores("imagereward", model.score(prompt, [pics[i] for i in idx]), len(idx))
            for i, s in zip(idx, got.tolist(), strict=True):
                out[i] = s
        return out

    return ImageModel("imagereward", score, ctx.config.frames)


def hpsv3(ctx: RewardContext) -> ImageModel:
    """MizzenAI/HPSv3 (``pip install hpsv3``); reward.model: a checkpoint file ("" = the hub's
    MizzenAI/HPSv3 weights)."""
    mod = require("hpsv3", "hpsv3", "pip install hpsv3")
    inferencer = mod.HPSv3RewardInferencer(
        checkpoint_path=ctx.config.model or None, device=ctx.device
    )
    batch = ctx.config.batch

    def score(pics, prompts):
        parts = []
        for i in range(0, len(pics), batch):
            # keywords: the released versions differ in the order of the two
            logits = inferencer.reward(
                prompts=prompts[i : i + batch], image_paths=pics[i : i + batch]
            )
            logits = torch.as_tensor(logits).detach().float().cpu()
            if logits.ndim != 2 or logits.shape[0] != len(pics[i : i + batch]):
                raise DDRLError(
                    f"reward 'hpsv3': the model returned shape {tuple(logits.shape)}; "
                    "expected [n, 2] (mu, sigma)"
                )
            parts.append(logits[:, 0])
        return torch.cat(parts)

    return ImageModel("hpsv3", score, ctx.config.frames)


class VideoAlign:
    """KwaiVGI/VideoAlign's VideoReward on videos [B, 3, F, H, W] in [-1, 1] → [B] (see the
    module docstring): "Overall" or one of its dimensions VQ, MQ, TA."""

    accepts_video = True  # whole videos, in a trainer too

    def __init__(
        self, inferencer, dimension: str = "Overall", batch: int = 4, fps: float = VIDEO_FPS
    ):
        if dimension not in ("Overall", "VQ", "MQ", "TA"):
            raise DDRLError(f"videoalign dimension {dimension!r}; allowed: Overall, VQ, MQ, TA")
        self.inferencer, self.dimension, self.batch, self.fps = inferencer, dimension, batch, fps

    def __repr__(self) -> str:
        return f"VideoAlign({self.dimension!r})"

    def __call__(self, videos: Tensor, prompts: list[str]) -> Tensor:
        prompts = _checked("videoalign", videos, prompts, 5)
        if videos.shape[2] < 2:
            raise DDRLError(
                f"reward 'videoalign': videos of {videos.shape[2]} frame; allowed: 2 or more "
                "(VideoAlign samples at least 2)"
            )
        cv2 = require("cv2", "videoalign", "pip install opencv-python-headless")
        # [B, F, H, W, 3] uint8, reversed to OpenCV's BGR
        frames = quantize(videos).cpu().permute(0, 2, 3, 4, 1).flip(-1).contiguous().numpy()
        scores = []
        with tempfile.TemporaryDirectory(prefix="ddrl-videoalign-") as tmp, torch.no_grad():
            paths = [self._write(cv2, f"{tmp}/{i}.mp4", v) for i, v in enumerate(frames)]
            for i in range(0, len(paths), self.batch):
                got = self.inferencer.reward(
                    video_paths=paths[i : i + self.batch],
                    prompts=prompts[i : i + self.batch],
                    use_norm=True,
                )
                try:
                    scores += [float(r[self.dimension]) for r in got]
                except (KeyError, TypeError, ValueError):
                    raise DDRLError(
                        f"reward 'videoalign': the model returned {str(got)[:80]}; expected a "
                        f"list of dicts with {self.dimension!r}"
                    ) from None
        out = _scores("videoalign", scores, len(prompts))
        out[~_finite(videos)] = float("nan")
        return out

    def _write(self, cv2, path: str, frames) -> str:
        """One video, uint8 [F, H, W, 3] BGR, as an MPEG-4 file at ``self.fps``."""
        f, h, w, _ = frames.shape
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
        if not writer.isOpened():
            raise DDRLError(f"reward 'videoalign': OpenCV cannot write an mp4 video to {path}")
        for frame in frames:
            writer.write(frame)
        writer.release()
        return path


def _videoalign(ctx: RewardContext, dimension: str) -> VideoAlign:
    if not ctx.config.model or not (Path(ctx.config.model) / "model_config.json").is_file():
        raise DDRLError(
            f"reward 'videoalign': reward.model={ctx.config.model!r} is not a VideoReward "
            "checkpoint folder (with model_config.json); allowed: e.g. the clone of "
            "https://huggingface.co/KwaiVGI/VideoReward"
        )
    mod = require("inference", "videoalign", VIDEOALIGN_HINT)
    if not hasattr(mod, "VideoVLMRewardInference"):
        raise DDRLError(
            f"reward 'videoalign': the module 'inference' found ({getattr(mod, '__file__', '')}) "
            f"is not VideoAlign's; {VIDEOALIGN_HINT}"
        )
    inferencer = mod.VideoVLMRewardInference(ctx.config.model, device=ctx.device)
    return VideoAlign(inferencer, dimension, ctx.config.batch)


def videoalign(ctx: RewardContext) -> VideoAlign:
    """VideoAlign's "Overall" = VQ + MQ + TA; reward.model: the VideoReward checkpoint folder."""
    return _videoalign(ctx, "Overall")


def videoalign_vq(ctx: RewardContext) -> VideoAlign:
    """VideoAlign's visual quality (VQ) alone."""
    return _videoalign(ctx, "VQ")


def videoalign_mq(ctx: RewardContext) -> VideoAlign:
    """VideoAlign's motion quality (MQ) alone."""
    return _videoalign(ctx, "MQ")


def videoalign_ta(ctx: RewardContext) -> VideoAlign:
    """VideoAlign's text alignment (TA) alone."""
    return _videoalign(ctx, "TA")

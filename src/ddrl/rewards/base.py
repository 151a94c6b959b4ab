"""The Reward protocol and the checks every reward output goes through."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ddrl.errors import DDRLError, check_choice, check_range


@dataclass
class RewardConfig:
    """The training (proxy) reward."""

    name: str = "ink"  # built-in name (see `ddrl.rewards.REWARDS`) or "module:attr" factory;
    # several as "a,b" (see weights and aggregate)
    weights: str = ""  # one weight per reward in name, "1,0.5"; "" = all 1
    aggregate: str = "flow_grpo"  # several rewards → advantages: "flow_grpo" = normalise the
    # weighted sum in its group; "cosmos_rl" = normalise each, then their weighted mean (release)
    scale: float = 1.0  # multiplies the reward (advantages are normalised, so mostly for logs)
    seed: int = 0  # seed of a reward model trained on first use (fixed, not the run's seed)
    model: str = ""  # weights of a learned reward: hub id or local folder; "" = its default
    batch: int = 16  # images per reward-model call
    device: str = "auto"  # where a reward model runs: auto (the run's device) | cpu | cuda
    frames: str = "mean"  # video → image reward: "mean" over frames, or frame indices "0,-1"
    url: str = ""  # http://host:port of a `ddrl reward-server` (used when reward.name = remote)
    timeout: float = 60.0  # seconds the client waits on the server (connect, send, answer)
    retries: int = 3  # extra attempts after a connection failure, timeout or HTTP 502/503/504
    backoff: float = 0.5  # seconds before the first retry, doubled before each further one
    overlap: bool = False  # decode and score each rollout chunk (sampler.batch) in a worker
    # thread while the next chunk samples: hides CPU-side or remote rewards; the same rewards

    def check(self) -> None:
        check_range("reward.scale", self.scale, -1e12, 1e12)
        check_range("reward.seed", self.seed, 0, 2**32 - 1)
        check_range("reward.batch", self.batch, 1)
        check_range("reward.timeout", self.timeout, 1e-3)
        check_range("reward.retries", self.retries, 0, 100)
        check_range("reward.backoff", self.backoff, 0.0)
        from ddrl.advantages import AGGREGATES
        from ddrl.rewards.multi import parse_names, parse_weights

        check_choice("reward.aggregate", self.aggregate, AGGREGATES)
        parse_weights(self.weights, len(parse_names(self.name)))
        if self.device not in ("auto", "cpu", "cuda"):
            raise DDRLError(f"reward.device={self.device!r}; allowed: auto, cpu, cuda")
        if self.frames != "mean":
            try:
                [int(i) for i in self.frames.split(",")]
            except ValueError:
                raise DDRLError(
                    f"reward.frames={self.frames!r}; allowed: mean, or frame indices like 0,-1"
                ) from None


@dataclass
class GoldConfig:
    """The held-out judge used only by evaluation (never by the training loop)."""

    name: str = "digits"  # digits | toy2d | "" (none: gold metrics are left out)
    seed: int = 0  # seed of the gold model (fixed across runs so evaluations compare)

    def check(self) -> None:
        check_range("gold.seed", self.seed, 0, 2**32 - 1)


@dataclass
class RewardContext:
    """What a reward factory may need to build itself."""

    data: str  # the data set's name (a reward may only apply to some)
    cache_dir: Path
    seed: int = 0
    device: str = "cpu"
    model: str = ""  # reward.model: hub id or folder of a learned reward ("" = its default)
    batch: int = 16  # reward.batch: images per model call
    frames: str = "mean"  # reward.frames: how an image reward scores a video
    url: str = ""  # reward.url: a reward service (reward.name = remote)
    timeout: float = 60.0  # reward.timeout
    retries: int = 3  # reward.retries
    backoff: float = 0.5  # reward.backoff

    @classmethod
    def from_config(cls, cfg: RewardConfig, data: str, cache_dir: Path, device: str):
        """The context of ``reward.*`` settings for a run on ``data``."""
        return cls(
            data,
            cache_dir,
            cfg.seed,
            device,
            cfg.model,
            cfg.batch,
            cfg.frames,
            cfg.url,
            cfg.timeout,
            cfg.retries,
            cfg.backoff,
        )


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


class OverlappedScorer:
    """Decodes and scores rollout chunks in one worker thread while the next chunk samples
    (``reward.overlap``); ``result()`` waits for the last one. Per-sample rewards, so the
    values are those of scoring the whole batch at once (to the rounding of batched kernels)."""

    def __init__(self, codec, reward, prompts: list[str], device):
        from concurrent.futures import ThreadPoolExecutor

        self.codec, self.reward, self.prompts, self.device = codec, reward, prompts, device
        self.pool, self.jobs = ThreadPoolExecutor(1, thread_name_prefix="ddrl-reward"), []

    def _score(self, part: slice, x: torch.Tensor) -> torch.Tensor:
        from ddrl.models import decode_images

        with torch.no_grad():  # grad mode is per thread
            return self.reward.each(decode_images(self.codec, x), self.prompts[part])

    def __call__(self, part: slice, x: torch.Tensor) -> None:
        self.jobs.append(self.pool.submit(self._score, part, x))

    def result(self) -> torch.Tensor:
        """Rewards [B, K] of every chunk, in order."""
        try:
            return torch.cat([j.result().to(self.device) for j in self.jobs])
        finally:
            self.pool.shutdown()

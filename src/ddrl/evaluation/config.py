"""The eval section of a run's config (torch-free)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ddrl.config.core import SamplerConfig
from ddrl.errors import check_literals, check_range

# The keys a saved run's config may change when it is sampled again (ddrl sample, ddrl vote).
SAMPLE_KEYS = ("sampler.eval_steps", "sampler.cfg_scale", "eval.cfg_scale")


@dataclass
class EvalConfig:
    """Evaluation samples and schedule."""

    every: int = field(
        default=0,
        metadata={"help": "evaluate every N training iterations (and at 0 and the end); 0 = off"},
    )
    samples_per_prompt: int = field(
        default=30, metadata={"help": "ODE samples per prompt (digits: 10 prompts → 300 images)"}
    )
    seed: int = field(
        default=12345,
        metadata={
            "help": "noise seed of evaluation samples and the held-out loss (fixed across runs)"
        },
    )
    loss_t_points: int = field(
        default=10, metadata={"help": "t grid (midpoints) of the held-out diffusion loss"}
    )
    grid: Literal["scheduler", "linear"] = field(
        default="scheduler",
        metadata={
            "help": "ODE grid of evaluation samples, the same for every algorithm (a preset's "
            'training grid, e.g. DanceGRPO\'s "linear", does not change how it is judged)'
        },
    )
    cfg_scale: float = field(
        default=0.0,
        metadata={
            "help": "classifier-free guidance of evaluation samples; 0 = sampler.cfg_scale (the "
            "DDRL release trains without CFG and evaluates its samples with it)"
        },
    )
    cond_frames: int = field(
        default=0,
        metadata={
            "help": "image/video-to-video evaluation: each sample conditioned on the first N "
            "latent frames of a data item of its prompt (cosmos); 0 = text-to-video"
        },
    )
    rewards: str = field(
        default="",
        metadata={
            "help": 'out-of-domain rewards scored but never trained on ("clipscore,pickscore": '
            "the paper checks they do not fall), logged as ood_<name>"
        },
    )
    features: str = field(
        default="",
        metadata={
            "help": 'a reward whose model embeds images ("clipscore", "pickscore", "hpsv2"): '
            'diversity and Fréchet distance in its space for real models; "" = pixels only'
        },
    )
    features_model: str = field(
        default="", metadata={"help": 'that model\'s hub id or folder ("" = its default)'}
    )

    def check(self) -> None:
        check_literals(self, "eval.")
        check_range("eval.every", self.every, 0)
        check_range("eval.samples_per_prompt", self.samples_per_prompt, 2)
        check_range("eval.loss_t_points", self.loss_t_points, 1)
        check_range("eval.cfg_scale", self.cfg_scale, 0.0, 100.0)
        check_range("eval.cond_frames", self.cond_frames, 0, 1024)

    def sampler(self, train: SamplerConfig) -> SamplerConfig:
        """How evaluation samples: the training sampler's steps and shift, with this grid and
        guidance (``eval.cfg_scale``, or the sampler's when 0)."""
        return dataclasses.replace(
            train, grid=self.grid, cfg_scale=self.cfg_scale or train.cfg_scale
        )

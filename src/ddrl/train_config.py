"""Configs owned by the training loop (model source, optimiser, loop sizes)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import check_choice, check_range


@dataclass
class ModelConfig:
    """Which network is trained."""

    backbone: str = (
        ""  # "" = the task's own (digits, toy2d); or "module:Class" with from_pretrained
    )
    base: str = ""  # saved base model folder; "" = the task's cached base (pretrained on demand)
    cache_dir: str = (
        ""  # where base models and reward models are cached; "" = $DDRL_CACHE or ~/.cache/ddrl
    )


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, grad clipping and an EMA of the weights."""

    lr: float = 1e-4  # peak learning rate (release: 1e-5 for 2B-parameter video models)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay (release value)
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW betas (release value)
    grad_clip: float = 1.0  # max global grad norm (release value)
    warmup: int = 5  # linear warm-up iterations (release: 50 of thousands; runs here are short)
    ema_decay: float = 0.0  # EMA of weights, 0 = off; evaluation uses the EMA when on

    def check(self) -> None:
        check_range("optim.lr", self.lr, 0.0, 1.0)
        check_range("optim.weight_decay", self.weight_decay, 0.0)
        check_range("optim.grad_clip", self.grad_clip, 0.0)
        check_range("optim.warmup", self.warmup, 0)
        check_range("optim.ema_decay", self.ema_decay, 0.0, 1.0 - 1e-12)
        for b in self.betas:
            check_range("optim.betas", b, 0.0, 1.0 - 1e-12)


@dataclass
class TrainConfig:
    """Sizes of the loop, and where it writes."""

    iterations: int = 60  # rollout → reward → update cycles
    prompts_per_iter: int = 10  # groups per iteration
    group_size: int = 8  # samples per prompt (paper: G = 8)
    inner_updates: int = 1  # optimizer steps per rollout batch (1 ⇒ ratio ≡ 1, REINFORCE)
    timestep_fraction: float = 1.0  # fraction of sampling steps trained, a random subset each it.
    micro_batch: int = 0  # trajectories per backward pass; 0 = all at once
    checkpoint_every: int = 20  # iterations between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept (older ones are deleted)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    tensorboard: bool = False  # also log scalars to <run>/tb (needs the tensorboard package)
    progress: bool = True  # tqdm progress bar on the terminal

    def check(self) -> None:
        check_range("train.iterations", self.iterations, 0)
        check_range("train.prompts_per_iter", self.prompts_per_iter, 1)
        check_range("train.group_size", self.group_size, 2)
        check_range("train.inner_updates", self.inner_updates, 1)
        check_range("train.timestep_fraction", self.timestep_fraction, 1e-6, 1.0)
        check_range("train.micro_batch", self.micro_batch, 0)
        check_range("train.checkpoint_every", self.checkpoint_every, 1)
        check_range("train.keep_checkpoints", self.keep_checkpoints, 1)
        check_choice("train.device", self.device, ("auto", "cpu", "cuda"))

"""Configs owned by the training loop (optimiser, loop sizes)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from ddrl.errors import DDRLError, check_literals, check_range


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, grad clipping and an EMA of the weights."""

    lr: float = field(
        default=1e-4,
        metadata={"help": "peak learning rate (release: 1e-5 for 2B-parameter video models)"},
    )
    weight_decay: float = field(
        default=1e-4, metadata={"help": "AdamW decoupled weight decay (release value)"}
    )
    betas: tuple[float, float] = field(
        default=(0.9, 0.99), metadata={"help": "AdamW betas (release value)"}
    )
    grad_clip: float = field(
        default=1.0, metadata={"help": "max global grad norm (release value); 0 = no clipping"}
    )
    warmup: int = field(
        default=5,
        metadata={
            "help": "linear warm-up iterations (release: 50 of thousands; runs here are short)"
        },
    )
    ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "EMA of weights, 0 = off (the cap with ema_warmup); evaluation uses the EMA"
        },
    )
    ema_every: int = field(
        default=1,
        metadata={
            "help": "an EMA call updates only when (s + 1) % ema_every == 0, s = optimizer steps "
            "taken (flow_grpo: 8, scripts/train_sd3.py L445)"
        },
    )
    ema_warmup: bool = field(
        default=False,
        metadata={
            "help": "decay min((1 + s)/(10 + s), ema_decay) at step count s (flow_grpo/ema.py "
            "L33-37); false = ema_decay throughout"
        },
    )
    ema_per: Literal["step", "micro_batch"] = field(
        default="step",
        metadata={
            "help": '"step": one EMA call per optimizer step; "micro_batch": flow_grpo\'s, one '
            "after every micro-batch of trajectories with the step count (train_sd3.py L954-955)"
        },
    )

    def check(self) -> None:
        if not 0.0 < self.lr <= 1.0:  # also 1e-400, which parses as 0.0
            raise DDRLError(f"optim.lr={self.lr!r} is out of range; allowed: (0, 1], finite")
        check_range("optim.weight_decay", self.weight_decay, 0.0)
        check_range("optim.grad_clip", self.grad_clip, 0.0)
        check_range("optim.warmup", self.warmup, 0)
        check_literals(self, "optim.")
        check_range("optim.ema_decay", self.ema_decay, 0.0, 1.0 - 1e-12)
        check_range("optim.ema_every", self.ema_every, 1)
        for b in self.betas:
            check_range("optim.betas", b, 0.0, 1.0 - 1e-12)


@dataclass
class TrainConfig:
    """Sizes of the loop, and where it writes."""

    iterations: int = field(default=60, metadata={"help": "rollout → reward → update cycles"})
    prompts_per_iter: int = field(default=10, metadata={"help": "groups per iteration"})
    group_size: int = field(default=8, metadata={"help": "samples per prompt (paper: G = 8)"})
    inner_updates: int = field(
        default=1,
        metadata={
            "help": "passes over the rollout batch (flow_grpo num_inner_epochs), each taking "
            "updates_per_batch optimizer steps"
        },
    )
    updates_per_batch: int = field(
        default=1,
        metadata={
            "help": "optimizer steps per pass: each rank's trajectories split into this many "
            "parts, one step each (1 ⇒ ratio ≡ 1, REINFORCE; flow_grpo 2, DanceGRPO 3)"
        },
    )
    update_split: Literal["shuffled", "within_groups"] = field(
        default="shuffled",
        metadata={
            "help": '"shuffled": a random order per pass (flow_grpo); "within_groups": part u '
            "takes the u-th slice of every group (DanceGRPO's one group per GPU, in order)"
        },
    )
    timestep_fraction: float = field(
        default=1.0, metadata={"help": "trained steps per iteration: floor(fraction · num_steps)"}
    )
    timestep_selection: Literal[
        "first", "per_sample", "per_batch", "strided", "stratified", "window"
    ] = field(
        default="first",
        metadata={
            "help": '"first" (steps 0..n−1 in order, flow_grpo), "per_sample" (a random '
            'subset per trajectory, DanceGRPO, DiffusionNFT), "per_batch" (one random subset),'
            ' "strided" (every k-th from 0: the release\'s even steps 0, 2, ..., 18 of 20), '
            '"stratified" (one per stratum of the first floor(fraction·N), AWM), "window" '
            "(MixGRPO: a sliding window of steps, the SDE inside it and the ODE elsewhere)"
        },
    )
    timestep_count: int = field(
        default=6,
        metadata={"help": 'strata of "stratified" (AWM train_timesteps: 6); unused otherwise'},
    )
    window_size: int = field(
        default=4, metadata={"help": '"window": steps in the window (MixGRPO group_size: 4)'}
    )
    window_every: int = field(
        default=25,
        metadata={"help": '"window": iterations before it moves (MixGRPO iters_per_group: 25)'},
    )
    window_stride: int = field(
        default=1,
        metadata={"help": '"window": steps it moves by (MixGRPO prog_overlap_step: 1; 0 = fixed)'},
    )
    skip_first_step: bool = field(
        default=False,
        metadata={"help": '"stratified" from step 1 (AWM discrete_wo_init) instead of 0'},
    )
    skip_last_step: bool = field(
        default=False,
        metadata={"help": "never train the last step (DanceGRPO permutes steps 0..N−2)"},
    )
    micro_batch: int = field(
        default=0, metadata={"help": "trajectories per backward pass; 0 = all at once"}
    )
    steps_per_forward: int = field(
        default=1,
        metadata={
            "help": "trained steps stacked into one forward (k× the batch, 1/k the forwards; the "
            "same gradient): faster where a larger batch is cheaper per sample (GPUs)"
        },
    )
    max_bad_steps: int = field(
        default=3,
        metadata={"help": "consecutive non-finite loss/gradient steps (skipped) before stopping"},
    )
    max_skipped_iterations: int = field(
        default=3, metadata={"help": "consecutive iterations with every group skipped (NaN reward)"}
    )
    checkpoint_every: int = field(
        default=20, metadata={"help": "iterations between checkpoints (and one at the end)"}
    )
    keep_checkpoints: int = field(
        default=2, metadata={"help": "newest checkpoints kept (older ones are deleted)"}
    )
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata={"help": '"auto" (cuda if available), "cpu", "cuda"'}
    )
    tensorboard: bool = field(
        default=False,
        metadata={
            "help": "also log scalars, watch firings and evaluation samples to <run>/tb (the "
            "tensorboard extra)"
        },
    )
    wandb: Literal["off", "online", "offline"] = field(
        default="off",
        metadata={
            "help": "also log to Weights & Biases (the wandb extra); offline writes <run>/wandb "
            "for `wandb sync`"
        },
    )
    wandb_project: str = field(
        default="ddrl", metadata={"help": 'the wandb project; "" = wandb\'s "uncategorized"'}
    )
    wandb_entity: str = field(
        default="", metadata={"help": 'the wandb team or user; "" = your default entity'}
    )
    wandb_name: str = field(
        default="", metadata={"help": "the wandb run's display name; \"\" = the run folder's name"}
    )
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar on the terminal"})
    sync_timing: bool = field(
        default=False,
        metadata={
            "help": "synchronise the GPU around every timed phase (exact time_<phase> per phase, "
            "at the cost of the syncs; `ddrl bench` turns it on); CPU timings are exact"
        },
    )
    preflight: bool = field(
        default=True,
        metadata={
            "help": "before iteration 1: on-policy ratio, SDE at zero noise, CFG, reward and "
            "data pairing checks (ddrl doctor runs them alone)"
        },
    )

    def check(self) -> None:
        check_literals(self, "train.")
        check_range("train.iterations", self.iterations, 0)
        check_range("train.prompts_per_iter", self.prompts_per_iter, 1)
        check_range("train.group_size", self.group_size, 2)
        check_range("train.inner_updates", self.inner_updates, 1)
        check_range(
            "train.updates_per_batch",
            self.updates_per_batch,
            1,
            self.prompts_per_iter * self.group_size,
        )
        check_range("train.timestep_fraction", self.timestep_fraction, 1e-6, 1.0)
        check_range("train.timestep_count", self.timestep_count, 1)
        check_range("train.window_size", self.window_size, 1)
        check_range("train.window_every", self.window_every, 1)
        check_range("train.window_stride", self.window_stride, 0)
        check_range("train.micro_batch", self.micro_batch, 0)
        check_range("train.steps_per_forward", self.steps_per_forward, 1)
        check_range("train.max_bad_steps", self.max_bad_steps, 1)
        check_range("train.max_skipped_iterations", self.max_skipped_iterations, 1)
        check_range("train.checkpoint_every", self.checkpoint_every, 1)
        check_range("train.keep_checkpoints", self.keep_checkpoints, 1)

    def require_trackers(self) -> None:
        """Raise a one-line DDRLError when a tracker this config turns on is not installed.
        Training calls it before building anything; ``check`` does not, so a run that logged to
        wandb can still be evaluated or exported where wandb is not installed."""
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise DDRLError(
                "train.tensorboard=true needs the tensorboard package: pip install "
                "'ddrl[tensorboard]' (or train.tensorboard=false)"
            )
        if self.wandb != "off" and importlib.util.find_spec("wandb") is None:
            raise DDRLError(
                f"train.wandb={self.wandb} needs the wandb package: pip install 'ddrl[wandb]' "
                "(or train.wandb=off)"
            )


@dataclass
class PretrainConfig:
    """Base-model pretraining (used when model.base is empty)."""

    steps: int = field(
        default=600,
        metadata={"help": "optimizer steps (digits: ≈110 s on 2 CPU cores, gold accuracy ≈0.98)"},
    )
    batch_size: int = field(default=128, metadata={"help": "images per step"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate after warm-up"})
    warmup: int = field(default=100, metadata={"help": "linear warm-up steps"})
    ema_decay: float = field(
        default=0.995, metadata={"help": "the saved base is the EMA of the weights"}
    )
    cfg_dropout: float = field(
        default=0.1,
        metadata={"help": "fraction of labels replaced by the null class (enables CFG)"},
    )
    seed: int = field(
        default=0,
        metadata={"help": "the base model's own seed (the run's seed never retrains the base)"},
    )

    def check(self) -> None:
        check_range("pretrain.steps", self.steps, 1)
        check_range("pretrain.batch_size", self.batch_size, 1)
        check_range("pretrain.lr", self.lr, 0.0, 1.0)
        check_range("pretrain.ema_decay", self.ema_decay, 0.0, 1.0)
        check_range("pretrain.cfg_dropout", self.cfg_dropout, 0.0, 1.0)
        check_range("pretrain.seed", self.seed, 0, 2**32 - 1)

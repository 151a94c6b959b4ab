"""Configs owned by the training loop (optimiser, loop sizes)."""

from __future__ import annotations

from dataclasses import dataclass

from ddrl.errors import check_choice, check_range

SELECTIONS = ("first", "per_sample", "per_batch", "strided")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, grad clipping and an EMA of the weights."""

    lr: float = 1e-4  # peak learning rate (release: 1e-5 for 2B-parameter video models)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay (release value)
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW betas (release value)
    grad_clip: float = 1.0  # max global grad norm (release value); 0 = no clipping
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
    timestep_fraction: float = 1.0  # trained steps per iteration: floor(fraction · num_steps)
    timestep_selection: str = "first"  # "first" (steps 0..n−1 in order, flow_grpo),
    # "per_sample" (a random subset per trajectory, DanceGRPO), "per_batch" (one random subset),
    # "strided" (every k-th from 0: the release's even steps 0, 2, ..., 18 of 20)
    skip_last_step: bool = False  # never train the last step (DanceGRPO permutes steps 0..N−2)
    micro_batch: int = 0  # trajectories per backward pass; 0 = all at once
    steps_per_forward: int = 1  # trained steps stacked into one forward (k× the batch, 1/k the
    # forwards; the same gradient): faster where a larger batch is cheaper per sample (GPUs)
    max_bad_steps: int = 3  # consecutive non-finite loss/gradient steps (skipped) before stopping
    max_skipped_iterations: int = 3  # consecutive iterations with every group skipped (NaN reward)
    checkpoint_every: int = 20  # iterations between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept (older ones are deleted)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    tensorboard: bool = False  # also log scalars to <run>/tb (needs the tensorboard package)
    progress: bool = True  # tqdm progress bar on the terminal
    sync_timing: bool = False  # synchronise the GPU around every timed phase (exact time_<phase>
    # per phase, at the cost of the syncs; `ddrl bench` turns it on); CPU timings are exact

    def check(self) -> None:
        check_range("train.iterations", self.iterations, 0)
        check_range("train.prompts_per_iter", self.prompts_per_iter, 1)
        check_range("train.group_size", self.group_size, 2)
        check_range("train.inner_updates", self.inner_updates, 1)
        check_range("train.timestep_fraction", self.timestep_fraction, 1e-6, 1.0)
        check_choice("train.timestep_selection", self.timestep_selection, SELECTIONS)
        check_range("train.micro_batch", self.micro_batch, 0)
        check_range("train.steps_per_forward", self.steps_per_forward, 1)
        check_range("train.max_bad_steps", self.max_bad_steps, 1)
        check_range("train.max_skipped_iterations", self.max_skipped_iterations, 1)
        check_range("train.checkpoint_every", self.checkpoint_every, 1)
        check_range("train.keep_checkpoints", self.keep_checkpoints, 1)
        check_choice("train.device", self.device, ("auto", "cpu", "cuda"))

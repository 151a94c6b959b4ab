"""Evaluate a model on a fixed prompt set with fixed noise: the numbers that expose hacking.

proxy_reward (the training reward), gold_reward / gold_accuracy (the held-out evaluator the
loop never saw), diversity (mean within-prompt pairwise distance, pixels and gold features),
heldout_diffusion_loss (flow-matching loss on held-out data on a fixed t grid), fd (Fréchet
distance to held-out data in gold-feature space), out_of_range_rate and saturation_rate.
Identical model + config ⇒ identical numbers: all noise comes from ``EvalConfig.seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..backbones import Backbone
from ..data import TaskData
from ..errors import check_range
from ..rewards import GoldEvaluator, Reward
from ..rollout import sample_ode
from .metrics import (
    default_t_grid,
    frechet_distance,
    heldout_diffusion_loss,
    out_of_range_rate,
    pairwise_diversity,
    saturation_rate,
)
from .report import save_image_grid


@dataclass
class EvalConfig:
    """Evaluation samples and schedule."""

    every: int = 0  # evaluate every N training iterations (and at 0 and the end); 0 = off
    samples_per_prompt: int = 30  # ODE samples per prompt (digits: 10 prompts → 300 images)
    seed: int = 12345  # noise seed of evaluation samples and the held-out loss (fixed across runs)
    loss_t_points: int = 10  # t grid (midpoints) of the held-out diffusion loss
    clamp_low: float = -1.0  # valid range of a decoded sample (digits: [-1, 1])
    clamp_high: float = 1.0

    def check(self) -> None:
        check_range("eval.every", self.every, 0)
        check_range("eval.samples_per_prompt", self.samples_per_prompt, 2)
        check_range("eval.loss_t_points", self.loss_t_points, 1)


@torch.no_grad()
def evaluate(
    model: Backbone,
    data: TaskData,
    reward: Reward,
    gold: GoldEvaluator,
    cfg: EvalConfig,
    num_steps: int = 20,
    shift: float = 1.0,
    cfg_scale: float = 1.0,
    device="cpu",
) -> tuple[dict[str, float], Tensor, list[str]]:
    """Returns (metrics, raw samples [P·n, ...], their prompts)."""
    was_training = model.training
    model.eval()
    prompts = [p for p in data.prompts for _ in range(cfg.samples_per_prompt)]
    gen = torch.Generator().manual_seed(cfg.seed)
    raw = sample_ode(model, prompts, num_steps, gen, shift, cfg_scale, device).cpu()
    images = raw.clamp(cfg.clamp_low, cfg.clamp_high)
    groups = torch.arange(len(data.prompts)).repeat_interleave(cfg.samples_per_prompt)
    held = data.heldout
    held_cond = model.encode(held.prompts)

    def velocity(x_t: Tensor, t: Tensor, index: Tensor) -> Tensor:
        idx = index.to(device)
        return model.velocity(x_t.to(device), t.to(device).float(), held_cond[idx]).cpu()

    feats = gold.features(images)
    metrics = {
        "proxy_reward": reward(images.to(device), prompts).float().mean().item(),
        "gold_reward": gold.reward(images, prompts).float().mean().item(),
        "gold_accuracy": gold.correct(images, prompts).float().mean().item(),
        "diversity": pairwise_diversity(images, groups),
        "diversity_feature": pairwise_diversity(feats, groups),
        "heldout_diffusion_loss": heldout_diffusion_loss(
            velocity, held.x, default_t_grid(cfg.loss_t_points).float(), seed=cfg.seed
        ),
        "fd": frechet_distance(feats, gold.features(held.x)),
        "out_of_range_rate": out_of_range_rate(raw, cfg.clamp_low, cfg.clamp_high),
        "saturation_rate": saturation_rate(raw, cfg.clamp_high, low=cfg.clamp_low),
    }
    model.train(was_training)
    return metrics, raw, prompts


def evaluate_components(model: Backbone, c, cfg, device="cpu"):
    """``evaluate`` with a run's components (data, reward, gold) and its eval/sampler config."""
    return evaluate(
        model,
        c.data,
        c.reward,
        c.gold,
        cfg.eval,
        cfg.sampler.eval_steps,
        cfg.sampler.shift,
        cfg.sampler.cfg_scale,
        device,
    )


def save_prompt_grid(raw: Tensor, n_prompts: int, path, title: str | None = None):
    """Picture of evaluation samples: for images [P·n, C, H, W] (prompt-major, as ``evaluate``
    returns them) a grid of up to 10 per prompt, one prompt per column; for 2-D points a
    scatter plot. Anything else writes nothing and returns None."""
    if raw.dim() == 2 and raw.shape[1] == 2:
        return save_scatter(raw, path, title)
    if raw.dim() != 4:
        return None
    per = raw.shape[0] // n_prompts
    show = raw.view(n_prompts, per, *raw.shape[1:])[:, : min(per, 10)].transpose(0, 1)
    return save_image_grid(show.reshape(-1, *raw.shape[1:]), path, nrow=n_prompts, title=title)


def save_scatter(points: Tensor, path, title: str | None = None):
    """Scatter plot of 2-D samples [N, 2] over the toy mixture's centres."""
    from matplotlib.figure import Figure

    from ..data.toy2d import CENTRES

    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    p = points.detach().float().cpu()
    ax.scatter(p[:, 0], p[:, 1], s=4, alpha=0.5, label="samples")
    ax.scatter(CENTRES[:, 0], CENTRES[:, 1], marker="x", c="k", label="data modes")
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=7)
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path

"""Evaluate a model on a fixed prompt set with fixed noise: the numbers that expose hacking.

proxy_reward (the training reward), gold_reward / gold_accuracy (the held-out evaluator the
loop never saw), diversity (mean within-prompt pairwise distance, pixels and gold features),
heldout_diffusion_loss (flow-matching loss on held-out data on a fixed t grid), fd (Fréchet
distance to held-out data in gold-feature space), out_of_range_rate and saturation_rate.
Identical model + config ⇒ identical numbers: all noise comes from ``EvalConfig.seed``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ddrl.data import PairedPool, TaskData
from ddrl.errors import check_choice, check_range
from ddrl.evaluation.metrics import (
    default_t_grid,
    frechet_distance,
    heldout_diffusion_loss,
    out_of_range_rate,
    pairwise_diversity,
    saturation_rate,
)
from ddrl.experiments.report import save_image_grid
from ddrl.flow import GRIDS
from ddrl.models import Generator, clamp_images
from ddrl.rewards import GoldEvaluator, MultiReward, Reward
from ddrl.rewards.base import finite_mean
from ddrl.rewards.multi import video_frames
from ddrl.sampling import SamplerConfig, sample_ode


@dataclass
class EvalConfig:
    """Evaluation samples and schedule."""

    every: int = 0  # evaluate every N training iterations (and at 0 and the end); 0 = off
    samples_per_prompt: int = 30  # ODE samples per prompt (digits: 10 prompts → 300 images)
    seed: int = 12345  # noise seed of evaluation samples and the held-out loss (fixed across runs)
    loss_t_points: int = 10  # t grid (midpoints) of the held-out diffusion loss
    grid: str = "scheduler"  # ODE grid of evaluation samples, the same for every algorithm
    # (a preset's training grid, e.g. DanceGRPO's "linear", does not change how it is judged)
    rewards: str = ""  # out-of-domain rewards scored but never trained on ("clipscore,pickscore":
    # the paper checks they do not fall), logged as ood_<name>
    features: str = ""  # a reward whose model embeds images ("clipscore", "pickscore",
    # "hpsv2"): diversity and Fréchet distance in its space for real models; "" = pixels only
    features_model: str = ""  # that model's hub id or folder ("" = its default)
    loss_warn: float = 0.10  # warn when the held-out diffusion loss rises by more than this
    # fraction over iteration 0's (the paper's warning sign of hacking: +10%)

    def check(self) -> None:
        check_range("eval.every", self.every, 0)
        check_range("eval.samples_per_prompt", self.samples_per_prompt, 2)
        check_range("eval.loss_t_points", self.loss_t_points, 1)
        check_choice("eval.grid", self.grid, GRIDS)
        check_range("eval.loss_warn", self.loss_warn, 0.0)


@torch.no_grad()
def evaluate(
    gen: Generator,
    data: TaskData,
    reward: Reward,
    gold: GoldEvaluator | None,
    cfg: EvalConfig,
    sampler: SamplerConfig,
    device="cpu",
    ood: MultiReward | None = None,
    held_latents: PairedPool | None = None,
    embed=None,
) -> tuple[dict[str, float], Tensor, list[str]]:
    """Returns (metrics, raw decoded samples [P·n, ...], their prompts). Rewards and the gold
    evaluator see decoded images clamped to the codec's range; the held-out diffusion loss is
    taken in model space, on ``held_latents`` (already encoded) or the data's held-out images.
    ``ood``: rewards never trained on, each logged as ood_<name>. ``embed``: images → features
    [B, D] (a CLIP image tower) for feature-space diversity and, with held-out data, Fréchet
    distance. Without a gold evaluator or held-out data their metrics are left out."""
    den = gen.denoiser
    was_training = den.training
    den.eval()
    eval_prompts = data.eval_prompts or data.prompts
    prompts = [p for p in eval_prompts for _ in range(cfg.samples_per_prompt)]
    gen_noise = torch.Generator().manual_seed(cfg.seed)
    z = sample_ode(gen, prompts, dataclasses.replace(sampler, grid=cfg.grid), gen_noise, device)
    raw = gen.codec.decode(z.to(device)).cpu()  # decoded once: a VAE decode is costly
    images = clamp_images(gen.codec, raw)
    groups = torch.arange(len(eval_prompts)).repeat_interleave(cfg.samples_per_prompt)
    lo, hi = gen.codec.value_range or (float("-inf"), float("inf"))
    metrics = {
        "proxy_reward": reward(images.to(device), prompts).float().mean().item(),
        "diversity": pairwise_diversity(images, groups),
        "out_of_range_rate": out_of_range_rate(raw, lo, hi),
    }
    if ood is not None:
        scores = ood.each(images.to(device), prompts)
        for k, name in enumerate(ood.names):
            metrics[f"ood_{name}"] = finite_mean(scores[:, k]).item()
    held = data.heldout
    if held_latents is not None or held is not None:  # a user's set may have no held-out data
        if held_latents is not None:
            held_x, held_prompts = held_latents.x, held_latents.prompts
        else:
            held_x, held_prompts = gen.codec.encode(held.x.to(device)).cpu(), held.prompts
        held_cond = gen.conditioner.encode(held_prompts).to(device)

        def velocity(x_t: Tensor, t: Tensor, index: Tensor) -> Tensor:
            c = held_cond.index(index.to(device))
            return den.velocity(x_t.to(device), t.to(device).float(), c).cpu()

        metrics["heldout_diffusion_loss"] = heldout_diffusion_loss(
            velocity, held_x, default_t_grid(cfg.loss_t_points).float(), seed=cfg.seed
        )
    if embed is not None:
        feats = embed(video_frames(images))
        metrics["diversity_feature"] = pairwise_diversity(feats, groups)
        if held_latents is not None:  # decoded once: the real data as the model space holds it
            real = clamp_images(gen.codec, gen.codec.decode(held_latents.x.to(device))).cpu()
            metrics["fd_feature"] = frechet_distance(feats, embed(video_frames(real)))
    if gen.codec.value_range is not None:
        metrics["saturation_rate"] = saturation_rate(raw, hi, low=lo)
    if gold is not None:
        feats = gold.features(images)
        metrics.update(
            gold_reward=gold.reward(images, prompts).float().mean().item(),
            gold_accuracy=gold.correct(images, prompts).float().mean().item(),
            diversity_feature=pairwise_diversity(feats, groups),
            fd=frechet_distance(feats, gold.features(held.x)),
        )
    den.train(was_training)
    return metrics, raw, prompts


def evaluate_components(gen: Generator, c, cfg, device="cpu"):
    """``evaluate`` with a run's components (data, reward, gold) and its eval/sampler config."""
    return evaluate(
        gen,
        c.data,
        c.reward,
        c.gold,
        cfg.eval,
        cfg.sampler,
        device,
        c.eval_rewards,
        c.heldout,
        c.embed,
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

    from ddrl.data.toy2d import CENTRES

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

"""Evaluate a model on a fixed prompt set with fixed noise: the numbers that expose hacking.

proxy_reward (the training reward), gold_reward / gold_accuracy (the held-out evaluator the
loop never saw), diversity (mean within-prompt pairwise distance, pixels and gold features),
heldout_diffusion_loss (flow-matching loss on held-out data on a fixed t grid), fd (Fréchet
distance to held-out data in gold-feature space), out_of_range_rate and saturation_rate.
Identical model + config ⇒ identical numbers: all noise comes from ``EvalConfig.seed``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddrl.config.core import SamplerConfig
from ddrl.data.pools import PairedPool, TaskData
from ddrl.evaluation.config import EvalConfig
from ddrl.evaluation.metrics import (
    default_t_grid,
    frechet_distance,
    heldout_diffusion_loss,
    out_of_range_rate,
    pairwise_diversity,
    saturation_rate,
)
from ddrl.models.base import Generator, clamp_images
from ddrl.rewards.base import GoldEvaluator, Reward, finite_mean
from ddrl.rewards.multi import MultiReward, video_frames
from ddrl.sampling import sample_ode


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
    pool: PairedPool | None = None,
) -> tuple[dict[str, float], Tensor, list[str]]:
    """Returns (metrics, raw decoded samples [P·n, ...], their prompts). Rewards and the gold
    evaluator see decoded images clamped to the codec's range; the held-out diffusion loss is
    taken in model space, on ``held_latents`` (already encoded) or the data's held-out images.
    ``ood``: rewards never trained on, each logged as ood_<name>. ``embed``: images → features
    [B, D] (a CLIP image tower) for feature-space diversity and, with held-out data, Fréchet
    distance. Without a gold evaluator or held-out data their metrics are left out. With
    ``cfg.cond_frames`` each prompt's samples are conditioned on the first frames of one item
    of ``pool`` (model space) with that prompt, drawn from the eval seed."""
    den = gen.denoiser
    was_training = den.training
    den.eval()
    eval_prompts = data.eval_prompts or data.prompts
    prompts = [p for p in eval_prompts for _ in range(cfg.samples_per_prompt)]
    gen_noise = torch.Generator().manual_seed(cfg.seed)
    given = None
    if cfg.cond_frames:
        x = pool.paired(eval_prompts, torch.Generator().manual_seed(cfg.seed + 1))
        n = cfg.samples_per_prompt
        given = (x.repeat_interleave(n, dim=0), torch.full((len(prompts),), cfg.cond_frames))
    z = sample_ode(gen, prompts, cfg.sampler(sampler), gen_noise, device, given=given)
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
        c.pool,
    )

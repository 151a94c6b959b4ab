"""The one training loop: rollout → reward → advantage → loss → step.

Algorithms differ only in the loss object and config (sampler kind, shared noise, timestep
fraction); the loop never asks which algorithm it runs. Simplifications, stated up front:
single process here (the distributed wrapper comes later); one optimizer step per inner update
with gradients accumulated over the trained timesteps (and micro-batches); all randomness of
iteration k comes from a generator seeded by (seed, rank, k), so resume is exact.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .advantages import group_advantages
from .backbones import cond_index
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .components import build_components, device_of
from .config import RunConfig, save_config
from .eval.evaluate import evaluate_components, save_prompt_grid
from .losses import StepBatch, build_loss
from .pretrain import ema_update
from .rewards import checked_reward
from .rollout import rollout
from .runlog import RunLogger


def iteration_generator(seed: int, rank: int, iteration: int) -> torch.Generator:
    """A generator that depends only on (seed, rank, iteration)."""
    state = np.random.SeedSequence([seed, rank, iteration]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, log=print) -> dict:
    """Run (or resume) training into ``run_dir``; returns the last metrics row."""
    run_dir = Path(run_dir)
    dev = device_of(cfg)
    c = build_components(cfg, log)
    base = c.base.to(dev).eval().requires_grad_(False)
    model = copy.deepcopy(base).train().requires_grad_(True)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.optim.ema_decay > 0 else None
    loss_fn = build_loss(cfg.algorithm, cfg.loss, cfg.sampler, base)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
    )
    start = 0
    if resume:
        start = load_checkpoint(latest_checkpoint(run_dir), model, ema, opt)["iteration"]
    else:
        save_config(cfg, run_dir / "config.json")
    logger = RunLogger(run_dir, start, cfg.train.tensorboard)
    tc, P, G = cfg.train, cfg.train.prompts_per_iter, cfg.train.group_size
    n_train = max(1, round(tc.timestep_fraction * cfg.sampler.num_steps))
    micro = tc.micro_batch or P * G
    shipped = ema if ema is not None else model  # what evaluation and final/ see

    def run_eval(it: int, final: bool = False) -> None:
        m, raw, _ = evaluate_components(shipped, c, cfg, dev)
        logger.eval({"iteration": it, **m})
        if final:
            save_prompt_grid(
                raw,
                len(c.data.prompts),
                run_dir / "samples_final.png",
                f"{cfg.algorithm} after {it} iterations",
            )

    if cfg.eval.every and start == 0:
        run_eval(0)
    row: dict = {}
    bar = tqdm(
        range(start, tc.iterations),
        initial=start,
        total=tc.iterations,
        disable=not tc.progress,
        desc=cfg.algorithm,
        dynamic_ncols=True,
    )
    for it in bar:
        t0 = time.perf_counter()
        g = iteration_generator(cfg.seed, 0, it)
        prompts = c.data.sample_prompts(P, g)
        model.eval()
        ro = rollout(model, prompts, G, cfg.sampler, g, dev)
        model.train()
        t1 = time.perf_counter()
        images = ro.final.clamp(cfg.eval.clamp_low, cfg.eval.clamp_high)
        rewards = checked_reward(c.reward, cfg.reward.name, images, ro.prompts) * cfg.reward.scale
        adv, valid = group_advantages(rewards, ro.group_ids, cfg.advantage)
        x0_data = c.pool.paired(ro.prompts, g).to(dev)
        steps = torch.randperm(cfg.sampler.num_steps, generator=g)[:n_train].sort().values
        t2 = time.perf_counter()
        parts: dict[str, list[float]] = {}
        for _ in range(tc.inner_updates):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for j, i in enumerate(steps.tolist()):
                for idx in torch.arange(P * G, device=dev).split(micro):
                    b = StepBatch(
                        x_t=ro.states[i, idx],
                        x_next=ro.states[i + 1, idx],
                        t=ro.timesteps[i].expand(len(idx)),
                        t_next=ro.timesteps[i + 1].expand(len(idx)),
                        logp_old=ro.log_probs[i, idx],
                        advantages=adv[idx],
                        valid=valid[idx],
                        cond=cond_index(ro.cond, idx),
                        x0_data=x0_data[idx],
                        noise0=ro.states[0, idx],
                        first=j == 0,
                        generator=g,
                    )
                    loss, m = loss_fn(model, b)
                    w = len(idx) / (P * G) / len(steps)
                    (loss * w).backward()
                    total += loss.item() * w
                    for k, v in m.items():
                        parts.setdefault(k, []).append(v)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            lr = cfg.optim.lr * min(1.0, (it + 1) / max(cfg.optim.warmup, 1))
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            if ema is not None:
                ema_update(ema, model, cfg.optim.ema_decay)
        t3 = time.perf_counter()
        fin = rewards[torch.isfinite(rewards)]
        row = {
            "iteration": it + 1,
            "reward_mean": fin.mean().item() if len(fin) else float("nan"),
            "reward_std": fin.std().item() if len(fin) > 1 else 0.0,
            "skipped_groups": int((~valid).sum().item() // G),
            "loss": total,
            "grad_norm": grad_norm.item(),
            "lr": lr,
            **{k: float(np.mean(v)) for k, v in parts.items()},
            "time_rollout": t1 - t0,
            "time_reward": t2 - t1,
            "time_train": t3 - t2,
            "time_iteration": t3 - t0,
        }
        if row["skipped_groups"]:
            log(f"iteration {it + 1}: skipped {row['skipped_groups']} group(s) with NaN/inf reward")
        logger.metrics(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", loss=f"{total:.3f}")
        done = it + 1 == tc.iterations
        if cfg.eval.every and ((it + 1) % cfg.eval.every == 0 or done):
            run_eval(it + 1, final=done)
        if (it + 1) % tc.checkpoint_every == 0 or done:
            save_checkpoint(
                run_dir, it + 1, model, ema, opt, {"algorithm": cfg.algorithm}, tc.keep_checkpoints
            )
    bar.close()
    logger.close()
    shipped.save_pretrained(run_dir / "final")
    return row

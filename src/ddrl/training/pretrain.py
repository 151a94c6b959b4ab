"""Train a base generator from scratch with the flow-matching loss, and cache it.

Deterministic given (model, data, config incl. its seed): the same cache key always names the
same weights, so every later command (train, synth, eval, compare) reuses one base.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from ddrl.data.config import cache_root
from ddrl.data.pools import load_data
from ddrl.flow import flow_matching_loss, interpolate, sample_training_t
from ddrl.io import atomic_dir
from ddrl.models import load_generator, resolve
from ddrl.models.base import Cond, Generator
from ddrl.training.config import PretrainConfig
from ddrl.training.ema import ema_update

FORMAT = 2  # bump when the saved layout changes, so stale cache entries are not loaded


def base_path(model: str, data: str, cfg: PretrainConfig, cache_dir: str = "") -> Path:
    """Cache folder of the base for (model family, data set, pretraining config)."""
    key = json.dumps([FORMAT, model, data, asdict(cfg)], sort_keys=True)
    return cache_root(cache_dir) / data / f"base-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _mix(cond: Cond, null: Cond, drop: Tensor) -> Cond:
    """Rows of ``null`` where ``drop`` [B] is True, else ``cond`` (CFG dropout)."""

    def pick(c: Tensor, n: Tensor) -> Tensor:
        return torch.where(drop.view(-1, *([1] * (c.dim() - 1))), n, c)

    return Cond({k: pick(v, null.batched[k]) for k, v in cond.batched.items()}, cond.shared)


def pretrain(model: str, data: str, cfg: PretrainConfig, log=print) -> Generator:
    """Flow-matching pretraining of a fresh generator (denoiser and conditioner) on the data
    set's training pool; returns the EMA of the weights."""
    torch.manual_seed(cfg.seed)
    ds = load_data(data)
    gen = resolve(model)()
    ema = copy.deepcopy(gen).requires_grad_(False)
    opt = torch.optim.AdamW(gen.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)))
    g = torch.Generator().manual_seed(cfg.seed)
    x_all, prompts = gen.codec.encode(ds.train.x), ds.train.prompts
    t0 = time.time()
    for step in range(cfg.steps):
        idx = torch.randint(len(prompts), (cfg.batch_size,), generator=g)
        x0 = x_all[idx]
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.cfg_dropout
        batch_prompts = [prompts[i] for i in idx.tolist()]
        cond = _mix(gen.conditioner.encode(batch_prompts), gen.conditioner.null(len(idx)), drop)
        noise = torch.randn(x0.shape, generator=g)
        t = sample_training_t(cfg.batch_size, g)
        v = gen.denoiser.velocity(interpolate(x0, noise, t), t, cond)
        loss = flow_matching_loss(v, x0, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        opt.step()
        sched.step()
        # A short warm-up of the EMA so early steps do not freeze the random init into it.
        ema_update(ema, gen, min(cfg.ema_decay, (1 + step) / (10 + step)))
        if step % 250 == 0 or step == cfg.steps - 1:
            took = time.time() - t0
            log(f"pretrain {model} step {step}/{cfg.steps} loss {loss.item():.4f} ({took:.0f}s)")
    return ema.eval()


def ensure_base(
    model: str, data: str, cfg: PretrainConfig, cache_dir: str = "", log=print
) -> tuple[Generator, Path]:
    """Load the cached base for (model, data, cfg), pretraining and saving it first if absent."""
    path = base_path(model, data, cfg, cache_dir)
    if (path / "generator.json").is_file():
        return load_generator(path), path
    t0 = time.time()
    gen = pretrain(model, data, cfg, log)
    with atomic_dir(path) as tmp:  # a race lost to another process: theirs is identical
        gen.save_pretrained(tmp)
        info = {"model": model, "data": data, "config": asdict(cfg), "seconds": time.time() - t0}
        (tmp / "pretrain.json").write_text(json.dumps(info))
    log(f"saved base model to {path} ({time.time() - t0:.0f}s)")
    return load_generator(path), path

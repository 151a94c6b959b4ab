"""Train a task's base model from scratch with the flow-matching loss, and cache it.

Deterministic given (task, seed, config): the same cache key always names the same weights,
so every later command (train, synth, eval, compare) reuses one base instead of retraining.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .backbones import BACKBONES, Backbone, load_backbone
from .data import load_task_data
from .errors import check_range
from .flow import flow_matching_loss, interpolate, sample_training_t


@dataclass
class PretrainConfig:
    """Base-model pretraining (used when model.base is empty)."""

    steps: int = 600  # optimizer steps (digits: ≈110 s on 2 CPU cores, gold accuracy ≈0.98)
    batch_size: int = 128  # images per step
    lr: float = 2e-3  # AdamW learning rate after warm-up
    warmup: int = 100  # linear warm-up steps
    ema_decay: float = 0.995  # the saved base is the EMA of the weights
    cfg_dropout: float = 0.1  # fraction of labels replaced by the null class (enables CFG)

    def check(self) -> None:
        check_range("pretrain.steps", self.steps, 1)
        check_range("pretrain.batch_size", self.batch_size, 1)
        check_range("pretrain.lr", self.lr, 0.0, 1.0)
        check_range("pretrain.ema_decay", self.ema_decay, 0.0, 1.0)
        check_range("pretrain.cfg_dropout", self.cfg_dropout, 0.0, 1.0)


def cache_root(configured: str = "") -> Path:
    return Path(configured or os.environ.get("DDRL_CACHE") or Path.home() / ".cache" / "ddrl")


def base_path(task: str, cfg: PretrainConfig, seed: int, cache_dir: str = "") -> Path:
    key = hashlib.sha1(json.dumps([task, seed, asdict(cfg)], sort_keys=True).encode()).hexdigest()
    return cache_root(cache_dir) / task / f"base-{key[:10]}"


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·θ, parameter by parameter."""
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p.detach(), 1 - decay)


def pretrain(task: str, cfg: PretrainConfig, seed: int = 0, log=print) -> Backbone:
    """Flow-matching pretraining on the task's training pool; returns the EMA model."""
    torch.manual_seed(seed)
    data = load_task_data(task)
    model = BACKBONES[task]()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)))
    g = torch.Generator().manual_seed(seed)
    x_all, prompts = data.train.x, data.train.prompts
    cond_all = model.encode(prompts)
    null = model.null_cond(len(prompts))
    t0 = time.time()
    for step in range(cfg.steps):
        idx = torch.randint(len(prompts), (cfg.batch_size,), generator=g)
        x0 = x_all[idx]
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.cfg_dropout
        cond = torch.where(drop, null[idx], cond_all[idx])
        noise = torch.randn(x0.shape, generator=g)
        t = sample_training_t(cfg.batch_size, g)
        loss = flow_matching_loss(
            model.velocity(interpolate(x0, noise, t), t, cond), x0, noise
        ).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        # A short warm-up of the EMA so early steps do not freeze the random init into it.
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        if step % 250 == 0 or step == cfg.steps - 1:
            log(
                f"pretrain {task} step {step}/{cfg.steps} loss {loss.item():.4f} "
                f"({time.time() - t0:.0f}s)"
            )
    return ema.eval()


def ensure_base(
    task: str, cfg: PretrainConfig, seed: int = 0, cache_dir: str = "", log=print
) -> tuple[Backbone, Path]:
    """Load the cached base for (task, cfg, seed), pretraining and saving it first if absent."""
    path = base_path(task, cfg, seed, cache_dir)
    if (path / "backbone.json").is_file():
        return load_backbone(path), path
    t0 = time.time()
    model = pretrain(task, cfg, seed, log)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(
        json.dumps({"task": task, "seed": seed, "config": asdict(cfg), "seconds": time.time() - t0})
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(path)  # atomic: a crash never leaves a half-written base behind
    except OSError:  # another process won the race; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"saved base model to {path} ({time.time() - t0:.0f}s)")
    return load_backbone(path), path

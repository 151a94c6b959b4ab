"""Build what a run needs from its config: generator, data, rewards, gold evaluator."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig
from .data import PairedPool, TaskData, load_data
from .data.synthetic import load_pool
from .errors import DDRLError
from .models import DIFFUSERS_FAMILIES, Generator, load_generator, resolve
from .models.hf import ensure_tiny
from .pretrain import cache_root, ensure_base
from .rewards import GoldEvaluator, Reward, RewardContext, build_gold, build_reward


@dataclass
class Components:
    gen: Generator  # the starting model; `train` trains its denoiser in place
    base_path: Path
    data: TaskData  # prompts, training and held-out pools (image space)
    pool: PairedPool  # where the data term draws x0 from (model space; real or synthetic)
    reward: Reward
    gold: GoldEvaluator | None


def device_of(cfg: RunConfig) -> str:
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise DDRLError("train.device='cuda' but no CUDA device is available; allowed: auto, cpu")
    return cfg.train.device


def load_base(cfg: RunConfig, log=print) -> tuple[Generator, Path]:
    """The starting generator and the folder it came from: a diffusers family's pipeline (hub
    id, folder, or "tiny": built from config into the cache on first use), model.base (a saved
    generator folder), or the embedded family's cached base (pretrained on first use)."""
    m = cfg.model
    if m.name in DIFFUSERS_FAMILIES:
        family = resolve(m.name)
        source = m.base
        if m.base == "tiny":
            source = str(ensure_tiny(family, cache_root(m.cache_dir), log))
        gen = family.from_pretrained(source, config=m)
        local = Path(os.path.expanduser(source))
        return gen, local if local.exists() else cache_root(m.cache_dir) / "hub" / slug(source)
    if m.base:
        path = Path(m.base)
        if (path / "generator.json").is_file():
            return load_generator(path, config=m), path
        if not path.is_dir():
            raise DDRLError(f"model.base={m.base!r} does not exist")
        return resolve(m.name).from_pretrained(path, config=m), path
    return ensure_base(m.name, cfg.data.name, cfg.pretrain, m.cache_dir, log)


def slug(text: str) -> str:
    """A file-name-safe form of a hub id or path."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "--" for ch in text)


def synthetic_path(cfg: RunConfig, base_path: Path) -> Path:
    """data.synthetic_path, or the default file next to the base model."""
    if cfg.data.synthetic_path:
        return Path(cfg.data.synthetic_path)
    return base_path / "synthetic.safetensors"


def build_components(cfg: RunConfig, log=print) -> Components:
    gen, base_path = load_base(cfg, log)
    data = load_data(cfg.data.name)
    if cfg.data.source == "real":
        pool = PairedPool(gen.codec.encode(data.train.x), data.train.prompts)
    else:
        pool = load_pool(synthetic_path(cfg, base_path))
    ctx = RewardContext(cfg.data.name, cache_root(cfg.model.cache_dir), cfg.reward.seed)
    reward = build_reward(cfg.reward.name, ctx)
    return Components(gen, base_path, data, pool, reward, build_gold(cfg.gold))

"""Build what a run needs from its config: generator, data, rewards, gold evaluator."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig
from .data import PairedPool, TaskData, load_data
from .data.synthetic import load_pool
from .errors import DDRLError
from .models import Generator, load_generator, resolve
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
    """model.base if given (a saved generator folder), else the family's cached base."""
    m = cfg.model
    if m.base:
        path = Path(m.base)
        if (path / "generator.json").is_file():
            return load_generator(path, resolution=m.resolution), path
        if not path.is_dir():
            raise DDRLError(f"model.base={m.base!r} does not exist")
        return resolve(m.name).from_pretrained(path, resolution=m.resolution), path
    return ensure_base(m.name, cfg.data.name, cfg.pretrain, m.cache_dir, log)


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

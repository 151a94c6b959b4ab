"""Build what a run needs from its config: base model, data, rewards, gold evaluator."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .backbones import Backbone, load_backbone, resolve
from .checkpoint import save_file_atomic
from .config import RunConfig
from .data import PairedPool, TaskData, load_task_data
from .errors import DDRLError
from .pretrain import cache_root, ensure_base
from .rewards import GoldEvaluator, Reward, RewardContext, build_gold, build_reward


@dataclass
class Components:
    base: Backbone  # the reference / starting model (never trained in place)
    base_path: Path
    data: TaskData
    pool: PairedPool  # where the data term draws x0 from (real or synthetic)
    reward: Reward
    gold: GoldEvaluator


def device_of(cfg: RunConfig) -> str:
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise DDRLError("train.device='cuda' but no CUDA device is available; allowed: auto, cpu")
    return cfg.train.device


def load_base(cfg: RunConfig, log=print) -> tuple[Backbone, Path]:
    """model.base if given (any saved backbone), else the task's cached pretrained base."""
    if cfg.model.base:
        path = Path(cfg.model.base)
        if cfg.model.backbone:
            return resolve(cfg.model.backbone).from_pretrained(path), path
        return load_backbone(path), path
    return ensure_base(cfg.task, cfg.pretrain, cfg.seed, cfg.model.cache_dir, log)


def synthetic_path(cfg: RunConfig, base_path: Path) -> Path:
    return (
        Path(cfg.data.synthetic_path)
        if cfg.data.synthetic_path
        else (base_path / "synthetic.safetensors")
    )


def save_pool(pool: PairedPool, path: Path) -> None:
    ids = torch.tensor([int(p) if p else -1 for p in pool.prompts])
    save_file_atomic({"x": pool.x.contiguous(), "prompt_ids": ids}, path)


def load_pool(path: Path) -> PairedPool:
    if not path.is_file():
        raise DDRLError(
            f"no synthetic data at {path}; run `ddrl synth` first or set data.source=real"
        )
    try:
        t = load_file(path)
    except (SafetensorError, OSError) as e:
        raise DDRLError(f"corrupt synthetic data {path}: {e}") from e
    return PairedPool(t["x"], [str(i) if i >= 0 else "" for i in t["prompt_ids"].tolist()])


def build_components(cfg: RunConfig, log=print) -> Components:
    base, base_path = load_base(cfg, log)
    data = load_task_data(cfg.task)
    pool = data.train if cfg.data.source == "real" else load_pool(synthetic_path(cfg, base_path))
    ctx = RewardContext(cfg.task, cache_root(cfg.model.cache_dir), cfg.seed)
    reward = build_reward(cfg.reward.name, ctx)
    return Components(base, base_path, data, pool, reward, build_gold(cfg.task, cfg.seed))

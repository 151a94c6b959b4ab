"""Build what a run needs from its config: generator, data, rewards, gold evaluator, and the
data term's pool only for an algorithm whose loss uses data (``Loss.needs_data``)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ddrl.config import RunConfig
from ddrl.data.conditions import attach_condition_images
from ddrl.data.config import cache_root
from ddrl.data.latents import latent_pool
from ddrl.data.pool_io import load_pool
from ddrl.data.pools import PairedPool, TaskData, load_data
from ddrl.data.synthetic import synthesize
from ddrl.errors import DDRLError
from ddrl.losses import needs
from ddrl.models import DIFFUSERS_FAMILIES, load_generator, resolve
from ddrl.models.base import Generator
from ddrl.models.hf import ensure_tiny
from ddrl.models.random_base import ensure_random, is_random
from ddrl.rewards.base import GoldEvaluator, RewardContext
from ddrl.rewards.build import build_gold, build_reward, build_rewards
from ddrl.rewards.multi import MultiReward
from ddrl.training.pretrain import ensure_base


@dataclass
class Components:
    gen: Generator  # the starting model; `train` trains its denoiser in place
    base_path: Path
    data: TaskData  # prompts, training and held-out pools (image space)
    pool: PairedPool | None  # where the data term draws x0 from (model space; real or
    # synthetic); None when the run's loss uses no data
    reward: MultiReward  # every configured reward; calling it gives their weighted sum
    gold: GoldEvaluator | None
    eval_rewards: MultiReward | None = None  # eval.rewards: out-of-domain, never trained on
    heldout: PairedPool | None = None  # data.eval_images encoded (model space), for eval
    embed: Callable[[Tensor], Tensor] | None = None  # eval.features: images → features [B, D]
    needs_data: bool = False  # the loss trains on data: each trajectory gets an x0 from the pool

    @functools.cached_property
    def paired(self) -> bool:
        """Whether the data term pairs each trajectory with data of its own prompt (the pool
        has items for every prompt: embedded and synthetic sets); else (a caption set whose
        captions are not the prompts) it draws data uniformly with its own captions."""
        return self.pool is not None and self.pool.covers(self.data.prompts)


def device_of(cfg: RunConfig) -> str:
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise DDRLError("train.device='cuda' but no CUDA device is available; allowed: auto, cpu")
    return cfg.train.device


def load_base(cfg: RunConfig, log=print) -> tuple[Generator, Path]:
    """The starting generator and the folder it came from: a diffusers family's pipeline (hub
    id, folder, or "tiny": built from config into the cache on first use), model.base (a saved
    generator folder), or the embedded family's cached base (pretrained on first use); with
    ``data.condition_images`` handed to its conditioner."""
    gen, path = _load_base(cfg, log)
    condition_images(cfg, gen)
    return gen, path


def _load_base(cfg: RunConfig, log) -> tuple[Generator, Path]:
    m = cfg.model
    if m.name in DIFFUSERS_FAMILIES:
        family = resolve(m.name)
        source = m.base
        if m.base == "tiny" or m.base.startswith("tiny:"):
            variant = m.base.partition(":")[2]
            if variant not in family.tiny_variants:
                have = ", ".join(["tiny", *(f"tiny:{v}" for v in family.tiny_variants if v)])
                raise DDRLError(f"model.base={m.base!r} for {m.name}; allowed: {have}")
            source = str(ensure_tiny(family, cache_root(m.cache_dir), log, variant))
        elif is_random(m.base):  # the real shapes, random weights (said loudly)
            source = str(ensure_random(family, m.base, cache_root(m.cache_dir), log))
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


def condition_images(cfg: RunConfig, gen: Generator) -> None:
    """Hand ``data.condition_images`` to the conditioner (``ddrl.data.conditions``), checked to
    cover the training and evaluation prompts; a family that needs them fails without."""
    path = cfg.data.condition_images
    if not path:
        if getattr(gen, "needs_condition_images", False):
            raise DDRLError(
                f"model.name={cfg.model.name!r} edits an image per prompt: set "
                "data.condition_images (a caption folder or table whose captions are the prompts)"
            )
        return
    frames = [
        k for k, n in (("model", cfg.model.cond_frames[1]), ("eval", cfg.eval.cond_frames)) if n
    ]
    if frames:
        raise DDRLError(
            f"data.condition_images and {frames[0]}.cond_frames both condition the first frames; "
            f"allowed: one of them (set {frames[0]}.cond_frames=0 or data.condition_images='')"
        )
    data = load_data(cfg.data)
    attach_condition_images(gen, path, [*data.prompts, *data.eval_prompts], cfg.model.name)


def slug(text: str) -> str:
    """A file-name-safe form of a hub id or path."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "--" for ch in text)


def synthetic_path(cfg: RunConfig, base_path: Path) -> Path:
    """data.synthetic_path, or the default file next to the base model (embedded families) or
    in the cache, keyed by the base, the prompts and the sampling settings (diffusers)."""
    if cfg.data.synthetic_path:
        return Path(cfg.data.synthetic_path)
    if cfg.model.name not in DIFFUSERS_FAMILIES:
        return base_path / "synthetic.safetensors"
    m, s = cfg.model, cfg.sampler
    key = json.dumps(
        [
            m.name,
            str(base_path),
            m.revision,
            m.resolution,
            m.height,
            m.width,
            m.frames,
            m.dtype,
            cfg.data.prompts,
            cfg.data.synthetic_per_prompt,
            s.eval_steps,
            s.cfg_scale,
            s.grid,
            s.shift,
            cfg.seed,
            *([cfg.data.condition_images] if cfg.data.condition_images else []),
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root(m.cache_dir) / "synthetic" / f"{m.name}-{digest}.safetensors"


def synthesize_for(cfg: RunConfig, gen: Generator, data: TaskData, path: Path, log=print):
    """Generate the synthetic regulariser set of ``cfg`` (resumable) into ``path``."""
    return synthesize(
        gen.to(device_of(cfg)),
        data.prompts,
        cfg.data.synthetic_per_prompt,
        cfg.sampler,
        cfg.seed + 1,
        path,
        device=device_of(cfg),
        log=log,
        model_id=model_id(cfg),
        progress=cfg.train.progress,
    )


def model_id(cfg: RunConfig) -> str:
    """What identifies the base's weights and precision in cache keys (latents, synthetic
    shards): family, base, revision, dtype."""
    m = cfg.model
    return f"{m.name}:{m.base}@{m.revision}:{m.dtype}"


def encoded_set(cfg: RunConfig, gen: Generator, images: str, log=print) -> PairedPool:
    """A user's image/video-caption set (``images``) VAE-encoded once into cached latents."""
    m = cfg.model
    return latent_pool(
        dataclasses.replace(cfg.data, images=images),
        gen.codec,
        model_id(cfg),
        gen.resolution,
        getattr(gen, "frames", 0),
        cache_root(m.cache_dir),
        log,
        batch=m.vae_batch,
    )


def build_pool(cfg: RunConfig, gen: Generator, base_path: Path, data: TaskData, log=print):
    """The data term's p̃_data in model space: the task's real data (embedded sets encoded
    now; a user's image/video-caption set VAE-encoded once into cached latents), or the
    synthetic set (generated on first use for the diffusers families)."""
    if cfg.data.source == "real":
        if data.train is not None:
            return PairedPool(gen.codec.encode(data.train.x), data.train.prompts)
        return encoded_set(cfg, gen, cfg.data.images, log)
    path = synthetic_path(cfg, base_path)
    if not path.is_file() and cfg.model.name in DIFFUSERS_FAMILIES:
        log(f"no synthetic data at {path}: generating it from the base model once (ddrl synth)")
        return synthesize_for(cfg, gen, data, path, log)
    return load_pool(path)


def build_components(cfg: RunConfig, log=print, training: bool = True) -> Components:
    """Everything ``cfg`` names, built (and cached) before any run folder is touched. The data
    pool only when ``training`` with a loss that uses data: evaluation and export, and
    Flow-GRPO, GRPO and DanceGRPO, never build, generate or draw a data set."""
    gen, base_path = load_base(cfg, log)
    data = load_data(cfg.data)
    needs_data = training and needs(cfg.algorithm, cfg.objective, cfg.regularisers)["data"]
    frames = {}  # conditional frames asked for: key → (count, the prompts whose items give them)
    if training and cfg.model.cond_frames[1]:
        frames["model.cond_frames"] = (cfg.model.cond_frames[1], data.prompts)
    if cfg.eval.cond_frames:
        frames["eval.cond_frames"] = (cfg.eval.cond_frames, data.eval_prompts or data.prompts)
    for key, (n, _) in frames.items():
        check_cond_frames(key, n, cfg.model.name, gen)
    pool = build_pool(cfg, gen, base_path, data, log) if needs_data or frames else None
    for key, (_, prompts) in frames.items():
        if not pool.covers(prompts):
            raise DDRLError(
                f"{key} takes the frames from a data item of each prompt, but the data's "
                "captions do not cover the prompts; allowed: data whose captions are the "
                "prompts (files with captions, synthetic), or 0"
            )
    r = cfg.reward
    device = device_of(cfg) if r.device == "auto" else r.device
    root = cache_root(cfg.model.cache_dir)
    reward = build_rewards(r, RewardContext(cfg.data.name, root, device, r))
    ood = None
    if cfg.eval.rewards:
        o = dataclasses.replace(r, name=cfg.eval.rewards, weights="")
        ood = build_rewards(o, RewardContext(cfg.data.name, root, device, o))
    heldout = encoded_set(cfg, gen, cfg.data.eval_images, log) if cfg.data.eval_images else None
    embed = None
    if cfg.eval.features:
        fr = dataclasses.replace(r, name=cfg.eval.features, model=cfg.eval.features_model)
        model = build_reward(cfg.eval.features, RewardContext(cfg.data.name, root, device, fr))
        if not hasattr(model, "features"):
            raise DDRLError(
                f"eval.features={cfg.eval.features!r} has no image features; allowed: "
                "clipscore, pickscore, hpsv2 (CLIP image towers)"
            )
        embed = model.features
    for r in [*reward.rewards, *(ood.rewards if ood else [])]:  # a reward service: is it up?
        if callable(getattr(r, "health", None)):
            r.health()
    gold = build_gold(cfg.gold)
    return Components(gen, base_path, data, pool, reward, gold, ood, heldout, embed, needs_data)


def check_cond_frames(key: str, n: int, family: str, gen: Generator) -> None:
    """Up to ``n`` conditional frames (config key ``key``) need a family with conditional
    frames, and fewer of them than the sample's latent frames [C, T, h, w]."""
    shape = gen.sample_shape
    if not callable(getattr(gen, "condition_frames", None)) or len(shape) != 4:
        raise DDRLError(
            f"{key} asks for conditional frames, which model.name={family!r} does not take; "
            "allowed: 0 here (conditional frames: cosmos)"
        )
    if n >= shape[1]:
        raise DDRLError(
            f"{key} asks for {n} conditional frames: at most {shape[1] - 1} of the sample's "
            f"{shape[1]} latent frames can be given"
        )

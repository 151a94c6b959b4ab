"""Synthetic regulariser data: samples generated once from the base model before RL.

The paper reports that DDRL's data term works with synthetic data (its SD3.5 setting). A pool
is stored as one safetensors file: the samples (model space) as a tensor and their text prompts
as JSON in the file's metadata, so any prompt set fits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..checkpoint import save_file_atomic
from ..errors import DDRLError
from .base import PairedPool


def generate_pool(gen, prompts: list[str], per_prompt: int, sampler_cfg, seed: int, device="cpu"):
    """``per_prompt`` ODE samples of the base for every prompt: PairedPool [P·n, ...] in model
    space. Samples are decoded, clamped to the codec's valid range and re-encoded, so the pool
    holds what a real image would encode to (for digits: pixels in [-1, 1])."""
    from ..models import decode_images
    from ..rollout import sample_ode

    rep = [p for p in prompts for _ in range(per_prompt)]
    g = torch.Generator().manual_seed(seed)
    z = sample_ode(gen, rep, sampler_cfg, g, device)
    return PairedPool(gen.codec.encode(decode_images(gen.codec, z)).cpu(), rep)


def save_pool(pool: PairedPool, path: Path) -> None:
    """Write x and the prompts (metadata) atomically."""
    meta = {"prompts": json.dumps(pool.prompts)}
    save_file_atomic({"x": pool.x.contiguous()}, Path(path), metadata=meta)


def load_pool(path: Path) -> PairedPool:
    path = Path(path)
    if not path.is_file():
        raise DDRLError(
            f"no synthetic data at {path}; run `ddrl synth` first or set data.source=real"
        )
    try:
        x = load_file(path)["x"]
        with safe_open(str(path), "pt") as f:
            prompts = json.loads((f.metadata() or {})["prompts"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise DDRLError(f"corrupt synthetic data {path}: {e}".splitlines()[0]) from e
    return PairedPool(x, prompts)

"""A pool on disk: one safetensors file with the samples (model space) as tensor ``x`` and their
prompts as JSON in the metadata (synthetic sets and cached latents both use it)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ddrl.data.pools import PairedPool
from ddrl.errors import DDRLError, first_line
from ddrl.io import save_file_atomic


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
        raise DDRLError(f"corrupt synthetic data {path}: {first_line(e)}") from e
    return PairedPool(x, prompts)

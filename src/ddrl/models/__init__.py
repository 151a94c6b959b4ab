"""Model families by name; "module:Class" names a user Generator class with ``from_pretrained``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DDRLError, check_range, lookup
from .base import (
    Codec,
    Cond,
    CondCache,
    Conditioner,
    Denoiser,
    Generator,
    IdentityCodec,
    clamp_images,
    decode_images,
    guided_velocity,
)
from .digits import DigitsGenerator
from .toy2d import Toy2DGenerator

MODELS = {"digits": DigitsGenerator, "toy2d": Toy2DGenerator}

__all__ = [
    "MODELS",
    "Codec",
    "Cond",
    "CondCache",
    "Conditioner",
    "Denoiser",
    "Generator",
    "IdentityCodec",
    "ModelConfig",
    "clamp_images",
    "decode_images",
    "guided_velocity",
    "load_generator",
    "resolve",
]


@dataclass
class ModelConfig:
    """Which generator is trained, and from which weights."""

    name: str = "digits"  # model family: digits | toy2d | "module:Class" (a Generator class)
    base: str = ""  # saved generator folder to start from; "" = the family's cached base
    resolution: int = 0  # pixels per side of a sample; 0 = the family's native size
    cache_dir: str = ""  # base and reward models; "" = $DDRL_CACHE or ~/.cache/ddrl

    def check(self) -> None:
        resolve(self.name)
        check_range("model.resolution", self.resolution, 0)
        if self.name not in MODELS and not self.base:
            raise DDRLError(
                f"model.name={self.name!r} is a plugin: set model.base to its weights folder "
                f"(only {', '.join(MODELS)} are pretrained here)"
            )


def resolve(name: str):
    """A registered family name, or "package.module:Attr" for a user plugin."""
    cls = lookup("model", name, MODELS)
    if not hasattr(cls, "from_pretrained"):
        raise DDRLError(
            f"model {name!r} is not a Generator class (no from_pretrained); "
            f"allowed: {', '.join(MODELS)} or 'module:Class' naming one"
        )
    return cls


def load_generator(path: str | Path, name: str = "", resolution: int = 0) -> Generator:
    """Load a saved generator; its generator.json names the family unless ``name`` is given."""
    path = Path(path)
    meta_path = path / "generator.json"
    if not name:
        if not meta_path.is_file():
            raise DDRLError(f"no model at {path} (missing generator.json)")
        try:
            name = json.loads(meta_path.read_text())["type"]
        except (json.JSONDecodeError, KeyError) as e:
            raise DDRLError(f"corrupt {meta_path}: {e}") from e
    return resolve(name).from_pretrained(path, resolution=resolution)

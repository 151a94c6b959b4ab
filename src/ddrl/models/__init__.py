"""Model families by name; "module:Class" names a user Generator class with ``from_pretrained``."""

from __future__ import annotations

import json
from pathlib import Path

from ddrl.errors import DDRLError, lookup
from ddrl.models.base import (
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
from ddrl.models.config import LoraConfig, ModelConfig
from ddrl.models.digits import DigitsGenerator
from ddrl.models.toy2d import Toy2DGenerator

# Diffusers families load lazily ("module:attr"): importing ddrl does not import them.
DIFFUSERS_FAMILIES = {
    "sd3": "ddrl.models.sd3:SD3Generator",
    "flux": "ddrl.models.flux:FluxGenerator",
    "cosmos": "ddrl.models.cosmos:CosmosGenerator",
    "wan": "ddrl.models.wan:WanGenerator",
}
MODELS = {"digits": DigitsGenerator, "toy2d": Toy2DGenerator, **DIFFUSERS_FAMILIES}
# diffusers pipeline class (model_index.json "_class_name") → family name
PIPELINES = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "Cosmos2_5_PredictBasePipeline": "cosmos",
    "WanPipeline": "wan",
}

__all__ = [
    "DIFFUSERS_FAMILIES",
    "MODELS",
    "PIPELINES",
    "Codec",
    "Cond",
    "CondCache",
    "Conditioner",
    "Denoiser",
    "Generator",
    "IdentityCodec",
    "LoraConfig",
    "ModelConfig",
    "clamp_images",
    "decode_images",
    "family_of",
    "guided_velocity",
    "load_generator",
    "resolve",
]


def resolve(name: str):
    """A registered family name, or "package.module:Attr" for a user plugin."""
    cls = lookup("model", name, MODELS)
    if name in DIFFUSERS_FAMILIES:  # a built-in diffusers family, imported on first use
        cls = lookup("model", cls, {})
    if not hasattr(cls, "from_pretrained"):
        raise DDRLError(
            f"model {name!r} is not a Generator class (no from_pretrained); "
            f"allowed: {', '.join(MODELS)} or 'module:Class' naming one"
        )
    return cls


def family_of(path: str | Path) -> str:
    """The family a folder holds: generator.json's "type" (saved by ddrl) or, for a diffusers
    pipeline folder, its model_index.json "_class_name"."""
    path = Path(path)
    meta_path, index = path / "generator.json", path / "model_index.json"
    try:
        if meta_path.is_file():
            return json.loads(meta_path.read_text())["type"]
        if index.is_file():
            cls = json.loads(index.read_text()).get("_class_name")
            if cls not in PIPELINES:
                raise DDRLError(
                    f"{path} holds a {cls}; supported pipelines: {', '.join(PIPELINES)}"
                )
            return PIPELINES[cls]
    except (json.JSONDecodeError, KeyError) as e:
        raise DDRLError(f"corrupt {meta_path if meta_path.is_file() else index}: {e}") from e
    raise DDRLError(f"no model at {path} (no generator.json or model_index.json)")


def load_generator(
    path: str | Path, name: str = "", config: ModelConfig | None = None
) -> Generator:
    """Load a saved generator or pipeline folder; its family comes from the folder unless
    ``name`` is given. ``config``: the run's model section (resolution, LoRA, precision)."""
    return resolve(name or family_of(path)).from_pretrained(path, config=config)

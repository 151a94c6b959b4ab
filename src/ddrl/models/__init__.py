"""Model families by name, each a "module:Class" string imported on first use (so naming or
checking one loads no model code); "module:Class" also names a user Generator class with
``from_pretrained``. The protocol they follow is ``ddrl.models.base``."""

from __future__ import annotations

import json
from pathlib import Path

from ddrl.errors import DDRLError, lookup

EMBEDDED = {  # trained from scratch here (``ddrl.training.pretrain``), no downloads
    "digits": "ddrl.models.digits:DigitsGenerator",
    "toy2d": "ddrl.models.toy2d:Toy2DGenerator",
}
DIFFUSERS_FAMILIES = {  # diffusers pipelines: a hub id, a folder, or "tiny"
    "sd3": "ddrl.models.sd3:SD3Generator",
    "flux": "ddrl.models.flux:FluxGenerator",
    "cosmos": "ddrl.models.cosmos:CosmosGenerator",
    "wan": "ddrl.models.wan:WanGenerator",
    "qwen_image": "ddrl.models.qwen_image:QwenImageGenerator",
    "qwen_image_edit": "ddrl.models.qwen_image_edit:QwenImageEditGenerator",
    "flux2": "ddrl.models.flux2:Flux2Generator",
    "flux2_klein": "ddrl.models.flux2:Flux2KleinGenerator",
    "z_image": "ddrl.models.z_image:ZImageGenerator",
}
MODELS = {**EMBEDDED, **DIFFUSERS_FAMILIES}
# diffusers pipeline class (model_index.json "_class_name") → family name
PIPELINES = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "Cosmos2_5_PredictBasePipeline": "cosmos",
    "WanPipeline": "wan",
    "QwenImagePipeline": "qwen_image",
    "QwenImageEditPlusPipeline": "qwen_image_edit",
    "Flux2Pipeline": "flux2",
    "Flux2KleinPipeline": "flux2_klein",
    "ZImagePipeline": "z_image",
}


def check_model_name(name: str) -> None:
    """Fail fast on a model name: a built-in (nothing imported) or a "module:Class" plugin."""
    if name not in MODELS:
        resolve(name)


def resolve(name: str):
    """The Generator class of a registered family name, or of "package.module:Attr"."""
    cls = lookup("model", name, MODELS)
    if name in MODELS:  # a built-in, imported on first use
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


def load_generator(path: str | Path, name: str = "", config=None):
    """Load a saved generator or pipeline folder; its family comes from the folder unless
    ``name`` is given. ``config``: the run's model section (resolution, LoRA, precision)."""
    return resolve(name or family_of(path)).from_pretrained(path, config=config)

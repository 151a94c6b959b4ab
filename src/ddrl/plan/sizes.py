"""What a run's model is, without its weights: parameter counts from the published configs
(``ddrl.models.shapes``) instantiated on PyTorch's ``meta`` device, LoRA adapter sizes, text
encoder sizes, and the sample geometry (latent size, tokens) of the configured size.

``model.base`` is looked up in ``HUB_IDS`` (hub id → checkpoint), else a local pipeline folder
is read (its ``*/config.json``, never its weights), else a checkpoint whose name the base
contains, else the family's published default (said in the note). A tiny base ("tiny",
"tiny:VARIANT") is the family's tiny pipeline, built from config into the cache as ``train``
builds it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ddrl.errors import DDRLError
from ddrl.models import shapes

HUB_IDS = {  # model.base (hub id) → shapes/<checkpoint>.json
    "stabilityai/stable-diffusion-3.5-medium": "sd3.5-medium",
    "stabilityai/stable-diffusion-3.5-large": "sd3.5-large",
    "black-forest-labs/FLUX.1-dev": "flux.1-dev",
    "black-forest-labs/FLUX.2-dev": "flux.2-dev",
    "black-forest-labs/FLUX.2-klein-4B": "flux.2-klein-4b",
    "black-forest-labs/FLUX.2-klein-9B": "flux.2-klein-9b",
    "black-forest-labs/FLUX.2-klein-base-4B": "flux.2-klein-base-4b",
    "nvidia/Cosmos-Predict2.5-2B": "cosmos-predict2.5-2b",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan2.1-t2v-1.3b",
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": "wan2.1-t2v-14b",
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": "wan2.2-t2v-a14b",
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": "wan2.2-ti2v-5b",
    "Qwen/Qwen-Image": "qwen-image",
    "Qwen/Qwen-Image-Edit-2509": "qwen-image-edit-2509",
    "Tongyi-MAI/Z-Image": "z-image",
    "Tongyi-MAI/Z-Image-Turbo": "z-image-turbo",
}
FAMILY_DEFAULT = shapes.DEFAULT_CHECKPOINT  # the published checkpoint a family falls back to
CLASSES = {  # pipeline → (transformer class, VAE class) in diffusers
    "StableDiffusion3Pipeline": ("SD3Transformer2DModel", "AutoencoderKL"),
    "FluxPipeline": ("FluxTransformer2DModel", "AutoencoderKL"),
    "Cosmos2_5_PredictBasePipeline": ("CosmosTransformer3DModel", "AutoencoderKLWan"),
    "WanPipeline": ("WanTransformer3DModel", "AutoencoderKLWan"),
    "QwenImagePipeline": ("QwenImageTransformer2DModel", "AutoencoderKLQwenImage"),
    "QwenImageEditPlusPipeline": ("QwenImageTransformer2DModel", "AutoencoderKLQwenImage"),
    "Flux2Pipeline": ("Flux2Transformer2DModel", "AutoencoderKLFlux2"),
    "Flux2KleinPipeline": ("Flux2Transformer2DModel", "AutoencoderKLFlux2"),
    "ZImagePipeline": ("ZImageTransformer2DModel", "AutoencoderKL"),
}
# Text encoders: parameters, what, where the number comes from. "computed": counted on the meta
# device (docs/MODELS.md §2); "approximate": the model card's headline size.
_SD3_TEXT = (5_581e6, "CLIP-L + OpenCLIP bigG + T5-XXL encoder", "computed (docs/MODELS.md §2)")
_QWEN25VL = (8_292e6, "Qwen2.5-VL-7B (language + vision)", "computed (docs/MODELS.md §2)")
_QWEN3_4B = (4_022e6, "Qwen3-4B", "computed from shapes/z-image.json text_encoder (36 × 2560)")
_UMT5 = (5_681e6, "umT5-XXL encoder", "computed (docs/MODELS.md §2)")
TEXT_ENCODERS = {
    "sd3.5-medium": _SD3_TEXT,
    "sd3.5-large": _SD3_TEXT,
    "flux.1-dev": (4_885e6, "CLIP-L + T5-XXL encoder", "computed (docs/MODELS.md §2)"),
    "cosmos-predict2.5-2b": (*_QWEN25VL[:2], "computed: Cosmos-Reason1-7B (docs/MODELS.md §2)"),
    "wan2.1-t2v-1.3b": _UMT5,
    "wan2.1-t2v-14b": _UMT5,
    "wan2.2-t2v-a14b": _UMT5,
    "wan2.2-ti2v-5b": _UMT5,
    "qwen-image": _QWEN25VL,
    "qwen-image-edit-2509": _QWEN25VL,
    "flux.2-dev": (
        24.0e9,
        "Mistral-Small-3.2-24B (Mistral3ForConditionalGeneration)",
        "approximate (model card: 24B; shapes/flux.2-dev.json source)",
    ),
    "flux.2-klein-4b": _QWEN3_4B,
    "flux.2-klein-base-4b": _QWEN3_4B,
    "flux.2-klein-9b": (8.19e9, "Qwen3-8B", "approximate (model card: 8.2B)"),
    "z-image": _QWEN3_4B,
    "z-image-turbo": _QWEN3_4B,
}
VIDEO_NATIVE = {"wan": (480, 832, 81), "cosmos": (704, 1280, 93)}  # the pipelines' defaults
TEXT_TOKENS = {"sd3": 77 + 256, "flux": 512}  # joint-attention text tokens at the defaults
CROSS_ATTENTION = ("wan", "cosmos")  # text enters by cross-attention: not in the sequence


@dataclass
class ModelFacts:
    """Everything the memory model needs about the configured model."""

    checkpoint: str  # shapes name, "tiny:<family>", or a folder
    note: str
    pipeline: str
    transformers: dict[str, dict] = field(default_factory=dict)  # component → config
    vae: dict = field(default_factory=dict)
    text_encoder: tuple = (0.0, "", "")
    native: tuple[int, int, int] = (1024, 1024, 0)


def locate(m) -> ModelFacts:
    """The configs of ``model`` (a ``ModelConfig``): see the module doc for the lookup order."""
    base = m.base
    if base == "tiny" or base.startswith("tiny:"):
        from ddrl.data.config import cache_root
        from ddrl.models import resolve
        from ddrl.models.hf import ensure_tiny

        family, variant = resolve(m.name), base.partition(":")[2]
        if variant not in family.tiny_variants:
            raise DDRLError(f"model.base={base!r} for {m.name}: no such tiny variant")
        path = ensure_tiny(family, cache_root(m.cache_dir), lambda *a: None, variant)
        facts = _folder(path, f"{base} ({m.name}, built from config)")
        facts.text_encoder = (_folder_text_params(path), "tiny text encoders", "computed")
        return facts
    if base == "random" or base.startswith("random:"):  # real shapes, random weights
        from ddrl.models import resolve
        from ddrl.models.random_base import random_checkpoint

        name = random_checkpoint(resolve(m.name), base)
        return _published(name, f"model.base {base}: {name}'s shapes, RANDOM weights")
    if base in HUB_IDS:
        return _published(HUB_IDS[base], f"model.base {base}")
    local = Path(os.path.expanduser(base))
    if (local / "model_index.json").is_file():
        facts = _folder(local, f"folder {base}")
        return facts
    low = Path(base).name.lower().removesuffix("-diffusers")
    hits = [c for c in shapes.checkpoints() if c in low or low == c]
    if hits:
        name = max(hits, key=len)
        return _published(name, f"model.base {base!r} read as the published {name}")
    name = FAMILY_DEFAULT.get(m.name)
    if name is None:
        raise DDRLError(
            f"ddrl plan: no published config for model.name={m.name!r}; allowed: "
            f"{', '.join(FAMILY_DEFAULT)}"
        )
    return _published(name, f"model.base {base!r} unknown: planned as {m.name}'s {name}")


def _published(name: str, note: str) -> ModelFacts:
    real = shapes.real_config(name)
    trs = {k: real[k] for k in ("transformer", "transformer_2") if k in real}
    family = _family_of(real["pipeline"])
    native = VIDEO_NATIVE.get(family)
    if native is None:
        side = real["vae"].get("sample_size") or 1024
        native = (side, side, 0)
    return ModelFacts(
        name,
        note,
        real["pipeline"],
        trs,
        real["vae"],
        TEXT_ENCODERS.get(name, (0, "?", "?")),
        native,
    )


def _folder(path: Path, note: str) -> ModelFacts:
    index = json.loads((path / "model_index.json").read_text())
    trs = {}
    for k in ("transformer", "transformer_2"):
        f = path / k / "config.json"
        if isinstance(index.get(k), list) and index[k][0] and f.is_file():
            trs[k] = {a: b for a, b in json.loads(f.read_text()).items() if not a.startswith("_")}
    vae = json.loads((path / "vae" / "config.json").read_text())
    family = _family_of(index["_class_name"])
    h, w, n = VIDEO_NATIVE.get(family, (0, 0, 0))
    defaults = path / "ddrl_defaults.json"
    if defaults.is_file():
        d = json.loads(defaults.read_text())
        h, w, n = d.get("height", h), d.get("width", w), d.get("frames", n) or n
    if not h:
        h = w = vae.get("sample_size") or 1024
    return ModelFacts(str(path), note, index["_class_name"], trs, vae, (0, "", ""), (h, w, n))


def _folder_text_params(path: Path) -> float:
    """Parameters of a folder's text encoders, counted from their safetensors headers."""
    total = 0
    for f in path.glob("text_encoder*/*.safetensors"):
        with open(f, "rb") as fh:
            head = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for k, v in head.items():
            if k != "__metadata__":
                n = 1
                for d in v["shape"]:
                    n *= d
                total += n
    return float(total)


def _family_of(pipeline: str) -> str:
    from ddrl.models import PIPELINES

    return PIPELINES[pipeline]


def meta_module(pipeline: str, config: dict, part: int = 0):
    """The diffusers transformer (part 0) or VAE (part 1) of ``config`` on the meta device."""
    import diffusers
    import torch

    cls = getattr(diffusers, CLASSES[pipeline][part])
    with torch.device("meta"):
        return cls(**config)


def count(module) -> tuple[int, int]:
    """(parameters, buffer elements) of a module."""
    return (
        sum(p.numel() for p in module.parameters()),
        sum(b.numel() for b in module.buffers()),
    )


def lora_params(module, targets: list[str] | tuple[str, ...], rank: int) -> int:
    """A = Σ r·(d_in + d_out) over the linear layers whose name is a target or ends with
    ".target" (peft's matching)."""
    import torch

    total = 0
    for name, mod in module.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(
            name == t or name.endswith("." + t) for t in targets
        ):
            total += rank * (mod.in_features + mod.out_features)
    return total


def dims(tc: dict) -> tuple[int, int]:
    """(blocks L, width h) of a transformer config: every block the tokens pass through."""
    layers = (tc.get("num_layers") or tc.get("n_layers") or 0) + (tc.get("num_single_layers") or 0)
    layers += 2 * (tc.get("n_refiner_layers") or 0)  # Z-Image: noise and context refiners
    heads, head_dim = tc.get("num_attention_heads"), tc.get("attention_head_dim")
    hidden = heads * head_dim if heads and head_dim else tc.get("dim") or tc.get("hidden_size")
    return layers, int(hidden)

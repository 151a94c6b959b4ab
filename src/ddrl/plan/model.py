"""The configured model in numbers: parameter counts (meta device), LoRA size, text encoders,
and the sample geometry (pixels, latent elements, tokens) of the configured size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ddrl.models import EMBEDDED
from ddrl.plan.sizes import (
    CROSS_ATTENTION,
    TEXT_TOKENS,
    count,
    dims,
    locate,
    lora_params,
    meta_module,
)

_MODULES: dict = {}  # (checkpoint, component) → meta module: suggestions re-run cheaply


@dataclass
class ModelNumbers:
    family: str
    checkpoint: str
    note: str
    trained: float  # parameters of the trained transformer(s)
    trained_buffers: float
    frozen: float  # parameters + buffers of transformers used but not trained (Wan2.2 expert)
    lora: float  # adapter parameters A at the configured rank and targets (LoRA runs; else 0)
    forward_params: float  # parameters one denoiser forward uses (one expert)
    text: float
    text_what: str
    text_source: str
    vae: float
    vae_width: int  # channels of the VAE decoder's full-resolution stage
    layers: int
    hidden: int
    height: int
    width: int
    frames: int  # 0 for images
    latent: int  # elements of one latent sample
    tokens: int  # sequence length s of one transformer forward (image/video + joint text)
    cross_tokens: int  # text tokens reached by cross-attention (video families)
    video_vae: bool  # a causal video VAE decodes a few frames at a time

    @property
    def pixels(self) -> int:
        return self.height * self.width * max(self.frames, 1)


def _module(key: tuple, build):
    if key not in _MODULES:
        _MODULES[key] = build()
    return _MODULES[key]


def model_numbers(m) -> ModelNumbers:
    """The numbers of ``m`` (a ``ModelConfig``)."""
    if m.name in EMBEDDED:
        return _embedded(m)
    from ddrl.models import PIPELINES, resolve

    facts = locate(m)
    family = PIPELINES[facts.pipeline]
    cls = resolve(m.name)
    names = cls.trained_names(m) if len(facts.transformers) > 1 else ("transformer",)
    targets = [t.strip() for t in m.lora.target_modules.split(",") if t.strip()]
    targets = targets or list(cls.lora_default_targets)
    trained = buffers = frozen = lora = 0
    for comp, tc in facts.transformers.items():
        mod = _module((facts.checkpoint, comp), lambda tc=tc: meta_module(facts.pipeline, tc))
        p, b = count(mod)
        if comp in names:
            trained, buffers = trained + p, buffers + b
            if m.finetune == "lora":
                lora += lora_params(mod, targets, m.lora.rank)
        else:
            frozen += p + b
    first = facts.transformers["transformer"]
    fwd = count(_module((facts.checkpoint, "transformer"), lambda: None))[0]
    vae = _module((facts.checkpoint, "vae"), lambda: meta_module(facts.pipeline, facts.vae, 1))
    layers, hidden = dims(first)
    v = facts.vae
    nh, nw, nf = facts.native
    height, width = m.size((nh, nw))
    frames = (m.frames or nf) if nf else 0
    if "temperal_downsample" in v:
        f = v.get("scale_factor_spatial") or 2 ** len(v["temperal_downsample"])
    else:
        f = 2 ** (len(v["block_out_channels"]) - 1)
    tf = v.get("scale_factor_temporal") or 4
    t_lat = (frames - 1) // tf + 1 if frames else 1
    channels = v.get("latent_channels") or v.get("z_dim")
    latent = channels * t_lat * (height // f) * (width // f)
    image_tokens = t_lat * (height // (2 * f)) * (width // (2 * f))  # 2×2 patches / packing
    text = m.max_sequence_length or 512
    if family == "sd3":
        text = 77 + (m.max_sequence_length or TEXT_TOKENS["sd3"] - 77)
    cross = text if family in CROSS_ATTENTION else 0
    tokens = image_tokens + (0 if cross else text)
    if family == "qwen_image_edit":  # the condition image's latents join the sequence
        tokens += image_tokens
    width0 = v.get("decoder_base_dim") or v.get("base_dim") or v["block_out_channels"][0]
    return ModelNumbers(
        family, facts.checkpoint, facts.note, trained, buffers, frozen, lora, fwd,
        facts.text_encoder[0], facts.text_encoder[1], facts.text_encoder[2], count(vae)[0],
        width0, layers, hidden, height, width, frames, latent, tokens, cross,
        "temperal_downsample" in v and bool(frames),
    )  # fmt: skip


def _embedded(m) -> ModelNumbers:
    """digits / toy2d: the generator itself built on the meta device."""
    import torch

    from ddrl.models import resolve

    gen = _module((m.name, "generator"), lambda: _meta(resolve(m.name)))
    p, b = count(gen.denoiser)
    tr = getattr(gen.denoiser, "transformer", None)
    if tr is not None:
        layers, hidden = dims(dict(tr.config))
        tokens = math.prod(gen.sample_shape[1:]) // tr.config.patch_size**2 + 2
    else:
        linears = [x for x in gen.denoiser.modules() if isinstance(x, torch.nn.Linear)]
        layers, hidden, tokens = len(linears), max(x.out_features for x in linears), 1
    lora = 0
    cond = gen.conditioner
    text = float(sum(x.numel() for x in cond.parameters())) if hasattr(cond, "parameters") else 0.0
    side = gen.sample_shape[-1] if len(gen.sample_shape) > 1 else 1
    return ModelNumbers(
        m.name, m.name, f"{m.name}: trained from scratch here, counted on the meta device",
        p, b, 0, lora, p, text, "class tokens" if text else "none", "computed", 0, 0,
        layers, hidden, side, side, 0, math.prod(gen.sample_shape), tokens, 0, False,
    )  # fmt: skip


def _meta(cls):
    import torch

    with torch.device("meta"):
        return cls()

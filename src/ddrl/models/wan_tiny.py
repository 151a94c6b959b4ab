"""The tiny Wan pipelines (``model.base`` "tiny", "tiny:a14b", "tiny:ti2v"): the published
configs with only sizes shrunk (``ddrl.models.shapes.shrink``), a 1-layer UMT5 and a
character-level T5 tokenizer; the tiny Wan2.1 VAE is Cosmos' too."""

from __future__ import annotations

import json
from pathlib import Path

from ddrl.models import shapes
from ddrl.models.hf import DEFAULTS_FILE

# The tiny checkpoints: model.base "tiny" / "tiny:<variant>" → published config, native size.
TINY_VARIANTS = {
    "": ("wan2.1-t2v-1.3b", {"height": 32, "width": 32, "frames": 5}),
    "a14b": ("wan2.2-t2v-a14b", {"height": 32, "width": 32, "frames": 5}),
    "ti2v": ("wan2.2-ti2v-5b", {"height": 64, "width": 64, "frames": 5}),  # VAE factor 16
}
TINY_TRANSFORMER = {  # sizes only (shapes.SIZE_KEYS); 12 = the smallest head the 3-axis RoPE
    "num_layers": 1,  # splits into (4, 4, 4)
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "ffn_dim": 32,
    "freq_dim": 16,
    "text_dim": 16,
}
TINY_VAE = {"base_dim": 4, "num_res_blocks": 1}
TINY_VAE_22 = {"decoder_base_dim": 4}  # the z_dim-48 VAE's separate decoder width (a size)


def build_tiny_pipeline(path: Path, variant: str = "") -> None:
    """A tiny Wan pipeline from a published config with only sizes shrunk
    (``TINY_VARIANTS``): "" = Wan2.1-T2V-1.3B (16 latent channels, patch (1, 2, 2),
    qk-norm across heads, cross-attention norm, the Wan2.1 VAE's four stages and temporal
    downsampling, latents mean/std), "a14b" = two such experts with boundary_ratio 0.875,
    "ti2v" = the TI2V-5B (48 latent channels, the z_dim-48 VAE with spatial factor 16,
    expand_timesteps). A 1-layer UMT5 and a character-level T5 tokenizer encode text."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from ddrl.models.tiny_text import t5_tokenizer

    name, size = TINY_VARIANTS[variant]
    cfg = tiny_configs(name)
    tok = t5_tokenizer()
    text = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tok),
            d_model=cfg["transformer"]["text_dim"],
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    parts = {"transformer": WanTransformer3DModel(**cfg["transformer"])}
    if "transformer_2" in cfg:
        parts["transformer_2"] = WanTransformer3DModel(**cfg["transformer_2"])
    pipe = WanPipeline(
        tokenizer=tok,
        text_encoder=text,
        vae=_vae(cfg["vae"]),
        scheduler=UniPCMultistepScheduler(**cfg["scheduler"]),
        **parts,
        **{k: v for k, v in cfg["pipeline_config"].items() if v is not None},
    )
    pipe.save_pretrained(path, safe_serialization=True)
    (Path(path) / DEFAULTS_FILE).write_text(json.dumps(size))


def tiny_configs(checkpoint: str) -> dict:
    """The published configs of ``checkpoint`` (``shapes/<checkpoint>.json``) with only sizes
    shrunk (``TINY_TRANSFORMER``, ``TINY_VAE``): the tiny pipeline's parts."""
    real = shapes.real_config(checkpoint)
    out = {k: real[k] for k in ("scheduler", "pipeline_config")}
    for part in ("transformer", "transformer_2"):
        if part in real:
            out[part] = shapes.shrink(real[part], **TINY_TRANSFORMER)
    vae = shapes.shrink(real["vae"], **TINY_VAE)
    if vae.get("decoder_base_dim") is not None:  # the z_dim-48 VAE's own decoder width
        vae = shapes.shrink(vae, **TINY_VAE_22)
    out["vae"] = vae
    return out


def _vae(config: dict):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**config)


def tiny_wan_vae(checkpoint: str):
    """A tiny AutoencoderKLWan from a published config (e.g. "wan2.1-t2v-1.3b": the Wan2.1 VAE
    shrunk, 16 latent channels, its real stages, temporal downsampling and latents mean/std;
    Cosmos-Predict2.5 uses this VAE)."""
    return _vae(tiny_configs(checkpoint)["vae"])

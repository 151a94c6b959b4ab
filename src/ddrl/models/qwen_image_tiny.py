"""The tiny Qwen-Image / Qwen-Image-Edit pipelines' parts: the published configs with only sizes
shrunk (``ddrl.models.shapes.shrink``) and a tiny Qwen2.5-VL text encoder."""

from __future__ import annotations

TINY_TEXT_HIDDEN = 16
# Only sizes change (``ddrl.models.shapes.shrink``).
TINY_SIZES = {
    "transformer": dict(
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_TEXT_HIDDEN,
        axes_dims_rope=[4, 6, 6],  # even parts summing to the head width, 3 axes as published
    ),
    "vae": dict(base_dim=4, num_res_blocks=1),
}


def tiny_configs(checkpoint: str) -> dict:
    """The published configs of ``checkpoint`` with only sizes shrunk (``TINY_SIZES``)."""
    from ddrl.models.shapes import real_config, shrink

    real = real_config(checkpoint)
    return {
        "transformer": shrink(real["transformer"], **TINY_SIZES["transformer"]),
        "vae": shrink(real["vae"], **TINY_SIZES["vae"]),
        "scheduler": dict(real["scheduler"]),
    }


def tiny_parts(checkpoint: str, tokenizer=None) -> dict:
    """Transformer, VAE and scheduler from the shrunk published configs, plus the tokenizer."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )

    from ddrl.models.tiny_qwen import qwen_tokenizer

    c = tiny_configs(checkpoint)
    return {
        "transformer": QwenImageTransformer2DModel.from_config(c["transformer"]),
        "vae": AutoencoderKLQwenImage.from_config(c["vae"]),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(c["scheduler"]),
        "tokenizer": tokenizer or qwen_tokenizer(),
    }


def tiny_text_encoder(tok, vision: dict | None = None):
    """The tiny Qwen2.5-VL of width ``TINY_TEXT_HIDDEN`` for ``tok``; ``vision``: token ids of
    the vision specials (edit pipelines) and vision-tower sizes (``tiny_qwen25_vl``)."""
    from ddrl.models.tiny_qwen import tiny_qwen25_vl

    return tiny_qwen25_vl(tok, TINY_TEXT_HIDDEN, 2, vision=vision)

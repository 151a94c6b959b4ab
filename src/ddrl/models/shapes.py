"""Published configs of real checkpoints, and tiny models shrunk from them.

Each ``shapes/<checkpoint>.json`` holds facts copied from a published checkpoint: its
``source`` (where each config was read, with the commit or revision), the diffusers
``pipeline`` class, and the ``transformer`` (and ``transformer_2``), ``vae`` and ``scheduler``
``config.json`` values (the private ``_class_name`` / ``_diffusers_version`` keys dropped).

A tiny model is that config with only sizes changed (``shrink``): widths, depths, vocabulary and
the lists that scale with them, never a structural flag (qk-norm kind, guidance embedding, patch
size, latent channels, VAE scaling/shift, expert boundary ...). The tiny pipelines
(``DiffusersGenerator.build_tiny``) and the random real-shape bases are built from these
facts, so structure the real checkpoints have is exercised by every test on a tiny model.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from ddrl.errors import DDRLError

SHAPES_DIR = Path(__file__).parent / "shapes"
# family → its default published checkpoint: what "random" builds, what ``ddrl plan`` falls back
# to, and what the family's tiny pipeline is shrunk from (Wan's tiny variants name their own)
DEFAULT_CHECKPOINT = {
    "sd3": "sd3.5-medium",
    "flux": "flux.1-dev",
    "cosmos": "cosmos-predict2.5-2b",
    "wan": "wan2.1-t2v-1.3b",
    "qwen_image": "qwen-image",
    "qwen_image_edit": "qwen-image-edit-2509",
    "flux2": "flux.2-dev",
    "flux2_klein": "flux.2-klein-base-4b",  # a base model (CFG on), as the tiny
    "z_image": "z-image-turbo",
}

# Keys a tiny model may change: sizes only. A list-valued key must keep its length (the number
# of VAE stages, of RoPE axes), except the index lists of the layers that have an extra part
# (SD3.5's dual-attention layers), which are scaled down with the depth.
SIZE_KEYS = frozenset(
    {
        # depth
        "num_layers",
        "num_single_layers",
        "num_refiner_layers",
        "n_layers",
        "n_refiner_layers",
        "layers_per_block",
        "num_res_blocks",
        # width
        "attention_head_dim",
        "num_attention_heads",
        "num_key_value_heads",
        "dim",
        "n_heads",
        "n_kv_heads",
        "hidden_size",
        "intermediate_size",
        "ffn_dim",
        "freq_dim",
        "text_dim",
        "joint_attention_dim",
        "caption_projection_dim",
        "pooled_projection_dim",
        "cap_feat_dim",
        "text_embed_dim",
        "adaln_lora_dim",
        "crossattn_proj_in_channels",
        "encoder_hidden_states_channels",
        "timestep_guidance_channels",
        "block_out_channels",
        "base_dim",
        "decoder_base_dim",
        "norm_num_groups",
        "mlp_ratio",
        "axes_dims_rope",
        "axes_dims",
        "rope_axes_dim",
        "image_dim",
        # positions / sample size (how far the tiny model's positions reach)
        "sample_size",
        "pos_embed_max_size",
        "rope_max_seq_len",
        "max_size",
        "axes_lens",
        # vocabulary
        "vocab_size",
    }
)
INDEX_KEYS = frozenset({"dual_attention_layers"})  # scaled down with the depth


@cache
def _load(name: str) -> dict:
    path = SHAPES_DIR / f"{name}.json"
    if not path.is_file():
        have = sorted(p.stem for p in SHAPES_DIR.glob("*.json"))
        raise DDRLError(f"no published config {name!r}; allowed: {', '.join(have)}")
    return json.loads(path.read_text())


def real_config(name: str) -> dict:
    """The published configs of checkpoint ``name`` (a fresh copy): {"source", "pipeline",
    "transformer", "vae", "scheduler", ...}."""
    return json.loads(json.dumps(_load(name)))


def checkpoints() -> list[str]:
    """Every checkpoint with published configs here."""
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def shrink(config: dict, **sizes) -> dict:
    """``config`` with only size keys replaced (``SIZE_KEYS``; list-valued keys keep their
    length; ``INDEX_KEYS`` may shorten). Anything else is a structural flag: an error."""
    out = dict(config)
    for key, value in sizes.items():
        if key not in SIZE_KEYS and key not in INDEX_KEYS:
            raise DDRLError(f"shrink: {key!r} is structural, not a size (SIZE_KEYS)")
        if key not in config:
            raise DDRLError(f"shrink: {key!r} is not in the config (keys: {sorted(config)})")
        old = config[key]
        if key in SIZE_KEYS and isinstance(old, list | tuple) and len(old) != len(value):
            raise DDRLError(f"shrink: {key} must keep {len(old)} entries, got {value!r}")
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def structural_differences(real: dict, tiny: dict) -> list[str]:
    """Keys of ``real`` that ``tiny`` changes or drops although they are not sizes (what a test
    asserts is empty), plus list sizes whose length changed."""
    bad = []
    for key, value in real.items():
        if key.startswith("_"):
            continue
        if key not in tiny:
            bad.append(f"{key} missing")
        elif key in INDEX_KEYS:
            continue
        elif key in SIZE_KEYS:
            if isinstance(value, list | tuple) and len(value) != len(tiny[key]):
                bad.append(f"{key}: {len(value)} entries → {len(tiny[key])}")
        elif _norm(tiny[key]) != _norm(value):
            bad.append(f"{key}: {value!r} → {tiny[key]!r}")
    return bad


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def scaled_indices(indices: list[int], real_depth: int, tiny_depth: int) -> list[int]:
    """Layer indices (e.g. SD3.5's dual-attention layers 0..12 of 24) mapped onto a shallower
    model: index i → ⌊i·tiny/real⌋, deduplicated, so the same fraction of early layers keeps
    the extra part."""
    return sorted({i * tiny_depth // real_depth for i in indices})

"""Stable Diffusion 3 / 3.5 through diffusers' ``StableDiffusion3Pipeline``.

Model space: normalised VAE latents z = (E(x) − shift_factor)·scaling_factor, [C, H/f, W/f]
(C = 16 for SD3). The transformer is called exactly as the pipeline calls it: timestep = σ·1000
(the scheduler's timesteps), prompt embeddings from the three text encoders (two CLIP + T5)
and the pooled CLIP projections; its output already is the loop's velocity v = ε − x0.
Sampling with ``timestep_grid`` and Euler steps reproduces ``pipe(...)`` (true CFG with the
empty negative prompt through ``guided_velocity``).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ddrl.errors import DDRLError
from ddrl.models.base import Cond
from ddrl.models.config import ModelConfig
from ddrl.models.hf import DiffusersGenerator, dynamic_mu
from ddrl.models.hf_parts import HFDenoiser, TextConditioner, VAECodec
from ddrl.models.shapes import real_config, scaled_indices, shrink

SD3_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default T5 length


class SD3Denoiser(HFDenoiser):
    """SD3's MMDiT: x_t [B, C, h, w], t [B] ∈ [0, 1], Cond(prompt_embeds [B, L, D],
    pooled [B, P]) → v [B, C, h, w]."""

    BLOCKS = ("transformer_blocks",)  # MMDiT joint blocks

    def forward_velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        c = cond.batched
        return self.transformer(
            hidden_states=x_t,
            timestep=t * 1000,  # the pipeline passes the scheduler's timesteps σ·1000
            encoder_hidden_states=c["prompt_embeds"].to(x_t.device, x_t.dtype),
            pooled_projections=c["pooled"].to(x_t.device, x_t.dtype),
            return_dict=False,
        )[0]


class SD3Conditioner(TextConditioner):
    """Prompts → the pipeline's own ``encode_prompt`` (CLIP-L, CLIP-G, T5)."""

    def encode_batch(self, prompts: list[str]) -> Cond:
        """Prompts [B] → Cond(prompt_embeds [B, 77 + L, D], pooled [B, P])."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device(),
            do_classifier_free_guidance=False,
            max_sequence_length=self.cfg.max_sequence_length or SD3_MAX_SEQUENCE_LENGTH,
        )
        return Cond({"prompt_embeds": embeds, "pooled": pooled})


def latent_shape(pipe, cfg: ModelConfig, family: str, native: int, multiple: int) -> tuple:
    """(latent height, latent width) for the configured size (``ModelConfig.size``; the square
    ``native`` by default); each side must be a multiple of ``multiple`` (VAE factor × patch)."""
    h, w = cfg.size((native, native))
    if h % multiple or w % multiple:
        key = f"model.height={h}, model.width={w}" if cfg.height else f"model.resolution={h}"
        raise DDRLError(
            f"{key} does not fit {family}: allowed are multiples of {multiple} "
            f"(VAE factor {pipe.vae_scale_factor} × patch size), or 0 for the native {native}"
        )
    return h // pipe.vae_scale_factor, w // pipe.vae_scale_factor


class SD3Generator(DiffusersGenerator):
    """SD3 / SD3.5 (``StableDiffusion3Pipeline``); samples are latents [16, H/8, W/8]."""

    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    # flow_grpo's SD3 LoRA (as diffusers' SD3 DreamBooth LoRA script): the joint attention's
    # image and context projections.
    lora_default_targets = (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    )

    def build_parts(self, pipe, cfg: ModelConfig) -> None:
        tc = pipe.transformer.config
        f, p = pipe.vae_scale_factor, tc.patch_size
        h, w = latent_shape(pipe, cfg, self.family, tc.sample_size * f, f * p)
        limit = tc.pos_embed_max_size
        if limit and max(h, w) // p > limit:
            raise DDRLError(
                f"model size {h * f}x{w * f} is too large for this sd3 transformer: allowed up "
                f"to {limit * p * f} per side (pos_embed_max_size {limit} patches)"
            )
        self.sample_shape = (tc.in_channels, h, w)
        self.denoiser = SD3Denoiser(pipe.transformer, cfg.autocast)
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        self.conditioner = SD3Conditioner(pipe, cfg, names)
        vc = pipe.vae.config
        self.codec = VAECodec(pipe.vae, vc.shift_factor or 0.0, vc.scaling_factor, cfg.vae_batch)

    def timestep_grid(self, num_steps: int, shift: float = 0.0) -> Tensor:
        """The pipeline's sigmas [N + 1] (1 → 0); with a dynamic-shifting scheduler config,
        mu from the image token count as ``StableDiffusion3Pipeline`` computes it."""
        sc = self.scheduler.config
        if shift > 0 or not sc.get("use_dynamic_shifting"):
            return super().timestep_grid(num_steps, shift)
        p = self.denoiser.transformer.config.patch_size
        seq = (self.sample_shape[1] // p) * (self.sample_shape[2] // p)
        mu = dynamic_mu(sc, seq, max_shift=1.16)  # StableDiffusion3Pipeline's default
        sched = type(self.scheduler).from_config(sc)
        sched.set_timesteps(num_steps, mu=mu)
        return sched.sigmas.float().cpu()

    @classmethod
    def build_tiny(cls, path: Path) -> None:
        """A tiny SD3.5 pipeline: SD3.5 Medium's published configs (``shapes/sd3.5-medium.json``)
        with only sizes shrunk (``TINY_SD3``): 3 MMDiT blocks of width 16, the first two with
        SD3.5's dual attention (its layers 0..12 of 24 scaled down) and every one with its RMS
        qk-norm; patch 2, 16 latent channels; the 4-stage (factor 8) VAE with SD3's scaling and
        shift; SD3.5's scheduler; native 32 px (4×4 latents, 2×2 tokens). Text encoders: two
        CLIPs of width 16 (pooled 16 + 16 = ``pooled_projection_dim``) and a one-layer T5 of
        width 32 (= ``joint_attention_dim``)."""
        from diffusers import (
            FlowMatchEulerDiscreteScheduler,
            SD3Transformer2DModel,
            StableDiffusion3Pipeline,
        )
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        from ddrl.models.tiny_text import (
            clip_tokenizer,
            t5_tokenizer,
            tiny_clip_config,
            tiny_t5_config,
        )

        real = real_config(TINY_SD3_CHECKPOINT)
        tok, tok3 = clip_tokenizer(), t5_tokenizer()
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**tiny_sd3_transformer_config(real)),
            scheduler=FlowMatchEulerDiscreteScheduler(**real["scheduler"]),
            vae=tiny_vae(TINY_SD3_CHECKPOINT),
            text_encoder=CLIPTextModelWithProjection(tiny_clip_config(len(tok))),
            text_encoder_2=CLIPTextModelWithProjection(tiny_clip_config(len(tok))),
            text_encoder_3=T5EncoderModel(tiny_t5_config(len(tok3))),
            tokenizer=tok,
            tokenizer_2=clip_tokenizer(),
            tokenizer_3=tok3,
        )
        pipe.save_pretrained(path, safe_serialization=True)


TINY_SD3_CHECKPOINT = "sd3.5-medium"
# The tiny SD3 transformer's sizes (everything else is SD3.5 Medium's): 3 blocks so that, as in
# the real 24, the early blocks have dual attention and the last (context_pre_only) one has not;
# width 2 heads × 8 = caption_projection_dim 16; joint_attention_dim = the tiny T5 width 32,
# pooled_projection_dim = the two tiny CLIP projections (16 + 16); positions up to 16 patches
# (256 px), native 4 latents (32 px: the smallest with a 2×2 token grid).
TINY_SD3 = {
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "caption_projection_dim": 16,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 16,
    "sample_size": 4,
}
# The tiny VAE's sizes: the real stage count (4: factor 8) and latent channels, width 8.
TINY_VAE = {
    "block_out_channels": [8, 8, 8, 8],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 32,
}


def tiny_sd3_transformer_config(real: dict) -> dict:
    """The real SD3 transformer config with only sizes shrunk (``TINY_SD3``); its
    dual-attention layer indices scaled to the shallower depth."""
    tc = real["transformer"]
    dual = scaled_indices(tc["dual_attention_layers"], tc["num_layers"], TINY_SD3["num_layers"])
    return shrink(tc, **TINY_SD3, dual_attention_layers=dual)


def tiny_vae(checkpoint: str):
    """The published AutoencoderKL config of ``checkpoint`` (``shapes/<checkpoint>.json``) with
    only sizes shrunk (``TINY_VAE``): its 4 stages (factor 8), 16 latent channels, scaling and
    shift factors and quant-conv flags kept; 32 px images ↔ 16 × 4 × 4 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**shrink(real_config(checkpoint)["vae"], **TINY_VAE))

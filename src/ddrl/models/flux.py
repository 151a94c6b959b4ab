"""FLUX.1 through diffusers' ``FluxPipeline``.

Model space: UNPACKED normalised VAE latents z = (E(x) − shift_factor)·scaling_factor,
[C, H/f, W/f] (C = 16). The denoiser packs 2×2 latent patches into tokens before the
transformer and unpacks its output (a permutation, so Gaussian log-probs are unchanged), and
calls the transformer as the pipeline does: timestep = σ (the pipeline passes its scheduler
timesteps / 1000), the guidance embedding (FLUX.1-dev's distilled guidance), T5 token
embeddings, the pooled CLIP output, and the text/image position ids. Its output is already
v = ε − x0. ``timestep_grid`` reproduces the pipeline's resolution-dependent shift (mu).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ddrl.errors import DDRLError
from ddrl.flow import scheduler_grid
from ddrl.models.base import Cond
from ddrl.models.config import ModelConfig
from ddrl.models.hf import DiffusersGenerator, dynamic_mu
from ddrl.models.hf_parts import HFDenoiser, TextConditioner, VAECodec
from ddrl.models.sd3 import SD3Generator, latent_shape, tiny_vae
from ddrl.models.shapes import real_config, shrink

FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale
FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default T5 length


def pack(x: Tensor) -> Tensor:
    """Latents [B, C, h, w] → tokens [B, h/2·w/2, 4C] (FLUX's 2×2 patch packing)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Tokens [B, h/2·w/2, 4C] → latents [B, C, h, w] (inverse of ``pack``)."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int) -> Tensor:
    """Position ids [h/2·w/2, 3] of the packed latent tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


class FluxDenoiser(HFDenoiser):
    """FLUX's transformer on unpacked latents: x_t [B, C, h, w], t [B] ∈ [0, 1],
    Cond(prompt_embeds [B, L, D], pooled [B, P]; shared txt_ids [L, 3]) → v [B, C, h, w]."""

    BLOCKS = ("transformer_blocks", "single_transformer_blocks")  # double-, single-stream

    def __init__(self, transformer, autocast: str, guidance: float | None):
        super().__init__(transformer, autocast)
        self.guidance = guidance
        self._ids: dict[tuple, Tensor] = {}

    def img_ids(self, h: int, w: int, like: Tensor) -> Tensor:
        key = (h, w, like.device, like.dtype)
        if key not in self._ids:
            self._ids[key] = image_ids(h, w).to(like.device, like.dtype)
        return self._ids[key]

    def forward_velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        b, _, h, w = x_t.shape
        c = cond.batched
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((b,), self.guidance, device=x_t.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=pack(x_t),
            timestep=t.to(x_t.dtype),  # = the pipeline's (σ·1000) / 1000
            guidance=guidance,
            pooled_projections=c["pooled"].to(x_t.device, x_t.dtype),
            encoder_hidden_states=c["prompt_embeds"].to(x_t.device, x_t.dtype),
            txt_ids=cond.shared["txt_ids"].to(x_t.device, x_t.dtype),
            img_ids=self.img_ids(h, w, x_t),
            return_dict=False,
        )[0]
        return unpack(out, h, w)


class FluxConditioner(TextConditioner):
    """Prompts → the pipeline's own ``encode_prompt`` (pooled CLIP, T5 tokens)."""

    def encode_batch(self, prompts: list[str]) -> Cond:
        """Prompts [B] → Cond(prompt_embeds [B, L, D], pooled [B, P]; shared txt_ids [L, 3])."""
        embeds, pooled, txt_ids = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device(),
            max_sequence_length=self.cfg.max_sequence_length or FLUX_MAX_SEQUENCE_LENGTH,
        )
        return Cond({"prompt_embeds": embeds, "pooled": pooled}, {"txt_ids": txt_ids})


class FluxGenerator(DiffusersGenerator):
    """FLUX.1 (``FluxPipeline``); samples are unpacked latents [16, H/8, W/8]."""

    family = "flux"
    pipeline_class = "FluxPipeline"
    # flow_grpo's / diffusers' FLUX DreamBooth LoRA attention targets (double-stream blocks:
    # image and context projections; single-stream blocks: to_q/k/v): the same names as SD3's.
    lora_default_targets = SD3Generator.lora_default_targets

    def build_parts(self, pipe, cfg: ModelConfig) -> None:
        tc = pipe.transformer.config
        f = pipe.vae_scale_factor
        # Native size: the VAE's sample_size (FLUX.1: 1024 = the pipeline's 128 latents × 8).
        native = pipe.vae.config.sample_size or pipe.default_sample_size * f
        h, w = latent_shape(pipe, cfg, self.family, native, 2 * f)
        self.sample_shape = (tc.in_channels // 4, h, w)
        if tc.guidance_embeds:
            guidance = cfg.guidance or FLUX_GUIDANCE
        elif cfg.guidance > 0:
            raise DDRLError(
                f"model.guidance={cfg.guidance} needs a guidance-distilled FLUX (FLUX.1-dev); "
                "this transformer has no guidance embedding: allowed 0"
            )
        else:
            guidance = None
        self.denoiser = FluxDenoiser(pipe.transformer, cfg.autocast, guidance)
        self.conditioner = FluxConditioner(pipe, cfg, ("text_encoder", "text_encoder_2"))
        vc = pipe.vae.config
        self.codec = VAECodec(pipe.vae, vc.shift_factor or 0.0, vc.scaling_factor, cfg.vae_batch)

    def guidance_args(self, w: float) -> list[str]:
        """FLUX.1-dev's distilled guidance embedding; true CFG against "" when w ≠ 1."""
        g = self.denoiser.guidance
        out = [] if g is None else [f"guidance_scale={g!r}"]
        return out + ([f"true_cfg_scale={w!r}", 'negative_prompt=""'] if w != 1.0 else [])

    def timestep_grid(self, num_steps: int, shift: float = 0.0) -> Tensor:
        """FluxPipeline's sigmas [N + 1]: shift(linspace(1, 1/N, N)) then 0, with mu from the
        image token count (dynamic shifting, FLUX.1-dev); ``shift`` > 0: a static shift."""
        seq = (self.sample_shape[1] // 2) * (self.sample_shape[2] // 2)
        mu = dynamic_mu(self.scheduler.config, seq, max_shift=1.15)  # FluxPipeline's default
        return scheduler_grid(num_steps, shift, mu=mu, scheduler=self.scheduler)

    @classmethod
    def build_tiny(cls, path: Path) -> None:
        """A tiny FLUX.1-dev pipeline: FLUX.1-dev's published configs (``shapes/flux.1-dev.json``)
        with only sizes shrunk (``TINY_FLUX``): one double- and one single-stream block of
        width 2 heads × 10, the guidance embedding, in_channels 64 (16 latent channels × 2×2
        packing), 3 RoPE axes [2, 4, 4] (FLUX's [16, 56, 56] scaled to head dim 10); the
        4-stage (factor 8) VAE with FLUX's scaling and shift; FLUX.1-dev's dynamic-shifting
        scheduler as published; native 32 px (4×4 latents, 2×2 tokens). Text encoders: CLIP of
        width 16 (= ``pooled_projection_dim``), T5 of width 32 (= ``joint_attention_dim``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        from ddrl.models.tiny_text import (
            clip_tokenizer,
            t5_tokenizer,
            tiny_clip_config,
            tiny_t5_config,
        )

        real = real_config(TINY_FLUX_CHECKPOINT)
        tok, tok2 = clip_tokenizer(), t5_tokenizer()
        pipe = FluxPipeline(
            transformer=FluxTransformer2DModel(**shrink(real["transformer"], **TINY_FLUX)),
            scheduler=FlowMatchEulerDiscreteScheduler(**real["scheduler"]),
            vae=tiny_vae(TINY_FLUX_CHECKPOINT),
            text_encoder=CLIPTextModel(tiny_clip_config(len(tok))),
            text_encoder_2=T5EncoderModel(tiny_t5_config(len(tok2))),
            tokenizer=tok,
            tokenizer_2=tok2,
        )
        pipe.save_pretrained(path, safe_serialization=True)


TINY_FLUX_CHECKPOINT = "flux.1-dev"
# The tiny FLUX transformer's sizes (everything else is FLUX.1-dev's): head dim 10 split over
# the 3 RoPE axes as [2, 4, 4] (even per axis, rows = columns, the smallest for time, as in
# [16, 56, 56] of 128; the exactly proportional [4, 14, 14] of 32 doubles the forward time);
# joint_attention_dim = the tiny T5 width, pooled_projection_dim = the tiny CLIP width.
TINY_FLUX = {
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 10,
    "num_attention_heads": 2,
    "axes_dims_rope": [2, 4, 4],
    "joint_attention_dim": 32,
    "pooled_projection_dim": 16,
}

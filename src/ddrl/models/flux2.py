"""FLUX.2 (diffusers ``Flux2Pipeline``, FLUX.2-dev) and FLUX.2-Klein (``Flux2KleinPipeline``).

Both share ``Flux2Transformer2DModel`` and ``AutoencoderKLFlux2``; they differ in the text
encoder and in how guidance is applied.

- Model space: the transformer's own input, PATCHIFIED and batch-norm NORMALISED VAE latents
  z = (patchify₂ₓ₂(E(x)) − bn.running_mean) / sqrt(bn.running_var + batch_norm_eps),
  [4·C, H/2f, W/2f] = [128, H/16, W/16] (``Flux2Codec``; the pipelines' ``_encode_vae_image``
  and their decoding tail, inverted exactly). The pipelines draw their initial noise in this
  space too, so ``sample_ode`` from the same noise reproduces them.
- Denoiser: the latents are flattened into tokens [B, h·w, 128] (``pack``, the pipelines'
  ``_pack_latents``; a permutation, so Gaussian log-probs are unchanged) with 4-axis position
  ids (t, h, w, l) = (0, row, column, 0) for the image and (0, 0, 0, i) for the text tokens.
  The transformer is called as the pipelines call it: timestep = σ (the pipelines pass their
  scheduler timesteps / 1000), FLUX.2-dev's guidance embedding (``guidance_scale``, default
  4.0; ``model.guidance``), Klein without one (``guidance=None``). Its output already is the
  loop's velocity v = ε − x0.
- Conditioner: the pipeline's own ``encode_prompt`` (Mistral-3 through its chat template with
  the pipeline's system message, or Qwen3 through its chat template with thinking off), the
  hidden states of the pipeline's ``text_encoder_out_layers`` stacked along the width
  (FLUX.2-dev: 10, 20, 30; Klein: 9, 18, 27), ``max_sequence_length`` 512 by default.
- Guidance: FLUX.2-dev is guidance-distilled (the embedding, no true CFG in its pipeline).
  Klein-base uses true CFG with the empty negative prompt, v_u + w·(v_c − v_u), exactly ddrl's
  ``guided_velocity`` with ``sampler.cfg_scale`` = the pipeline's ``guidance_scale``; a
  step-distilled Klein (``is_distilled``) ignores guidance in its pipeline: use cfg_scale 1.
- Grid: ``timestep_grid(N)`` = the pipelines' sigmas: linspace(1, 1/N, N) shifted
  exponentially with mu = ``compute_empirical_mu(image tokens, N)`` (depends on the step count
  as well as the resolution), then 0.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from ddrl.errors import DDRLError
from ddrl.flow import scheduler_grid
from ddrl.models.base import Cond
from ddrl.models.config import ModelConfig
from ddrl.models.hf import DiffusersGenerator
from ddrl.models.hf_parts import HFDenoiser, TextConditioner
from ddrl.models.sd3 import latent_shape

FLUX2_GUIDANCE = 4.0  # Flux2Pipeline.__call__'s default guidance_scale
MAX_SEQUENCE_LENGTH = 512  # both pipelines' default max_sequence_length
TEXT_WIDTH = 16  # the tiny text encoders' width (joint_attention_dim = 3 × 16)


def pack(x: Tensor) -> Tensor:
    """Latents [B, C, h, w] → tokens [B, h·w, C] (``Flux2Pipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Tokens [B, h·w, C] → latents [B, C, h, w] (inverse of ``pack``)."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, h, w)


def patchify(lat: Tensor) -> Tensor:
    """VAE latents [B, C, H, W] → [B, 4C, H/2, W/2] (the pipelines' ``_patchify_latents``)."""
    b, c, h, w = lat.shape
    lat = lat.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return lat.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(lat: Tensor) -> Tensor:
    """[B, 4C, h, w] → VAE latents [B, C, 2h, 2w] (the pipelines' ``_unpatchify_latents``)."""
    b, c, h, w = lat.shape
    lat = lat.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return lat.reshape(b, c // 4, h * 2, w * 2)


def image_ids(h: int, w: int) -> Tensor:
    """Position ids [h·w, 4] (t, h, w, l) = (0, row, column, 0) of the image tokens, int64
    (``Flux2Pipeline._prepare_latent_ids``)."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))


class Flux2Denoiser(HFDenoiser):
    """Flux2Transformer2DModel on unpacked model-space latents: x_t [B, 128, h, w], t [B],
    Cond(prompt_embeds [B, L, D]; shared txt_ids [L, 4]) → v [B, 128, h, w]."""

    BLOCKS = ("transformer_blocks", "single_transformer_blocks")  # double-, single-stream

    def __init__(self, transformer, autocast: str, guidance: float | None):
        super().__init__(transformer, autocast)
        self.guidance = guidance
        self._ids: dict[tuple, Tensor] = {}

    def img_ids(self, h: int, w: int, device) -> Tensor:
        key = (h, w, device)
        if key not in self._ids:
            self._ids[key] = image_ids(h, w).to(device)
        return self._ids[key]

    def forward_velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        b, _, h, w = x_t.shape
        guidance = None
        if self.guidance is not None:  # Flux2Pipeline: torch.full([1], g, float32).expand(B)
            guidance = torch.full((b,), self.guidance, device=x_t.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=pack(x_t),
            encoder_hidden_states=cond.batched["prompt_embeds"].to(x_t.device, x_t.dtype),
            timestep=t.to(x_t.dtype),  # = the pipelines' (σ·1000) / 1000
            img_ids=self.img_ids(h, w, x_t.device),
            txt_ids=cond.shared["txt_ids"].to(x_t.device),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack(out, h, w)


class Flux2Conditioner(TextConditioner):
    """Prompts → the pipeline's own ``encode_prompt`` with its default hidden-state layers."""

    def encode_batch(self, prompts: list[str]) -> Cond:
        """Prompts [B] → Cond(prompt_embeds [B, L, 3·width]; shared txt_ids [L, 4])."""
        layers = inspect.signature(self.pipe.encode_prompt).parameters["text_encoder_out_layers"]
        embeds, text_ids = self.pipe.encode_prompt(
            prompt=prompts,
            device=self.device(),
            max_sequence_length=self.cfg.max_sequence_length or MAX_SEQUENCE_LENGTH,
            text_encoder_out_layers=layers.default,
        )
        return Cond({"prompt_embeds": embeds}, {"txt_ids": text_ids[0]})


class Flux2Codec(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] ↔ model space [B, 4C, H/2f, W/2f]: the VAE latent
    distribution's mode, patchified 2×2, normalised by the VAE's batch-norm running statistics
    (the pipelines' ``_encode_vae_image``; ``decode`` is their decoding tail)."""

    value_range = (-1.0, 1.0)

    def __init__(self, vae: nn.Module, batch: int):
        super().__init__()
        self.vae, self.batch = vae, batch
        bn, eps = vae.bn, vae.config.batch_norm_eps
        mean = bn.running_mean.detach().float().view(1, -1, 1, 1)
        std = torch.sqrt(bn.running_var.detach().float().view(1, -1, 1, 1) + eps)
        self.register_buffer("m", mean, persistent=False)
        self.register_buffer("s", std, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def to_vae_latents(self, z: Tensor) -> Tensor:
        """Model space → the VAE's raw latents [B, C, H/f, W/f] (what Klein's
        ``output_type="latent"`` returns)."""
        return unpatchify(z.to(self.m.device).float() * self.s + self.m)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        out = []
        for x in images.split(self.batch):
            lat = self.vae.encode(x.to(self.m.device, self.dtype)).latent_dist.mode()
            out.append((patchify(lat.float()) - self.m) / self.s)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        out = []
        for x in z.split(self.batch):
            lat = self.to_vae_latents(x).to(self.dtype)
            out.append(self.vae.decode(lat, return_dict=False)[0].float())
        return torch.cat(out)


class Flux2Generator(DiffusersGenerator):
    """FLUX.2-dev (``Flux2Pipeline``); samples are model-space latents [128, H/16, W/16]."""

    family = "flux2"
    pipeline_class = "Flux2Pipeline"
    checkpoint: ClassVar[str] = "flux.2-dev"  # shapes/<checkpoint>.json: the tiny's real config
    # Flow-Factory's FLUX.2 / Klein LoRA targets (models/flux/flux2.py L92-104,
    # flux2_klein.py L92-105 @a0b2bc5a): double-stream attention and both SwiGLU MLPs, the
    # single-stream fused qkv+MLP input (their single-stream "attn.to_out.0" names only the
    # double-stream output projection in diffusers: the single-stream one is "attn.to_out").
    lora_default_targets = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
        "attn.to_qkv_mlp_proj",
    )

    def build_parts(self, pipe, cfg: ModelConfig) -> None:
        tc = pipe.transformer.config
        f = pipe.vae_scale_factor
        native = pipe.vae.config.sample_size or pipe.default_sample_size * f
        native = native[0] if isinstance(native, list | tuple) else native
        h, w = latent_shape(pipe, cfg, self.family, native, 2 * f)
        self.sample_shape = (tc.in_channels, h // 2, w // 2)
        self.is_distilled = bool(pipe.config.get("is_distilled", False))
        if tc.guidance_embeds:
            guidance = cfg.guidance or FLUX2_GUIDANCE
        elif cfg.guidance > 0:
            raise DDRLError(
                f"model.guidance={cfg.guidance} needs a guidance-embedding FLUX.2 (FLUX.2-dev); "
                f"this {self.family} transformer has none (use sampler.cfg_scale): allowed 0"
            )
        else:
            guidance = None
        self.denoiser = Flux2Denoiser(pipe.transformer, cfg.autocast, guidance)
        self.conditioner = Flux2Conditioner(pipe, cfg, ("text_encoder",))
        self.codec = Flux2Codec(pipe.vae, cfg.vae_batch)

    def pixel_size(self, pipe) -> tuple[tuple[int, int], int]:
        side = 2 * pipe.vae_scale_factor  # VAE factor × the 2×2 patchify
        return (self.sample_shape[1] * side, self.sample_shape[2] * side), 0

    def guidance_args(self, w: float) -> list[str]:
        """FLUX.2-dev: its guidance embedding (the pipeline has no true CFG; w ≠ 1 has no
        pipeline equivalent). Klein: the pipeline's true CFG is ddrl's, g = w (a
        step-distilled Klein ignores it)."""
        if self.denoiser.guidance is not None:
            return [f"guidance_scale={self.denoiser.guidance!r}"]
        return [f"guidance_scale={w!r}"]

    def timestep_grid(self, num_steps: int, shift: float = 0.0) -> Tensor:
        """The pipelines' sigmas [N + 1]: linspace(1, 1/N, N) shifted with
        mu = compute_empirical_mu(h·w tokens, N), then 0; ``shift`` > 0: a static shift."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        mu = compute_empirical_mu(self.sample_shape[1] * self.sample_shape[2], num_steps)
        return scheduler_grid(num_steps, shift, mu=mu, scheduler=self.scheduler)

    @classmethod
    def tiny_pipeline_kwargs(cls) -> dict:
        """Extra constructor arguments of the tiny pipeline."""
        return {}

    @classmethod
    def tiny_text(cls):
        """(text encoder, tokenizer) of the tiny pipeline (``ddrl.models.flux2_tiny``)."""
        from ddrl.models.flux2_tiny import tiny_mistral3

        return tiny_mistral3(TEXT_WIDTH)

    @classmethod
    def build_tiny(cls, path: Path) -> None:
        """The real checkpoint's configs (shapes/<checkpoint>.json) with only sizes shrunk: one
        double and one single block of width 16, a 4-stage VAE of width 8 at 64 px (latent
        channels, batch norm, patch size kept), the real scheduler; a tiny text encoder deep
        enough for the pipeline's hidden-state layers, of width 16."""
        import diffusers

        from ddrl.models import shapes

        real = shapes.real_config(cls.checkpoint)
        tr = shapes.shrink(
            real["transformer"],
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=3 * TEXT_WIDTH,  # three stacked hidden-state layers
            timestep_guidance_channels=32,
            axes_dims_rope=[2, 2, 2, 2],  # sums to attention_head_dim
        )
        vae_conf = shapes.shrink(
            real["vae"], block_out_channels=[8, 8, 8, 8], layers_per_block=1,
            norm_num_groups=4, sample_size=64,
        )  # fmt: skip
        vae = diffusers.AutoencoderKLFlux2.from_config(vae_conf)
        with torch.no_grad():  # non-trivial batch-norm statistics, so the codec test means it
            vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
            vae.bn.running_var.copy_(torch.empty_like(vae.bn.running_var).uniform_(0.5, 2.0))
        text_encoder, tokenizer = cls.tiny_text()
        pipe = getattr(diffusers, cls.pipeline_class)(
            transformer=diffusers.Flux2Transformer2DModel.from_config(tr),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(real["scheduler"]),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            **cls.tiny_pipeline_kwargs(),
        )
        pipe.save_pretrained(path, safe_serialization=True)


class Flux2KleinGenerator(Flux2Generator):
    """FLUX.2-Klein (``Flux2KleinPipeline``, Qwen3 text encoder, no guidance embedding: true CFG
    for the base models, none for the step-distilled ones)."""

    family = "flux2_klein"
    pipeline_class = "Flux2KleinPipeline"
    checkpoint: ClassVar[str] = "flux.2-klein-base-4b"  # the tiny is a base (CFG) model

    @classmethod
    def tiny_text(cls):
        from ddrl.models.flux2_tiny import tiny_qwen3

        return tiny_qwen3(TEXT_WIDTH)

    @classmethod
    def tiny_pipeline_kwargs(cls) -> dict:
        return {"is_distilled": False}  # FLUX.2-klein-base-4B: CFG on in its pipeline

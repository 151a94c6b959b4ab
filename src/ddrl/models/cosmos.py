"""Cosmos-Predict2.5 (diffusers ``Cosmos2_5_PredictBasePipeline``, the DDRL paper's model).

- Denoiser: ``CosmosTransformer3DModel`` on normalised latents [B, C, T, h, w]; it is called as
  the pipeline calls it: ``timestep`` = σ itself per latent frame [B, 1, T, 1, 1],
  ``condition_mask`` [B, 1, T, h, w], ``padding_mask`` zeros [1, 1, h, w] (the pipeline's
  pixel-size zeros, which the transformer resizes to the latent size) and the prompt
  embeddings; its output is the velocity v = ε − x0 (flow prediction).
- Text-to-video: condition_mask 0 everywhere. Conditional frames (image/video-to-world): a Cond
  carrying "given" (clean normalised latents [B, C, T, h, w]) and "given_mask" ([B, 1, T, 1, 1],
  1 on conditional latent frames; see ``with_given``) makes the denoiser feed the given latents
  on those frames with timestep 1e-4 (the pipeline's ``conditional_frame_timestep``) and return
  there v = (x_t − given) / t, the straight path to the given latents, so that the ODE ends
  exactly on them. It does not depend on θ: no gradient flows through conditional frames. (The
  pipeline instead returns ε − given with ε the initial noise, which lands on
  (1 − σ_0)·ε + σ_0·given, σ_0 = 200/201; the generated frames are the same either way.)
- Conditioner: ``pipe.encode_prompt`` (Qwen2.5-VL through its chat template; the hidden states of
  every layer normalised and concatenated, ``max_sequence_length`` default 512). The null prompt
  is the pipeline's ``DEFAULT_NEGATIVE_PROMPT``. The pipeline's CFG is v_c + g·(v_c − v_u), i.e.
  ddrl's v_u + w·(v_c − v_u) with w = g + 1 (pipeline guidance 7 ↔ sampler.cfg_scale 8).
- Codec: the Wan VAE with per-channel latent mean/std, videos [B, 3, F, H, W] in [-1, 1].

Size: ``model.frames`` (0 = 93) and ``model.height`` × ``model.width`` or ``model.resolution``
= R (R×R; neither = the native 704×1280),
as for Wan (``ddrl.models.wan``), and within the transformer's RoPE range ``max_size``.

Sampling grid: the model's own ``UniPCMultistepScheduler`` (Karras sigmas in σ/(1−σ) from 200
to 0.01, mapped to flow sigmas) gives ``timestep_grid(N)`` = its N + 1 sigmas, 200/201 ≈ 0.995
down to 0.0099 then 0; the pipeline starts its unit-variance noise at 0.995 too. ddrl takes
Euler/SDE steps on that grid (see ``ddrl.models.wan`` for why); ``sampler.shift`` does not
apply (Karras sigmas have no shift).

Safety: the pipeline's constructor builds ``CosmosSafetyChecker`` (the ``cosmos_guardrail``
package; an ImportError without it) unless one is passed. ddrl trains and does not serve,
so it loads the pipeline with ``NoGuardrail`` (text always allowed, video unchanged); the
guardrail is left to deployment. An exported folder records no safety checker
(``"safety_checker": [null, null]``, as diffusers' convert_cosmos_to_diffusers.py writes it),
so the plain pipeline's ``from_pretrained(folder)`` builds the real guardrail, or takes
``safety_checker=...``.

diffusers' Cosmos transformer resizes the padding mask with torchvision; without torchvision
installed, ``torch.nn.functional.interpolate(mode="nearest")`` stands in (the same operation).
"""

from __future__ import annotations

import logging
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ddrl.errors import DDRLError
from ddrl.models.base import Cond
from ddrl.models.config import ModelConfig
from ddrl.models.hf import DEFAULTS_FILE, DiffusersGenerator
from ddrl.models.hf_parts import HFDenoiser
from ddrl.models.shapes import real_config, shrink
from ddrl.models.wan import WanConditioner, video_sample_shape, wan_vae_codec

COND_FRAME_T = 1e-4  # the pipeline's conditional_frame_timestep
NATIVE = (704, 1280, 93)  # the pipeline's default height, width, num_frames


class NoGuardrail:
    """Stands in for Cosmos' ``CosmosSafetyChecker`` while training (see the module docstring):
    every prompt passes, videos come back unchanged. Not saved with a pipeline."""

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames):
        return frames

    def to(self, *args, **kwargs) -> NoGuardrail:
        return self


class _QuietNoGuardrail(logging.Filter):
    """Drops diffusers' "unexpected type" / "cannot be saved" notices about ``NoGuardrail``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "NoGuardrail" not in record.getMessage()


_pipeline_log = logging.getLogger("diffusers.pipelines.pipeline_utils")
if not any(isinstance(f, _QuietNoGuardrail) for f in _pipeline_log.filters):
    _pipeline_log.addFilter(_QuietNoGuardrail())


def _resize_without_torchvision() -> None:
    """Give diffusers' Cosmos transformer its ``transforms.functional.resize`` (nearest) when
    torchvision is not installed; with torchvision present nothing changes."""
    import diffusers.models.transformers.transformer_cosmos as tc

    if hasattr(tc, "transforms"):
        return

    def resize(x: Tensor, size, interpolation=None) -> Tensor:
        return torch.nn.functional.interpolate(x, size=list(size), mode="nearest")

    functional = types.SimpleNamespace(resize=resize)
    modes = types.SimpleNamespace(NEAREST="nearest")
    tc.transforms = types.SimpleNamespace(functional=functional, InterpolationMode=modes)


def with_given(cond: Cond, given: Tensor, mask: Tensor) -> Cond:
    """``cond`` plus conditional frames: ``given`` clean normalised latents [B, C, T, h, w] and
    ``mask`` [B, 1, T, 1, 1] (1 on conditional latent frames). With CFG the null condition needs
    them too: ``with_given(null, given, mask)``."""
    return Cond({**cond.batched, "given": given, "given_mask": mask.float()}, cond.shared)


class CosmosDenoiser(HFDenoiser):
    """v_θ(x_t, t, c) from CosmosTransformer3DModel; x_t [B, C, T, h, w], t [B] = σ,
    c.batched: "prompt_embeds" [B, L, D] and optionally "given" / "given_mask"."""

    BLOCKS = ("transformer_blocks",)

    def forward_velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        b, _, f, h, w = x_t.shape
        sigma = t.float().view(b, 1, 1, 1, 1).expand(b, 1, f, 1, 1)
        given = cond.batched.get("given")
        if given is None:  # text-to-video
            mask = torch.zeros(b, 1, f, 1, 1, device=x_t.device)
            inp, timestep = x_t, sigma
        else:
            mask = cond.batched["given_mask"].to(x_t.device, torch.float32)
            given = given.to(x_t.device, torch.float32)
            if given.shape[2] < f:  # a condition image's latent frames: the rest generated
                pad = (0, 0, 0, 0, 0, f - given.shape[2])
                given, mask = F.pad(given, pad), F.pad(mask, pad)
            inp = (mask * given + (1 - mask) * x_t.float()).to(self.dtype)
            timestep = mask * COND_FRAME_T + (1 - mask) * sigma
        out = self.transformer(
            hidden_states=inp,
            timestep=timestep,
            encoder_hidden_states=cond.batched["prompt_embeds"].to(x_t.device, self.dtype),
            condition_mask=mask.expand(b, 1, f, h, w).to(self.dtype),
            padding_mask=x_t.new_zeros(1, 1, h, w),
            return_dict=False,
        )[0]
        if given is None:
            return out
        v_given = (x_t.float() - given) / t.float().view(b, 1, 1, 1, 1).clamp_min(1e-8)
        return (mask * v_given + (1 - mask) * out.float()).to(out.dtype)


class CosmosConditioner(WanConditioner):
    """Prompts → normalised, layer-concatenated Qwen2.5-VL states [B, L, layers·hidden]
    (``encode_prompt`` has Wan's signature); the null prompt is the pipeline's negative one.

    Image-to-world (``data.condition_images``, ``set_images``): each prompt's image, encoded by
    the VAE as a one-frame video (the causal Wan VAE's first latent frame, what the pipeline's
    ``image=`` path conditions on), is its "given" first latent frame, in its condition and in
    its null condition (``null_for``) alike."""

    def __init__(self, pipe, cfg: ModelConfig, encoder_names: tuple[str, ...], encode_video):
        super().__init__(pipe, cfg, encoder_names)
        from diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict import DEFAULT_NEGATIVE_PROMPT

        self.null_prompt = DEFAULT_NEGATIVE_PROMPT
        # the codec's encode (videos → latents), kept as a function: the VAE is the codec's part
        self.encode_video, self.images, self.frames = encode_video, None, {}

    def set_images(self, images) -> None:
        """prompt → condition image [3, H, W] in [-1, 1] at the sample size."""
        self.images, self.frames = images, {}

    def encode(self, prompts: list[str]) -> Cond:
        cond = super().encode(prompts)
        return cond if self.images is None else self._given(cond, prompts)

    def null(self, n: int) -> Cond:
        return super().encode([self.null_prompt] * n)

    def null_for(self, prompts: list[str]) -> Cond:
        cond = self.null(len(prompts))
        return cond if self.images is None else self._given(cond, prompts)

    def _given(self, cond: Cond, prompts: list[str]) -> Cond:
        for p in prompts:
            if p not in self.frames:  # [1, C, 1, h, w], encoded once per prompt
                image = self.images[p][None, :, None]
                self.frames[p] = self.encode_video(image).cpu()
        given = torch.cat([self.frames[p] for p in prompts])
        return with_given(cond, given, torch.ones(len(prompts), 1, 1, 1, 1))


class CosmosGenerator(DiffusersGenerator):
    """Cosmos2_5_PredictBasePipeline (text-to-world; conditional frames via ``with_given``)."""

    family = "cosmos"
    pipeline_class = "Cosmos2_5_PredictBasePipeline"

    @classmethod
    def load_kwargs(cls) -> dict:
        return {"safety_checker": NoGuardrail()}

    def build_parts(self, pipe, cfg: ModelConfig) -> None:
        _resize_without_torchvision()
        tr = pipe.transformer
        self.denoiser = CosmosDenoiser(tr, cfg.autocast)
        self.codec = wan_vae_codec(pipe.vae, cfg.vae_batch)
        self.conditioner = CosmosConditioner(pipe, cfg, ("text_encoder",), self.codec.encode)
        pt, ph, pw = tr.config.patch_size
        shape = video_sample_shape(self, cfg, tr.config.in_channels - 1, ph, NATIVE)
        # RoPE positions run to max(max_size / patch) on every axis (a learnable positional
        # embedding, when present, to max_size / patch on each).
        room = [m // p for m, p in zip(tr.config.max_size, (pt, ph, pw), strict=True)]
        if tr.config.extra_pos_embed_type != "learnable":
            room = [max(room)] * 3
        need = [shape[1] // pt, shape[2] // ph, shape[3] // pw]
        if any(n > r for n, r in zip(need, room, strict=True)):
            s = self.pipe.vae_scale_factor_spatial
            raise DDRLError(
                f"model.frames/model.resolution for cosmos: {need[0]} latent frames of "
                f"{shape[2] * s}x{shape[3] * s} px exceed the transformer's positions "
                f"({room[0] * pt} latent frames, {room[1] * ph * s}x{room[2] * pw * s} px)"
            )
        self.sample_shape = shape

    def condition_frames(self, cond: Cond, x0: Tensor, k: Tensor) -> Cond:
        """``cond`` [B] conditioned on the first k_i latent frames of x0_i (clean normalised
        latents [B, C, T, h, w], k [B] ints; k_i = 0 leaves row i text-to-video): the release's
        Vid2Vid condition (condition mask 1 on frames < k_i, cosmos-rl ``v2v_model.py``)."""
        frames = torch.arange(x0.shape[2], device=k.device)
        mask = (frames[None] < k[:, None]).float()[:, None, :, None, None]
        return with_given(cond, x0, mask.to(x0.device))

    def guidance_args(self, w: float) -> list[str]:
        """The pipeline's v_c + g·(v_c − v_u) is ddrl's w = g + 1."""
        return [f"guidance_scale={w - 1.0!r}"]

    def timestep_grid(self, num_steps: int, shift: float = 0.0) -> Tensor:
        """The scheduler's sigmas [N + 1]: ≈0.995 → 0.0099, then 0 (Karras, no shift)."""
        if shift > 0 and self.scheduler.config.get("use_karras_sigmas"):
            raise DDRLError(
                f"sampler.shift={shift} does not apply to cosmos: its scheduler uses Karras "
                "sigmas (sigma_min/sigma_max); leave sampler.shift = 0"
            )
        return super().timestep_grid(num_steps, shift)

    @classmethod
    def build_tiny(cls, path: Path) -> None:
        """A tiny Cosmos-Predict2.5 pipeline: Cosmos-Predict2.5-2B's published configs
        (``shapes/cosmos-predict2.5-2b.json``) with only sizes shrunk (``TINY_COSMOS``): a
        1-layer transformer of width 16 on 16 latent channels + the condition mask, with the
        real flags (padding-mask concat, no extra positional embedding, the cross-attention
        projection of the layer-concatenated text states, RoPE scale, AdaLN-LoRA, patch 1×2×2);
        a 2-layer Qwen2.5-VL (hidden 16, so 32-wide prompt states = crossattn_proj_in_channels),
        byte-level Qwen tokenizer, the tiny Wan2.1 VAE (``tiny_wan_vae``) and Cosmos' UniPC
        scheduler as published; native size ``TINY_SIZE`` (16×16 px × 5 frames: 2 latent
        frames of 2×2, one token each)."""
        import json

        from diffusers import (
            Cosmos2_5_PredictBasePipeline,
            CosmosTransformer3DModel,
            UniPCMultistepScheduler,
        )

        from ddrl.models.tiny_qwen import qwen_tokenizer, tiny_qwen25_vl

        real = real_config(TINY_COSMOS_CHECKPOINT)
        tok = qwen_tokenizer()
        hidden, layers = 16, 2
        text = tiny_qwen25_vl(tok, hidden, layers)
        from ddrl.models.wan_tiny import tiny_wan_vae

        vae = tiny_wan_vae(TINY_COSMOS_VAE)  # Cosmos-Predict2.5's VAE is Wan2.1's
        transformer = CosmosTransformer3DModel(**shrink(real["transformer"], **TINY_COSMOS))
        if transformer.config.in_channels != vae.config.z_dim + 1:
            raise DDRLError(
                f"tiny cosmos: the tiny Wan VAE has {vae.config.z_dim} latent channels, the "
                f"transformer takes {transformer.config.in_channels} (latents + condition mask)"
            )
        scheduler = UniPCMultistepScheduler(**real["scheduler"])
        pipe = Cosmos2_5_PredictBasePipeline(
            text_encoder=text,
            tokenizer=tok,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            safety_checker=NoGuardrail(),
        )
        pipe.save_pretrained(path, safe_serialization=True)
        (Path(path) / DEFAULTS_FILE).write_text(json.dumps(TINY_SIZE))


TINY_COSMOS_CHECKPOINT = "cosmos-predict2.5-2b"
TINY_COSMOS_VAE = "wan2.1-t2v-1.3b"  # its VAE: convert_cosmos_to_diffusers.py L948-949
TINY_SIZE = {"height": 16, "width": 16, "frames": 5}  # the smallest the VAE and patch allow
# The tiny Cosmos transformer's sizes (everything else is Cosmos-Predict2.5-2B's): width
# 1 head × 16 (the smallest head dim the 3-axis RoPE splits), text_embed_dim =
# encoder_hidden_states_channels = that width, crossattn_proj_in_channels = the tiny Qwen's
# 2 layers × hidden 16, RoPE positions up to 16 latent frames and 32 latent rows/columns.
TINY_COSMOS = {
    "num_attention_heads": 1,
    "attention_head_dim": 16,
    "num_layers": 1,
    "mlp_ratio": 2.0,
    "text_embed_dim": 16,
    "adaln_lora_dim": 4,
    "max_size": [16, 32, 32],
    "crossattn_proj_in_channels": 32,
    "encoder_hidden_states_channels": 16,
}

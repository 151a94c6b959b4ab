"""Z-Image (Tongyi-MAI Z-Image / Z-Image-Turbo) through diffusers' ``ZImagePipeline``.

- Denoiser: ``ZImageTransformer2DModel`` (single-stream DiT) takes LISTS of per-sample tensors:
  latents [C, F=1, h, w] and caption features [L_i, D] of each prompt's own length L_i (it pads
  each caption to a multiple of 32 itself and places the image positions after it, so the true
  length matters). Its time is reversed: the pipeline passes (1000 − t_s)/1000 with t_s = σ·1000
  the scheduler's timestep, i.e. 1 − σ, and NEGATES its output before the Euler step
  x ← x + (σ' − σ)·(−out). So the loop's velocity (x_t = (1 − σ)·x0 + σ·ε, v = ε − x0) is
  v = −out, the transformer called at (1000 − σ·num_train_timesteps)/1000.
- Conditioner: ``pipe.encode_prompt`` (Qwen3 through the tokenizer's chat template,
  ``hidden_states[-2]``, the padding dropped). Rows are cached per prompt at their true length;
  a batch is padded with zeros to a fixed length (``model.max_sequence_length``, 0 = the
  pipeline's 512) and carries ``cap_len`` [B], so that rows of different prompts, the null
  prompt included, concatenate (``Cond.cat``, ``CondCache``); the denoiser slices each row back
  to its true length before calling the transformer. Padding never reaches the transformer: a
  batch of prompts of different lengths gives each sample what it gives alone.
- Codec: the FLUX-style AutoencoderKL, z = (E(x) − shift_factor)·scaling_factor.
- CFG: the pipeline's ``pos + g·(pos − neg)`` on the transformer outputs (CFG on when g > 0) is,
  on v = −out, v_c + g·(v_c − v_u) = v_u + (g + 1)·(v_c − v_u): ddrl's ``sampler.cfg_scale`` =
  g + 1 (Z-Image guidance 4 ↔ 5; Turbo's 0 ↔ 1, no CFG). Its defaults ``cfg_normalization=False``
  and ``cfg_truncation=1.0`` change nothing (1 − σ never exceeds 1). The non-default options
  (a per-sample norm cap, a time-dependent scale) are not offered (docs/MODELS.md).
- Grid: ``timestep_grid(N)`` = the pipeline's sigmas: ``linspace(1, 1/N, N)`` (torch float32,
  ``get_default_z_image_sigmas``) through the scheduler with mu = ``calculate_shift`` of the
  image token count (used only when the scheduler has dynamic shifting; the published Z-Image
  schedulers have a static shift: Turbo 3, base 6), then 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ddrl.models.base import Cond
from ddrl.models.config import ModelConfig
from ddrl.models.hf import DiffusersGenerator
from ddrl.models.hf_parts import HFDenoiser, TextConditioner, VAECodec
from ddrl.models.sd3 import latent_shape

Z_IMAGE_MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's default max_sequence_length
Z_IMAGE_NATIVE = 1024  # ZImagePipeline's default height and width


class ZImageDenoiser(HFDenoiser):
    """ZImageTransformer2DModel on latents [B, C, h, w], t [B] = σ; Cond: "cap_feats" [B, L, D]
    (zero-padded) and "cap_len" [B] (true lengths) → v = ε − x0 [B, C, h, w]."""

    BLOCKS = ("noise_refiner", "context_refiner", "layers")

    def __init__(self, transformer, autocast: str, num_train_timesteps: int):
        super().__init__(transformer, autocast)
        self.num_train_timesteps = num_train_timesteps

    def forward_velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        feats = cond.batched["cap_feats"].to(x_t.device, self.dtype)
        lengths = cond.batched["cap_len"].tolist()
        caps = [feats[i, :n] for i, n in enumerate(lengths)]
        # The pipeline's (1000 − t_s)/1000 with t_s = σ·num_train_timesteps (float32).
        ts = (1000 - t.float() * self.num_train_timesteps) / 1000
        out = self.transformer(list(x_t.unsqueeze(2).unbind(0)), ts, caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


class ZImageConditioner(TextConditioner):
    """Prompts → Qwen3 ``hidden_states[-2]`` rows of each prompt's true length (cached), batched
    zero-padded to ``length`` with "cap_len"."""

    def __init__(self, pipe, cfg: ModelConfig, encoder_names: tuple[str, ...]):
        super().__init__(pipe, cfg, encoder_names)
        self.length = cfg.max_sequence_length or Z_IMAGE_MAX_SEQUENCE_LENGTH

    def encode_batch(self, prompts: list[str]) -> Cond:
        """Prompts [B] → Cond(cap_feats [B, max L_i, D] zero-padded, cap_len [B])."""
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts),  # the pipeline rewrites the list it is given in place
            device=self.device(),
            do_classifier_free_guidance=False,
            max_sequence_length=self.length,
        )
        return _padded(embeds, max(len(e) for e in embeds))

    def _fill(self, prompts: list[str], batch: int = 16) -> None:
        super()._fill(prompts, batch)
        for p in prompts:  # keep each row at its true length (memory)
            row = self.rows[p]
            n = int(row["cap_len"])
            if row["cap_feats"].shape[1] != n:
                row["cap_feats"] = row["cap_feats"][:, :n].clone()

    def encode(self, prompts: list[str]) -> Cond:
        self._fill(prompts)
        rows = [self.rows[p] for p in prompts]
        return _padded([r["cap_feats"][0] for r in rows], self.length)


def _padded(embeds: list[Tensor], length: int) -> Cond:
    """Rows [L_i, D] → Cond(cap_feats [B, length, D] zero-padded, cap_len [B] int64)."""
    feats = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    for i, e in enumerate(embeds):
        feats[i, : len(e)] = e
    lens = torch.tensor([len(e) for e in embeds], dtype=torch.long)
    return Cond({"cap_feats": feats, "cap_len": lens})


class ZImageGenerator(DiffusersGenerator):
    """Z-Image / Z-Image-Turbo (``ZImagePipeline``); samples are latents [16, H/8, W/8]."""

    family = "z_image"
    pipeline_class = "ZImagePipeline"
    # Flow-Factory's Z-Image LoRA targets (src/flow_factory/models/z_image/z_image.py L70-74,
    # X-GenGroup/Flow-Factory@a0b2bc5): attention projections and the SwiGLU feed-forward.
    lora_default_targets = (
        "attention.to_k",
        "attention.to_q",
        "attention.to_v",
        "attention.to_out.0",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    )

    def build_parts(self, pipe, cfg: ModelConfig) -> None:
        tc = pipe.transformer.config
        f = pipe.vae_scale_factor
        native = pipe.vae.config.sample_size or Z_IMAGE_NATIVE
        patch = tc.all_patch_size[0]
        h, w = latent_shape(pipe, cfg, self.family, native, patch * f)
        self.sample_shape = (tc.in_channels, h, w)
        steps = pipe.scheduler.config.get("num_train_timesteps", 1000)
        self.denoiser = ZImageDenoiser(pipe.transformer, cfg.autocast, steps)
        self.conditioner = ZImageConditioner(pipe, cfg, ("text_encoder",))
        vc = pipe.vae.config
        self.codec = VAECodec(pipe.vae, vc.shift_factor or 0.0, vc.scaling_factor, cfg.vae_batch)

    def guidance_args(self, w: float) -> list[str]:
        """ZImagePipeline's pos + g·(pos − neg) is ddrl's w = g + 1 (g = 0: no CFG)."""
        return [f"guidance_scale={w - 1.0!r}"]

    def timestep_grid(self, num_steps: int, shift: float = 0.0) -> Tensor:
        """ZImagePipeline's sigmas [N + 1] (see the module docstring); ``shift`` > 0: a static
        shift instead of the scheduler's."""
        from diffusers.pipelines.z_image.pipeline_z_image import (
            calculate_shift,
            get_default_z_image_sigmas,
        )

        sc = self.scheduler.config
        seq = (self.sample_shape[1] // 2) * (self.sample_shape[2] // 2)
        mu = calculate_shift(
            seq,
            sc.get("base_image_seq_len", 256),
            sc.get("max_image_seq_len", 4096),
            sc.get("base_shift", 0.5),
            sc.get("max_shift", 1.15),
        )
        over = {"shift": shift, "use_dynamic_shifting": False} if shift > 0 else {}
        sched = type(self.scheduler).from_config(sc, **over)
        sched.set_timesteps(sigmas=get_default_z_image_sigmas(num_steps), mu=mu)
        return sched.sigmas.float().cpu()

    @classmethod
    def build_tiny(cls, path: Path) -> None:
        """A tiny Z-Image-Turbo: its published configs (``shapes/z-image-turbo.json``) with only
        sizes shrunk (transformer width 32, 2 heads of 16 = RoPE axes 4 + 6 + 6, one main and
        one refiner layer, caption width 16; the 4-stage VAE at width 8, so 32 px ↔ 16 × 4 × 4),
        the same scheduler, a 3-layer Qwen3 of width 16 (``hidden_states[-2]`` is a real
        layer's output) and the byte-level Qwen tokenizer."""
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            ZImagePipeline,
            ZImageTransformer2DModel,
        )
        from transformers import Qwen3Config, Qwen3Model

        from ddrl.models.shapes import real_config, shrink
        from ddrl.models.tiny_qwen import qwen_tokenizer

        real = real_config("z-image-turbo")
        width = 16  # text encoder hidden size = the transformer's cap_feat_dim
        tr = shrink(
            real["transformer"],
            dim=32,
            n_heads=2,
            n_kv_heads=2,
            n_layers=1,
            n_refiner_layers=1,
            cap_feat_dim=width,
            axes_dims=[4, 6, 6],
        )
        vae = shrink(
            real["vae"],
            block_out_channels=[8, 8, 8, 8],
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=32,
        )
        tok = qwen_tokenizer()
        text = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tok),
                hidden_size=width,
                intermediate_size=32,
                num_hidden_layers=3,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=1024,
                rms_norm_eps=real["text_encoder"]["rms_norm_eps"],
                bos_token_id=None,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                tie_word_embeddings=True,
            )
        )
        pipe = ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**real["scheduler"]),
            vae=AutoencoderKL(**vae),
            text_encoder=text,
            tokenizer=tok,
            transformer=ZImageTransformer2DModel(**tr),
        )
        pipe.save_pretrained(path, safe_serialization=True)

"""Qwen-Image (diffusers ``QwenImagePipeline``); the edit family is in ``qwen_image_edit``.

- Model space: UNPACKED normalised latents z = (E(x) − latents_mean) / latents_std [16, H/8,
  W/8] of the Wan-style 3D VAE (``AutoencoderKLQwenImage``; images are one-frame videos). The
  denoiser packs 2×2 latent patches into tokens (``ddrl.models.flux.pack``, the pipeline's
  ``_pack_latents``), calls the transformer as the pipeline does (timestep = σ: the pipeline
  passes its scheduler timesteps / 1000; ``img_shapes`` = [(1, h/2, w/2)]) and unpacks. Its
  output is already the flow velocity v = ε − x0.
- Conditioner: ``pipe.encode_prompt`` (Qwen2.5-VL's last hidden states of the chat template,
  the template's first 34 tokens dropped; ``max_sequence_length`` 512 as ``__call__``).
  Prompts have different lengths: each cached row is padded to one fixed length per run (the
  longest prompt ``prepare`` saw; before it, ``max_sequence_length``) with its 0/1 mask, so rows
  of any prompts concatenate (``CondCache``, ``Cond.cat``); the denoiser cuts a batch's padding
  back to its longest prompt and passes the mask (None when no row is padded, as the pipeline),
  so a sample does not depend on which prompts share its batch (tested).
- CFG: the pipeline's true CFG with a negative prompt (" ", flow_grpo's) and a norm rescale:
  v = v_u + w·(v_c − v_u), then each packed token of v rescaled to the norm of v_c's token
  (``true_cfg_mix``), the denoiser's ``cfg_mix`` (the family hook ``ddrl.models.base.guide``
  calls in sampling, training-time CFG and the references).
- Grid: ``np.linspace(1, 1/N, N)`` shifted with μ = ``calculate_shift`` of the image token count
  (the scheduler's exponential dynamic shift and its ``shift_terminal`` stretch), then 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from ddrl.errors import DDRLError
from ddrl.flow import scheduler_grid
from ddrl.models.base import Cond, cfg_mix
from ddrl.models.config import ModelConfig
from ddrl.models.flux import pack, unpack
from ddrl.models.hf import DEFAULTS_FILE, DiffusersGenerator, dynamic_mu
from ddrl.models.hf_parts import HFDenoiser, TextConditioner, VAECodec

MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default max_sequence_length
NEGATIVE_PROMPT = " "  # flow_grpo's negative prompt for Qwen-Image(-Edit) true CFG
# flow_grpo's Qwen-Image LoRA targets (scripts/train_qwenimage_edit_plus.py, main()): the joint
# attention's image and text projections and both streams' feed-forward layers.
LORA_TARGETS = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)


# Parts of the last transformer block whose output the image stream never sees.
UNUSED_IN_LAST_BLOCK = ("attn.add_q_proj", "attn.norm_added_q", "attn.to_add_out", "txt_mlp")


def _strip_adapters(parent: torch.nn.Module, name: str) -> None:
    """Replace the peft LoRA layers at or below ``parent.<name>`` by their base layers."""
    child = getattr(parent, name)
    if hasattr(child, "base_layer") and hasattr(child, "lora_A"):
        setattr(parent, name, child.base_layer)
        return
    for sub, _ in list(child.named_children()):
        _strip_adapters(child, sub)


def _token_norm(v: Tensor) -> Tensor:
    """‖·‖ of each packed 2×2×C token of unpacked latents [B, C, h, w], broadcast back to
    [B, 1, h, w] (the pipeline's ``torch.norm(noise_pred, dim=-1)`` on packed tokens)."""
    b, c, h, w = v.shape
    n = v.reshape(b, c, h // 2, 2, w // 2, 2).pow(2).sum(dim=(1, 3, 5)).sqrt()
    return n.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]


def true_cfg_mix(
    v_c: Tensor, v_u: Tensor, scale: float | Tensor, detach_uncond: bool = False
) -> Tensor:
    """QwenImage pipelines' true CFG: comb = v_u + w·(v_c − v_u) (w one float or one per sample
    [B]), rescaled token by token to the norm of the conditional velocity's token;
    ``detach_uncond``: no gradient through v_u."""
    comb = cfg_mix(v_c, v_u, scale, detach_uncond)
    return comb * (_token_norm(v_c) / _token_norm(comb))


def trim_text(cond: Cond, like: Tensor) -> tuple[Tensor, Tensor | None]:
    """A batch's prompt embeddings [B, L, D] and mask cut to its longest prompt; the mask is None
    when no row is padded (as the pipeline passes it)."""
    mask = cond.batched["prompt_mask"].to(like.device)
    length = int(mask.sum(1).max())
    embeds = cond.batched["prompt_embeds"][:, :length].to(like.device, like.dtype)
    mask = mask[:, :length]
    return embeds, None if bool(mask.all()) else mask.to(torch.long)


class QwenImageDenoiser(HFDenoiser):
    """QwenImageTransformer2DModel on unpacked latents x_t [B, C, h, w], t [B] = σ; Cond:
    "prompt_embeds" [B, L, D], "prompt_mask" [B, L], optionally "image_latents" [B, C, h', w']
    (an edit model's normalised condition latents, whose tokens follow the noisy ones; only the
    noisy tokens' velocity is returned, as ``QwenImageEditPlusPipeline``)."""

    BLOCKS = ("transformer_blocks",)

    def cfg_mix(
        self, v_c: Tensor, v_u: Tensor, t: Tensor, scale: float | Tensor, detach_uncond=False
    ) -> Tensor:
        """The family's CFG (``ddrl.models.base.guide`` calls it): ``true_cfg_mix``."""
        return true_cfg_mix(v_c, v_u, scale, detach_uncond)

    def forward_velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        b, _, h, w = x_t.shape
        tokens = pack(x_t)
        shapes = [(1, h // 2, w // 2)]
        given = cond.batched.get("image_latents")
        if given is not None:
            shapes.append((1, given.shape[-2] // 2, given.shape[-1] // 2))
            tokens = torch.cat([tokens, pack(given.to(x_t.device, x_t.dtype))], dim=1)
        embeds, mask = trim_text(cond, x_t)
        out = self.transformer(
            hidden_states=tokens,
            timestep=t.to(x_t.dtype),  # = the pipeline's (σ·1000) / 1000
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[shapes] * b,
            return_dict=False,
        )[0]
        return unpack(out[:, : (h // 2) * (w // 2)], h, w)


class QwenImageConditioner(TextConditioner):
    """Prompts → Cond(prompt_embeds [B, L, D], prompt_mask [B, L]) through ``encode_prompt``;
    every row padded to one run-wide length (module docstring)."""

    null_prompt = NEGATIVE_PROMPT

    def __init__(self, pipe, cfg: ModelConfig, encoder_names: tuple[str, ...]):
        super().__init__(pipe, cfg, encoder_names)
        self.max_len = cfg.max_sequence_length or MAX_SEQUENCE_LENGTH
        self.pad_len: int | None = None  # fixed by ``prepare`` or the first ``encode``

    def text_rows(self, prompts: list[str], **kw) -> tuple[Tensor, Tensor]:
        """``pipe.encode_prompt`` → (embeds [B, L, D], mask [B, L] long, all ones if None)."""
        embeds, mask = self.pipe.encode_prompt(
            prompt=prompts, device=self.device(), max_sequence_length=self.max_len, **kw
        )
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    def encode_batch(self, prompts: list[str]) -> Cond:
        embeds, mask = self.text_rows(prompts)
        return Cond({"prompt_embeds": embeds, "prompt_mask": mask})

    @torch.no_grad()
    def _fill(self, prompts: list[str], batch: int = 16) -> None:
        new = {p for p in prompts if p not in self.rows}
        super()._fill(prompts, batch)
        for p in new:  # keep each row unpadded: padding is added per request (``encode``)
            row = self.rows[p]
            n = int(row["prompt_mask"].sum())
            self.rows[p] = {
                k: v[:, :n].clone() if k in ("prompt_embeds", "prompt_mask") else v.clone()
                for k, v in row.items()
            }

    def encode(self, prompts: list[str]) -> Cond:
        self._fill(prompts)
        if self.pad_len is None:
            self.pad_len = max(self.max_len, *(self._len(p) for p in self.rows))
        longest = max(prompts, key=self._len)
        if self._len(longest) > self.pad_len:
            raise DDRLError(
                f"prompt {longest[:60]!r} encodes to {self._len(longest)} tokens, more than the "
                f"{self.pad_len} every row of this run is padded to (the longest prompt known at "
                "prepare); list it among the run's prompts"
            )
        rows = [self.rows[p] for p in prompts]
        out = {}
        for key in rows[0]:
            if key in ("prompt_embeds", "prompt_mask"):
                out[key] = torch.cat([pad_tokens(r[key], self.pad_len) for r in rows])
            else:
                out[key] = torch.cat([r[key] for r in rows])
        return Cond(out, self.shared)

    def _len(self, key: str) -> int:
        return self.rows[key]["prompt_mask"].shape[1]

    def prepare(self, prompts: list[str]) -> None:
        """Encode ``prompts`` and the negative prompt, fix the padded length to the longest of
        them, then free the text encoder if configured."""
        keys = self.prepare_keys(prompts)
        self._fill(keys)
        if self.pad_len is None:
            self.pad_len = max(self._len(k) for k in keys)
        if self.cfg.release_text_encoders:
            self.release()

    def prepare_keys(self, prompts: list[str]) -> list[str]:
        return [*prompts, self.null_prompt]


def pad_tokens(x: Tensor, length: int) -> Tensor:
    """[1, n, ...] zero-padded along dim 1 to ``length``."""
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


class QwenVAECodec(VAECodec):
    """Images [B, 3, H, W] in [-1, 1] ↔ z = (E(x) − mean) / std [B, C, H/8, W/8] through the
    3D VAE on one-frame videos (the pipelines' ``unsqueeze(2)`` / ``[:, :, 0]``)."""

    def encode(self, images: Tensor) -> Tensor:
        return super().encode(images[:, :, None])[:, :, 0]

    def decode(self, z: Tensor) -> Tensor:
        return super().decode(z[:, :, None])[:, :, 0]


def qwen_vae_codec(vae, batch: int) -> QwenVAECodec:
    """The Wan-style per-channel normalisation (``wan_vae_codec``) on one-frame videos."""
    from ddrl.models.wan import wan_vae_codec

    video = wan_vae_codec(vae, batch)
    return QwenVAECodec(vae, video.m, video.s, batch)


def native_size(gen: DiffusersGenerator, pipe) -> tuple[int, int]:
    """The pipeline's default size (``default_sample_size`` × VAE factor = 1024²), or a folder's
    ``ddrl_defaults.json`` (the tiny pipelines: 32²)."""
    side = pipe.default_sample_size * pipe.vae_scale_factor
    defaults = Path(os.path.expanduser(gen.source)) / DEFAULTS_FILE
    if defaults.is_file():
        d = json.loads(defaults.read_text())
        return d.get("height", side), d.get("width", side)
    return side, side


class QwenImageGenerator(DiffusersGenerator):
    """Qwen-Image (``QwenImagePipeline``); samples are unpacked latents [16, H/8, W/8]."""

    family = "qwen_image"
    pipeline_class = "QwenImagePipeline"
    lora_default_targets = LORA_TARGETS
    conditioner_class = QwenImageConditioner

    def __init__(self, pipe, cfg: ModelConfig, source: str):
        super().__init__(pipe, cfg, source)
        # The last block's text-stream output is discarded (only image tokens reach norm_out):
        # its text query, text output projection and text MLP never get a gradient. They do not
        # train (full: frozen; LoRA: no adapter there; peft's enable_adapters would re-enable a
        # frozen adapter), so DDP sees no unused parameter and no weight decay moves them.
        last = self.denoiser.transformer.transformer_blocks[-1]
        for name in UNUSED_IN_LAST_BLOCK:
            where, _, leaf = name.rpartition(".")
            parent = last.get_submodule(where)
            if getattr(parent, leaf, None) is None:
                continue
            if self.lora:
                _strip_adapters(parent, leaf)
            else:
                getattr(parent, leaf).requires_grad_(False)

    def build_parts(self, pipe, cfg: ModelConfig) -> None:
        tc = pipe.transformer.config
        if tc.guidance_embeds:
            raise DDRLError(
                f"{self.source}: a guidance-distilled Qwen-Image transformer (guidance_embeds) "
                "is not supported; allowed: the published Qwen-Image transformers"
            )
        f = pipe.vae_scale_factor
        h, w = cfg.size(native_size(self, pipe))
        if h % (2 * f) or w % (2 * f):
            raise DDRLError(
                f"model size {h}x{w} does not fit {self.family}: allowed are multiples of "
                f"{2 * f} (VAE factor {f} × 2×2 packing)"
            )
        self.sample_shape = (tc.in_channels // 4, h // f, w // f)
        self.denoiser = QwenImageDenoiser(pipe.transformer, cfg.autocast)
        self.conditioner = self.conditioner_class(pipe, cfg, ("text_encoder",))
        self.codec = qwen_vae_codec(pipe.vae, cfg.vae_batch)

    def pixel_size(self, pipe) -> tuple[tuple[int, int], int]:
        f = pipe.vae_scale_factor
        return (self.sample_shape[1] * f, self.sample_shape[2] * f), 0

    def guidance_args(self, w: float) -> list[str]:
        """True CFG with the pipeline's norm rescale against " " (none when w = 1)."""
        return [f"true_cfg_scale={w!r}", 'negative_prompt=" "'] if w != 1.0 else []

    def timestep_grid(self, num_steps: int, shift: float = 0.0) -> Tensor:
        """The pipeline's sigmas [N + 1]: linspace(1, 1/N, N) shifted with μ from the image
        token count (exponential, then stretched to ``shift_terminal``), then 0; ``shift`` > 0:
        a static shift instead."""
        seq = (self.sample_shape[1] // 2) * (self.sample_shape[2] // 2)
        mu = dynamic_mu(self.scheduler.config, seq, max_shift=1.15)  # the pipelines' default
        return scheduler_grid(num_steps, shift, mu=mu, scheduler=self.scheduler)

    @classmethod
    def build_tiny(cls, path: Path) -> None:
        """A tiny Qwen-Image pipeline shrunk from the published config (one block of width 32,
        the VAE at base width 4 with every stage, flag and latent statistic kept), a 2-layer
        Qwen2.5-VL of width 16 with the byte-level tokenizer; native size 32×32 px."""
        from diffusers import QwenImagePipeline

        from ddrl.models.qwen_image_tiny import tiny_parts, tiny_text_encoder

        parts = tiny_parts("qwen-image")
        pipe = QwenImagePipeline(
            transformer=parts["transformer"],
            vae=parts["vae"],
            scheduler=parts["scheduler"],
            text_encoder=tiny_text_encoder(parts["tokenizer"]),
            tokenizer=parts["tokenizer"],
        )
        pipe.save_pretrained(path, safe_serialization=True)
        (Path(path) / DEFAULTS_FILE).write_text(json.dumps({"height": 32, "width": 32}))

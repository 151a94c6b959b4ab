"""Wan2.1 / Wan2.2 text-to-video (diffusers ``WanPipeline``) behind the model protocol.

- Denoiser: ``WanTransformer3DModel`` on normalised latents [B, C, T, h, w]; it is called with
  ``timestep`` = t·1000 and its output is the flow velocity v = ε − x0 (the scheduler runs
  with ``prediction_type="flow_prediction"``). Wan2.2 TI2V (``expand_timesteps``) gets the
  same value per latent token, as the pipeline passes it. The two-expert Wan2.2 A14B
  (``transformer_2`` / ``boundary_ratio``) is rejected: one policy per run.
- Conditioner: ``pipe.encode_prompt`` (UMT5, zero-padded to ``max_sequence_length`` tokens,
  default 512 as in the pipeline's ``__call__``); the null prompt is "", the pipeline's
  negative-prompt default, and CFG is v_u + w·(v_c − v_u) exactly as the pipeline's.
- Codec: the Wan VAE, z = (E(x) − latents_mean) / latents_std per channel; videos
  [B, 3, F, H, W] in [-1, 1], F = 4k + 1 frames ↔ T = k + 1 latent frames.

Size: ``model.frames`` (0 = 81, the pipeline's default) and ``model.height`` × ``model.width``,
or ``model.resolution`` = R for R×R videos; neither gives the pipeline's native 480×832. A
pipeline folder may carry ``ddrl_defaults.json`` ({"height", "width", "frames"}) to replace
those natives: the tiny pipeline does (16×16, 5 frames).

Sampling grid: Wan ships ``UniPCMultistepScheduler`` (use_flow_sigmas, flow_shift 3.0), a
multistep solver. The RL loop needs one first-order Gaussian transition per step, so ddrl
samples with the Euler (ODE) or SDE step *on that scheduler's own sigmas*
(``timestep_grid`` = its ``sigmas`` after ``set_timesteps(N)``: N + 1 points from 1 − 1e-6 to
0). UniPC with solver_order=1 and the corrector off is algebraically that Euler step for flow
prediction (its DDIM update x0·α_t + ε̂·σ_t equals x + (σ_t − σ_s)·v); the tests compare
against the pipeline running a first-order scheduler on the same sigmas. One difference from
the stock pipeline remains: UniPC stores integer timesteps (⌊σ·1000⌋), ddrl conditions the
transformer on the continuous t·1000.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from ddrl.errors import DDRLError
from ddrl.models.base import Cond
from ddrl.models.config import ModelConfig
from ddrl.models.hf import DEFAULTS_FILE, DiffusersGenerator
from ddrl.models.hf_parts import TORCH_DTYPES, HFDenoiser, TextConditioner, VAECodec

TINY_DEFAULTS = {"height": 16, "width": 16, "frames": 5}
NATIVE = (480, 832, 81)  # WanPipeline's default height, width, num_frames


def wan_vae_codec(vae, batch: int) -> VAECodec:
    """The Wan VAE (also Cosmos-Predict2.5's) with its per-channel latent normalisation:
    z = (E(x) − mean)·(1 / std), mean/std [1, C, 1, 1, 1] from the VAE config."""
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, c, 1, 1, 1)
    return VAECodec(vae, mean, 1.0 / std, batch)


def video_sample_shape(
    gen: DiffusersGenerator,
    cfg: ModelConfig,
    channels: int,
    patch: int,
    native: tuple[int, int, int],
) -> tuple[int, int, int, int]:
    """(C, T, h, w) of one latent video from model.frames / model.resolution (0 = the folder's
    ``ddrl_defaults.json`` or ``native`` = (height, width, frames)), checked against the VAE's
    temporal factor and its spatial factor × the transformer's patch size."""
    pipe = gen.pipe
    s, tf = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    height, width, frames = native
    defaults = Path(os.path.expanduser(gen.source)) / DEFAULTS_FILE
    if defaults.is_file():
        try:
            d = json.loads(defaults.read_text())
        except json.JSONDecodeError as e:
            raise DDRLError(f"corrupt {defaults}: {e}") from e
        height, width, frames = d.get("height", height), d.get("width", width), d.get("frames", 0)
        frames = frames or native[2]
    frames = cfg.frames or frames
    height, width = cfg.size((height, width))
    if (frames - 1) % tf:
        ok = ", ".join(str(tf * k + 1) for k in range(4))
        raise DDRLError(
            f"model.frames={frames} for {gen.family}: the VAE needs {tf}k + 1 frames ({ok}, …)"
        )
    mult = s * patch
    if height % mult or width % mult:
        raise DDRLError(
            f"model size {height}x{width} for {gen.family}: each side must be a multiple of "
            f"{mult} (VAE factor {s} × patch {patch}); set model.resolution or height/width"
        )
    return (channels, (frames - 1) // tf + 1, height // s, width // s)


class WanDenoiser(HFDenoiser):
    """v_θ(x_t, t, c) = WanTransformer3DModel(x_t, t·1000, prompt_embeds);
    x_t [B, C, T, h, w], t [B], c.batched["prompt_embeds"] [B, L, D]."""

    BLOCKS = ("blocks",)

    def __init__(self, transformer, autocast: str = "none", expand_timesteps: bool = False):
        super().__init__(transformer, autocast)
        self.expand_timesteps = expand_timesteps

    def forward_velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        timestep = t * 1000
        if self.expand_timesteps:  # Wan2.2 TI2V: one timestep per latent token [B, T·h/2·w/2]
            b, _, f, h, w = x_t.shape
            p = self.transformer.config.patch_size
            timestep = timestep[:, None].expand(b, f * -(-h // p[1]) * -(-w // p[2]))
        emb = cond.batched["prompt_embeds"].to(x_t.device, self.dtype)
        return self.transformer(
            hidden_states=x_t, timestep=timestep, encoder_hidden_states=emb, return_dict=False
        )[0]


class WanConditioner(TextConditioner):
    """Prompts → UMT5 embeddings [B, L, D] through ``WanPipeline.encode_prompt``."""

    null_prompt = ""  # WanPipeline.encode_prompt's negative prompt when none is given

    def encode_batch(self, prompts: list[str]) -> Cond:
        emb, _ = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.cfg.max_sequence_length or 512,
            device=self.device(),
            dtype=TORCH_DTYPES[self.cfg.dtype],
        )
        return Cond({"prompt_embeds": emb})


class WanGenerator(DiffusersGenerator):
    """WanPipeline (Wan2.1 / Wan2.2 single-transformer text-to-video) as a Generator."""

    family = "wan"
    pipeline_class = "WanPipeline"

    def build_parts(self, pipe, cfg: ModelConfig) -> None:
        two = getattr(pipe, "transformer_2", None) is not None
        ratio = pipe.config.get("boundary_ratio")
        if pipe.transformer is None or two or ratio is not None:
            raise DDRLError(
                f"{self.source!r} is a two-expert Wan2.2 pipeline (transformer_2, boundary_ratio="
                f"{ratio}); ddrl trains one transformer: use Wan2.1 or Wan2.2-TI2V"
            )
        tr = pipe.transformer
        if tr.config.in_channels != pipe.vae.config.z_dim:
            raise DDRLError(
                f"{self.source!r}: transformer in_channels {tr.config.in_channels} != VAE z_dim "
                f"{pipe.vae.config.z_dim}; only text-to-video Wan pipelines are supported"
            )
        self.denoiser = WanDenoiser(tr, cfg.autocast, bool(pipe.config.get("expand_timesteps")))
        self.conditioner = WanConditioner(pipe, cfg, ("text_encoder",))
        self.codec = wan_vae_codec(pipe.vae, cfg.vae_batch)
        patch = tr.config.patch_size[1]
        self.sample_shape = video_sample_shape(self, cfg, tr.config.in_channels, patch, NATIVE)

    @classmethod
    def build_tiny(cls, path: Path) -> None:
        """A tiny Wan pipeline (~30 k parameters: a 1-layer transformer on 4 latent channels, a
        1-layer UMT5, a character-level T5 tokenizer, a tiny Wan VAE) whose native size is
        16×16 px × 5 frames."""
        from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        from ddrl.models.tiny_text import t5_tokenizer

        tok = t5_tokenizer()
        text = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tok),
                d_model=16,
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
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=32,
            num_layers=1,
            rope_max_seq_len=64,
        )
        pipe = WanPipeline(
            tokenizer=tok,
            text_encoder=text,
            vae=tiny_wan_vae(),
            transformer=transformer,
            scheduler=UniPCMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
            ),
        )
        pipe.save_pretrained(path, safe_serialization=True)
        (Path(path) / DEFAULTS_FILE).write_text(json.dumps(TINY_DEFAULTS))


def tiny_wan_vae():
    """A tiny AutoencoderKLWan: 4 latent channels, spatial factor 8, temporal factor 4, and a
    non-trivial per-channel latent mean/std so the normalisation is exercised."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    )

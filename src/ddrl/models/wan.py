"""Wan2.1 / Wan2.2 text-to-video (diffusers ``WanPipeline``) behind the model protocol.

- Denoiser: ``WanTransformer3DModel`` on normalised latents [B, C, T, h, w]; it is called with
  ``timestep`` = t·1000 and its output is the flow velocity v = ε − x0 (the scheduler runs
  with ``prediction_type="flow_prediction"``). Wan2.2 TI2V-5B (``expand_timesteps``, the
  z_dim-48 VAE with spatial factor 16) gets the same value per latent token, as the pipeline
  passes it.
- Wan2.2 A14B: two experts. ``transformer`` (high noise) runs where the pipeline's timestep
  t·1000 ≥ ``boundary_ratio`` · num_train_timesteps (0.875 · 1000), ``transformer_2`` (low
  noise) below, *per sample*: every velocity (rollout, policy and data terms, evaluation) uses
  the expert the pipeline would use at that sample's t. ``model.experts`` ("both" | "high" |
  "low") says which train (LoRA or full); the other is frozen. CFG: the pipeline's
  ``guidance_scale`` is ``sampler.cfg_scale``; its ``guidance_scale_2`` (the low-noise expert's)
  is ``model.cfg_scale_2`` (0 = the same, the pipeline's default), applied per sample by
  ``WanDenoiser.cfg_mix`` (the family's CFG hook, ``ddrl.models.base.guide``).
- Conditioner: ``pipe.encode_prompt`` (UMT5, zero-padded to ``max_sequence_length`` tokens,
  default 512 as in the pipeline's ``__call__``); the null prompt is "", the pipeline's
  negative-prompt default, and CFG is v_u + w·(v_c − v_u) exactly as the pipeline's.
- Codec: the Wan VAE, z = (E(x) − latents_mean) / latents_std per channel; videos
  [B, 3, F, H, W] in [-1, 1], F = 4k + 1 frames ↔ T = k + 1 latent frames.

Size: ``model.frames`` (0 = 81, the pipeline's default) and ``model.height`` × ``model.width``,
or ``model.resolution`` = R for R×R videos; neither gives the pipeline's native 480×832. A
pipeline folder may carry ``ddrl_defaults.json`` ({"height", "width", "frames"}) to replace
those natives: the tiny pipelines do (32×32 px × 5 frames; TI2V 64×64).

Sampling grid: Wan ships ``UniPCMultistepScheduler`` (use_flow_sigmas, flow_shift 3.0), a
multistep solver. The RL loop needs one first-order Gaussian transition per step, so ddrl
samples with the Euler (ODE) or SDE step *on that scheduler's own sigmas*
(``timestep_grid`` = its ``sigmas`` after ``set_timesteps(N)``: N + 1 points from 1 − 1e-6 to
0). UniPC with solver_order=1 and the corrector off is algebraically that Euler step for flow
prediction (its DDIM update x0·α_t + ε̂·σ_t equals x + (σ_t − σ_s)·v); the tests compare
against the pipeline running a first-order scheduler on the same sigmas. One difference from
the stock pipeline remains: UniPC stores integer timesteps (⌊σ·1000⌋), ddrl conditions the
transformer on the continuous t·1000 (so the A14B's expert switch can differ from the stock
pipeline's on a step with 875 ≤ σ·1000 < 876).

Tiny pipelines (``build_tiny``): the published configs (``shapes/wan2.1-t2v-1.3b.json``,
``wan2.2-t2v-a14b.json``, ``wan2.2-ti2v-5b.json``) with only sizes shrunk; ``model.base =
"tiny"`` (Wan2.1), ``"tiny:a14b"`` (two experts) or ``"tiny:ti2v"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ddrl.errors import DDRLError
from ddrl.models.base import Cond, cfg_mix
from ddrl.models.config import ModelConfig
from ddrl.models.hf import DEFAULTS_FILE, DiffusersGenerator
from ddrl.models.hf_parts import TORCH_DTYPES, HFDenoiser, TextConditioner, VAECodec

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


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class WanDenoiser(HFDenoiser):
    """v_θ(x_t, t, c) = WanTransformer3DModel(x_t, t·1000, prompt_embeds);
    x_t [B, C, T, h, w], t [B], c.batched["prompt_embeds"] [B, L, D]. With ``transformer_2``
    (Wan2.2 A14B) each sample goes to the expert its t selects (``high_noise``)."""

    BLOCKS = ("blocks",)

    def __init__(
        self,
        transformer,
        autocast: str = "none",
        expand_timesteps: bool = False,
        transformer_2=None,
        boundary: float | None = None,
        cfg_scale_2: float = 0.0,
    ):
        super().__init__(transformer, autocast)
        self.expand_timesteps = expand_timesteps
        self.transformer_2 = transformer_2  # registered (None: one expert)
        self.boundary = boundary  # the pipeline's boundary_timestep, on the t·1000 scale
        self.cfg_scale_2 = cfg_scale_2

    def shard_units(self) -> list[nn.Module]:
        """Every block of both experts (FSDP2 units)."""
        experts = [t for t in (self.transformer, self.transformer_2) if t is not None]
        return [b for tr in experts for name in self.BLOCKS for b in getattr(tr, name)]

    @property
    def dtype(self) -> torch.dtype:
        """float32 when either expert is (a fully fine-tuned expert beside a frozen bfloat16
        one); each expert's call casts to its own dtype."""
        if self.transformer_2 is not None and self.transformer_2.dtype == torch.float32:
            return torch.float32
        return super().dtype

    def high_noise(self, t: Tensor) -> Tensor:
        """[B] bool: True where ``transformer`` (the high-noise expert) runs: as WanPipeline,
        timestep ≥ boundary_ratio · num_train_timesteps, with timestep = t·1000."""
        if self.transformer_2 is None:
            return torch.ones(t.shape, dtype=torch.bool, device=t.device)
        return t * 1000 >= self.boundary

    def cfg_scale(self, t: Tensor, scale: float) -> float | Tensor:
        """The CFG scale per sample [B] (or one float for all): ``scale`` (sampler.cfg_scale,
        the pipeline's guidance_scale) where the high-noise expert runs, ``cfg_scale_2``
        (guidance_scale_2) where the low-noise one does. ``scale`` = 1 means no CFG at all, as
        in the pipeline (it guides only when guidance_scale > 1)."""
        s2 = self.cfg_scale_2
        if self.transformer_2 is None or not s2 or s2 == scale or scale == 1.0:
            return scale
        hi = self.high_noise(t)
        return torch.where(hi, torch.tensor(float(scale)), torch.tensor(float(s2))).float()

    def cfg_mix(
        self, v_c: Tensor, v_u: Tensor, t: Tensor, scale: float, detach_uncond: bool = False
    ) -> Tensor:
        """The loop's CFG (``ddrl.models.base.guide``) with the per-expert scale
        (``cfg_scale``): v_u + w_i·(v_c − v_u) for each sample i, as WanPipeline guides."""
        return cfg_mix(v_c, v_u, self.cfg_scale(t, scale), detach_uncond)

    def _call(self, model, x_t: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        dtype = model.dtype if hasattr(model, "dtype") else next(model.parameters()).dtype
        timestep = t * 1000
        if self.expand_timesteps:  # Wan2.2 TI2V: one timestep per latent token [B, T·h/2·w/2]
            b, _, f, h, w = x_t.shape
            p = model.config.patch_size
            timestep = timestep[:, None].expand(b, f * -(-h // p[1]) * -(-w // p[2]))
        return model(
            hidden_states=x_t.to(dtype),
            timestep=timestep,
            encoder_hidden_states=emb.to(dtype),
            return_dict=False,
        )[0]

    def forward_velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        emb = cond.batched["prompt_embeds"].to(x_t.device)
        if self.transformer_2 is None:
            return self._call(self.transformer, x_t, t, emb)
        high = self.high_noise(t)
        # Under DDP/FSDP every rank must run both experts in the same order (FSDP's all-gathers,
        # DDP's gradient buckets): an expert with no sample here runs on one and adds 0·v.
        sync = _distributed()
        if not sync and bool(high.all()):
            return self._call(self.transformer, x_t, t, emb)
        if not sync and not bool(high.any()):
            return self._call(self.transformer_2, x_t, t, emb)
        v = torch.zeros(x_t.shape, dtype=torch.float32, device=x_t.device)
        zero = x_t.new_zeros(())
        for model, mask in ((self.transformer, high), (self.transformer_2, ~high)):
            idx = mask.nonzero().squeeze(1)
            if len(idx):
                out = self._call(model, x_t[idx], t[idx], emb[idx.to(emb.device)])
                v = v.index_copy(0, idx, out.float())
            else:
                zero = zero + 0.0 * self._call(model, x_t[:1], t[:1], emb[:1]).float().sum()
        return v + zero


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
    """WanPipeline (Wan2.1, Wan2.2 TI2V-5B, and the two-expert Wan2.2 A14B) as a Generator."""

    family = "wan"
    pipeline_class = "WanPipeline"

    tiny_variants = ("", "a14b", "ti2v")  # model.base "tiny", "tiny:a14b", "tiny:ti2v"

    def guidance_args(self, w: float) -> list[str]:
        """guidance_scale = w; the A14B's low-noise expert's guidance_scale_2 when it differs."""
        s2 = self.denoiser.cfg_scale_2
        return [f"guidance_scale={w!r}"] + ([f"guidance_scale_2={s2!r}"] if s2 else [])

    @classmethod
    def trained_names(cls, cfg: ModelConfig) -> tuple[str, ...]:
        experts = cfg.experts
        return {"both": ("transformer", "transformer_2"), "high": ("transformer",)}.get(
            experts, ("transformer_2",)
        )

    def trained_components(self) -> dict[str, nn.Module]:
        den = self.denoiser
        if den.transformer_2 is None:
            return {"transformer": den.transformer}
        return {n: getattr(den, n) for n in self.trained_names(self.cfg)}

    def frozen_transformers(self) -> list[nn.Module]:
        trained = self.trained_components()
        den = self.denoiser
        return [
            getattr(den, n)
            for n in ("transformer", "transformer_2")
            if getattr(den, n) is not None and n not in trained
        ]

    def build_parts(self, pipe, cfg: ModelConfig) -> None:
        tr, tr2 = pipe.transformer, getattr(pipe, "transformer_2", None)
        ratio = pipe.config.get("boundary_ratio")
        if tr is None:
            raise DDRLError(f"{self.source!r} has no transformer (only transformer_2)")
        if (tr2 is None) != (ratio is None):
            raise DDRLError(
                f"{self.source!r}: transformer_2 {'without' if ratio is None else 'missing for'} "
                f"boundary_ratio={ratio}; a two-expert Wan2.2 pipeline needs both"
            )
        experts = cfg.experts
        if tr2 is None and experts != "both":
            raise DDRLError(
                f"model.experts={experts!r} needs a two-expert Wan2.2 A14B pipeline; "
                f"{self.source!r} has one transformer (allowed: both)"
            )
        for t in (tr, tr2):
            if t is not None and t.config.in_channels != pipe.vae.config.z_dim:
                raise DDRLError(
                    f"{self.source!r}: transformer in_channels {t.config.in_channels} != VAE "
                    f"z_dim {pipe.vae.config.z_dim}; only text-to-video Wan pipelines are "
                    "supported"
                )
        boundary = None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps
        self.denoiser = WanDenoiser(
            tr,
            cfg.autocast,
            bool(pipe.config.get("expand_timesteps")),
            transformer_2=tr2,
            boundary=boundary,
            cfg_scale_2=cfg.cfg_scale_2,
        )
        self.conditioner = WanConditioner(pipe, cfg, ("text_encoder",))
        self.codec = wan_vae_codec(pipe.vae, cfg.vae_batch)
        patch = tr.config.patch_size[1]
        self.sample_shape = video_sample_shape(self, cfg, tr.config.in_channels, patch, NATIVE)

    @classmethod
    def build_tiny(cls, path: Path, variant: str = "") -> None:
        """A tiny Wan pipeline from a published config with only sizes shrunk
        (``ddrl.models.wan_tiny``): "" = Wan2.1-T2V-1.3B, "a14b" = the two-expert A14B,
        "ti2v" = the TI2V-5B."""
        from ddrl.models.wan_tiny import build_tiny_pipeline

        build_tiny_pipeline(path, variant)

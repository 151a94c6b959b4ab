"""Wan (WanPipeline) behind the model protocol, on a tiny pipeline built from config.

Equivalence: the diffusers pipeline, its UniPC scheduler swapped for a first-order Euler one on
the same sigmas (``GridEuler``), from the same initial latents, against ddrl's ODE loop over
``gen.timestep_grid(N)``; CFG on and off; decoded videos too.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import one_line
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

from ddrl.config.core import FlowSDE, SamplerConfig
from ddrl.errors import DDRLError
from ddrl.models import shapes
from ddrl.models.base import guided_velocity
from ddrl.models.config import LoraConfig, ModelConfig
from ddrl.models.hf import ensure_tiny
from ddrl.models.wan import WanGenerator
from ddrl.sampling import rollout, sample_ode
from ddrl.sde import stepper

MAXLEN = 32  # text tokens (the tiny T5 tokenizer is one token per character)
PROMPTS = ["a red ball", "a cat on a mat"]
STEPS = 4
TOL = 1e-5  # float32, same operations up to batching


class GridEuler(FlowMatchEulerDiscreteScheduler):
    """First-order Euler on a given grid: sigmas = ``grid`` [N + 1], timesteps = σ·1000
    (``floor``: ⌊σ·1000⌋ as UniPC stores them)."""

    def use(self, grid: torch.Tensor, floor: bool = False) -> GridEuler:
        self.grid, self.floor = grid.float(), floor
        return self

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        self.sigmas = self.grid.clone()
        self.timesteps = self.grid[:-1] * 1000
        if self.floor:
            self.timesteps = self.timesteps.long().float()
        self.num_inference_steps = len(self.grid) - 1
        self._step_index = self._begin_index = None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny(WanGenerator, tmp_path_factory.mktemp("cache"), log=lambda m: None)


def load(path, base, **kw) -> WanGenerator:
    cfg = ModelConfig(name="wan", base=str(base), max_sequence_length=MAXLEN, **kw)
    return WanGenerator.from_pretrained(path, cfg)


def noise_for(gen, n=2, seed=0) -> torch.Tensor:
    return torch.randn((n, *gen.sample_shape), generator=torch.Generator().manual_seed(seed))


def ours(gen, scale=1.0, steps=STEPS) -> torch.Tensor:
    """ddrl's ODE samples [B, C, T, h, w] from ``noise_for(gen)`` (sample_ode draws the same)."""
    cfg = SamplerConfig(eval_steps=steps, cfg_scale=scale)
    return sample_ode(gen, PROMPTS, cfg, torch.Generator().manual_seed(0))


def pipeline(pipe, gen, guidance=1.0, scheduler=None, output_type="latent", steps=STEPS):
    """The diffusers pipeline from the same latents, on ``gen``'s grid (or ``scheduler``)."""
    pipe.set_progress_bar_config(disable=True)
    old = pipe.scheduler
    pipe.scheduler = scheduler or GridEuler().use(gen.timestep_grid(steps))
    try:
        out = pipe(
            prompt=PROMPTS,
            height=gen.height,
            width=gen.width,
            num_frames=gen.frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noise_for(gen),
            output_type=output_type,
            max_sequence_length=MAXLEN,
        ).frames
    finally:
        pipe.scheduler = old
    return out


def test_structure_is_the_published_one(tiny):
    """The tiny Wan2.1 differs from Wan2.1-T2V-1.3B's published configs in sizes only."""
    gen = load(tiny, tiny)
    real = shapes.real_config("wan2.1-t2v-1.3b")
    for part, module in (("transformer", gen.pipe.transformer), ("vae", gen.pipe.vae)):
        assert shapes.structural_differences(real[part], dict(module.config)) == []
    sched = dict(gen.pipe.scheduler.config)
    assert shapes.structural_differences(real["scheduler"], sched) == []
    assert gen.pipe.config.get("boundary_ratio") is None and not gen.pipe.config.expand_timesteps
    assert gen.denoiser.transformer_2 is None


def test_shape_and_grid(tiny):
    gen = load(tiny, tiny)
    assert gen.sample_shape == (16, 2, 4, 4) and (gen.height, gen.width, gen.frames) == (32, 32, 5)
    grid = gen.timestep_grid(STEPS)
    ref = UniPCMultistepScheduler.from_config(gen.pipe.scheduler.config)
    ref.set_timesteps(STEPS)
    assert len(grid) == STEPS + 1 and torch.equal(grid, ref.sigmas.float())
    assert abs(grid[0] - 1) < 1e-5 and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())
    big = load(tiny, tiny, resolution=64, frames=9)
    assert big.sample_shape == (16, 3, 8, 8) and (big.height, big.width, big.frames) == (64, 64, 9)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_pipeline_equivalence(tiny, guidance):
    gen = load(tiny, tiny)
    x = ours(gen, scale=guidance)  # the pipeline's CFG is v_u + g·(v_c − v_u), as ddrl's
    ref = pipeline(gen.pipe, gen, guidance)
    assert ref.shape == x.shape
    assert (ref - x).abs().max() < TOL
    if guidance == 1.0:
        assert (x - ours(gen, scale=4.0)).abs().max() > 1e-3  # CFG changes the samples
        video = gen.codec.decode(x)
        assert video.shape == (2, 3, 5, 32, 32)
        ref_video = pipeline(gen.pipe, gen, output_type="pt")  # [B, F, 3, H, W] in [0, 1]
        ours_video = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
        assert (ref_video - ours_video).abs().max() < TOL


def test_unipc_first_order_is_euler(tiny):
    """UniPC (order 1, no corrector) takes the Euler step; it conditions the transformer on
    ⌊σ·1000⌋, so the Euler reference here does too (ddrl uses the continuous σ·1000)."""
    gen = load(tiny, tiny)
    unipc = UniPCMultistepScheduler.from_config(
        gen.pipe.scheduler.config, solver_order=1, disable_corrector=list(range(STEPS))
    )
    ref = pipeline(gen.pipe, gen, scheduler=unipc)
    euler = GridEuler().use(gen.timestep_grid(STEPS), floor=True)
    assert (ref - pipeline(gen.pipe, gen, scheduler=euler)).abs().max() < 1e-4


def test_rollout_log_probs(tiny):
    gen = load(tiny, tiny)
    cfg = SamplerConfig(num_steps=3)
    ro = rollout(gen, PROMPTS, 2, cfg, torch.Generator().manual_seed(0))
    assert ro.states.shape == (4, 4, *gen.sample_shape) and ro.log_probs.shape == (3, 4)
    assert torch.isfinite(ro.log_probs).all()
    sde = FlowSDE()
    with torch.no_grad():
        for i in range(3):
            t, t_next = ro.timesteps[i].expand(4), ro.timesteps[i + 1].expand(4)
            v = guided_velocity(gen.denoiser, ro.states[i], t, ro.cond, None)
            lp = stepper(sde)(ro.states[i], v, t, t_next, prev_sample=ro.states[i + 1]).log_prob
            assert torch.allclose((lp - ro.log_probs[i]).exp(), torch.ones(4), atol=1e-5)


def perturb(gen, lora_only: bool, scale: float, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in gen.denoiser.transformer.named_parameters():
            if "lora_" in n or not lora_only:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_lora_save_load_export(tiny, tmp_path):
    gen = load(tiny, tiny, finetune="lora", lora=LoraConfig(rank=4))
    tr = gen.denoiser.transformer
    trainable = [n for n, p in tr.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in gen.conditioner.parameters())
    base = ours(gen)
    perturb(gen, lora_only=True, scale=0.3)
    x = ours(gen)
    assert (x - base).abs().max() > 1e-3
    # gradients reach the adapters only
    cond = gen.conditioner.encode(PROMPTS)
    gen.denoiser.velocity(noise_for(gen), torch.full((2,), 0.5), cond).pow(2).mean().backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in tr.named_parameters())

    gen.save_pretrained(tmp_path / "run")
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    again = load(tmp_path / "run", tiny, finetune="lora", lora=LoraConfig(rank=4))
    assert torch.equal(ours(again), x)
    plain = WanPipeline.from_pretrained(tiny)
    plain.load_lora_weights(tmp_path / "run")
    assert (pipeline(plain, gen) - x).abs().max() < TOL
    out = gen.export(tmp_path / "export")
    assert (pipeline(WanPipeline.from_pretrained(out), gen) - x).abs().max() < 1e-4
    with pytest.raises(DDRLError, match="exists"):
        gen.export(out)


def test_full_finetune_save_load_export(tiny, tmp_path):
    gen = load(tiny, tiny)
    assert all(p.requires_grad for p in gen.denoiser.transformer.parameters())
    perturb(gen, lora_only=False, scale=0.05)
    x = ours(gen)
    gen.save_pretrained(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "generator.json").read_text())
    assert meta == {"type": "wan", "base": str(tiny), "finetune": "full"}
    assert torch.equal(ours(load(tmp_path / "run", tiny)), x)
    tr = WanTransformer3DModel.from_pretrained(tmp_path / "run" / "transformer")
    plain = WanPipeline.from_pretrained(tiny, transformer=tr)
    assert (pipeline(plain, gen) - x).abs().max() < TOL
    out = gen.export(tmp_path / "export")
    assert (pipeline(WanPipeline.from_pretrained(out), gen) - x).abs().max() < TOL
    assert load(out, out).sample_shape == gen.sample_shape  # the tiny size travels along


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(DDRLError) as e:
        load(tiny, tiny, frames=6)
    assert "4k + 1" in one_line(e)
    with pytest.raises(DDRLError) as e:
        load(tiny, tiny, resolution=24)
    assert "multiple of 16" in one_line(e)
    with pytest.raises(DDRLError) as e:
        load(tiny, tiny, finetune="lora", lora=LoraConfig(rank=4, target_modules="to_qq"))
    assert "to_qq" in one_line(e)
    # transformer_2 without boundary_ratio (the pipeline would never use it), and
    # model.experts on a one-transformer pipeline
    p = WanPipeline.from_pretrained(tiny)
    two = WanPipeline(
        tokenizer=p.tokenizer,
        text_encoder=p.text_encoder,
        vae=p.vae,
        scheduler=p.scheduler,
        transformer=p.transformer,
        transformer_2=p.transformer,
    )
    two.save_pretrained(tmp_path / "half")
    with pytest.raises(DDRLError) as e:
        load(tmp_path / "half", tmp_path / "half")
    assert "boundary_ratio" in one_line(e)
    cfg = ModelConfig(name="wan", base=str(tiny), max_sequence_length=MAXLEN)
    object.__setattr__(cfg, "experts", "high")
    with pytest.raises(DDRLError) as e:
        WanGenerator.from_pretrained(tiny, cfg)
    assert "two-expert" in one_line(e)


def test_bfloat16_lora_and_native_size(tiny, tmp_path):
    """bfloat16 weights with float32 adapters (Wan keeps scale_shift_table in float32, so the
    denoiser's dtype must come from the transformer's, not its first parameter)."""
    gen = load(tiny, tiny, dtype="bfloat16", finetune="lora", lora=LoraConfig(rank=4))
    assert gen.denoiser.dtype == torch.bfloat16
    x = ours(gen)
    assert x.dtype == torch.float32 and (x - ours(load(tiny, tiny))).abs().max() < 0.05
    # a pipeline folder without ddrl_defaults.json: WanPipeline's 480×832, 81 frames
    WanPipeline.from_pretrained(tiny).save_pretrained(tmp_path / "native")
    native = load(tmp_path / "native", tmp_path / "native")
    assert native.sample_shape == (16, 21, 60, 104) and native.frames == 81


def test_expand_timesteps(tiny, tmp_path):
    """Wan2.2-TI2V style (expand_timesteps): one timestep per latent token, as the pipeline."""
    p = WanPipeline.from_pretrained(tiny)
    parts = {k: getattr(p, k) for k in ("tokenizer", "text_encoder", "vae", "scheduler")}
    WanPipeline(transformer=p.transformer, expand_timesteps=True, **parts).save_pretrained(
        tmp_path / "ti2v"
    )
    gen = load(tmp_path / "ti2v", tmp_path / "ti2v", resolution=32, frames=5)
    assert gen.denoiser.expand_timesteps
    assert (pipeline(gen.pipe, gen, 4.0) - ours(gen, 4.0)).abs().max() < TOL

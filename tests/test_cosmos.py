"""Cosmos-Predict2.5 (Cosmos2_5_PredictBasePipeline) behind the model protocol, on a tiny
pipeline built from config (no cosmos_guardrail, no torchvision needed).

Equivalence: the diffusers pipeline, its UniPC scheduler swapped for a first-order Euler one on
the same sigmas (``GridEuler``), from the same initial latents, against ddrl's ODE loop over
``gen.timestep_grid(N)``; CFG on and off (pipeline guidance g ↔ ddrl cfg_scale g + 1); decoded
videos; image-to-world with a conditional first latent frame.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import one_line
from diffusers import (
    Cosmos2_5_PredictBasePipeline,
    CosmosTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from ddrl.config.core import FlowSDE, SamplerConfig
from ddrl.errors import DDRLError
from ddrl.models.base import guided_velocity
from ddrl.models.config import LoraConfig, ModelConfig
from ddrl.models.cosmos import CosmosGenerator, NoGuardrail, with_given
from ddrl.models.hf import ensure_tiny
from ddrl.sampling import rollout, sample_ode
from ddrl.sde import ode_step, stepper

MAXLEN = 160  # the tiny Qwen tokenizer is byte-level; the chat scaffold alone is ~100 tokens
PROMPTS = ["a red ball", "a cat on a mat"]
STEPS = 4
TOL = 1e-5  # float32, same operations up to batching


class GridEuler(FlowMatchEulerDiscreteScheduler):
    """First-order Euler on a given grid: sigmas = ``grid`` [N + 1] (Cosmos feeds σ itself to
    the transformer, so the timesteps only index the steps)."""

    def use(self, grid: torch.Tensor) -> GridEuler:
        self.grid = grid.float()
        return self

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        self.sigmas = self.grid.clone()
        self.timesteps = self.grid[:-1] * 1000
        self.num_inference_steps = len(self.grid) - 1
        self._step_index = self._begin_index = None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny(CosmosGenerator, tmp_path_factory.mktemp("cache"), log=lambda m: None)


def load(path, base, **kw) -> CosmosGenerator:
    cfg = ModelConfig(name="cosmos", base=str(base), max_sequence_length=MAXLEN, **kw)
    return CosmosGenerator.from_pretrained(path, cfg)


def plain(folder, **parts) -> Cosmos2_5_PredictBasePipeline:
    """The pipeline as a user loads it (a stand-in for the guardrail, which is not installed)."""
    return Cosmos2_5_PredictBasePipeline.from_pretrained(
        folder, safety_checker=NoGuardrail(), **parts
    )


def noise_for(gen, n=2, seed=0) -> torch.Tensor:
    return torch.randn((n, *gen.sample_shape), generator=torch.Generator().manual_seed(seed))


def ours(gen, scale=1.0) -> torch.Tensor:
    """ddrl's ODE samples [B, C, T, h, w] from ``noise_for(gen)`` (sample_ode draws the same)."""
    cfg = SamplerConfig(eval_steps=STEPS, cfg_scale=scale)
    return sample_ode(gen, PROMPTS, cfg, torch.Generator().manual_seed(0))


def pipeline(pipe, gen, guidance=1.0, scheduler=None, output_type="latent", **kw):
    """The diffusers pipeline from the same latents, on ``gen``'s grid (or ``scheduler``)."""
    pipe.set_progress_bar_config(disable=True)
    old = pipe.scheduler
    pipe.scheduler = scheduler or GridEuler().use(gen.timestep_grid(STEPS))
    kw.setdefault("prompt", PROMPTS)
    kw.setdefault("latents", noise_for(gen))
    try:
        out = pipe(
            height=16,
            width=16,
            num_frames=5,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            output_type=output_type,
            max_sequence_length=MAXLEN,
            **kw,
        ).frames
    finally:
        pipe.scheduler = old
    return out


def test_shape_grid_and_prompts(tiny):
    gen = load(tiny, tiny)
    assert gen.sample_shape == (16, 2, 2, 2) and (gen.height, gen.width, gen.frames) == (16, 16, 5)
    grid = gen.timestep_grid(STEPS)
    ref = UniPCMultistepScheduler.from_config(gen.pipe.scheduler.config)
    ref.set_timesteps(STEPS)
    assert len(grid) == STEPS + 1 and torch.equal(grid, ref.sigmas.float())
    assert abs(grid[0] - 200 / 201) < 1e-5 and grid[-1] == 0
    assert bool((grid[1:] < grid[:-1]).all())
    c = gen.conditioner.encode(PROMPTS).batched["prompt_embeds"]
    assert c.shape == (2, MAXLEN, 32) and (c[0] - c[1]).abs().max() > 0.1
    assert gen.conditioner.null_prompt.startswith("The video captures")
    big = load(tiny, tiny, resolution=32, frames=9)
    assert big.sample_shape == (16, 3, 4, 4) and (big.height, big.width, big.frames) == (32, 32, 9)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_pipeline_equivalence(tiny, guidance):
    gen = load(tiny, tiny)
    # the pipeline's CFG v_c + g·(v_c − v_u) is ddrl's v_u + (g + 1)·(v_c − v_u)
    x = ours(gen, scale=guidance + 1 if guidance > 1 else 1.0)
    ref = pipeline(gen.pipe, gen, guidance)
    assert ref.shape == x.shape
    assert (ref - x).abs().max() < TOL
    if guidance == 1.0:
        assert (x - ours(gen, scale=4.0)).abs().max() > 1e-3  # CFG changes the samples
        video = gen.codec.decode(x)
        assert video.shape == (2, 3, 5, 16, 16)
        ref_video = pipeline(gen.pipe, gen, output_type="pt")  # [B, F, 3, H, W] in [0, 1]
        ours_video = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
        assert (ref_video - ours_video).abs().max() < TOL


def test_unipc_first_order_is_euler(tiny):
    """Cosmos' own UniPC with order 1 and no corrector takes exactly ddrl's Euler steps."""
    gen = load(tiny, tiny)
    unipc = UniPCMultistepScheduler.from_config(
        gen.pipe.scheduler.config, solver_order=1, disable_corrector=list(range(STEPS))
    )
    assert (pipeline(gen.pipe, gen, scheduler=unipc) - ours(gen)).abs().max() < 1e-4


def test_image_to_world(tiny):
    """A conditional first latent frame: generated frames as the pipeline's; the conditional
    frame ends exactly on the given latents (the pipeline's on (1 − σ_0)·ε + σ_0·given)."""
    gen = load(tiny, tiny)
    image = torch.rand((1, 3, 1, 16, 16), generator=torch.Generator().manual_seed(3)) * 2 - 1
    given = gen.codec.encode(image.repeat(1, 1, 5, 1, 1))  # what the pipeline encodes
    mask = torch.zeros(1, 1, given.shape[2], 1, 1)
    mask[:, :, 0] = 1
    cond = with_given(gen.conditioner.encode(PROMPTS[:1]), given, mask)
    eps = noise_for(gen, n=1)
    x, grid = eps.clone(), gen.timestep_grid(STEPS)
    with torch.no_grad():
        for i in range(STEPS):
            t = grid[i].expand(1)
            v = guided_velocity(gen.denoiser, x, t, cond, None)
            x = ode_step(x, v, t, grid[i + 1].expand(1)).x_next
    ref = pipeline(
        gen.pipe, gen, prompt=PROMPTS[0], latents=eps, video=image, num_latent_conditional_frames=1
    )
    gen_frames = mask[0, 0, :, 0, 0] == 0
    assert (ref[:, :, gen_frames] - x[:, :, gen_frames]).abs().max() < TOL
    assert (x[:, :, 0] - given[:, :, 0]).abs().max() < 1e-5
    s0 = grid[0]
    assert (ref[:, :, 0] - ((1 - s0) * eps + s0 * given)[:, :, 0]).abs().max() < 1e-5
    # no gradient reaches the transformer through conditional frames
    tr = gen.denoiser.transformer
    gen.denoiser.velocity(eps, torch.full((1,), 0.5), cond)[:, :, 0].sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in tr.parameters())


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
    base = ours(gen)
    perturb(gen, lora_only=True, scale=0.3)
    x = ours(gen)
    assert (x - base).abs().max() > 1e-3
    cond = gen.conditioner.encode(PROMPTS)
    gen.denoiser.velocity(noise_for(gen), torch.full((2,), 0.5), cond).pow(2).mean().backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in tr.named_parameters())

    gen.save_pretrained(tmp_path / "run")
    again = load(tmp_path / "run", tiny, finetune="lora", lora=LoraConfig(rank=4))
    assert torch.equal(ours(again), x)
    pipe = plain(tiny)
    pipe.load_lora_weights(tmp_path / "run")
    assert (pipeline(pipe, gen) - x).abs().max() < TOL
    out = gen.export(tmp_path / "export")
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]  # the guardrail is never saved
    assert (pipeline(plain(out), gen) - x).abs().max() < 1e-4


def test_full_finetune_save_load_export(tiny, tmp_path):
    gen = load(tiny, tiny)
    perturb(gen, lora_only=False, scale=0.05)
    x = ours(gen)
    gen.save_pretrained(tmp_path / "run")
    assert torch.equal(ours(load(tmp_path / "run", tiny)), x)
    tr = CosmosTransformer3DModel.from_pretrained(tmp_path / "run" / "transformer")
    assert (pipeline(plain(tiny, transformer=tr), gen) - x).abs().max() < TOL
    out = gen.export(tmp_path / "export")
    assert (pipeline(plain(out), gen) - x).abs().max() < TOL
    assert load(out, out).sample_shape == gen.sample_shape


def test_bad_inputs(tiny):
    with pytest.raises(DDRLError) as e:
        load(tiny, tiny, frames=4)
    assert "4k + 1" in one_line(e)
    with pytest.raises(DDRLError) as e:
        load(tiny, tiny, resolution=40)
    assert "multiple of 16" in one_line(e)
    with pytest.raises(DDRLError) as e:
        load(tiny, tiny, resolution=1024)  # the tiny transformer's RoPE reaches 16 patches
    assert "exceed" in one_line(e)
    with pytest.raises(DDRLError) as e:
        load(tiny, tiny, finetune="lora", lora=LoraConfig(rank=4, target_modules="q_proj"))
    assert "q_proj" in one_line(e)
    with pytest.raises(DDRLError) as e:
        load(tiny, tiny).timestep_grid(4, shift=3.0)
    assert "Karras" in one_line(e)

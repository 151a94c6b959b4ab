"""FLUX through diffusers: a tiny FluxPipeline (guidance embedding, FLUX.1-dev's dynamic-shift
scheduler) built from config (no downloads).

Equivalence: our Euler ODE on ``gen.timestep_grid`` (mu from the token count) with
``gen.denoiser`` on UNPACKED latents [16, 4, 4] against ``pipe(...)`` given the same initial
latents packed to [2·2 tokens, 64] (its latent output is packed too, so it is unpacked before
comparing), float32 on the CPU. Tolerance TOL = 1e-4 absolute on latents of magnitude ~1 (the
differences measured are ≤ ~1e-6); decoded images are compared after clamping to [-1, 1] with
the same tolerance. Save/load round trips of our own generator must match exactly.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import one_line_error

from ddrl.config.core import SamplerConfig
from ddrl.models.config import LoraConfig, ModelConfig
from ddrl.models.flux import FluxGenerator, image_ids, pack, unpack
from ddrl.models.hf import ensure_tiny
from ddrl.sampling import rollout, sample_ode
from ddrl.sde import stepper

TOL = 1e-4
N = 4
PROMPTS = ["a Red CAT, on a mat!", "Two dogs & 3 birds"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return ensure_tiny(FluxGenerator, tmp_path_factory.mktemp("flux"), log=lambda _: None)


def load(path, **kw) -> FluxGenerator:
    """The user's path: ``FluxGenerator.from_pretrained(folder, ModelConfig(...))``."""
    return FluxGenerator.from_pretrained(path, ModelConfig(name="flux", base=str(path), **kw))


def plain(path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def gen(folder):
    return load(folder)


def noise(gen, b: int, seed: int = 0) -> torch.Tensor:
    """The initial latents ``sample_ode`` draws from ``Generator().manual_seed(seed)``."""
    return torch.randn((b, *gen.sample_shape), generator=torch.Generator().manual_seed(seed))


def ours(gen, cfg_scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Our ODE samples [B, 16, 4, 4] (unpacked latents)."""
    cfg = SamplerConfig(eval_steps=N, cfg_scale=cfg_scale)
    return sample_ode(gen, PROMPTS, cfg, torch.Generator().manual_seed(seed))


def theirs(pipe, gen, guidance=3.5, true_cfg=1.0, seed=0, output_type="latent"):
    """The pipeline's output from the same latents: unpacked latents, or images in [0, 1]."""
    out = pipe(
        prompt=PROMPTS,
        negative_prompt="" if true_cfg != 1.0 else None,
        true_cfg_scale=true_cfg,
        num_inference_steps=N,
        guidance_scale=guidance,
        latents=pack(noise(gen, len(PROMPTS), seed)),
        height=gen.height,
        width=gen.width,
        output_type=output_type,
    ).images
    return unpack(out, *gen.sample_shape[1:]) if output_type == "latent" else out


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


def test_packing():
    x = torch.randn(2, 16, 8, 6)
    tokens = pack(x)
    assert tokens.shape == (2, 12, 64) and torch.equal(unpack(tokens, 8, 6), x)
    from diffusers import FluxPipeline

    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 2, 16, 8, 6))
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32)
    assert torch.equal(image_ids(8, 6), ids)


@pytest.mark.parametrize("guidance,true_cfg", [(0.0, 1.0), (5.0, 1.0), (0.0, 3.0)])
def test_pipeline_equivalence(folder, gen, guidance, true_cfg):
    g = load(folder, guidance=guidance) if guidance else gen
    assert g.denoiser.guidance == (guidance or 3.5)
    pipe = plain(folder)
    lat = theirs(pipe, g, guidance or 3.5, true_cfg)
    assert torch.allclose(pipe.scheduler.sigmas, g.timestep_grid(N))
    mine = ours(g, true_cfg)
    assert mine.shape == (2, *g.sample_shape) == (2, 16, 4, 4)
    assert maxdiff(lat, mine) < TOL
    if guidance or true_cfg != 1.0:
        assert maxdiff(mine, ours(gen)) > 1e-3  # the guidance really changes the samples
    img = theirs(pipe, g, guidance or 3.5, true_cfg, output_type="pt") * 2 - 1
    dec = g.codec.decode(mine)
    assert dec.shape == (2, 3, 32, 32)
    assert maxdiff(img, dec.clamp(-1, 1)) < TOL


def test_grid(gen):
    """FluxPipeline's dynamic shift (mu from 4 tokens); shift > 0 is a static shift."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(4, 256, 4096, 0.5, 1.15)
    s = torch.linspace(1, 1 / N, N, dtype=torch.float64)
    want = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / s - 1))
    assert torch.allclose(gen.timestep_grid(N)[:-1].double(), want, atol=1e-6)
    static = gen.timestep_grid(N, shift=3.0)[:-1].double()
    assert torch.allclose(static, 3 * s / (1 + 2 * s), atol=1e-6)
    assert gen.timestep_grid(N)[-1] == 0 and len(static) == N


def test_rollout_log_probs_recompute(gen):
    cfg = SamplerConfig(num_steps=3)
    r = rollout(gen, PROMPTS, 2, cfg, torch.Generator().manual_seed(0))
    assert r.states.shape == (4, 4, 16, 4, 4) and r.log_probs.shape == (3, 4)
    assert torch.isfinite(r.log_probs).all() and torch.isfinite(r.states).all()
    assert r.cond.shared["txt_ids"].shape == (512, 3)
    with torch.no_grad():
        for i in range(3):
            t, t_next = r.timesteps[i].expand(4), r.timesteps[i + 1].expand(4)
            v = gen.denoiser.velocity(r.states[i], t, r.cond)
            step = stepper(cfg.sde)(r.states[i], v, t, t_next, prev_sample=r.states[i + 1])
            ratio = (step.log_prob - r.log_probs[i]).exp()
            assert (ratio - 1).abs().max() < 1e-5


def perturb(params, scale: float) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn_like(p))


def test_lora_save_load_export(folder, tmp_path):
    g = load(folder, finetune="lora", lora=LoraConfig(rank=4))
    trainable = [n for n, p in g.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("single_transformer_blocks" in n for n in trainable)
    perturb([p for p in g.parameters() if p.requires_grad], 0.3)
    mine = ours(g)
    assert maxdiff(mine, ours(load(folder))) > 1e-3  # the adapter changes the samples
    g.save_pretrained(tmp_path / "run")
    pipe = plain(folder)
    pipe.load_lora_weights(tmp_path / "run")
    assert maxdiff(theirs(pipe, g), mine) < TOL
    assert torch.equal(ours(FluxGenerator.from_pretrained(tmp_path / "run", g.cfg)), mine)
    out = g.export(tmp_path / "merged")
    assert maxdiff(theirs(plain(out), g), mine) < TOL


def test_full_finetune_save_load(folder, tmp_path):
    g = load(folder)
    assert all(p.requires_grad for p in g.denoiser.parameters())
    perturb(g.denoiser.parameters(), 0.02)
    mine = ours(g)
    assert maxdiff(mine, ours(load(folder))) > 1e-3
    g.save_pretrained(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "generator.json").read_text())["type"] == "flux"
    assert torch.equal(ours(FluxGenerator.from_pretrained(tmp_path / "run", g.cfg)), mine)
    out = g.export(tmp_path / "merged")
    assert maxdiff(theirs(plain(out), g), mine) < TOL


def test_resolution(folder):
    g = load(folder, resolution=96)
    assert g.sample_shape == (16, 12, 12) and (g.height, g.width) == (96, 96)
    assert torch.isfinite(ours(g)).all()


def test_bad_inputs(folder, tmp_path):
    from ddrl.models.sd3 import SD3Generator

    one_line_error(lambda: load(folder, resolution=36), match=("36", "multiples of 16"))
    bad = LoraConfig(rank=4, target_modules="nope")
    one_line_error(lambda: load(folder, finetune="lora", lora=bad), match="nope")
    one_line_error(lambda: SD3Generator.from_pretrained(folder), match="FluxPipeline")
    one_line_error(lambda: load(tmp_path / "missing"), match="missing")


def test_no_guidance_embedding(folder, tmp_path):
    """A FLUX without the guidance embedding (e.g. FLUX.1-schnell) takes no model.guidance."""
    other = tmp_path / "schnell"
    shutil.copytree(folder, other)
    conf = other / "transformer" / "config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "guidance_embeds": False}))
    assert load(other).denoiser.guidance is None
    one_line_error(lambda: load(other, guidance=2.0), match="model.guidance=2.0")

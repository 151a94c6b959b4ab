"""SD3 through diffusers: a tiny StableDiffusion3Pipeline built from config (no downloads).

Equivalence: our Euler ODE on ``gen.timestep_grid`` with ``gen.denoiser`` (and true CFG via
``guided_velocity`` with ``gen.conditioner.null``) against ``pipe(...)`` from the same initial
latents, float32 on the CPU. Tolerance TOL = 1e-4 absolute on latents of magnitude ~1 (the
differences measured are ~1e-6: batch composition and operation order only); decoded images
are compared after clamping to [-1, 1] with the same tolerance. Save/load round trips of our own
generator must match exactly (same weights, same computation).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import one_line_error

from ddrl.config.core import SamplerConfig
from ddrl.models.config import LoraConfig, ModelConfig
from ddrl.models.hf import ensure_tiny
from ddrl.models.sd3 import SD3Generator
from ddrl.sampling import rollout, sample_ode
from ddrl.sde import stepper

TOL = 1e-4
N = 4
PROMPTS = ["a Red CAT, on a mat!", "Two dogs & 3 birds"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return ensure_tiny(SD3Generator, tmp_path_factory.mktemp("sd3"), log=lambda _: None)


def load(path, **kw) -> SD3Generator:
    """The user's path: ``SD3Generator.from_pretrained(folder, ModelConfig(...))``."""
    return SD3Generator.from_pretrained(path, ModelConfig(name="sd3", base=str(path), **kw))


def plain(path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def gen(folder):
    return load(folder)


def noise(gen, b: int, seed: int = 0) -> torch.Tensor:
    """The initial latents ``sample_ode`` draws from ``Generator().manual_seed(seed)``."""
    return torch.randn((b, *gen.sample_shape), generator=torch.Generator().manual_seed(seed))


def ours(gen, cfg_scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Our ODE samples [B, 16, 4, 4] (model space)."""
    cfg = SamplerConfig(eval_steps=N, cfg_scale=cfg_scale)
    return sample_ode(gen, PROMPTS, cfg, torch.Generator().manual_seed(seed))


def theirs(pipe, gen, w: float = 1.0, seed: int = 0, output_type: str = "latent"):
    """The pipeline's output from the same initial latents (latents or images in [0, 1])."""
    return pipe(
        prompt=PROMPTS,
        num_inference_steps=N,
        guidance_scale=w,
        latents=noise(gen, len(PROMPTS), seed),
        height=gen.height,
        width=gen.width,
        output_type=output_type,
    ).images


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


def test_tokenizers_round_trip(folder, gen):
    from transformers import CLIPTokenizer, T5TokenizerFast

    text = ["A Photo of a CAT, 123! ~{}", "", "lowercase words only"]
    for name, cls in (("tokenizer", CLIPTokenizer), ("tokenizer_3", T5TokenizerFast)):
        tok = getattr(gen.pipe, name)
        again = cls.from_pretrained(folder / name)
        kw = dict(padding="max_length", max_length=40, truncation=True)
        assert tok(text, **kw).input_ids == again(text, **kw).input_ids
        assert tok.pad_token in (tok.eos_token, "<pad>")


@pytest.mark.parametrize("w", [1.0, 4.0])
def test_pipeline_equivalence(folder, gen, w):
    pipe = plain(folder)
    lat = theirs(pipe, gen, w)
    assert torch.allclose(pipe.scheduler.sigmas, gen.timestep_grid(N))
    mine = ours(gen, w)
    assert mine.shape == (2, *gen.sample_shape) == (2, 16, 4, 4)
    assert maxdiff(lat, mine) < TOL
    if w != 1.0:
        assert maxdiff(mine, ours(gen)) > 1e-2  # CFG is really on
    img = theirs(pipe, gen, w, output_type="pt") * 2 - 1
    dec = gen.codec.decode(mine)
    assert dec.shape == (2, 3, 32, 32)
    assert maxdiff(img, dec.clamp(-1, 1)) < TOL


def test_dynamic_shift_grid(folder, tmp_path):
    """A scheduler with dynamic shifting: mu from the token count, as the pipeline computes it."""
    other = tmp_path / "dynamic"
    shutil.copytree(folder, other)
    conf = other / "scheduler" / "scheduler_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "use_dynamic_shifting": True}))
    g, pipe = load(other), plain(other)
    lat = theirs(pipe, g)
    assert torch.allclose(pipe.scheduler.sigmas, g.timestep_grid(N))
    assert not torch.allclose(g.timestep_grid(N), load(folder).timestep_grid(N))
    assert maxdiff(lat, ours(g)) < TOL


def test_rollout_log_probs_recompute(gen):
    cfg = SamplerConfig(num_steps=3)
    r = rollout(gen, PROMPTS, 2, cfg, torch.Generator().manual_seed(0))
    assert r.states.shape == (4, 4, 16, 4, 4) and r.log_probs.shape == (3, 4)
    assert torch.isfinite(r.log_probs).all() and torch.isfinite(r.states).all()
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
    lcfg = dict(finetune="lora", lora=LoraConfig(rank=4))
    g = load(folder, **lcfg)
    trainable = [n for n, p in g.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("attn.add_q_proj" in n for n in trainable)
    perturb([p for p in g.parameters() if p.requires_grad], 0.3)
    mine = ours(g)
    assert maxdiff(mine, ours(load(folder))) > 1e-3  # the adapter changes the samples
    g.save_pretrained(tmp_path / "run")
    pipe = plain(folder)
    pipe.load_lora_weights(tmp_path / "run")
    assert maxdiff(theirs(pipe, g), mine) < TOL
    assert torch.equal(ours(SD3Generator.from_pretrained(tmp_path / "run", g.cfg)), mine)
    out = g.export(tmp_path / "merged")
    assert maxdiff(theirs(plain(out), g), mine) < TOL


def test_sd35_structure_and_lora_targets(folder):
    """The tiny keeps SD3.5 Medium's dual attention (early blocks, not the last) and RMS
    qk-norm; the default LoRA targets (flow_grpo's train_sd3.py) adapt the joint attention of
    every block and, as there, not the second (image-only) attention ``attn2``."""
    from ddrl.models.sd3 import TINY_SD3_CHECKPOINT, tiny_sd3_transformer_config
    from ddrl.models.shapes import real_config, structural_differences

    g = load(folder, finetune="lora", lora=LoraConfig(rank=4))
    tr = g.denoiser.transformer
    real = real_config(TINY_SD3_CHECKPOINT)["transformer"]
    assert structural_differences(real, dict(tr.config)) == []
    assert (
        tr.config.dual_attention_layers
        == tiny_sd3_transformer_config(real_config(TINY_SD3_CHECKPOINT))["dual_attention_layers"]
        == [0, 1]
    )
    blocks = tr.transformer_blocks
    assert [b.attn2 is not None for b in blocks] == [True, True, False]
    assert all(type(b.attn.norm_q).__name__ == "RMSNorm" for b in blocks)
    trainable = {n for n, p in g.named_parameters() if p.requires_grad}
    assert not any(".attn2." in n for n in trainable)
    assert all(any(f"transformer_blocks.{i}.attn.to_q" in n for n in trainable) for i in range(3))


def test_full_finetune_save_load(folder, tmp_path):
    g = load(folder)
    assert all(p.requires_grad for p in g.denoiser.parameters())
    assert not any(p.requires_grad for p in g.codec.parameters())
    perturb(g.denoiser.parameters(), 0.02)
    mine = ours(g)
    assert maxdiff(mine, ours(load(folder))) > 1e-3
    g.save_pretrained(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "generator.json").read_text())["type"] == "sd3"
    assert torch.equal(ours(SD3Generator.from_pretrained(tmp_path / "run", g.cfg)), mine)
    out = g.export(tmp_path / "merged")
    assert maxdiff(theirs(plain(out), g), mine) < TOL


def test_resolution(folder):
    assert load(folder, resolution=128).sample_shape == (16, 16, 16)


def test_bad_inputs(folder, tmp_path):
    from ddrl.models.flux import FluxGenerator

    one_line_error(lambda: load(folder, resolution=30), match=("30", "multiples of 16"))
    one_line_error(lambda: load(folder, resolution=512), match=("512", "256"))
    bad = LoraConfig(rank=4, target_modules="to_q,nope")
    one_line_error(lambda: load(folder, finetune="lora", lora=bad), match="nope")
    one_line_error(lambda: FluxGenerator.from_pretrained(folder), match="StableDiffusion3Pipeline")
    one_line_error(lambda: load(tmp_path / "missing"), match="missing")
    half = tmp_path / "half"
    shutil.copytree(folder, half)
    shutil.rmtree(half / "transformer")
    one_line_error(lambda: load(half), match="cannot load")


def test_a_long_prompt_says_once_that_it_was_truncated(folder, capfd):
    """A 10,000-character prompt: one short line (not three ~10k-character warnings from the
    pipeline's CLIP-L, CLIP-G and T5 tokenizers), and the embedding is still made."""
    g = load(folder)
    capfd.readouterr()
    cond = g.conditioner.encode(["a cat " * 1700])
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ddrl: prompt(s) among"), err[:500]
    assert "truncated" in lines[0] and len(lines[0]) < 500
    assert cond.batched["prompt_embeds"].shape[0] == 1


def test_loading_a_pipeline_prints_no_torchvision_notice():
    import subprocess
    import sys

    code = "from ddrl.models import resolve\nfor n in ('sd3', 'flux', 'wan', 'cosmos'): resolve(n)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "torchvision" not in done.stderr, done.stderr[-2000:]

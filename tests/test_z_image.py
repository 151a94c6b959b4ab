"""Z-Image through diffusers: a tiny ZImagePipeline built from Z-Image-Turbo's published config
with only sizes shrunk (no downloads).

Equivalence: our Euler ODE on ``gen.timestep_grid`` with ``gen.denoiser`` (v = −out, the
transformer at 1 − σ, per-sample lists, captions sliced to their true lengths) against
``pipe(...)`` from the same initial latents, float32 on the CPU, with CFG off (guidance 0) and
on (the pipeline's guidance g = ddrl's cfg_scale g + 1). Tolerance TOL = 1e-5 on latents of
magnitude ~4 and on decoded images (clamped to [-1, 1]). Saved and reloaded generators must
match exactly.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import one_line_error

from ddrl.config import build_config
from ddrl.config.core import SamplerConfig
from ddrl.models import shapes
from ddrl.models.config import LoraConfig, ModelConfig
from ddrl.models.hf import ensure_tiny
from ddrl.models.z_image import ZImageGenerator
from ddrl.sampling import ode_solve, rollout, sample_ode
from ddrl.sde import stepper
from ddrl.training.loop import train
from ddrl.training.runlog import prepare_run_dir, read_jsonl

TOL = 1e-5
N = 4
# Different lengths (39 and 67 tokens with the template): batching must not change a sample.
PROMPTS = ["a Red CAT, on a mat!", "Two dogs & 3 birds under a very long and winding road sign"]
ALGORITHMS = ("ddrl", "flow_grpo", "dance_grpo", "grpo", "mix_grpo", "sft", "nft", "nft_data")
ALGORITHMS += ("awm", "awm_data")
FAST = ("ddrl", "nft")
SMALL = ["train.progress=false", "train.prompts_per_iter=2", "train.group_size=2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return ensure_tiny(ZImageGenerator, tmp_path_factory.mktemp("zimage"), log=lambda _: None)


def load(path, **kw) -> ZImageGenerator:
    """The user's path: ``ZImageGenerator.from_pretrained(folder, ModelConfig(...))``."""
    return ZImageGenerator.from_pretrained(path, ModelConfig(name="z_image", base=str(path), **kw))


def plain(path):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def gen(folder):
    return load(folder)


def noise(gen, b: int, seed: int = 0) -> torch.Tensor:
    """The initial latents ``sample_ode`` draws from ``Generator().manual_seed(seed)``."""
    return torch.randn((b, *gen.sample_shape), generator=torch.Generator().manual_seed(seed))


def ours(gen, prompts=PROMPTS, cfg_scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    cfg = SamplerConfig(eval_steps=N, cfg_scale=cfg_scale)
    return sample_ode(gen, list(prompts), cfg, torch.Generator().manual_seed(seed))


def theirs(pipe, gen, guidance=0.0, seed=0, output_type="latent", **kw):
    """The pipeline's output from the same latents (it rewrites the prompt list it is given, so
    it gets a copy): latents, or images in [0, 1]."""
    return pipe(
        prompt=list(PROMPTS),
        num_inference_steps=N,
        guidance_scale=guidance,
        latents=noise(gen, len(PROMPTS), seed),
        height=gen.height,
        width=gen.width,
        output_type=output_type,
        **kw,
    ).images


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", ["z-image-turbo", "z-image"])
def test_tiny_keeps_the_published_structure(folder, name):
    """Every structural key of the published transformer, VAE and scheduler configs is the tiny
    pipeline's (the base differs from Turbo only in the scheduler's shift, 6 vs 3)."""
    real = shapes.real_config(name)
    pipe = plain(folder)
    for part in ("transformer", "vae"):
        assert shapes.structural_differences(real[part], dict(getattr(pipe, part).config)) == []
    sched = dict(pipe.scheduler.config)
    turbo = shapes.real_config("z-image-turbo")
    assert shapes.structural_differences(turbo["scheduler"], sched) == []
    assert {k: v for k, v in real.items() if k not in ("scheduler", "source")} == {
        k: v for k, v in turbo.items() if k not in ("scheduler", "source")
    }
    assert (real["scheduler"]["shift"], real["pipeline"]) == (
        3.0 if name == "z-image-turbo" else 6.0,
        "ZImagePipeline",
    )
    # hidden_states[-2] is a real layer's output; the caption width is the encoder's
    assert pipe.text_encoder.config.num_hidden_layers >= 2
    assert pipe.text_encoder.config.hidden_size == pipe.transformer.config.cap_feat_dim


@pytest.mark.parametrize("guidance", [0.0, 4.0])
def test_pipeline_equivalence(folder, gen, guidance):
    pipe = plain(folder)
    lat = theirs(pipe, gen, guidance)
    assert torch.equal(pipe.scheduler.sigmas, gen.timestep_grid(N))
    mine = ours(gen, cfg_scale=guidance + 1)  # pipeline g ↔ ddrl g + 1
    assert mine.shape == (2, *gen.sample_shape) == (2, 16, 4, 4)
    assert maxdiff(lat, mine) < TOL
    if guidance:
        assert maxdiff(mine, ours(gen)) > 1e-3  # the guidance really changes the samples
    img = theirs(pipe, gen, guidance, output_type="pt") * 2 - 1
    dec = gen.codec.decode(mine)
    assert dec.shape == (2, 3, 32, 32)
    assert maxdiff(img, dec.clamp(-1, 1)) < TOL


def test_grid_is_the_pipelines_own(folder, gen, tmp_path):
    """The sigmas ZImagePipeline sets (torch linspace(1, 1/N, N), then the scheduler with mu
    from the image token count): the published static shifts (Turbo 3, base 6), a scheduler with
    dynamic shifting, and ``shift`` > 0 as a static override."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = plain(folder)
    for name in ("z-image-turbo", "z-image"):
        sched = FlowMatchEulerDiscreteScheduler(**shapes.real_config(name)["scheduler"])
        pipe.scheduler, gen.scheduler = sched, sched
        for n in (3, 9):
            pipe(prompt=["x"], num_inference_steps=n, guidance_scale=0.0, height=32, width=32,
                 output_type="latent")  # fmt: skip
            assert torch.equal(pipe.scheduler.sigmas, gen.timestep_grid(n))
            s = torch.linspace(1, 1 / n, n, dtype=torch.float64)
            k = sched.config.shift
            assert torch.allclose(gen.timestep_grid(n)[:-1].double(), k * s / (1 + (k - 1) * s))
    gen.scheduler = gen.pipe.scheduler
    dyn = tmp_path / "dynamic"
    shutil.copytree(folder, dyn)
    conf = dyn / "scheduler" / "scheduler_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "use_dynamic_shifting": True}))
    g2, p2 = load(dyn, resolution=64), plain(dyn)
    p2(prompt=["x"], num_inference_steps=N, guidance_scale=0.0, height=64, width=64,
       output_type="latent")  # fmt: skip
    assert torch.equal(p2.scheduler.sigmas, g2.timestep_grid(N))
    assert not torch.allclose(g2.timestep_grid(N), gen.timestep_grid(N))
    s = torch.linspace(1, 1 / N, N, dtype=torch.float64)
    assert torch.allclose(g2.timestep_grid(N, shift=2.0)[:-1].double(), 2 * s / (1 + s))


def test_batching_prompts_of_different_lengths_changes_no_sample(gen):
    """Rows padded to one length (``cap_len`` carries the true one) and sliced back before the
    transformer: each prompt alone, in a batch, and the null prompt beside them (CFG) give the
    same samples; the cached rows are kept at their true lengths."""
    prompts = [*PROMPTS, "", "z"]
    c = gen.conditioner
    batch = c.encode(prompts)
    assert batch.batched["cap_feats"].shape[1] == c.length == 512
    lens = batch.batched["cap_len"].tolist()
    assert len(set(lens)) == 4 and all(c.rows[p]["cap_feats"].shape[1] == n
                                       for p, n in zip(prompts, lens, strict=True))  # fmt: skip
    assert batch.batched["cap_feats"][0, lens[0] :].abs().max() == 0
    for scale in (1.0, 5.0):
        together = ours(gen, prompts, scale)
        noises = noise(gen, len(prompts))
        for i, p in enumerate(prompts):
            cfg = SamplerConfig(eval_steps=N, cfg_scale=scale)
            alone = ode_solve(gen, noises[i : i + 1], [p], cfg)
            assert maxdiff(alone[0], together[i]) < TOL, (p, scale)


def test_rollout_log_probs_recompute(gen):
    cfg = SamplerConfig(num_steps=3, cfg_scale=5.0)
    r = rollout(gen, PROMPTS, 2, cfg, torch.Generator().manual_seed(0))
    assert r.states.shape == (4, 4, 16, 4, 4) and r.log_probs.shape == (3, 4)
    assert torch.isfinite(r.log_probs).all() and torch.isfinite(r.states).all()
    from ddrl.models.base import guided_velocity

    with torch.no_grad():
        for i in range(3):
            t, t_next = r.timesteps[i].expand(4), r.timesteps[i + 1].expand(4)
            v = guided_velocity(gen.denoiser, r.states[i], t, r.cond, r.null, 5.0)
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
    for part in ("attention.to_q", "attention.to_out.0", "feed_forward.w1", "feed_forward.w3"):
        assert any(f"{part}.lora_A" in n for n in trainable), part
    assert any("noise_refiner" in n for n in trainable) and any("layers." in n for n in trainable)
    perturb([p for p in g.parameters() if p.requires_grad], 0.3)
    mine = ours(g)
    assert maxdiff(mine, ours(load(folder))) > 1e-3  # the adapter changes the samples
    g.save_pretrained(tmp_path / "run")
    pipe = plain(folder)
    pipe.load_lora_weights(tmp_path / "run")  # ZImageLoraLoaderMixin
    assert maxdiff(theirs(pipe, g), mine) < TOL
    assert torch.equal(ours(ZImageGenerator.from_pretrained(tmp_path / "run", g.cfg)), mine)
    out = g.export(tmp_path / "merged")
    assert maxdiff(theirs(plain(out), g), mine) < TOL


def test_full_finetune_save_load_export(folder, tmp_path):
    g = load(folder)
    assert all(p.requires_grad for p in g.denoiser.parameters())
    perturb(g.denoiser.parameters(), 0.02)
    mine = ours(g)
    assert maxdiff(mine, ours(load(folder))) > 1e-3
    g.save_pretrained(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "generator.json").read_text())["type"] == "z_image"
    assert torch.equal(ours(ZImageGenerator.from_pretrained(tmp_path / "run", g.cfg)), mine)
    out = g.export(tmp_path / "merged")
    merged = plain(out)
    assert maxdiff(theirs(merged, g), mine) < TOL
    img = merged(prompt="a cat", num_inference_steps=2, guidance_scale=4.0, height=32, width=32)
    assert img.images[0].size == (32, 32)  # the plain pipeline generates PIL images


def test_sizes_and_bad_inputs(folder, tmp_path):
    g = load(folder, height=32, width=64)
    assert g.sample_shape == (16, 4, 8) and (g.height, g.width) == (32, 64)
    assert torch.isfinite(ours(g)).all()
    one_line_error(lambda: load(folder, resolution=40), match=("40", "multiples of 16"))
    bad = LoraConfig(rank=4, target_modules="nope")
    one_line_error(lambda: load(folder, finetune="lora", lora=bad), match="nope")
    from ddrl.models.flux import FluxGenerator

    one_line_error(lambda: FluxGenerator.from_pretrained(folder), match="ZImagePipeline")


def test_shard_units_and_gradient_checkpointing(folder):
    g = load(folder, gradient_checkpointing=True)
    tr = g.denoiser.transformer
    units = g.denoiser.shard_units()
    assert units == [*tr.noise_refiner, *tr.context_refiner, *tr.layers]
    x = torch.randn(2, *g.sample_shape, generator=torch.Generator().manual_seed(1))
    cond = g.conditioner.encode(PROMPTS)
    grads = []
    for ckpt in (True, False):
        tr.gradient_checkpointing = ckpt
        tr.zero_grad()
        g.denoiser.train()
        g.denoiser.velocity(x, torch.tensor([0.3, 0.8]), cond).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tr.parameters() if p.grad is not None]))
    assert grads[0].numel() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


# -- the loop on the tiny preset ---------------------------------------------------------------


def _train(tmp_path, name, *ov, resume=False):
    cfg = build_config(overrides=["preset=tiny-z-image", *SMALL, *ov])
    out = tmp_path / name
    if not resume:
        prepare_run_dir(out, resume=False, overwrite=False)
    train(cfg, out, resume=resume, log=lambda *a: None)
    return cfg, out


@pytest.mark.parametrize(
    "algorithm", [a if a in FAST else pytest.param(a, marks=pytest.mark.slow) for a in ALGORITHMS]
)
def test_every_algorithm_runs_two_iterations(tmp_path, algorithm):
    from ddrl.models import load_generator

    extra = ["train.timestep_count=1"] if algorithm.startswith("awm") else []  # 3 steps only
    cfg, out = _train(tmp_path, "run", f"algorithm={algorithm}", *extra)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert all(v is not None for v in r.values()), r
        if "onpolicy_ratio_dev_max" in r:
            assert r["onpolicy_ratio_dev_max"] < 1e-4, r
    gen = load_generator(out / "final", config=cfg.model)
    assert gen.sample_shape == (16, 4, 4)


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_resume_continues_exactly(tmp_path, finetune):
    from safetensors.torch import load_file

    ft = f"model.finetune={finetune}"
    ov = ["train.iterations=2", "train.checkpoint_every=1", ft]
    _train(tmp_path, "whole", *ov)
    _train(tmp_path, "split", "train.iterations=1", "train.checkpoint_every=1", ft)
    _train(tmp_path, "split", *ov, resume=True)
    name = "pytorch_lora_weights.safetensors" if finetune == "lora" else None
    files = (
        [name]
        if name
        else [p.name for p in (tmp_path / "whole" / "final" / "transformer").glob("*.safetensors")]
    )
    for f in files:
        sub = "" if name else "transformer"
        a = load_file(tmp_path / "whole" / "final" / sub / f)
        b = load_file(tmp_path / "split" / "final" / sub / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    split = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [r["loss"] for r in whole] == [r["loss"] for r in split]


def test_published_preset_resolves_with_the_cited_values():
    c = build_config(overrides=["preset=z-image-ddrl"])
    assert c.data.prompts == "data:flow_grpo-pickscore/train.txt"
    assert (c.model.name, c.model.base, c.model.resolution) == (
        "z_image",
        "Tongyi-MAI/Z-Image",
        512,
    )
    assert (c.model.lora.rank, c.model.lora.alpha, c.model.lora.target_modules) == (64, 128, "")
    assert (c.sampler.num_steps, c.sampler.eval_steps, c.sampler.sde.noise_level) == (10, 40, 0.7)
    assert (c.sampler.cfg_scale, c.eval.cfg_scale) == (1.0, 4.0 + 1)  # FF guidance 4 → ddrl 5
    assert (c.train.group_size, c.optim.lr, c.loss.clip_range) == (16, 3e-4, 1e-4)
    assert c.reward.name == "pickscore"


# -- two processes (gloo) ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_take_the_single_process_steps(tmp_path, strategy):
    """tiny-z-image (LoRA, DDRL with CFG) on 2 gloo ranks under DDP or FSDP2 (one unit per
    refiner/main block) vs one process: same rows and final adapter to float32 rounding."""
    import os
    import subprocess
    import sys

    from test_distributed import PARAM_TOL, _max_diff, _params, _same_rows, _torchrun

    args = ["--preset", "tiny-z-image", "train.iterations=2", "train.prompts_per_iter=2",
            "train.group_size=2", "train.progress=false"]  # fmt: skip
    one = tmp_path / "one"
    done = subprocess.run(
        [sys.executable, "-m", "ddrl", "train", "--out", str(one), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    two = tmp_path / "two"
    _torchrun("train", "--out", str(two), *args, f"parallel.strategy={strategy}")
    _same_rows(read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl"))
    assert _max_diff(_params(one), _params(two)) < PARAM_TOL

"""FLUX.2 (Flux2Pipeline, FLUX.2-dev) and FLUX.2-Klein (Flux2KleinPipeline) through diffusers:
tiny pipelines shrunk from the published configs (shapes/flux.2-dev.json,
flux.2-klein-base-4b.json; only sizes change), built offline with tiny Mistral-3 / Qwen3 text
encoders deep enough for the pipelines' hidden-state layers.

Equivalence: our Euler ODE on ``gen.timestep_grid`` with ``gen.denoiser`` on model-space latents
[128, 4, 4] (patchified, batch-norm normalised) against ``pipe(...)`` from the same initial
latents, float32 on the CPU, TOL = 1e-5 (measured: ≤ ~2e-6). Flux2Pipeline's latent output is
packed model space (unpacked before comparing); Flux2KleinPipeline's is the de-normalised,
unpatchified VAE latents (compared with ``codec.to_vae_latents``). Decoded images are compared
after clamping to [-1, 1].
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import one_line_error

from ddrl.config import build_config
from ddrl.config.core import SamplerConfig
from ddrl.models import load_generator, shapes
from ddrl.models.config import LoraConfig, ModelConfig
from ddrl.models.flux2 import (
    Flux2Generator,
    Flux2KleinGenerator,
    image_ids,
    pack,
    patchify,
    unpack,
    unpatchify,
)
from ddrl.models.hf import ensure_tiny
from ddrl.sampling import rollout, sample_ode
from ddrl.sde import stepper
from ddrl.training.loop import train
from ddrl.training.runlog import prepare_run_dir, read_jsonl

TOL = 1e-5
N = 4
PROMPTS = ["a Red CAT, on a mat!", "Two dogs & 3 birds"]
FAMILIES = {"flux2": Flux2Generator, "flux2_klein": Flux2KleinGenerator}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    return {k: ensure_tiny(c, root, log=lambda _: None) for k, c in FAMILIES.items()}


def load(cls, path, **kw):
    """The user's path: ``Generator.from_pretrained(folder, ModelConfig(...))``."""
    return cls.from_pretrained(path, ModelConfig(name=cls.family, base=str(path), **kw))


def plain(cls, path):
    import diffusers

    pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dev(folders):
    return load(Flux2Generator, folders["flux2"])


@pytest.fixture(scope="module")
def klein(folders):
    return load(Flux2KleinGenerator, folders["flux2_klein"])


def noise(gen, b: int, seed: int = 0) -> torch.Tensor:
    """The initial latents ``sample_ode`` draws from ``Generator().manual_seed(seed)``."""
    return torch.randn((b, *gen.sample_shape), generator=torch.Generator().manual_seed(seed))


def ours(gen, cfg_scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    cfg = SamplerConfig(eval_steps=N, cfg_scale=cfg_scale)
    return sample_ode(gen, PROMPTS, cfg, torch.Generator().manual_seed(seed))


def theirs(pipe, gen, guidance: float, seed: int = 0, output_type: str = "latent"):
    """The pipeline from the same initial latents: model-space latents (FLUX.2-dev), raw VAE
    latents (Klein), or images in [0, 1]."""
    out = pipe(
        prompt=PROMPTS,
        num_inference_steps=N,
        guidance_scale=guidance,
        latents=noise(gen, len(PROMPTS), seed),
        height=gen.height,
        width=gen.width,
        output_type=output_type,
    ).images
    if output_type == "latent" and isinstance(gen, Flux2KleinGenerator):
        return out
    return unpack(out, *gen.sample_shape[1:]) if output_type == "latent" else out


def comparable(gen, z):
    """Our model-space samples in the form the pipeline's latent output has."""
    return gen.codec.to_vae_latents(z) if isinstance(gen, Flux2KleinGenerator) else z


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


CHECKPOINTS = [("flux2", "flux.2-dev"), ("flux2_klein", "flux.2-klein-base-4b")]


@pytest.mark.parametrize("family,checkpoint", CHECKPOINTS)
def test_tiny_has_the_published_structure(folders, family, checkpoint):
    """Only sizes differ from the published configs; the hidden-state layers the pipeline
    stacks exist (and are not the last, final-normed one); joint_attention_dim = 3 × width."""
    cls = FAMILIES[family]
    assert cls.checkpoint == checkpoint
    real = shapes.real_config(checkpoint)
    pipe = plain(cls, folders[family])
    assert type(pipe).__name__ == real["pipeline"]
    for part in ("transformer", "vae", "scheduler"):
        got = dict(getattr(pipe, part).config)
        assert shapes.structural_differences(real[part], got) == [], part
    pc = real["pipeline_config"]
    assert bool(pipe.config.get("is_distilled", False)) == pc.get("is_distilled", False)
    text = pipe.text_encoder.config.get_text_config()
    assert type(pipe.text_encoder).__name__ == pc["text_encoder"]
    assert max(pc["text_encoder_out_layers"]) < text.num_hidden_layers
    assert pipe.transformer.config.joint_attention_dim == 3 * text.hidden_size
    if family == "flux2_klein":  # the base and the distilled 4B share the transformer config
        assert shapes.real_config("flux.2-klein-4b")["transformer"] == real["transformer"]


def test_packing_and_ids_are_the_pipelines():
    from diffusers import Flux2Pipeline as P

    lat = torch.randn(2, 32, 8, 6)
    z = patchify(lat)
    assert torch.equal(z, P._patchify_latents(lat)) and torch.equal(unpatchify(z), lat)
    assert torch.equal(P._unpatchify_latents(z), lat)
    tokens = pack(z)
    assert torch.equal(tokens, P._pack_latents(z)) and torch.equal(unpack(tokens, 4, 3), z)
    ids = P._prepare_latent_ids(z)
    assert torch.equal(image_ids(4, 3), ids[0])
    assert torch.equal(P._unpack_latents_with_ids(tokens, ids), z)


@pytest.mark.parametrize("family", ["flux2", "flux2_klein"])
def test_grid_is_the_pipelines(folders, family, dev, klein):
    """linspace(1, 1/N, N) shifted exponentially with mu = compute_empirical_mu(tokens, N)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    gen = dev if family == "flux2" else klein
    for n in (4, 28):
        mu = compute_empirical_mu(16, n)
        s = torch.linspace(1, 1 / n, n, dtype=torch.float64)
        e = torch.exp(torch.tensor(mu, dtype=torch.float64))
        grid = gen.timestep_grid(n)
        assert len(grid) == n + 1 and grid[-1] == 0
        assert torch.allclose(grid[:-1].double(), e / (e + (1 / s - 1)), atol=1e-6)
    static = gen.timestep_grid(N, shift=3.0)[:-1].double()
    s = torch.linspace(1, 1 / N, N, dtype=torch.float64)
    assert torch.allclose(static, 3 * s / (1 + 2 * s), atol=1e-6)
    g = load(FAMILIES[family], folders[family], resolution=128)  # 64 tokens: another mu
    assert g.sample_shape == (128, 8, 8) and (g.height, g.width) == (128, 128)
    assert not torch.allclose(g.timestep_grid(N), gen.timestep_grid(N))


@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_flux2_dev_pipeline_equivalence(folders, dev, guidance):
    """FLUX.2-dev: the guidance embedding (default 4.0, or model.guidance), no CFG."""
    g = load(Flux2Generator, folders["flux2"], guidance=guidance) if guidance else dev
    assert g.denoiser.guidance == (guidance or 4.0)
    pipe = plain(Flux2Generator, folders["flux2"])
    lat = theirs(pipe, g, guidance or 4.0)
    assert torch.allclose(pipe.scheduler.sigmas, g.timestep_grid(N))
    mine = ours(g)
    assert mine.shape == (2, *g.sample_shape) == (2, 128, 4, 4)
    assert maxdiff(lat, mine) < TOL
    if guidance:
        assert maxdiff(mine, ours(dev)) > 1e-4  # the embedding really changes the samples
    img = theirs(pipe, g, guidance or 4.0, output_type="pt") * 2 - 1
    dec = g.codec.decode(mine)
    assert dec.shape == (2, 3, 64, 64)
    assert maxdiff(img, dec.clamp(-1, 1)) < TOL


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_klein_pipeline_equivalence(folders, klein, cfg):
    """Klein base: true CFG with the empty negative prompt (cfg 1 = off), guidance=None."""
    assert klein.denoiser.guidance is None and not klein.is_distilled
    pipe = plain(Flux2KleinGenerator, folders["flux2_klein"])
    lat = theirs(pipe, klein, cfg)
    assert torch.allclose(pipe.scheduler.sigmas, klein.timestep_grid(N))
    mine = ours(klein, cfg)
    assert lat.shape == (2, 32, 8, 8)
    assert maxdiff(lat, comparable(klein, mine)) < TOL
    if cfg != 1.0:
        assert maxdiff(mine, ours(klein)) > 1e-4  # CFG really changes the samples
    img = theirs(pipe, klein, cfg, output_type="pt") * 2 - 1
    assert maxdiff(img, klein.codec.decode(mine).clamp(-1, 1)) < TOL


def test_step_distilled_klein_takes_no_cfg(folders, klein, tmp_path):
    """A step-distilled Klein (is_distilled, FLUX.2-klein-4B) ignores guidance_scale in its
    pipeline: its samples are ddrl's with cfg_scale 1."""
    import shutil

    other = tmp_path / "distilled"
    shutil.copytree(folders["flux2_klein"], other)
    index = other / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "is_distilled": True}))
    g = load(Flux2KleinGenerator, other)
    assert g.is_distilled
    lat = theirs(plain(Flux2KleinGenerator, other), g, 4.0)
    assert maxdiff(lat, comparable(g, ours(klein))) < TOL


@pytest.mark.parametrize("family", ["flux2", "flux2_klein"])
def test_codec_is_the_pipelines_latent_normalisation(folders, family, dev, klein):
    """encode = the pipeline's _encode_vae_image (mode, patchify, batch-norm statistics);
    to_vae_latents inverts it exactly (the pipelines' decoding tail)."""
    gen = dev if family == "flux2" else klein
    pipe = plain(FAMILIES[family], folders[family])
    assert pipe.vae.bn.running_var.std() > 0.1  # non-trivial statistics in the tiny VAE
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = gen.codec.encode(x)
    assert z.shape == (3, *gen.sample_shape)
    with torch.no_grad():
        want = pipe._encode_vae_image(x, generator=None)
        raw = pipe.vae.encode(x).latent_dist.mode()
    assert maxdiff(z, want) < 1e-6
    assert maxdiff(gen.codec.to_vae_latents(z), raw) < 1e-5
    with torch.no_grad():
        img = pipe.vae.decode(raw, return_dict=False)[0]
    assert maxdiff(gen.codec.decode(z), img) < 1e-5


def test_rollout_log_probs_recompute(klein):
    cfg = SamplerConfig(num_steps=3, cfg_scale=3.0)
    r = rollout(klein, PROMPTS, 2, cfg, torch.Generator().manual_seed(0))
    assert r.states.shape == (4, 4, 128, 4, 4) and r.log_probs.shape == (3, 4)
    assert torch.isfinite(r.log_probs).all() and torch.isfinite(r.states).all()
    assert r.cond.shared["txt_ids"].shape == (512, 4)
    from ddrl.models.base import guided_velocity, null_cond

    null = null_cond(klein.conditioner, list(PROMPTS) * 2)
    with torch.no_grad():
        for i in range(3):
            t, t_next = r.timesteps[i].expand(4), r.timesteps[i + 1].expand(4)
            v = guided_velocity(klein.denoiser, r.states[i], t, r.cond, null, 3.0)
            step = stepper(cfg.sde)(r.states[i], v, t, t_next, prev_sample=r.states[i + 1])
            assert ((step.log_prob - r.log_probs[i]).exp() - 1).abs().max() < 1e-5


def perturb(params, scale: float) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("family", ["flux2_klein", pytest.param("flux2", marks=pytest.mark.slow)])
def test_lora_save_load_export(folders, family, tmp_path):
    """LoRA on Flow-Factory's targets (both block kinds); the saved adapter loads through the
    plain pipeline's load_lora_weights; the merged export loads through the plain pipeline."""
    cls, cfg = FAMILIES[family], (3.0 if family == "flux2_klein" else 1.0)
    g = load(cls, folders[family], finetune="lora", lora=LoraConfig(rank=4))
    trainable = [n for n, p in g.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("single_transformer_blocks" in n and "to_qkv_mlp_proj" in n for n in trainable)
    assert any("ff_context.linear_in" in n for n in trainable)
    perturb([p for p in g.parameters() if p.requires_grad], 0.3)
    mine = ours(g, cfg)
    assert maxdiff(mine, ours(load(cls, folders[family]), cfg)) > 1e-4
    g.save_pretrained(tmp_path / "run")
    pipe = plain(cls, folders[family])
    pipe.load_lora_weights(tmp_path / "run")
    guidance = cfg if family == "flux2_klein" else 4.0
    assert maxdiff(theirs(pipe, g, guidance), comparable(g, mine)) < TOL
    assert torch.equal(ours(cls.from_pretrained(tmp_path / "run", g.cfg), cfg), mine)
    out = g.export(tmp_path / "merged")
    assert maxdiff(theirs(plain(cls, out), g, guidance), comparable(g, mine)) < TOL
    img = theirs(plain(cls, out), g, guidance, output_type="pt")
    assert img.shape == (2, 3, 64, 64) and torch.isfinite(img).all()


def test_full_finetune_save_load_export(folders, tmp_path):
    g = load(Flux2KleinGenerator, folders["flux2_klein"])
    assert all(p.requires_grad for p in g.denoiser.parameters())
    perturb(g.denoiser.parameters(), 0.02)
    mine = ours(g)
    assert maxdiff(mine, ours(load(Flux2KleinGenerator, folders["flux2_klein"]))) > 1e-4
    g.save_pretrained(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "generator.json").read_text())["type"] == "flux2_klein"
    assert torch.equal(ours(load_generator(tmp_path / "run", config=g.cfg)), mine)
    out = g.export(tmp_path / "merged")
    pipe = plain(Flux2KleinGenerator, out)
    assert not pipe.config.is_distilled  # the base's pipeline config travels with the export
    assert maxdiff(theirs(pipe, g, 1.0), comparable(g, mine)) < TOL


def test_bad_inputs(folders, tmp_path):
    k = folders["flux2_klein"]
    one_line_error(lambda: load(Flux2KleinGenerator, k, resolution=40), match=("40", "16"))
    one_line_error(lambda: load(Flux2KleinGenerator, k, guidance=2.0), match="model.guidance=2.0")
    one_line_error(lambda: Flux2Generator.from_pretrained(k), match="Flux2KleinPipeline")
    bad = LoraConfig(rank=4, target_modules="ff.net.0.proj")  # FLUX.1's name: not in FLUX.2
    one_line_error(lambda: load(Flux2KleinGenerator, k, finetune="lora", lora=bad), match="ff.net")


# -- the loop on the tiny presets ---------------------------------------------------------------
QUIET = {"log": lambda *a: None}
SMALL = ["train.progress=false", "train.prompts_per_iter=2", "train.group_size=2"]
FAST = ("ddrl", "nft")
SLOW = ("flow_grpo", "dance_grpo", "grpo", "mix_grpo", "sft", "nft_data", "awm", "awm_data")
EXTRA = {"awm": ["train.timestep_count=1"], "awm_data": ["train.timestep_count=1"]}  # 3 steps


def _train(tmp_path, name, preset, *ov, resume=False):
    cfg = build_config(overrides=[f"preset={preset}", *SMALL, *ov])
    out = tmp_path / name
    if not resume:
        prepare_run_dir(out, resume=False, overwrite=False)
    train(cfg, out, resume=resume, **QUIET)
    return cfg, out


@pytest.mark.parametrize(
    "algorithm", [*FAST, *(pytest.param(a, marks=pytest.mark.slow) for a in SLOW)]
)
def test_every_algorithm_runs_two_iterations(tmp_path, algorithm):
    ov = [f"algorithm={algorithm}", *EXTRA.get(algorithm, [])]
    cfg, out = _train(tmp_path, "run", "tiny-flux2-klein", *ov)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert all(v is not None for v in r.values()), r
        if "onpolicy_ratio_dev_max" in r:
            assert r["onpolicy_ratio_dev_max"] < 1e-4, r
    gen = load_generator(out / "final", config=cfg.model)
    assert gen.sample_shape == (128, 4, 4)


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_tiny_flux2_dev_trains(tmp_path, finetune):
    _, out = _train(tmp_path, "run", "tiny-flux2", f"model.finetune={finetune}")
    assert [r["iteration"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_lora_resume_continues_exactly(tmp_path):
    from safetensors.torch import load_file

    ov = ["train.iterations=2", "train.checkpoint_every=1"]
    _train(tmp_path, "whole", "tiny-flux2-klein", *ov)
    _train(tmp_path, "split", "tiny-flux2-klein", "train.iterations=1", "train.checkpoint_every=1")
    _train(tmp_path, "split", "tiny-flux2-klein", *ov, resume=True)
    a = load_file(tmp_path / "whole" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "split" / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    split = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [r["loss"] for r in whole] == [r["loss"] for r in split]


@pytest.mark.slow
def test_full_finetune_trains(tmp_path):
    _, out = _train(tmp_path, "run", "tiny-flux2-klein", "model.finetune=full")
    assert [r["iteration"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_take_the_single_process_steps(tmp_path, strategy):
    """2 gloo ranks (DDP, or FSDP2 per transformer block) vs one process on tiny-flux2-klein:
    same rewards and losses, same final LoRA weights to float32 rounding."""
    from test_distributed import PARAM_TOL, _max_diff, _params, _same_rows, _torchrun

    ov = ["--preset", "tiny-flux2-klein", "train.iterations=2", "train.prompts_per_iter=2",
          "train.group_size=4", "train.progress=false"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    _torchrun("train", "--out", str(one), *ov, n=1)
    _torchrun("train", "--out", str(two), *ov, f"parallel.strategy={strategy}")
    _same_rows(read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl"))
    assert _max_diff(_params(one), _params(two)) < PARAM_TOL

"""Wan2.2: the two-expert A14B (transformer = high noise, transformer_2 = low noise, switched at
boundary_ratio · 1000 per sample) and the single-transformer TI2V-5B (z_dim-48 VAE, one
timestep per token), on tiny pipelines shrunk from the published configs; and the structure of
all four Wan checkpoints.

Equivalence as tests/test_wan.py: WanPipeline with a first-order Euler scheduler on ddrl's grid
(``GridEuler``), from the same latents, against ddrl's ODE loop; CFG on/off and, for the A14B,
guidance_scale_2 ≠ guidance_scale.
"""

from __future__ import annotations

import copy
import gc
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from test_wan import MAXLEN, PROMPTS, STEPS, TOL, GridEuler, noise_for, ours, pipeline

from ddrl.config import build_config
from ddrl.config.core import FlowSDE, SamplerConfig
from ddrl.errors import DDRLError
from ddrl.models import shapes
from ddrl.models.base import guided_velocity
from ddrl.models.config import LoraConfig, ModelConfig
from ddrl.models.hf import ensure_tiny, lora_file
from ddrl.models.wan import WanGenerator
from ddrl.sampling import rollout
from ddrl.sde import stepper
from ddrl.training.loop import train
from ddrl.training.runlog import prepare_run_dir, read_jsonl

LORA2 = lora_file("transformer_2")
QUIET = {"log": lambda *a: None}
SMALL = ["train.progress=false", "train.prompts_per_iter=2", "train.group_size=2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def a14b(cache):
    return ensure_tiny(WanGenerator, cache, log=lambda m: None, variant="a14b")


@pytest.fixture(scope="module")
def ti2v(cache):
    return ensure_tiny(WanGenerator, cache, log=lambda m: None, variant="ti2v")


def load(path, base, experts="both", cfg_scale_2=0.0, **kw) -> WanGenerator:
    cfg = ModelConfig(
        name="wan",
        base=str(base),
        max_sequence_length=MAXLEN,
        experts=experts,
        cfg_scale_2=cfg_scale_2,
        **kw,
    )
    return WanGenerator.from_pretrained(path, cfg)


def run_pipeline(pipe, gen, guidance=1.0, guidance_2=None, output_type="latent"):
    """``test_wan.pipeline`` with guidance_scale_2."""
    pipe.set_progress_bar_config(disable=True)
    old = pipe.scheduler
    pipe.scheduler = GridEuler().use(gen.timestep_grid(STEPS))
    try:
        return pipe(
            prompt=PROMPTS,
            height=gen.height,
            width=gen.width,
            num_frames=gen.frames,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            guidance_scale_2=guidance_2,
            latents=noise_for(gen),
            output_type=output_type,
            max_sequence_length=MAXLEN,
        ).frames
    finally:
        pipe.scheduler = old


# -- structure -------------------------------------------------------------------------------


def test_structure_of_every_checkpoint(a14b, ti2v):
    """The tiny A14B / TI2V differ from their published configs in sizes only; Wan2.1-14B and
    each A14B expert share the 1.3B's structure (so the tiny Wan2.1 exercises them too)."""
    small, big = shapes.real_config("wan2.1-t2v-1.3b"), shapes.real_config("wan2.1-t2v-14b")
    real_a, real_t = shapes.real_config("wan2.2-t2v-a14b"), shapes.real_config("wan2.2-ti2v-5b")
    for part in ("transformer", "vae", "scheduler", "pipeline_config"):
        assert shapes.structural_differences(small[part], big[part]) == [], part
    assert shapes.structural_differences(big["transformer"], real_a["transformer"]) == []
    assert real_a["transformer"] == real_a["transformer_2"] and real_a["vae"] == small["vae"]
    for folder, real in ((a14b, real_a), (ti2v, real_t)):
        pipe = WanPipeline.from_pretrained(folder)
        parts = ("transformer", "transformer_2", "vae", "scheduler")
        for part in (p for p in parts if p in real):
            assert (
                shapes.structural_differences(real[part], dict(getattr(pipe, part).config)) == []
            ), (folder, part)
        for key, value in real["pipeline_config"].items():
            assert pipe.config.get(key) == value, key
    assert real_a["pipeline_config"]["boundary_ratio"] == 0.875
    assert real_t["vae"]["z_dim"] == 48 and real_t["vae"]["scale_factor_spatial"] == 16
    assert real_t["transformer"]["in_channels"] == 48 and small["vae"]["z_dim"] == 16


def test_shapes_grid_and_both_experts_on_the_grid(a14b, ti2v):
    gen = load(a14b, a14b)
    assert gen.sample_shape == (16, 2, 4, 4) and (gen.height, gen.width, gen.frames) == (32, 32, 5)
    assert gen.denoiser.boundary == 875.0
    both = [*gen.denoiser.transformer.blocks, *gen.denoiser.transformer_2.blocks]
    assert gen.denoiser.shard_units() == both  # FSDP2 units: every block of both experts
    grid = gen.timestep_grid(STEPS)
    ref = UniPCMultistepScheduler.from_config(gen.pipe.scheduler.config)
    ref.set_timesteps(STEPS)
    assert torch.equal(grid, ref.sigmas.float())
    high = gen.denoiser.high_noise(grid[:-1])
    assert high.any() and not high.all()  # the 4-step ODE uses both experts
    t5 = load(ti2v, ti2v)
    assert t5.sample_shape == (48, 2, 4, 4) and (t5.height, t5.width) == (64, 64)
    assert t5.denoiser.expand_timesteps and t5.denoiser.transformer_2 is None
    with pytest.raises(DDRLError, match="multiple of 32"):
        load(ti2v, ti2v, resolution=48)


def test_expert_choice_per_sample_at_the_boundary(a14b):
    """Hand-derived: boundary = 0.875 · 1000 = 875; the pipeline runs ``transformer`` where its
    timestep t·1000 ≥ 875. t = 1, 0.9, 0.875 → high; 0.87499, 0.5, 0 → low. One mixed batch
    gives each row its own expert's velocity, and the per-sample CFG scale follows."""
    gen = load(a14b, a14b, cfg_scale_2=2.5)
    den = gen.denoiser
    t = torch.tensor([1.0, 0.87499, 0.9, 0.5, 0.875, 0.0])
    want = [True, False, True, False, True, False]
    assert den.high_noise(t).tolist() == want
    x = torch.randn((6, *gen.sample_shape), generator=torch.Generator().manual_seed(2))
    cond = gen.conditioner.encode(PROMPTS * 3)
    with torch.no_grad():
        v = den.velocity(x, t, cond)
        for i, hi in enumerate(want):
            tr = den.transformer if hi else den.transformer_2
            e = cond.batched["prompt_embeds"][i : i + 1]
            one = tr(
                hidden_states=x[i : i + 1], timestep=t[i : i + 1] * 1000, encoder_hidden_states=e
            ).sample
            other = (den.transformer_2 if hi else den.transformer)(
                hidden_states=x[i : i + 1], timestep=t[i : i + 1] * 1000, encoder_hidden_states=e
            ).sample
            assert (v[i] - one[0]).abs().max() < TOL
            assert (v[i] - other[0]).abs().max() > 1e-3  # the experts differ
    assert den.cfg_scale(t, 4.0).tolist() == [4.0 if h else 2.5 for h in want]
    assert den.cfg_scale(t, 1.0) == 1.0  # no CFG at all, as the pipeline (guidance_scale ≤ 1)
    assert load(a14b, a14b).denoiser.cfg_scale(t, 4.0) == 4.0  # cfg_scale_2 = 0: the same


# -- pipeline equivalence --------------------------------------------------------------------


@pytest.mark.parametrize("guidance, guidance_2", [(1.0, None), (4.0, None), (4.0, 2.0), (1, 3)])
def test_a14b_pipeline_equivalence(a14b, guidance, guidance_2):
    gen = load(a14b, a14b, cfg_scale_2=float(guidance_2 or 0))
    x = ours(gen, scale=float(guidance))
    ref = run_pipeline(gen.pipe, gen, float(guidance), guidance_2)
    assert ref.shape == x.shape and (ref - x).abs().max() < TOL
    if guidance_2 and guidance != 1:
        plain = run_pipeline(gen.pipe, gen, float(guidance))  # guidance_scale_2 matters
        assert (plain - x).abs().max() > 1e-4
    if guidance == 1.0 and guidance_2 is None:
        video = gen.codec.decode(x)
        assert video.shape == (2, 3, 5, 32, 32)
        ref_video = run_pipeline(gen.pipe, gen, output_type="pt")
        ours_video = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
        assert (ref_video - ours_video).abs().max() < TOL
        # one expert alone would not give the pipeline's samples
        gen.denoiser.boundary = 0.0
        assert (ours(gen) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_ti2v_pipeline_equivalence(ti2v, guidance):
    gen = load(ti2v, ti2v)
    x = ours(gen, scale=guidance)
    ref = pipeline(gen.pipe, gen, guidance)
    assert ref.shape == x.shape == (2, 48, 2, 4, 4) and (ref - x).abs().max() < TOL
    if guidance == 1.0:
        video = gen.codec.decode(x)
        assert video.shape == (2, 3, 5, 64, 64)
        ref_video = pipeline(gen.pipe, gen, output_type="pt")
        ours_video = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
        assert (ref_video - ours_video).abs().max() < TOL


def test_a14b_rollout_log_probs(a14b):
    gen = load(a14b, a14b)
    ro = rollout(gen, PROMPTS, 2, SamplerConfig(num_steps=3), torch.Generator().manual_seed(0))
    assert gen.denoiser.high_noise(ro.timesteps[:-1]).unique().numel() == 2
    sde = FlowSDE()
    with torch.no_grad():
        for i in range(3):
            t, t_next = ro.timesteps[i].expand(4), ro.timesteps[i + 1].expand(4)
            v = guided_velocity(gen.denoiser, ro.states[i], t, ro.cond, None)
            lp = stepper(sde)(ro.states[i], v, t, t_next, prev_sample=ro.states[i + 1]).log_prob
            assert torch.allclose((lp - ro.log_probs[i]).exp(), torch.ones(4), atol=1e-5)


# -- which expert trains; save, reload, export -----------------------------------------------


def _perturb(tr, scale, seed, lora_only=True):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_" in n or not lora_only:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_lora_both_experts_save_reload_export(a14b, tmp_path):
    gen = load(a14b, a14b, finetune="lora", lora=LoraConfig(rank=4))
    den = gen.denoiser
    for tr in (den.transformer, den.transformer_2):
        trainable = [n for n, p in tr.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
    _perturb(den.transformer, 0.3, 1)
    _perturb(den.transformer_2, 0.3, 2)
    x = ours(gen)
    gen.save_pretrained(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").glob("*.safetensors")} == {
        "pytorch_lora_weights.safetensors",
        LORA2,
    }
    again = load(tmp_path / "run", a14b, finetune="lora", lora=LoraConfig(rank=4))
    assert torch.equal(ours(again), x)
    plain = WanPipeline.from_pretrained(a14b)  # diffusers' Wan LoRA loader, both experts
    plain.load_lora_weights(tmp_path / "run")
    plain.load_lora_weights(tmp_path / "run", weight_name=LORA2, load_into_transformer_2=True)
    assert (run_pipeline(plain, gen) - x).abs().max() < TOL
    out = gen.export(tmp_path / "export")
    assert (run_pipeline(WanPipeline.from_pretrained(out), gen) - x).abs().max() < 1e-4
    high = load(a14b, a14b, experts="high", finetune="lora", lora=LoraConfig(rank=4))
    high.save_pretrained(tmp_path / "high")
    assert not (tmp_path / "high" / LORA2).exists()
    with pytest.raises(DDRLError, match=LORA2):  # an adapter of one expert, loaded for both
        load(tmp_path / "high", a14b, finetune="lora", lora=LoraConfig(rank=4))


def test_full_low_expert_only_save_reload_export(a14b, tmp_path):
    gen = load(a14b, a14b, experts="low", dtype="bfloat16")
    den = gen.denoiser
    assert not any(p.requires_grad for p in den.transformer.parameters())
    assert all(p.requires_grad for p in den.transformer_2.parameters())
    assert den.transformer_2.dtype == torch.float32 and den.transformer.dtype == torch.bfloat16
    assert den.dtype == torch.float32
    high = copy.deepcopy(den.transformer.state_dict())
    _perturb(den.transformer_2, 0.05, 3, lora_only=False)
    x = ours(gen)
    gen.save_pretrained(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "generator.json").read_text())
    assert meta["trained"] == ["transformer_2"] and not (tmp_path / "run" / "transformer").exists()
    again = load(tmp_path / "run", a14b, experts="low", dtype="bfloat16")
    assert torch.equal(ours(again), x)
    assert all(torch.equal(v, again.denoiser.transformer.state_dict()[k]) for k, v in high.items())
    out = gen.export(tmp_path / "export")
    tr2 = WanTransformer3DModel.from_pretrained(out / "transformer_2")
    assert all(
        torch.equal(v, tr2.state_dict()[k].float())
        for k, v in den.transformer_2.state_dict().items()
    )


def _train(tmp_path, name, preset, *ov, experts="both", resume=False):
    cfg = build_config(overrides=[f"preset={preset}", *SMALL, *ov])
    object.__setattr__(cfg.model, "experts", experts)  # until ModelConfig has model.experts
    out = tmp_path / name
    if not resume:
        prepare_run_dir(out, resume=False, overwrite=False)
    row = train(cfg, out, resume=resume, **QUIET)
    return cfg, out, row


def test_lora_on_the_high_expert_leaves_transformer_2_unchanged(tmp_path):
    from safetensors.torch import load_file

    cfg, out, _ = _train(tmp_path, "run", "tiny-wan22", "algorithm=flow_grpo", experts="high")
    assert {p.name for p in (out / "final").glob("*.safetensors")} == {
        "pytorch_lora_weights.safetensors"
    }
    trained = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)  # it moved
    meta = json.loads((out / "final" / "generator.json").read_text())
    lora = LoraConfig(rank=4, alpha=8, target_modules=cfg.model.lora.target_modules)
    gen = load(out / "final", meta["base"], experts="high", finetune="lora", lora=lora)
    base = WanPipeline.from_pretrained(meta["base"]).transformer_2.state_dict()
    tr2 = gen.denoiser.transformer_2.state_dict()
    assert tr2.keys() == base.keys() and all(torch.equal(tr2[k], base[k]) for k in base)
    assert not any("lora_" in n for n, _ in gen.denoiser.transformer_2.named_parameters())


# -- the loop on tiny-wan22 ------------------------------------------------------------------

SLOW = pytest.mark.slow
ALGORITHMS = [
    "ddrl",
    "nft",
    *(
        pytest.param(a, marks=SLOW)
        for a in ("flow_grpo", "dance_grpo", "grpo", "mix_grpo", "sft", "nft_data", "awm")
    ),
    pytest.param("awm_data", marks=SLOW),
]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_two_iterations_on_tiny_wan22(tmp_path, algorithm):
    cfg, out, _ = _train(tmp_path, "run", "tiny-wan22", f"algorithm={algorithm}")
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert all(v is not None for v in r.values()), r
    assert (out / "final" / LORA2).is_file()


@pytest.mark.parametrize("preset", [pytest.param("tiny-wan22-ti2v", marks=SLOW), "tiny-wan22"])
def test_resume_continues_exactly(tmp_path, preset):
    from safetensors.torch import load_file

    ov = ["train.iterations=2", "train.checkpoint_every=1"]
    _train(tmp_path, "whole", preset, *ov)
    _train(tmp_path, "split", preset, "train.iterations=1", "train.checkpoint_every=1")
    _train(tmp_path, "split", preset, *ov, resume=True)
    whole_final, split_final = tmp_path / "whole" / "final", tmp_path / "split" / "final"
    for f in whole_final.rglob("*.safetensors"):
        a, b = load_file(f), load_file(split_final / f.relative_to(whole_final))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    whole = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    split = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [r["loss"] for r in whole] == [r["loss"] for r in split]


# -- DDP / FSDP2: both experts run on every rank -------------------------------------------------


def _in_group(rank: int, port: int, folder: str, strategy: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _check_gradients(rank, folder, strategy)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


def _check_gradients(rank: int, folder: str, strategy: str) -> None:
    """LoRA on both experts; rank 0's half of the batch is all high-noise, rank 1's mixed:
    every rank still runs both experts (FSDP2 all-gathers, DDP buckets), and the summed
    gradients equal one process's over the whole batch."""
    from ddrl.dist.config import ParallelConfig
    from ddrl.dist.parallel import Parallel

    gen = load(folder, folder, finetune="lora", lora=LoraConfig(rank=4))
    for tr in (gen.denoiser.transformer, gen.denoiser.transformer_2):
        _perturb(tr, 0.1, 5)
    x = torch.randn((4, *gen.sample_shape), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.95, 0.9, 0.3, 0.99])  # rank 0: high, high; rank 1: low, high
    cond = gen.conditioner.encode(PROMPTS * 2)
    whole = copy.deepcopy(gen.denoiser)
    whole.velocity(x, t, cond).pow(2).sum().backward()
    want = {n: p.grad for n, p in whole.named_parameters() if p.requires_grad}
    par = Parallel(ParallelConfig(strategy=strategy), "cpu")
    den = gen.denoiser
    wrapped = par.wrap(den)
    rows = torch.arange(2 * rank, 2 * rank + 2)
    with par.sync(True):
        wrapped.velocity(x[rows], t[rows], cond.index(rows)).pow(2).sum().backward()
    for n, p in den.named_parameters():
        if n in want:
            got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            torch.testing.assert_close(got, want[n], rtol=1e-4, atol=1e-5, msg=f"{strategy} {n}")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_give_the_one_process_gradients(a14b, strategy):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_in_group, args=(r, port, str(a14b), strategy)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]

"""Qwen-Image and Qwen-Image-Edit-2509 through diffusers: tiny pipelines shrunk from the
published configs (no downloads).

Equivalence: our Euler ODE on ``gen.timestep_grid`` with ``gen.denoiser`` on UNPACKED latents
[16, 4, 4] against the pipeline's own ``__call__`` from the same initial latents (packed), float32
on the CPU, CFG off and on (the pipelines' true CFG with its norm rescale: the denoiser's
``cfg_mix``, which ``ddrl.models.base.guide`` calls). The edit pipeline runs one
prompt per call (its batch limit) with the image at exactly the sample size and its module's
``VAE_IMAGE_SIZE`` set to that area, so its resize is the identity (ours encodes the condition
at the sample size: module docstring of ``ddrl.models.qwen_image_edit``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import one_line_error

from ddrl.config.core import SamplerConfig
from ddrl.models import qwen_image as qi
from ddrl.models.base import guide, guided_velocity
from ddrl.models.config import LoraConfig, ModelConfig
from ddrl.models.flux import pack, unpack
from ddrl.models.hf import ensure_tiny
from ddrl.models.qwen_image import QwenImageGenerator
from ddrl.models.qwen_image_edit import QwenImageEditGenerator
from ddrl.models.qwen_image_tiny import tiny_configs
from ddrl.sampling import ode_solve, rollout
from ddrl.sde import stepper

TOL = 1e-5
N = 3
PROMPTS = ["a Red CAT, on a mat!", "Two dogs & 3 birds on a long wooden bench at sunset"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return ensure_tiny(QwenImageGenerator, tmp_path_factory.mktemp("qi"), log=lambda _: None)


@pytest.fixture(scope="module")
def edit_folder(tmp_path_factory):
    return ensure_tiny(QwenImageEditGenerator, tmp_path_factory.mktemp("qe"), log=lambda _: None)


def load(path, cls=QwenImageGenerator, **kw):
    return cls.from_pretrained(path, ModelConfig(name=cls.family, base=str(path), **kw))


@pytest.fixture(scope="module")
def gen(folder):
    return load(folder)


def images(seed: int = 0) -> dict[str, torch.Tensor]:
    """One 8-bit condition image per prompt, as [3, 32, 32] in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randint(0, 256, (3, 32, 32), generator=g) / 127.5 - 1 for p in PROMPTS}


@pytest.fixture(scope="module")
def edit_gen(edit_folder):
    g = load(edit_folder, QwenImageEditGenerator)
    g.conditioner.set_images(images())
    return g


def plain(path, edit: bool = False):
    from diffusers import QwenImageEditPlusPipeline, QwenImagePipeline

    pipe = (QwenImageEditPlusPipeline if edit else QwenImagePipeline).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(gen, b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((b, *gen.sample_shape), generator=torch.Generator().manual_seed(seed))


def ours(gen, prompts=PROMPTS, cfg_scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    cfg = SamplerConfig(eval_steps=N, cfg_scale=cfg_scale)
    return ode_solve(gen, noise(gen, len(prompts), seed), list(prompts), cfg)


def theirs(pipe, gen, w: float = 1.0, seed: int = 0, output_type="latent", prompts=PROMPTS):
    out = pipe(
        prompt=list(prompts),
        negative_prompt=[" "] * len(prompts) if w != 1.0 else None,
        true_cfg_scale=w,
        num_inference_steps=N,
        latents=pack(noise(gen, len(prompts), seed)),
        height=gen.height,
        width=gen.width,
        output_type=output_type,
    ).images
    return unpack(out, *gen.sample_shape[1:]) if output_type == "latent" else out


def theirs_edit(pipe, gen, w: float = 1.0, output_type="latent"):
    """The edit pipeline, one prompt per call with its image (PIL, exactly the sample size)."""
    from ddrl.models.base import to_pil

    x = noise(gen, len(PROMPTS))
    out = []
    for i, p in enumerate(PROMPTS):
        res = pipe(
            image=to_pil(images()[p]),
            prompt=p,
            negative_prompt=" " if w != 1.0 else None,
            true_cfg_scale=w,
            num_inference_steps=N,
            latents=pack(x[i : i + 1]),
            height=gen.height,
            width=gen.width,
            output_type=output_type,
        ).images
        out.append(unpack(res, *gen.sample_shape[1:]) if output_type == "latent" else res)
    return torch.cat(out)


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", ["qwen-image", "qwen-image-edit-2509"])
def test_tiny_keeps_every_structural_flag_of_the_published_config(name, folder, edit_folder):
    from ddrl.models.shapes import real_config, structural_differences

    real = real_config(name)
    tiny = tiny_configs(name)
    pipe = plain(edit_folder if "edit" in name else folder, edit="edit" in name)
    assert type(pipe).__name__ == real["pipeline"]
    for part in ("transformer", "vae", "scheduler"):
        assert structural_differences(real[part], tiny[part]) == [], part
        built = dict(getattr(pipe, part).config)
        assert structural_differences(real[part], built) == [], part


def test_packing_matches_the_pipeline():
    from diffusers import QwenImagePipeline

    x = torch.randn(2, 16, 4, 6)
    assert torch.equal(pack(x), QwenImagePipeline._pack_latents(x, 2, 16, 4, 6))
    out = QwenImagePipeline._unpack_latents(pack(x), 32, 48, 8)
    assert torch.equal(out[:, :, 0], x)


def test_grid_is_the_pipelines(gen):
    """linspace(1, 1/N, N) with μ from the token count (exponential shift, shift_terminal)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import (
        calculate_shift,
        retrieve_timesteps,
    )

    sched = type(gen.scheduler).from_config(gen.scheduler.config)
    c = sched.config
    mu = calculate_shift(4, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    retrieve_timesteps(sched, N, "cpu", sigmas=np.linspace(1.0, 1 / N, N), mu=mu)
    assert torch.allclose(gen.timestep_grid(N), sched.sigmas.float())
    assert gen.timestep_grid(N)[-2] == pytest.approx(c.shift_terminal)  # stretched to 0.02
    assert len(gen.timestep_grid(N, shift=3.0)) == N + 1


@pytest.mark.parametrize("w", [1.0, 4.0])
def test_pipeline_equivalence(folder, gen, w):
    pipe = plain(folder)
    lat = theirs(pipe, gen, w)
    assert torch.allclose(pipe.scheduler.sigmas, gen.timestep_grid(N))
    mine = ours(gen, cfg_scale=w)
    assert mine.shape == (2, *gen.sample_shape) == (2, 16, 4, 4)
    assert maxdiff(lat, mine) < TOL
    if w != 1.0:
        assert maxdiff(mine, ours(gen)) > 1e-3  # CFG changes the samples
    img = theirs(pipe, gen, w, output_type="pt") * 2 - 1
    dec = gen.codec.decode(mine)
    assert dec.shape == (2, 3, 32, 32)
    assert maxdiff(img, dec.clamp(-1, 1)) < TOL


def test_true_cfg_is_the_pipelines_rescaled_mix(gen):
    """base's plain mix v_u + w·(v_c − v_u) differs; ours rescales each packed token."""
    g = torch.Generator().manual_seed(0)  # fixed inputs: the test is deterministic
    v_c, v_u = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    comb = v_u + 3 * (v_c - v_u)
    tc, tm = pack(v_c), pack(comb)
    want = unpack(tm * (tc.norm(dim=-1, keepdim=True) / tm.norm(dim=-1, keepdim=True)), 4, 4)
    assert torch.allclose(qi.true_cfg_mix(v_c, v_u, 3.0), want, atol=1e-6)
    t = torch.full((2,), 0.5)
    assert torch.equal(guide(gen.denoiser, v_c, v_u, t, 3.0), qi.true_cfg_mix(v_c, v_u, 3.0))
    per_sample = guide(gen.denoiser, v_c, v_u, t, torch.tensor([3.0, 1.0]))
    assert torch.allclose(per_sample[1], v_c[1]) and torch.allclose(per_sample[0], want[0])


def test_batching_and_padding_do_not_change_a_sample(gen):
    """A prompt sampled alone equals it sampled beside a longer prompt (padded rows + mask),
    with CFG (its negative prompt has yet another length)."""
    c = gen.conditioner.encode(PROMPTS)
    lengths = c.batched["prompt_mask"].sum(1)
    assert lengths[0] != lengths[1] and c.batched["prompt_mask"].shape[1] == gen.conditioner.pad_len
    both = ours(gen, PROMPTS, cfg_scale=4.0)
    x = noise(gen, 2)
    cfg = SamplerConfig(eval_steps=N, cfg_scale=4.0)
    for i, p in enumerate(PROMPTS):
        alone = ode_solve(gen, x[i : i + 1], [p], cfg)
        assert maxdiff(alone, both[i : i + 1]) < TOL


def test_rollout_log_probs_recompute(gen):
    cfg = SamplerConfig(num_steps=3)
    r = rollout(gen, PROMPTS, 2, cfg, torch.Generator().manual_seed(0))
    assert r.states.shape == (4, 4, 16, 4, 4) and r.log_probs.shape == (3, 4)
    assert torch.isfinite(r.log_probs).all()
    with torch.no_grad():
        for i in range(3):
            t, t_next = r.timesteps[i].expand(4), r.timesteps[i + 1].expand(4)
            v = gen.denoiser.velocity(r.states[i], t, r.cond)
            step = stepper(cfg.sde)(r.states[i], v, t, t_next, prev_sample=r.states[i + 1])
            assert ((step.log_prob - r.log_probs[i]).exp() - 1).abs().max() < 1e-5


def perturb(params, scale: float) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn_like(p))


def test_lora_save_load_export(folder, tmp_path):
    g = load(folder, finetune="lora", lora=LoraConfig(rank=4))
    trainable = [n for n, p in g.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("img_mlp" in n for n in trainable) and any("attn.add_k_proj" in n for n in trainable)
    perturb([p for p in g.parameters() if p.requires_grad], 0.3)
    mine = ours(g)
    assert maxdiff(mine, ours(load(folder))) > 1e-3
    g.save_pretrained(tmp_path / "run")
    pipe = plain(folder)
    pipe.load_lora_weights(tmp_path / "run")
    assert maxdiff(theirs(pipe, g), mine) < TOL
    assert torch.equal(ours(QwenImageGenerator.from_pretrained(tmp_path / "run", g.cfg)), mine)
    out = g.export(tmp_path / "merged")
    assert maxdiff(theirs(plain(out), g), mine) < TOL


def test_full_finetune_save_load_export(folder, tmp_path):
    g = load(folder)
    perturb(g.denoiser.parameters(), 0.02)
    mine = ours(g)
    g.save_pretrained(tmp_path / "run")
    assert torch.equal(ours(QwenImageGenerator.from_pretrained(tmp_path / "run", g.cfg)), mine)
    assert maxdiff(theirs(plain(g.export(tmp_path / "merged")), g), mine) < TOL


def test_sizes_and_bad_inputs(folder, tmp_path):
    g = load(folder, height=32, width=64)
    assert g.sample_shape == (16, 4, 8) and (g.height, g.width) == (32, 64)
    assert torch.isfinite(ours(g)).all()
    one_line_error(lambda: load(folder, resolution=40), match=("40", "multiples of 16"))
    bad = LoraConfig(rank=4, target_modules="nope")
    one_line_error(lambda: load(folder, finetune="lora", lora=bad), match="nope")
    one_line_error(
        lambda: QwenImageEditGenerator.from_pretrained(folder), match="QwenImagePipeline"
    )


# -- the edit family -----------------------------------------------------------------------


@pytest.mark.parametrize("w", [1.0, 4.0])
def test_edit_pipeline_equivalence(edit_folder, edit_gen, monkeypatch, w):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit

    monkeypatch.setattr(edit, "VAE_IMAGE_SIZE", edit_gen.height * edit_gen.width)
    pipe = plain(edit_folder, edit=True)
    lat = theirs_edit(pipe, edit_gen, w)
    mine = ours(edit_gen, cfg_scale=w)
    assert maxdiff(lat, mine) < TOL
    if w != 1.0:
        assert maxdiff(mine, ours(edit_gen)) > 1e-3
    img = theirs_edit(pipe, edit_gen, w, output_type="pt") * 2 - 1
    assert maxdiff(img, edit_gen.codec.decode(mine).clamp(-1, 1)) < TOL


def test_edit_rows_carry_the_image(edit_gen, edit_folder):
    c, u = edit_gen.conditioner.encode(PROMPTS), edit_gen.conditioner.null_for(PROMPTS)
    assert c.batched["image_latents"].shape == (2, 16, 4, 4)
    assert torch.equal(c.batched["image_latents"], u.batched["image_latents"])
    want = edit_gen.codec.encode(torch.stack([images()[p] for p in PROMPTS]))
    assert maxdiff(c.batched["image_latents"], want) < 1e-6
    # the negative prompt sees each prompt's image: two different rows
    assert maxdiff(u.batched["prompt_embeds"][0], u.batched["prompt_embeds"][1]) > 1e-4
    # the image changes the samples
    other = load(edit_folder, QwenImageEditGenerator)
    other.conditioner.set_images(images(seed=1))
    assert maxdiff(ours(other), ours(edit_gen)) > 1e-3
    one_line_error(lambda: edit_gen.conditioner.encode(["no image here"]), match="no image here")
    one_line_error(lambda: edit_gen.conditioner.null(2), match="null_for")


def test_edit_rollout_and_lora_round_trip(edit_folder, tmp_path):
    g = load(edit_folder, QwenImageEditGenerator, finetune="lora", lora=LoraConfig(rank=4))
    g.conditioner.set_images(images())
    cfg = SamplerConfig(num_steps=3, cfg_scale=4.0)
    r = rollout(g, PROMPTS, 2, cfg, torch.Generator().manual_seed(0))
    assert r.cond.batched["image_latents"].shape == (4, 16, 4, 4)
    with torch.no_grad():
        for i in range(3):
            t, t_next = r.timesteps[i].expand(4), r.timesteps[i + 1].expand(4)
            v = guided_velocity(g.denoiser, r.states[i], t, r.cond, r.null, 4.0)
            step = stepper(cfg.sde)(r.states[i], v, t, t_next, prev_sample=r.states[i + 1])
            assert ((step.log_prob - r.log_probs[i]).exp() - 1).abs().max() < 1e-5
    perturb([p for p in g.parameters() if p.requires_grad], 0.3)
    mine = ours(g)
    g.save_pretrained(tmp_path / "run")
    back = QwenImageEditGenerator.from_pretrained(tmp_path / "run", g.cfg)
    back.conditioner.set_images(images())
    assert torch.equal(ours(back), mine)


# -- training through the loop -------------------------------------------------------------

QUIET = {"log": lambda *a, **k: None}
SMALL = ["train.progress=false", "train.prompts_per_iter=2", "train.group_size=2"]
ALGORITHMS = ("ddrl", "nft", "flow_grpo", "dance_grpo", "grpo", "mix_grpo", "sft", "nft_data",
              "awm", "awm_data")  # fmt: skip
FAST = ("ddrl", "nft")


def _train(tmp_path, name, *ov, resume=False):
    from ddrl.config import build_config
    from ddrl.training.loop import train
    from ddrl.training.runlog import prepare_run_dir

    cfg = build_config(overrides=["preset=tiny-qwen-image", *SMALL, *ov])
    out = tmp_path / name
    if not resume:
        prepare_run_dir(out, resume=False, overwrite=False)
    return cfg, out, train(cfg, out, resume=resume, **QUIET)


@pytest.mark.parametrize(
    "algorithm", [a if a in FAST else pytest.param(a, marks=pytest.mark.slow) for a in ALGORITHMS]
)
def test_every_algorithm_trains_two_iterations(tmp_path, algorithm):
    from ddrl.models import load_generator
    from ddrl.training.runlog import read_jsonl

    extra = ["loss.old_rate=0.3"] if algorithm.startswith("nft") else []
    extra += ["loss.lag_rate=0.3", "train.timestep_count=1"] if algorithm.startswith("awm") else []
    cfg, out, _ = _train(tmp_path, "run", f"algorithm={algorithm}", *extra)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert all(v is not None for v in r.values()), r
    assert load_generator(out / "final", config=cfg.model).sample_shape == (16, 4, 4)


def test_resume_equals_the_uninterrupted_run(tmp_path):
    """LoRA DDRL: 1 iteration, checkpoint, resume to 2 = 2 iterations in one go (same rows but
    timings, the same adapter weights)."""
    from safetensors.torch import load_file

    from ddrl.training.runlog import read_jsonl

    ov = ["train.iterations=2", "train.checkpoint_every=1"]
    _train(tmp_path, "whole", *ov)
    _train(tmp_path, "split", "train.iterations=1", "train.checkpoint_every=1")
    _train(tmp_path, "split", *ov, resume=True)
    rows = [read_jsonl(tmp_path / n / "metrics.jsonl")[-1] for n in ("whole", "split")]
    a, b = ({k: v for k, v in r.items() if not k.startswith("time_")} for r in rows)
    assert a == b
    w, s = (load_file(tmp_path / n / "final" / "pytorch_lora_weights.safetensors")
            for n in ("whole", "split"))  # fmt: skip
    assert w.keys() == s.keys() and all(torch.equal(w[k], s[k]) for k in w)


def _edit_data(tmp_path):
    """A caption folder of one condition image per prompt, and the prompt file."""
    from PIL import Image

    from ddrl.models.base import to_pil

    folder = tmp_path / "cond"
    folder.mkdir()
    for i, (p, x) in enumerate(images().items()):
        to_pil(x).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(p)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert Image.open(folder / "0.png").size == (32, 32)
    return folder, tmp_path / "prompts.txt"


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ddrl", "flow_grpo"])
def test_edit_trains_two_iterations_with_condition_images(tmp_path, algorithm):
    from ddrl.config import build_config
    from ddrl.training.loop import train
    from ddrl.training.runlog import prepare_run_dir, read_jsonl

    folder, prompts = _edit_data(tmp_path)
    ov = ["preset=tiny-qwen-image-edit", *SMALL, f"algorithm={algorithm}",
          f"data.prompts={prompts}", f"data.condition_images={folder}",
          "sampler.cfg_scale=4.0"]  # fmt: skip
    out = prepare_run_dir(tmp_path / "run", resume=False, overwrite=False)
    train(build_config(overrides=ov), out, **QUIET)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_take_the_single_process_steps(tmp_path, strategy):
    """2-rank gloo DDP / FSDP2 (one shard unit per transformer block) on the tiny Qwen-Image
    vs one process: same rows and final adapter weights to float32 rounding."""
    import os
    import subprocess
    import sys

    from test_distributed import PARAM_TOL, _max_diff, _params, _same_rows, _torchrun

    from ddrl.training.runlog import read_jsonl

    ov = ["--preset", "tiny-qwen-image", "train.iterations=2", "train.progress=false",
          "train.prompts_per_iter=2", "train.group_size=2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ddrl", "train", "--out", str(tmp_path / "one"), *ov]
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    _torchrun("train", "--out", str(tmp_path / "two"), *ov, f"parallel.strategy={strategy}")
    _same_rows(read_jsonl(tmp_path / "one" / "metrics.jsonl"),
               read_jsonl(tmp_path / "two" / "metrics.jsonl"))  # fmt: skip
    assert _max_diff(_params(tmp_path / "one"), _params(tmp_path / "two")) < PARAM_TOL


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_every_trainable_weight_gets_a_gradient(folder, finetune):
    """The last block's text-stream output is discarded: its unused parts do not train (DDP
    would otherwise stop on parameters without a gradient)."""
    g = load(folder, finetune=finetune, lora=LoraConfig(rank=4))
    c = g.conditioner.encode(PROMPTS)
    v = g.denoiser.velocity(noise(g, 2), torch.tensor([0.5, 0.3]), c)
    v.square().sum().backward()
    trainable = {n: p for n, p in g.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None for p in trainable.values())
    unused = [n for n, _ in g.denoiser.named_parameters() if ".0.txt_mlp" in n]
    if finetune == "full":
        assert unused and not any(n in trainable for n in unused)
    else:  # no adapter on the unused parts, even after peft re-enables the adapters
        g.denoiser.transformer.disable_adapters()
        g.denoiser.transformer.enable_adapters()
        assert not any("lora_" in n for n in unused)
        assert all(p.requires_grad == ("lora_" in n) for n, p in g.denoiser.named_parameters())


def test_edit_run_without_condition_images_is_one_line(tmp_path):
    from ddrl.config import build_config
    from ddrl.training.loop import train
    from ddrl.training.runlog import prepare_run_dir

    ov = ["preset=tiny-qwen-image-edit", *SMALL, "data.condition_images=", "data.prompts=tiny.txt"]
    out = prepare_run_dir(tmp_path / "run", resume=False, overwrite=False)
    one_line_error(
        lambda: train(build_config(overrides=ov), out, **QUIET), match="data.condition_images"
    )

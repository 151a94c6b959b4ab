"""The one loop on every diffusers family (tiny pipelines built from config, loaded back through
``Pipeline.from_pretrained`` like a user's): every algorithm, LoRA and full fine-tuning, the
adapter-disabled reference, the on-policy ratio across micro-batches and precisions, exact
resume, real data cached as latents, export, presets, and the one-line errors."""

import json

import pytest
import torch

from ddrl.cli import main
from ddrl.config import build_config, preset_descriptions
from ddrl.config.schema import PRESET_NAMES
from ddrl.models import load_generator
from ddrl.training.loop import train
from ddrl.training.runlog import prepare_run_dir, read_jsonl

TINY = ("tiny-sd3", "tiny-flux", "tiny-cosmos", "tiny-wan")
ALGORITHMS = ("ddrl", "flow_grpo", "dance_grpo", "grpo", "sft")
QUIET = {"log": lambda *a: None}
SMALL = ["train.progress=false", "train.prompts_per_iter=2", "train.group_size=2"]


def _train(tmp_path, name, preset, *ov, resume=False):
    cfg = build_config(overrides=[f"preset={preset}", *SMALL, *ov])
    out = tmp_path / name
    if not resume:
        prepare_run_dir(out, resume=False, overwrite=False)
    row = train(cfg, out, resume=resume, **QUIET)
    return cfg, out, row


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("preset", TINY)
def test_every_algorithm_runs_two_iterations_on_every_family(tmp_path, preset, algorithm):
    cfg, out, row = _train(tmp_path, "run", preset, f"algorithm={algorithm}")
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert all(v is not None for k, v in r.items()), r  # every logged value finite
        if algorithm != "sft":  # the on-policy ratio is logged every iteration
            assert r["onpolicy_ratio_dev_max"] < 1e-4, r
    gen = load_generator(out / "final", config=cfg.model)  # the saved weights load back
    assert gen.sample_shape == load_generator(out / "final", config=cfg.model).sample_shape


def test_lora_trains_adapters_only_and_its_reference_is_the_base(tmp_path):
    from ddrl.losses.reference import AdapterDisabled, make_reference
    from ddrl.training.components import load_base

    cfg = build_config(overrides=["preset=tiny-sd3", "algorithm=flow_grpo"])
    gen, _ = load_base(cfg)
    den = gen.denoiser
    trainable = [n for n, p in den.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ref = make_reference(den)
    assert isinstance(ref, AdapterDisabled)
    x = torch.randn(2, *gen.sample_shape)
    t = torch.tensor([0.7, 0.3])
    cond = gen.conditioner.encode(["a red sign", "a cat"])
    with torch.no_grad():
        base_v = den.velocity(x, t, cond)  # adapters start at B = 0: the policy is the base
        for n, p in den.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
        moved = den.velocity(x, t, cond)
    assert (moved - base_v).abs().max() > 1e-4
    assert torch.equal(ref.velocity(x, t, cond, None, 1.0), base_v)
    assert torch.equal(den.velocity(x, t, cond), moved)  # adapters are back on afterwards
    # Flow-GRPO's KL against the adapter-disabled base is 0 before the first update (the row
    # logs an iteration's last update: one per batch here).
    ov = ("algorithm=flow_grpo", "train.iterations=1", "train.updates_per_batch=1")
    _, out, _ = _train(tmp_path, "fg", "tiny-sd3", *ov)
    assert read_jsonl(out / "metrics.jsonl")[0]["loss_kl"] == 0.0


@pytest.mark.parametrize(
    "precision",
    [[], ["model.autocast=bfloat16"], ["model.dtype=bfloat16", "model.autocast=bfloat16"]],
)
def test_on_policy_ratio_is_one_across_micro_batches_and_precisions(tmp_path, precision):
    """The peers' most reported bug (flow_grpo #104/#131, DanceGRPO #57): log-probs recomputed
    in training differ from the rollout's. Here the rollout runs the whole batch at once and
    training one sample at a time; the ratio must stay 1 (fp32: to 1e-5; bf16: to 2e-3)."""
    ov = ["algorithm=flow_grpo", "train.micro_batch=1", "train.iterations=1", *precision]
    _, out, _ = _train(tmp_path, "r", "tiny-sd3", *ov)
    dev = read_jsonl(out / "metrics.jsonl")[0]["onpolicy_ratio_dev_max"]
    assert dev < (1e-5 if not precision else 2e-3), dev


def test_lora_resume_continues_exactly(tmp_path):
    from safetensors.torch import load_file

    ov = ["train.iterations=2", "train.checkpoint_every=1"]
    _train(tmp_path, "whole", "tiny-flux", *ov)
    _train(tmp_path, "split", "tiny-flux", "train.iterations=1", "train.checkpoint_every=1")
    _train(tmp_path, "split", "tiny-flux", *ov, resume=True)
    a = load_file(tmp_path / "whole" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "split" / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    split = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [r["loss"] for r in whole] == [r["loss"] for r in split]


def _image_folder(root, n=6):
    from PIL import Image

    root.mkdir()
    for i in range(n):
        arr = (torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a photo of thing {i % 3}")
    return root


def test_real_caption_data_is_encoded_once_then_read_as_latents(tmp_path, monkeypatch):
    import ddrl.data.media as media

    imgs = _image_folder(tmp_path / "imgs")
    ov = ["data.source=real", f"data.images={imgs}", "data.prompts=", "train.iterations=1"]
    _train(tmp_path, "a", "tiny-sd3", *ov)

    def no_images(*a, **k):
        raise AssertionError("the second run must read cached latents, not images")

    monkeypatch.setattr(media, "load_media", no_images)
    _, out, _ = _train(tmp_path, "b", "tiny-sd3", *ov)
    assert read_jsonl(out / "metrics.jsonl")[0]["loss_data"] > 0


def test_export_merge_cli_writes_a_pipeline_diffusers_loads(tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--preset", "tiny-sd3", *SMALL]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "merged")
    assert pipe.transformer is not None and pipe.text_encoder_3 is not None
    assert main(["export", str(run), "--out", str(tmp_path / "merged")]) == 2  # never overwrite
    assert "exists" in capsys.readouterr().err


def test_presets_are_listed_with_descriptions_and_tiny_ones_resolve(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in (*TINY, "digits", "toy2d"):
        assert name in PRESET_NAMES and name in out
    assert all(preset_descriptions().values())
    for name in TINY:
        cfg = build_config(overrides=[f"preset={name}"])
        assert cfg.model.base == "tiny" and cfg.train.iterations == 2


@pytest.mark.parametrize(
    "override, says",
    [
        ("model.resolution=30", "resolution"),
        ("model.lora.target_modules=to_nothing", "to_nothing"),
        ("model.base=/no/such/folder", "does not exist"),
        ("model.name=flux", "holds a StableDiffusion3Pipeline"),
    ],
)
def test_bad_model_input_is_one_line(tmp_path, capsys, override, says):
    from ddrl.data.config import cache_root
    from ddrl.models.hf import ensure_tiny
    from ddrl.models.sd3 import SD3Generator

    extra = []
    if override == "model.name=flux":  # an SD3 folder loaded as FLUX
        extra = [f"model.base={ensure_tiny(SD3Generator, cache_root(''), lambda *a: None)}"]
    code = main(["train", "--out", str(tmp_path / "r"), "--preset", "tiny-sd3", override, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "r").exists()  # nothing was created


def test_unknown_pipeline_class_is_one_line(tmp_path, capsys):
    from ddrl.errors import DDRLError
    from ddrl.models import family_of

    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(DDRLError, match="KandinskyPipeline; supported pipelines"):
        family_of(folder)
    code = main(
        ["train", "--out", str(tmp_path / "r"), "--preset", "tiny-sd3", f"model.base={folder}"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "holds a KandinskyPipeline" in err[0], err


@pytest.mark.parametrize("preset", TINY)
def test_non_square_size_from_height_and_width(preset):
    from ddrl.training.components import load_base

    cfg = build_config(overrides=[f"preset={preset}", "model.height=16", "model.width=32"])
    gen, _ = load_base(cfg)
    assert (gen.height, gen.width) == (16, 32)
    assert gen.sample_shape[-1] == 2 * gen.sample_shape[-2]
    x = torch.randn(1, *gen.sample_shape)
    v = gen.denoiser.velocity(x, torch.tensor([0.5]), gen.conditioner.encode(["a cat"]))
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert gen.codec.decode(x).shape[-2:] == (16, 32)


def test_rollout_chunks_change_memory_not_samples():
    from ddrl.config.core import SamplerConfig
    from ddrl.sampling import rollout
    from ddrl.training.components import load_base

    cfg = build_config(overrides=["preset=tiny-sd3"])
    gen, _ = load_base(cfg)
    outs = []
    for batch in (0, 1, 3):
        sc = SamplerConfig(num_steps=3, cfg_scale=4.5, batch=batch)
        outs.append(rollout(gen, ["a cat", "a red sign"], 3, sc, torch.Generator().manual_seed(0)))
    for ro in outs[1:]:  # the same noise; only float rounding of batched kernels differs
        assert torch.allclose(ro.states, outs[0].states, atol=1e-5)
        assert torch.allclose(ro.log_probs, outs[0].log_probs, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradient():
    from ddrl.training.components import load_base

    grads = []
    for ckpt in ("false", "true"):
        ov = ["preset=tiny-wan", f"model.gradient_checkpointing={ckpt}"]
        gen, _ = load_base(build_config(overrides=ov))
        den = gen.denoiser.train()
        x = torch.randn(2, *gen.sample_shape, generator=torch.Generator().manual_seed(1))
        cond = gen.conditioner.encode(["a cat", "a dog"])
        den.velocity(x, torch.tensor([0.3, 0.8]), cond).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in den.parameters() if p.grad is not None]))
    assert grads[0].numel() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-wan"])
def test_evaluation_on_real_models_reports_hacking_diagnostics(tmp_path, preset):
    from PIL import Image

    held = tmp_path / "held"
    held.mkdir()
    for i in range(3):
        arr = (torch.rand(20, 20, 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(held / f"h{i}.png")
        (held / f"h{i}.txt").write_text(f"a photo of thing {i}")
    ov = [
        f"data.eval_images={held}",
        "eval.every=1",
        "eval.samples_per_prompt=2",
        "eval.rewards=brightness",
        "eval.loss_warn=0",
        "model.frames=1" if preset == "tiny-wan" else "model.resolution=16",
    ]
    logs = []
    cfg = build_config(overrides=[f"preset={preset}", *SMALL, "train.iterations=2", *ov])
    out = prepare_run_dir(tmp_path / "r", resume=False, overwrite=False)
    train(cfg, out, log=logs.append)
    rows = read_jsonl(out / "eval.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0 <= r["ood_brightness"] <= 1 and r["heldout_diffusion_loss"] > 0
        assert r["proxy_reward"] == pytest.approx(r["ood_brightness"])  # the same reward here
    assert rows[0]["heldout_loss_rise"] == 0.0
    # eval.loss_warn=0 (the key before the watch) is the held-out rule's threshold; a rule
    # fires once per run of evaluations where it holds
    holds = [r["heldout_loss_rise"] > 0 for r in rows]
    starts = sum(h and not (i and holds[i - 1]) for i, h in enumerate(holds))
    assert sum("heldout_loss_rise" in m and "[warn]" in m for m in logs) == starts
    fired = [w for w in read_jsonl(out / "watch.jsonl") if w["signal"] == "heldout_loss_rise"]
    assert len(fired) == starts and all(w["threshold"] == 0 for w in fired)
    assert (out / "samples_final.png").is_file()


def test_published_presets_resolve_with_the_cited_values(tmp_path):
    """The real presets carry the peers' values, and they mean the same here (given the user's
    prompt file and data; weights are never loaded by resolving a config)."""
    prompts = tmp_path / "train.txt"
    prompts.write_text('a sign that says "hello"\n')
    videos = tmp_path / "videos"
    videos.mkdir()
    data = [f"data.prompts={prompts}", f"data.eval_prompts={prompts}"]
    fg = build_config(overrides=["preset=sd35-medium-ocr-flow-grpo", *data])
    assert fg.algorithm == "flow_grpo" and (fg.loss.beta_kl, fg.loss.clip_range) == (0.04, 1e-4)
    assert (fg.model.lora.rank, fg.model.lora.alpha, fg.model.resolution) == (32, 64, 512)
    assert (fg.sampler.num_steps, fg.sampler.eval_steps, fg.sampler.cfg_scale) == (10, 40, 4.5)
    assert (fg.train.timestep_fraction, fg.advantage.std) == (0.99, "global")
    dd = build_config(overrides=["preset=sd35-medium-ocr-ddrl", *data])
    assert dd.algorithm == "ddrl" and dd.data.source == "synthetic" and dd.reward.name == "ocr"
    # DDRL samples, trains and builds its synthetic set without CFG (cosmos-rl examples/ddrl.md
    # L88) and is evaluated as the other two are, at flow_grpo's 4.5 (config/grpo.py L38)
    assert (dd.sampler.cfg_scale, dd.eval.cfg_scale) == (1.0, 4.5)
    assert dd.eval.sampler(dd.sampler).cfg_scale == fg.eval.sampler(fg.sampler).cfg_scale == 4.5
    nft = build_config(overrides=["preset=sd35-medium-ocr-nft", *data])  # config/nft.py sd3_ocr
    assert (nft.objective, nft.regularisers, nft.sampler.sde.kind) == ("nft", "reverse_kl", "ode")
    assert (nft.loss.nft_beta, nft.loss.beta_kl, nft.loss.adv_clip_max) == (0.1, 1e-4, 5.0)
    assert (nft.loss.old_flat, nft.loss.old_rate, nft.loss.old_cap) == (75, 0.0075, 0.999)
    assert (nft.train.prompts_per_iter, nft.train.group_size, nft.train.updates_per_batch) == (
        48, 24, 2)  # fmt: skip
    assert (nft.sampler.num_steps, nft.sampler.cfg_scale, nft.optim.lr) == (10, 1.0, 3e-4)
    pick = build_config(overrides=["preset=sd35-medium-pickscore-nft", *data])
    assert (pick.loss.nft_beta, pick.loss.old_flat, pick.loss.old_rate, pick.loss.old_cap) == (
        1.0, 0, 0.001, 0.5)  # fmt: skip
    assert pick.reward.name == "pickscore" and pick.train.updates_per_batch == 1
    nd = build_config(overrides=["preset=sd35-medium-ocr-nft", "algorithm=nft_data", *data])
    assert nd.regularisers == "data" and nd.loss.nft_beta == 0.1 and not hasattr(nd.loss, "beta_kl")
    dance = build_config(overrides=["preset=sd35-medium-ocr-dance-grpo", *data])
    assert (dance.sampler.sde.kind, dance.sampler.sde.eta, dance.sampler.grid) == (
        "dance",
        0.3,
        "linear",
    )
    cosmos = build_config(
        overrides=[
            "preset=cosmos-predict2.5-2b-t2v-ddrl",
            f"data.images={videos}",
            "reward.name=remote",  # videoalign is served, not built in
        ]
    )
    assert (cosmos.loss.data_beta, cosmos.loss.clip_range, cosmos.optim.lr) == (0.01, 1e-4, 1e-5)
    assert (cosmos.sampler.num_steps, cosmos.sampler.cfg_scale, cosmos.train.group_size) == (
        20,
        1.0,
        8,
    )
    assert (cosmos.train.timestep_selection, cosmos.train.timestep_fraction) == ("strided", 0.5)
    # its sample callbacks' guidance [7] (2b.toml L152) in Cosmos' x = c + g (c - u) is
    # v_u + (1 + g)(v_c - v_u): ddrl's 8
    assert cosmos.eval.cfg_scale == 1 + 7 and cosmos.reward.clip == 5.0
    assert (cosmos.model.height, cosmos.model.width, cosmos.model.frames) == (720, 1280, 93)
    # min_num_conditional_frames = 0 (2b.toml L77), the code's max 1: the image-to-video half
    assert cosmos.model.cond_frames == (0, 1) and cosmos.eval.cond_frames == 0


def test_report_of_real_model_runs(tmp_path, capsys):
    held = _image_folder(tmp_path / "held", n=3)
    ov = [
        f"data.eval_images={held}",
        "eval.every=1",
        "eval.samples_per_prompt=2",
        "eval.rewards=brightness",
        "train.iterations=2",
    ]
    for alg in ("ddrl", "flow_grpo"):
        _train(tmp_path, alg, "tiny-sd3", f"algorithm={alg}", *ov)
    runs = [str(tmp_path / "ddrl"), str(tmp_path / "flow_grpo")]
    assert main(["report", *runs, "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "ood_<wbr>brightness" in page and "no gold evaluator" in page  # header: wraps at _
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert [a["label"] for a in metrics["arms"]] == ["ddrl", "flow_grpo"]
    assert metrics["base"]["iteration"] == 0 and len(metrics["arms"][0]["curve"]) == 3
    assert main(["report", str(held), "--out", str(tmp_path / "x")]) == 2
    assert "not an evaluated run" in capsys.readouterr().err


@pytest.mark.parametrize("preset", [*TINY, "digits", "toy2d"])
def test_each_family_names_its_shard_units(preset):
    """The blocks a family names for FSDP2 are every block of its transformer (what the generic
    "*blocks" rule finds for a plugin), each a distinct module; toy2d's MLP is one root unit."""
    from torch import nn

    from ddrl.dist import parallel
    from ddrl.training.components import load_base

    cfg = build_config(overrides=[f"preset={preset}", "pretrain.steps=1"])
    den = load_base(cfg, log=lambda *a: None)[0].denoiser
    named = den.shard_units()
    generic = [
        b
        for name, m in den.named_modules()
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1].endswith("blocks")
        for b in m
    ]
    assert [id(m) for m in named] == [id(m) for m in generic]
    assert len({id(m) for m in named}) == len(named) and (named or preset == "toy2d")
    assert parallel.shard_units(den) == named

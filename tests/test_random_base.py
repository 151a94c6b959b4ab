"""``model.base = "random"``: the real shapes with random weights.

Fast: every published checkpoint built through the random builder at reduced depth and width
(the test-only ``sizes``: sizes only, so every structural key stays the published one), its
text encoders' output widths checked against what the transformer reads, and for each family's
default checkpoint a prompt encoded and one transformer call made on it; the one-line error for
another family's checkpoint; the whole path (cache folder, loud log line, RANDOM_WEIGHTS.txt in
the run, resume, export, card) on a shallow SD3.5-Medium. Slow: SD3.5-Medium and Wan2.1-1.3B at
their real size train one iteration (bfloat16, LoRA, small resolution) and resume."""

import json
import time

import pytest
import torch

from ddrl.cli import main
from ddrl.config import build_config
from ddrl.errors import DDRLError
from ddrl.models import DIFFUSERS_FAMILIES, resolve
from ddrl.models import random_base as rb
from ddrl.models.config import ModelConfig
from ddrl.models.shapes import checkpoints, real_config, structural_differences
from ddrl.training.components import load_base
from ddrl.training.loop import train
from ddrl.training.runlog import prepare_run_dir, read_jsonl

FAMILY_OF = {resolve(f).pipeline_class: f for f in DIFFUSERS_FAMILIES}
ONE_HEAD = {"num_layers": 1, "num_attention_heads": 1}
AE = {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4}
SHALLOW = {  # family → test-only sizes of each part (head dims, text widths kept)
    "sd3": {
        "transformer": {"num_layers": 2, "num_attention_heads": 1, "caption_projection_dim": 64},
        "vae": AE,
    },
    "flux": {"transformer": {**ONE_HEAD, "num_single_layers": 1}, "vae": AE},
    "cosmos": {"transformer": ONE_HEAD, "vae": {"base_dim": 8, "num_res_blocks": 1}},
    "wan": {
        "transformer": {**ONE_HEAD, "ffn_dim": 32},
        "vae": {"base_dim": 8, "num_res_blocks": 1},
    },
    "qwen_image": {"transformer": ONE_HEAD, "vae": {"base_dim": 8, "num_res_blocks": 1}},
    "flux2": {"transformer": {**ONE_HEAD, "num_single_layers": 1}, "vae": AE},
    "z_image": {
        "transformer": {"dim": 128, "n_heads": 1, "n_kv_heads": 1, "n_layers": 1},
        "vae": AE,
    },
}
SHALLOW["qwen_image_edit"], SHALLOW["flux2_klein"] = SHALLOW["qwen_image"], SHALLOW["flux2"]
SIZE = {"cosmos": {"resolution": 32, "frames": 5}, "wan": {"resolution": 32, "frames": 5}}


def shallow(checkpoint: str) -> dict:
    real = real_config(checkpoint)
    sizes = json.loads(json.dumps(SHALLOW[FAMILY_OF[real["pipeline"]]]))
    if "transformer_2" in real:
        sizes["transformer_2"] = sizes["transformer"]
    if real["vae"].get("decoder_base_dim"):  # Wan2.2's z_dim-48 VAE: its decoder width too
        sizes["vae"]["decoder_base_dim"] = 8
    return sizes


def text_inputs(family: str, pipe) -> dict[str, tuple[int, int]]:
    """What each text input of the transformer expects vs what the text encoders give."""
    tc = pipe.transformer.config
    enc = {n: getattr(pipe, n).config for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
           if getattr(pipe, n, None) is not None}  # fmt: skip
    te = {n: getattr(c, "text_config", c) for n, c in enc.items()}
    width = {n: getattr(c, "d_model", None) or c.hidden_size for n, c in te.items()}
    if family == "sd3":
        pooled = te["text_encoder"].projection_dim + te["text_encoder_2"].projection_dim
        return {
            "pooled": (tc.pooled_projection_dim, pooled),
            "t5": (tc.joint_attention_dim, width["text_encoder_3"]),
            "clip fits t5": (1, int(width["text_encoder"] + width["text_encoder_2"] <= 4096)),
        }
    if family == "flux":
        return {
            "pooled": (tc.pooled_projection_dim, width["text_encoder"]),
            "t5": (tc.joint_attention_dim, width["text_encoder_2"]),
        }
    w = width["text_encoder"]
    if family == "wan":
        return {"umt5": (tc.text_dim, w)}
    if family == "cosmos":
        return {"layers": (tc.crossattn_proj_in_channels, w * te["text_encoder"].num_hidden_layers)}
    if family in ("qwen_image", "qwen_image_edit"):
        vision = enc["text_encoder"].vision_config.out_hidden_size
        return {"qwen": (tc.joint_attention_dim, w), "vision": (w, vision)}
    if family in ("flux2", "flux2_klein"):
        return {"3 layers": (tc.joint_attention_dim, 3 * w)}
    return {"qwen3": (tc.cap_feat_dim, w)}  # z_image


def check_structure(pipe, checkpoint: str, family: str) -> None:
    """Every part's structural keys, the scheduler and the pipeline flags as published; the
    text encoders' output widths what the transformer reads; transformer weights bfloat16."""
    real = real_config(checkpoint)
    for part in ("transformer", "transformer_2", "vae"):
        assert (part in real) == (getattr(pipe, part, None) is not None), part
        if part in real:
            got = dict(getattr(pipe, part).config)
            assert structural_differences(real[part], got) == [], part
    for key, value in real["scheduler"].items():
        assert pipe.scheduler.config[key] == value, key
    for key, value in real.get("pipeline_config", {}).items():
        if key in pipe.config and not isinstance(pipe.config[key], list | tuple):
            assert pipe.config[key] == value, key
    for name, (want, got) in text_inputs(family, pipe).items():
        assert got == want, (name, got, want)
    assert all(p.dtype == torch.bfloat16 for p in pipe.transformer.parameters())


OTHERS = [c for c in checkpoints() if c not in rb.DEFAULT_CHECKPOINT.values()]


@pytest.mark.parametrize("checkpoint", OTHERS)
def test_builder_keeps_published_structure_and_text_widths(tmp_path_factory, checkpoint):
    """Every checkpoint that is no family's default, built shallow (defaults: next test)."""
    cache = tmp_path_factory.getbasetemp() / "cache"  # one tiny template per family
    family = FAMILY_OF[real_config(checkpoint)["pipeline"]]
    pipe = rb.build_random_pipeline(resolve(family), checkpoint, cache, shallow(checkpoint))
    check_structure(pipe, checkpoint, family)


@pytest.mark.parametrize("checkpoint", checkpoints())
def test_full_size_on_meta_has_the_published_parameter_counts(tmp_path_factory, checkpoint):
    """Every checkpoint at its REAL size, built on the meta device (nothing materialised):
    each part's config is the published one and its parameter count is what ``ddrl plan``
    counts from the published config; the text encoders give the widths it reads."""
    from ddrl.plan.sizes import count, meta_module

    cache = tmp_path_factory.getbasetemp() / "cache"
    real = real_config(checkpoint)
    family = FAMILY_OF[real["pipeline"]]
    pipe = rb.build_random_pipeline(resolve(family), checkpoint, cache, meta=True)
    for part, kind in (("transformer", 0), ("transformer_2", 0), ("vae", 1)):
        if part in real:
            module = getattr(pipe, part)
            assert structural_differences(real[part], dict(module.config)) == [], part
            assert {k: module.config[k] for k in real[part]} == real[part], part
            want = count(meta_module(real["pipeline"], real[part], kind))[0]
            assert count(module)[0] == want, part
    for name, (want, got) in text_inputs(family, pipe).items():
        assert got == want, (name, got, want)


@pytest.mark.parametrize("family", sorted(rb.DEFAULT_CHECKPOINT))
def test_default_checkpoint_encodes_and_runs_the_transformer(tmp_path_factory, family):
    """Each family's default built shallow: its structure, and its encoders' outputs through
    the transformer's text inputs (one call; the edit family's conditioner needs images)."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    name = rb.DEFAULT_CHECKPOINT[family]
    pipe = rb.build_random_pipeline(resolve(family), name, cache, shallow(name))
    check_structure(pipe, name, family)
    if family == "qwen_image_edit":
        return
    pipe.to(torch.float32)
    size = SIZE.get(family, {"resolution": 64})
    cfg = ModelConfig(name=family, base="random", max_sequence_length=8, **size)
    gen = resolve(family)(pipe, cfg, "random")
    cond = gen.conditioner.encode_batch(["a red cube"])
    v = gen.denoiser.forward_velocity(torch.randn(1, *gen.sample_shape), torch.tensor([0.5]), cond)
    assert v.shape == (1, *gen.sample_shape) and bool(v.isfinite().all())


def test_random_base_names_a_checkpoint_of_its_own_family():
    sd3 = resolve("sd3")
    assert rb.random_checkpoint(sd3, "random") == "sd3.5-medium"
    assert rb.random_checkpoint(sd3, "random:sd3.5-large") == "sd3.5-large"
    assert rb.random_checkpoint(resolve("wan"), "random:wan2.2-ti2v-5b") == "wan2.2-ti2v-5b"
    for base in ("random:wan2.1-t2v-1.3b", "random:no-such"):
        with pytest.raises(DDRLError) as e:
            rb.random_checkpoint(sd3, base)
        msg = str(e.value)
        assert "\n" not in msg and "random:sd3.5-large" in msg and base in msg
    cfg = build_config(overrides=["preset=tiny-sd3", "model.base=random:flux.1-dev"])
    with pytest.raises(DDRLError, match="allowed: random, random:sd3.5"):
        load_base(cfg, log=lambda *a: None)


def test_random_sd3_trains_resumes_exports_and_says_so(tmp_path, monkeypatch):
    """The whole path on SD3.5-Medium's structure made shallow (the test-only TEST_SIZES)."""
    monkeypatch.setattr(rb, "TEST_SIZES", {"sd3.5-medium": shallow("sd3.5-medium")})
    said = []
    ov = [
        "preset=tiny-sd3",
        "model.base=random",
        f"model.cache_dir={tmp_path / 'cache'}",
        "model.resolution=64",
        "model.max_sequence_length=8",
        "algorithm=flow_grpo",
        "train.progress=false",
        "train.prompts_per_iter=1",
        "train.group_size=2",
        "sampler.num_steps=2",
        "train.iterations=1",
    ]
    run = prepare_run_dir(tmp_path / "run", resume=False, overwrite=False)
    train(build_config(overrides=ov), run, log=said.append)
    folder = tmp_path / "cache" / "random" / f"sd3.5-medium-v{rb.RANDOM_VERSION}"
    loud = "model.base=random: RANDOM weights with the real shapes of sd3.5-medium"
    assert sum(loud in s for s in said) == 1, said
    assert (run / rb.MARKER).is_file() and (folder / rb.MARKER).is_file()
    final = json.loads((run / "final" / "generator.json").read_text())
    assert final["base"] == str(folder)
    train(
        build_config(overrides=[*ov[:-1], "train.iterations=2"]), run, resume=True, log=said.append
    )
    assert [r["iteration"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert main(["export", str(run), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert (tmp_path / "merged" / rb.MARKER).is_file()
    assert "RANDOM WEIGHTS" in (tmp_path / "merged" / "README.md").read_text()


def _real_run(tmp_path, preset, *ov):
    """One iteration at the real size, then a resume to two; returns (seconds, seconds)."""
    base = [
        f"preset={preset}",
        "model.base=random",
        f"model.cache_dir={tmp_path / 'cache'}",
        "model.dtype=bfloat16",
        "model.finetune=lora",  # full fine-tuning of 1.4-2.2 B fp32 weights + Adam: > 24 GiB
        "model.max_sequence_length=16",
        "algorithm=flow_grpo",
        "train.device=cpu",
        "train.progress=false",
        "train.prompts_per_iter=1",
        "train.group_size=2",
        "sampler.num_steps=2",
        "sampler.eval_steps=2",
        "sampler.cfg_scale=1.0",
        "eval.every=0",
        *ov,
    ]
    run = prepare_run_dir(tmp_path / "run", resume=False, overwrite=False)
    t0 = time.perf_counter()
    train(build_config(overrides=[*base, "train.iterations=1"]), run, log=lambda *a: None)
    t1 = time.perf_counter()
    train(build_config(overrides=[*base, "train.iterations=2"]), run, resume=True, log=print)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2] and (run / rb.MARKER).is_file()
    return t1 - t0, time.perf_counter() - t1


@pytest.mark.slow
def test_real_size_sd35_medium_trains_one_iteration_and_resumes(tmp_path):
    first, resumed = _real_run(tmp_path, "tiny-sd3", "model.resolution=128")
    print(f"sd3.5-medium random: build + 1 iteration {first:.0f} s, resume + 1 {resumed:.0f} s")


@pytest.mark.slow
def test_real_size_wan21_1_3b_trains_one_iteration_and_resumes(tmp_path):
    first, resumed = _real_run(tmp_path, "tiny-wan", "model.resolution=64", "model.frames=5")
    print(f"wan2.1-t2v-1.3b random: build + 1 iteration {first:.0f} s, resume + 1 {resumed:.0f} s")


def test_plan_reads_a_random_base_as_its_checkpoint():
    from ddrl.plan.sizes import locate

    facts = locate(ModelConfig(name="wan", base="random:wan2.2-t2v-a14b"))
    assert set(facts.transformers) == {"transformer", "transformer_2"}
    assert "RANDOM" in facts.note and "wan2.2-t2v-a14b" in facts.note
    assert (
        locate(ModelConfig(name="sd3", base="random")).transformers["transformer"]
        == (real_config("sd3.5-medium")["transformer"])
    )

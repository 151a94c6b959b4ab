"""CLIP-based rewards (clipscore, pickscore, aesthetic, hpsv2) on tiny random CLIP models.

Each model is written with ``save_pretrained`` to a temporary folder and loaded back through the
reward factory with ``reward.model`` = that folder, as a user's hub id or folder would be. Every
score is re-derived here by an independent path: the transformers processor on a PIL image
(``CLIPProcessor``), ``CLIPModel.forward`` (``logits_per_image``, ``image_embeds``), then the
formula. The HPSv2 conversion is also checked against open_clip itself where it is installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ddrl.errors import DDRLError  # noqa: E402
from ddrl.rewards.base import RewardContext  # noqa: E402
from ddrl.rewards.build import build_reward
from ddrl.rewards.clip_rewards import Preprocess
from ddrl.rewards.config import RewardConfig

CLIP = ("aesthetic", "clipscore", "hpsv2", "pickscore")  # the CLIP family
SIZE = 32  # the tiny models' input (shortest edge = crop = 32)
PROMPTS = ["a red cat", "a dog on the beach", "a red cat", "", "x" * 200]


def _image_processor(**kw):
    from transformers.models import clip

    cls = getattr(clip, "CLIPImageProcessorPil", None) or clip.CLIPImageProcessor
    return cls(**kw)


def _tiny_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    from ddrl.models.tiny_text import clip_tokenizer, tiny_clip_config

    tok = clip_tokenizer()
    text = tiny_clip_config(len(tok)).to_dict() | {"hidden_act": "gelu"}
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=SIZE,
        patch_size=8,
        projection_dim=16,
        hidden_act="gelu",
    )
    cfg = CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(20.0))  # not the init value, so a scale bug shows
    return model, tok


def _save_clip(folder, seed: int = 0, weights: bool = True):
    from transformers import CLIPProcessor

    model, tok = _tiny_clip(seed)
    ip = _image_processor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    if weights:
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clip")
    _save_clip(folder)
    return folder


def _ctx(tmp_path, model: str, batch: int = 16) -> RewardContext:
    return RewardContext("files", tmp_path, "cpu", RewardConfig(model=str(model), batch=batch))


def _images(n: int = 5, h: int = SIZE, w: int = SIZE, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2.2 - 1.1  # a little out of range: clamped


def _smooth(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Images with a photo's smoothness (upsampled noise): PIL's and torch's bicubic resizes
    then agree to a level or so (on pixel noise they differ by up to ~7 of 255)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def _pil(image: torch.Tensor) -> Image.Image:
    u = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(u.permute(1, 2, 0).numpy())


def _reference(folder, images, prompts):
    """(model, cos [B], logit_scale, unit image embeddings) via transformers' own processor."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    proc = CLIPProcessor.from_pretrained(folder)
    cos, embs = [], []
    for image, prompt in zip(images, prompts, strict=True):
        inputs = proc(
            text=[prompt],
            images=[_pil(image)],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=77,
        )
        with torch.no_grad():
            out = model(**inputs)
        scale = float(model.logit_scale.detach().exp())
        cos.append(float(out.logits_per_image[0, 0]) / scale)
        embs.append(F.normalize(out.image_embeds[0], dim=-1))
    return model, torch.tensor(cos), scale, torch.stack(embs)


def test_clipscore_is_hessel_formula(clip_folder, tmp_path):
    images = _images()
    r = build_reward("clipscore", _ctx(tmp_path, clip_folder))(images, PROMPTS)
    assert r.dtype == torch.float32 and r.shape == (5,) and r.device.type == "cpu"
    assert torch.isfinite(r).all()
    _, cos, _, _ = _reference(clip_folder, images, PROMPTS)
    assert (cos > 0).any() and (cos < 0).any()  # both sides of the clamp are exercised
    torch.testing.assert_close(r, 2.5 * cos.clamp(min=0), atol=1e-5, rtol=1e-4)


def test_pickscore_is_scaled_cosine_over_26(clip_folder, tmp_path):
    images = _images(seed=2)
    r = build_reward("pickscore", _ctx(tmp_path, clip_folder))(images, PROMPTS)
    _, cos, scale, _ = _reference(clip_folder, images, PROMPTS)
    assert scale == pytest.approx(20.0, rel=1e-5)
    torch.testing.assert_close(r, scale * cos / 26, atol=1e-5, rtol=1e-4)
    assert (r.abs() > 0).any()  # not clipped like CLIPScore


def test_batch_size_does_not_change_scores(clip_folder, tmp_path):
    images = _images(seed=3)
    full = build_reward("clipscore", _ctx(tmp_path, clip_folder, batch=16))
    pick = build_reward("pickscore", _ctx(tmp_path, clip_folder, batch=2))
    one = build_reward("pickscore", _ctx(tmp_path, clip_folder, batch=1))
    torch.testing.assert_close(pick(images, PROMPTS), one(images, PROMPTS), atol=1e-6, rtol=1e-5)
    single = torch.cat([full(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(full(images, PROMPTS), single, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "filename", ["aesthetic_head.safetensors", "sac+logos+ava1-l14-linearMSE.pth"]
)
def test_aesthetic_is_mlp_of_unit_image_embedding(filename, tmp_path):
    from ddrl.rewards.aesthetic import AestheticMLP

    folder = tmp_path / "aesthetic"
    _save_clip(folder)
    torch.manual_seed(4)
    head = AestheticMLP(16).eval()
    state = {k: v.contiguous() for k, v in head.state_dict().items()}
    if filename.endswith(".safetensors"):
        save_file(state, folder / filename)
    else:  # the original file: torch.save of the MLP's state dict
        torch.save(state, folder / filename)
    images = _images(seed=4)
    r = build_reward("aesthetic", _ctx(tmp_path, folder, batch=2))(images, PROMPTS)
    assert r.shape == (5,) and torch.isfinite(r).all()
    _, _, _, emb = _reference(folder, images, PROMPTS)
    with torch.no_grad():
        want = head(emb).squeeze(-1)
    torch.testing.assert_close(r, want, atol=1e-5, rtol=1e-4)


def _to_open_clip(model) -> dict[str, torch.Tensor]:
    """transformers CLIPModel → OpenCLIP state-dict layout (what HPS_v2.1_compressed.pt holds)."""
    sd, out = model.state_dict(), {}
    for tower, pre in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        layers = {k.split(".")[3] for k in sd if k.startswith(f"{tower}.encoder.layers.")}
        for i in layers:
            src, dst = f"{tower}.encoder.layers.{i}", f"{pre}.resblocks.{i}"
            for p in ("weight", "bias"):
                out[f"{dst}.attn.in_proj_{p}"] = torch.cat(
                    [sd[f"{src}.self_attn.{n}_proj.{p}"] for n in "qkv"]
                )
                for a, b in (
                    ("ln_1", "layer_norm1"),
                    ("ln_2", "layer_norm2"),
                    ("attn.out_proj", "self_attn.out_proj"),
                    ("mlp.c_fc", "mlp.fc1"),
                    ("mlp.c_proj", "mlp.fc2"),
                ):
                    out[f"{dst}.{a}.{p}"] = sd[f"{src}.{b}.{p}"]
    v = "vision_model"
    out |= {
        "visual.class_embedding": sd[f"{v}.embeddings.class_embedding"],
        "visual.positional_embedding": sd[f"{v}.embeddings.position_embedding.weight"],
        "visual.conv1.weight": sd[f"{v}.embeddings.patch_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].t(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].t(),
        "logit_scale": sd["logit_scale"],
        "attn_mask": torch.full((77, 77), float("-inf")).triu(1),
    }
    for a, b in (
        ("visual.ln_pre", f"{v}.pre_layrnorm"),
        ("visual.ln_post", f"{v}.post_layernorm"),
        ("ln_final", "text_model.final_layer_norm"),
    ):
        out[f"{a}.weight"], out[f"{a}.bias"] = sd[f"{b}.weight"], sd[f"{b}.bias"]
    return {k: t.half().contiguous() for k, t in out.items()}  # "compressed": fp16


def test_hpsv2_converts_open_clip_weights_and_scores_cosine(tmp_path):
    folder = tmp_path / "hps"
    model = _save_clip(folder, seed=5, weights=False)  # config + processor, no CLIP weights
    model = model.half().float()  # the fp16 checkpoint's values
    torch.save({"state_dict": _to_open_clip(model), "epoch": 1}, folder / "HPS_v2.1_compressed.pt")
    images = _smooth(3, 48, 36, seed=6)  # not square: longest side → 32, padded
    prompts = PROMPTS[:3]
    r = build_reward("hpsv2", _ctx(tmp_path, folder, batch=2))(images, prompts)
    assert r.shape == (3,) and torch.isfinite(r).all()
    # by hand: PIL bicubic to 24 x 32, black bars to 32 x 32, OpenAI mean/std, cos
    from transformers import CLIPProcessor

    proc = CLIPProcessor.from_pretrained(folder)
    mean = torch.tensor(proc.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(proc.image_processor.image_std).view(3, 1, 1)
    want = []
    for image, prompt in zip(images, prompts, strict=True):
        small = np.asarray(_pil(image).resize((24, 32), Image.BICUBIC), dtype=np.float32) / 255
        x = F.pad(torch.from_numpy(small).permute(2, 0, 1), (4, 4, 0, 0))
        x = ((x - mean) / std)[None]
        enc = proc.tokenizer([prompt], return_tensors="pt", truncation=True, max_length=77)
        with torch.no_grad():
            out = model(pixel_values=x, **enc)
        want.append(F.cosine_similarity(out.image_embeds, out.text_embeds)[0])
    torch.testing.assert_close(r, torch.stack(want), atol=3e-3, rtol=0)


def test_hpsv2_rejects_a_checkpoint_of_another_shape(tmp_path):
    folder = tmp_path / "hps_bad"
    model = _save_clip(folder, seed=5, weights=False)
    sd = _to_open_clip(model)
    sd["visual.proj"] = sd["visual.proj"][:, :8]
    torch.save({"state_dict": sd}, folder / "HPS_v2.1_compressed.pt")
    with pytest.raises(DDRLError, match="not an OpenCLIP ViT checkpoint") as e:
        build_reward("hpsv2", _ctx(tmp_path, folder))
    assert "\n" not in str(e.value)


def test_preprocess_matches_the_transformers_processor_on_resize_and_crop(clip_folder):
    from transformers import AutoImageProcessor

    ip = AutoImageProcessor.from_pretrained(clip_folder)
    pre = Preprocess.from_processor(ip)
    assert (pre.size, pre.crop) == (SIZE, (SIZE, SIZE))
    images = _smooth(2, 45, 70, seed=7)  # shorter side 45 → 32, longer 49, crop 32
    mine = pre(images)
    ref = torch.cat([ip(images=_pil(x), return_tensors="pt")["pixel_values"] for x in images])
    assert mine.shape == ref.shape == (2, 3, SIZE, SIZE)
    diff = (mine - ref).abs() * 0.27 * 255  # in 8-bit levels (std ≈ 0.27)
    assert diff.mean() < 0.5 and diff.max() < 2.5  # torch's antialiased bicubic vs PIL's
    same = _images(n=1, seed=8)  # already 32 x 32: exact
    ref = ip(images=_pil(same[0]), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pre(same), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CLIP)
def test_missing_folder_is_one_line_error(name, tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(DDRLError) as e:
        build_reward(name, _ctx(tmp_path, missing))
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg and "reward.model" in msg


def test_folder_without_the_weights_is_one_line_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for name, needle in (
        ("aesthetic", "aesthetic_head.safetensors"),
        ("hpsv2", "HPS_v2.1_compressed.pt"),
        ("clipscore", "reward.model"),
    ):
        with pytest.raises(DDRLError, match=needle) as e:
            build_reward(name, _ctx(tmp_path, empty))
        assert "\n" not in str(e.value) and str(empty) in str(e.value)


def test_hpsv2_conversion_matches_open_clip(tmp_path):
    """The converted model's embeddings equal OpenCLIP's own (run where open_clip is
    installed; HPSv2's vendored OpenCLIP has the same ViT CLIP and state-dict layout)."""
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP
    from transformers import CLIPConfig

    from ddrl.rewards.hpsv2 import clip_from_open_clip

    vocab = 64
    torch.manual_seed(9)
    oc = CLIP(
        embed_dim=16,
        vision_cfg={
            "image_size": SIZE,
            "layers": 2,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        text_cfg={"context_length": 77, "vocab_size": vocab, "width": 16, "heads": 2, "layers": 2},
    ).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one shows
        for name, p in oc.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.2)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 16,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "eos_token_id": vocab - 1,  # OpenCLIP pools at argmax(ids): eot is the top id
            "bos_token_id": vocab - 2,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": SIZE,
            "patch_size": 8,
            "hidden_act": "gelu",
        },
        projection_dim=16,
    )
    cfg.save_pretrained(tmp_path)
    torch.save({"state_dict": oc.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    hf = clip_from_open_clip(str(tmp_path / "HPS_v2.1_compressed.pt"), str(tmp_path))
    x = torch.randn(2, 3, SIZE, SIZE)
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[0, :5] = torch.tensor([vocab - 2, 3, 7, 9, vocab - 1])
    ids[1, :3] = torch.tensor([vocab - 2, 5, vocab - 1])
    mask = (torch.arange(77) < torch.tensor([[5], [3]])).long()
    with torch.no_grad():
        want_i, want_t = oc.encode_image(x, normalize=True), oc.encode_text(ids, normalize=True)
        got_i = hf.visual_projection(hf.vision_model(pixel_values=x).pooler_output)
        got_t = hf.text_projection(hf.text_model(input_ids=ids, attention_mask=mask).pooler_output)
    torch.testing.assert_close(F.normalize(got_i, dim=-1), want_i, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(F.normalize(got_t, dim=-1), want_t, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hf.logit_scale.detach(), oc.logit_scale.detach())


@pytest.mark.parametrize("name", CLIP)
def test_unreachable_hub_id_is_one_line_error(name, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries
    with pytest.raises(DDRLError) as e:
        build_reward(name, _ctx(tmp_path, "no-such-org/no-such-model"))
    msg = str(e.value)
    assert "\n" not in msg and "'no-such-org/no-such-model'" in msg and "reward.model" in msg


def test_feature_space_diversity_and_frechet_distance_in_evaluation(clip_folder, tmp_path):
    """eval.features=clipscore: within-prompt diversity of the samples' CLIP embeddings and the
    Fréchet distance to the held-out images' (decoded from their cached latents), recomputed
    here from the returned samples (the metric functions are checked by hand in
    test_eval_metrics)."""
    from ddrl.config import build_config
    from ddrl.evaluation.evaluate import evaluate_components
    from ddrl.evaluation.metrics import frechet_distance, pairwise_diversity
    from ddrl.models.base import clamp_images
    from ddrl.training.components import build_components

    held = tmp_path / "held"
    held.mkdir()
    for i in range(4):
        Image.fromarray((torch.rand(16, 16, 3) * 255).to(torch.uint8).numpy()).save(
            held / f"h{i}.png"
        )
        (held / f"h{i}.txt").write_text(f"thing {i}")
    ov = [
        "preset=tiny-sd3",
        "model.resolution=16",
        f"data.eval_images={held}",
        "eval.samples_per_prompt=3",
        "model.release_text_encoders=false",
        "eval.features=clipscore",
        f"eval.features_model={clip_folder}",
    ]
    cfg = build_config(overrides=ov)
    c = build_components(cfg, log=lambda *a: None)
    m, raw, prompts = evaluate_components(c.gen, c, cfg)
    feats = c.embed(clamp_images(c.gen.codec, raw))
    groups = torch.arange(len(c.data.eval_prompts)).repeat_interleave(3)
    assert m["diversity_feature"] == pytest.approx(pairwise_diversity(feats, groups), rel=1e-5)
    real = clamp_images(c.gen.codec, c.gen.codec.decode(c.heldout.x))
    assert m["fd_feature"] == pytest.approx(frechet_distance(feats, c.embed(real)), rel=1e-4)
    assert m["diversity_feature"] > 0 and m["fd_feature"] > 0
    with pytest.raises(DDRLError, match="no image features"):
        build_components(build_config(overrides=[*ov[:-2], "eval.features=brightness"]))

"""``data.condition_images``: one condition image per prompt, read lazily at the model's size,
handed to the conditioner once; every misuse is a one-line error before any work."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ddrl.cli import main
from ddrl.data.conditions import ConditionImages, attach_condition_images
from ddrl.errors import DDRLError


def _image(path, rgb, size=(20, 12)):
    Image.fromarray(np.full((size[1], size[0], 3), rgb, dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "cond"
    d.mkdir()
    rows = [("a.png", (255, 0, 0), "make it blue"), ("b.png", (0, 255, 0), "add a hat")]
    for name, rgb, _ in rows:
        _image(d / name, rgb)
    (d / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": n, "text": c}) + "\n" for n, _, c in rows)
    )
    return d


def test_images_are_read_on_access_at_the_model_size(folder):
    images = ConditionImages(str(folder), (8, 8))
    assert sorted(images) == ["add a hat", "make it blue"] and len(images) == 2
    x = images["make it blue"]
    assert x.shape == (3, 8, 8)  # shorter side resized, centre-cropped
    # pure red in [-1, 1]: (255/127.5 − 1, −1, −1), up to resampling of a flat image
    assert abs(x[0].mean().item() - 1.0) < 1e-5 and abs(x[1:].mean().item() + 1.0) < 1e-5
    with pytest.raises(DDRLError, match="no condition image"):
        images["unknown"]


def test_the_conditioner_gets_them_once_and_every_prompt_is_covered(folder):
    got = {}
    gen = SimpleNamespace(conditioner=SimpleNamespace(set_images=got.update), height=8, width=4)
    attach_condition_images(gen, str(folder), ["add a hat", "make it blue", "add a hat"], "x")
    assert sorted(got) == ["add a hat", "make it blue"]
    assert got["add a hat"].shape == (3, 8, 4)
    with pytest.raises(DDRLError, match="no image for 1 prompt"):
        attach_condition_images(gen, str(folder), ["add a hat", "a dog"], "x")
    plain = SimpleNamespace(conditioner=SimpleNamespace(), height=8, width=8)
    with pytest.raises(DDRLError, match="takes no condition image"):
        attach_condition_images(plain, str(folder), ["add a hat"], "sd3")


def test_two_images_for_one_prompt_is_an_error(folder):
    _image(folder / "c.png", (0, 0, 255))
    with open(folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "c.png", "text": "add a hat"}) + "\n")
    with pytest.raises(DDRLError, match="has two images"):
        ConditionImages(str(folder), (8, 8))


def test_a_family_without_condition_images_says_so_before_training(folder, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("add a hat\nmake it blue\n")
    code = main(
        [
            "train",
            "--out",
            str(tmp_path / "run"),
            "--preset",
            "tiny-sd3",
            f"data.prompts={prompts}",
            f"data.condition_images={folder}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "takes no condition image" in err[0]
    assert not (tmp_path / "run").exists()  # nothing written before the error


def test_without_a_prompt_file_the_condition_captions_are_the_prompts(folder):
    from ddrl.data.config import DataConfig
    from ddrl.data.files import files_data

    cfg = DataConfig(name="files", condition_images=str(folder))
    cfg.check()
    data = files_data(cfg)
    assert sorted(data.prompts) == ["add a hat", "make it blue"]
    assert data.eval_prompts == data.prompts


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cosmos_image_to_world_from_a_condition_image_is_the_pipelines(
    tmp_path, monkeypatch, guidance
):
    """Cosmos with ``set_images``: the image's VAE latent frame is given (in the condition and,
    with CFG, in the null condition); the generated frames equal Cosmos2_5_PredictBasePipeline's
    ``image=`` output from the same noise (pipeline guidance g ↔ cfg_scale g + 1), and the
    causal VAE's latent of the image alone is the first latent frame of the pipeline's
    [image, zeros, ...] video."""
    import diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict as module
    import torch
    from test_cosmos import GridEuler, load

    from ddrl.config.core import SamplerConfig
    from ddrl.models.cosmos import CosmosGenerator
    from ddrl.models.hf import ensure_tiny
    from ddrl.sampling import sample_ode

    def to_tensor(pil):  # torchvision's: HWC uint8 → CHW float in [0, 1] (not installed here)
        return torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255

    functional = SimpleNamespace(to_tensor=to_tensor)
    tv = SimpleNamespace(transforms=SimpleNamespace(functional=functional))
    monkeypatch.setattr(module, "torchvision", tv, raising=False)
    folder = ensure_tiny(CosmosGenerator, tmp_path / "cache", log=lambda m: None)
    gen = load(folder, folder)
    h, w = gen.height, gen.width
    rgb = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    black = -torch.ones(1, 3, gen.frames - 1, h, w)  # the pipeline pads with black frames
    video = torch.cat([image[None, :, None], black], dim=2)
    first = gen.codec.encode(video)[:, :, :1]
    assert (gen.codec.encode(image[None, :, None]) - first).abs().max() < 1e-5
    prompt = "a red ball"
    gen.conditioner.set_images({prompt: image})
    cfg = SamplerConfig(eval_steps=4, cfg_scale=guidance + 1 if guidance > 1 else 1.0)
    x = sample_ode(gen, [prompt], cfg, torch.Generator().manual_seed(0))
    eps = torch.randn((1, *gen.sample_shape), generator=torch.Generator().manual_seed(0))
    pipe = gen.pipe
    pipe.set_progress_bar_config(disable=True)
    old, pipe.scheduler = pipe.scheduler, GridEuler().use(gen.timestep_grid(4))
    try:
        ref = pipe(
            prompt=prompt,
            image=Image.fromarray(rgb),
            height=h,
            width=w,
            num_frames=gen.frames,
            num_inference_steps=4,
            guidance_scale=guidance,
            latents=eps,
            output_type="latent",
            max_sequence_length=160,
        ).frames
    finally:
        pipe.scheduler = old
    assert (ref[:, :, 1:] - x[:, :, 1:]).abs().max() < 1e-5  # the generated frames
    assert (x[:, :, :1] - first).abs().max() < 1e-5  # the given frame reached exactly


def test_condition_images_and_cond_frames_together_are_refused(folder, tmp_path, capsys):
    args = ["train", "--out", str(tmp_path / "run"), "--preset", "tiny-cosmos"]
    code = main([*args, f"data.condition_images={folder}", "model.cond_frames=[0,1]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "model.cond_frames both condition" in err[0]
    assert not (tmp_path / "run").exists()


def test_image_to_world_and_edit_runs_train_and_sample_with_the_shipped_pictures(tmp_path, capsys):
    """tiny-cosmos on the six shipped pictures (their captions the prompts) and the tiny edit
    preset out of the box: 2 iterations each; ``ddrl sample --image`` renders from each run, and
    an edit run refuses to sample without its image."""
    from ddrl.data.files import list_items
    from ddrl.training.runlog import read_jsonl

    shipped = list_items(Path(__file__).parents[1] / "src/ddrl/presets/prompts/tiny-edit")
    ov = ["train.progress=false", "data.prompts=", "data.condition_images=tiny-edit"]
    for name, preset, extra in (("i2v", "tiny-cosmos", ov), ("edit", "tiny-qwen-image-edit", [])):
        run = tmp_path / name
        assert main(["train", "--out", str(run), "--preset", preset, *extra]) == 0
        rows = read_jsonl(run / "metrics.jsonl")
        assert [r["iteration"] for r in rows] == [1, 2]
        assert all(v is not None for r in rows for v in r.values())
        out = tmp_path / f"{name}-samples"
        item = shipped[0]
        args = ["sample", str(run), "--prompt", item.caption, "--image", str(item.path)]
        assert main([*args, "--out", str(out)]) == 0 and len(list(out.iterdir())) == 1
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", "x", "--out", str(tmp_path / "no")]) != 0
    assert "give --image" in capsys.readouterr().err

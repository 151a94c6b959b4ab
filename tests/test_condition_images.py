"""``data.condition_images``: one condition image per prompt, read lazily at the model's size,
handed to the conditioner once; every misuse is a one-line error before any work."""

import json
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

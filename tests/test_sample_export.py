"""`ddrl sample` on every family (one file per sample at the model's own size, the same seed
giving the same bytes, the evaluation's ODE), and `ddrl export`'s model card (front matter,
facts, metrics as logged, and a usage snippet that is executed and renders at the card's size);
every bad input is one line before any work, and neither folder is ever half-written."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from helpers_quick import quick
from PIL import Image

from ddrl.cli import main
from ddrl.training.runlog import read_jsonl

TINY = [
    "algorithm=grpo",  # no data term: no synthetic pool to generate first
    "train.iterations=1",
    "train.prompts_per_iter=2",
    "train.group_size=2",
    "sampler.num_steps=2",
    "sampler.eval_steps=2",
    "train.progress=false",
]
# family → (its run's arguments, (height, width, frames) of one sample; frames 0 = an image)
FAMILIES = {
    "digits": (["--preset", "digits", *quick("train.iterations=1")], (8, 8, 0)),
    "toy2d": (["--preset", "toy2d", *quick("train.iterations=1")], None),
    "sd3": (["--preset", "tiny-sd3", *TINY, "model.height=16", "model.width=32"], (16, 32, 0)),
    "flux": (["--preset", "tiny-flux", *TINY], (32, 32, 0)),
    "cosmos": (["--preset", "tiny-cosmos", *TINY], (16, 16, 5)),
    "wan": (
        ["--preset", "tiny-wan", *TINY, "model.height=16", "model.width=32", "eval.every=1"],
        (16, 32, 5),
    ),
}
PROMPTS = {"digits": ["3", "7"], "toy2d": ["", ""]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """family → its run folder, trained (one iteration) on first use."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def get(family: str):
        if family not in done:
            out = root / family
            assert main(["train", "--out", str(out), *FAMILIES[family][0]]) == 0
            done[family] = out
        return done[family]

    return get


def _sample(run, out, family, *extra):
    prompts = PROMPTS.get(family, ["a red ball", "a cat"])
    args = ["sample", str(run), "--out", str(out), "--n", "2", "--seed", "5", *extra]
    return main([*args, *(a for p in prompts for a in ("--prompt", p))])


def _frames(path) -> np.ndarray:
    import imageio.v2 as imageio

    with imageio.get_reader(path, format="FFMPEG") as r:
        return np.stack([frame for frame in r])  # list(r) asks len(): inf


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sample_writes_one_file_per_sample_at_the_models_size(runs, family, tmp_path, capsys):
    run = runs(family)
    capsys.readouterr()
    assert _sample(run, tmp_path / "a", family) == 0
    printed = capsys.readouterr().out.split()
    assert _sample(run, tmp_path / "b", family) == 0
    files = sorted((tmp_path / "a").iterdir())
    assert printed == [str(f) for f in files]  # the paths written, and nothing else there
    size = FAMILIES[family][1]
    if size is None:  # 2-D points: one scatter picture per prompt
        assert [f.name for f in files] == ["p0.png", "p1.png"]
        assert Image.open(files[0]).size == (400, 400)
    else:
        h, w, frames = size
        ext = ".mp4" if frames else ".png"
        assert [f.name for f in files] == [f"p{i}_s{j}{ext}" for i in (0, 1) for j in (0, 1)]
        for f in files:
            if frames:
                assert _frames(f).shape == (frames, h, w, 3)
            else:
                img = Image.open(f)
                assert img.size == (w, h) and img.mode == ("L" if family == "digits" else "RGB")
    for f in files:  # the same seed: the same bytes
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    assert _sample(run, tmp_path / "c", family, "--seed", "6") == 0
    assert any(f.read_bytes() != (tmp_path / "c" / f.name).read_bytes() for f in files)


def test_sample_is_the_evaluation_ode_of_the_run(runs, tmp_path):
    """The PNGs hold, pixel for pixel, ``sample_ode`` with the run's sampler on eval.grid from
    the seed's noise; a sampler.eval_steps override changes them."""
    from ddrl.config import load_config
    from ddrl.sampling import sample_ode
    from ddrl.training.saved import load_run_generator

    run = runs("digits")
    cfg = load_config(run / "config.json")
    gen = load_run_generator(run)
    x = sample_ode(gen, ["3", "3", "7", "7"], cfg.sampler, torch.Generator().manual_seed(5))
    want = ((x.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)[:, 0].numpy()
    assert _sample(run, tmp_path / "a", "digits") == 0
    got = [np.array(Image.open(tmp_path / "a" / f"p{i}_s{j}.png")) for i in (0, 1) for j in (0, 1)]
    assert np.array_equal(np.stack(got), want)
    assert _sample(run, tmp_path / "b", "digits", "sampler.eval_steps=3") == 0
    assert np.array(Image.open(tmp_path / "b" / "p0_s0.png")).tolist() != want[0].tolist()
    # --step 1: the checkpoint of the last iteration holds the weights final/ holds
    assert _sample(run, tmp_path / "c", "digits", "--step", "1") == 0
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "c" / f.name).read_bytes()


def test_sample_from_model_folders(runs, tmp_path):
    """A saved generator (digits final/, into an existing empty --out), an unmerged LoRA export
    (generator.json + adapter) and a merged pipeline folder (model_index.json, its size from
    the ddrl_defaults.json the export wrote)."""
    (tmp_path / "d").mkdir()  # an existing empty folder is filled
    assert _sample(runs("digits") / "final", tmp_path / "d", "digits") == 0
    assert Image.open(tmp_path / "d" / "p1_s1.png").size == (8, 8)
    assert main(["export", str(runs("sd3")), "--out", str(tmp_path / "lora")]) == 0
    assert _sample(tmp_path / "lora", tmp_path / "s", "sd3") == 0
    assert Image.open(tmp_path / "s" / "p0_s0.png").size == (32, 32)  # the base's native size
    assert main(["export", str(runs("wan")), "--out", str(tmp_path / "m"), "--merge"]) == 0
    assert _sample(tmp_path / "m", tmp_path / "w", "wan") == 0
    assert _frames(tmp_path / "w" / "p0_s0.mp4").shape == (5, 16, 32, 3)  # the run's size


def _card(folder):
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def _snippet(body: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", body, re.S)
    assert len(blocks) == 1
    return blocks[0]


def _run(code: str, cwd) -> None:
    """Run a card's snippet as a user would: its own Python process, offline. (The test
    session already holds the CPU lock: the child must not take it again.)"""
    (cwd / "use.py").write_text(code)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    done = subprocess.run([sys.executable, "use.py"], cwd=cwd, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_merged_export_card_snippet_renders_at_the_cards_size(runs, family, tmp_path):
    run = runs(family)
    assert main(["export", str(run), "--out", str(tmp_path / "exp"), "--merge"]) == 0
    meta, body = _card(tmp_path / "exp")
    video = family == "wan"
    assert meta == {
        "library_name": "diffusers",  # no base_model: the base is "tiny", not a hub id or path
        "pipeline_tag": "text-to-video" if video else "text-to-image",
        "tags": ["ddrl", "grpo", "reinforcement-learning"],
    }
    assert "- **Iterations trained:** 1" in body and "merged into a self-contained" in body
    last = read_jsonl(run / "metrics.jsonl")[-1]
    if video:  # eval.every=1: the last eval.jsonl row, every metric as logged
        row = read_jsonl(run / "eval.jsonl")[-1]
        assert f"Evaluation after iteration {row['iteration']}" in body
        assert f"| proxy_reward | {row['proxy_reward']:.6g} |" in body
    else:  # no evaluation: said so, and the last training reward instead
        assert "No evaluation was logged" in body
        assert f"reward_mean = {last['reward_mean']:.6g}." in body
    code = _snippet(body)
    # Only the folder is substituted: the export is moved and the snippet pointed at it.
    moved = shutil.move(tmp_path / "exp", tmp_path / "moved")
    assert code.count(str(tmp_path / "exp")) == 1
    code = code.replace(str(tmp_path / "exp"), str(moved))
    h, w, frames = FAMILIES[family][1]
    sizes = dict(re.findall(r"(height|width|num_frames|num_inference_steps)=(\d+)", code))
    assert sizes == {
        "height": str(h),
        "width": str(w),
        "num_inference_steps": "2",
        **({"num_frames": str(frames)} if video else {}),
    }
    if video:  # the run's sampler.shift, given to the plain pipeline's scheduler
        assert "flow_shift=5.0" in code and "guidance_scale=5.0" in code
    _run(code, tmp_path)
    if video:
        assert _frames(tmp_path / "sample.mp4").shape == (frames, h, w, 3)
    else:
        assert Image.open(tmp_path / "sample.png").size == (w, h)


def test_unmerged_and_embedded_cards(runs, tmp_path):
    """An unmerged LoRA export loads the base then the adapter; a full one the transformer
    onto the base; an embedded family's card uses ddrl (load_generator, ddrl sample); a model
    folder's card names its base (a path) and leaves what it cannot know absent."""
    assert main(["export", str(runs("sd3")), "--out", str(tmp_path / "lora")]) == 0
    _, body = _card(tmp_path / "lora")
    code = _snippet(body)
    base = json.loads((tmp_path / "lora" / "generator.json").read_text())["base"]
    assert f'StableDiffusion3Pipeline.from_pretrained("{base}"' in code
    assert "pipe.load_lora_weights(folder)" in code and "peft" in body
    assert "a LoRA adapter (rank 4), the trained part only" in body
    _run(code, tmp_path)  # the base pipeline plus the adapter renders at the run's size
    assert Image.open(tmp_path / "sample.png").size == (32, 16)
    assert main(["export", str(runs("digits")), "--out", str(tmp_path / "dig")]) == 0
    meta, body = _card(tmp_path / "dig")
    assert "library_name" not in meta and meta["pipeline_tag"] == "text-to-image"
    code = _snippet(body)
    assert "gen = load_generator(folder)" in code and "eval_steps=4" in code
    assert f'ddrl sample "{tmp_path / "dig"}" --prompt "3"' in body
    assert "- **Sample size:** 8 × 8 px" in body
    _run(code, tmp_path)  # 8 digits in one row, each 8 px + a 1 px gutter, enlarged 6 times
    assert Image.open(tmp_path / "samples.png").size == ((8 * 9 + 1) * 6, (9 + 1) * 6)
    assert main(["export", str(runs("wan")) + "/final", "--out", str(tmp_path / "full")]) == 0
    meta, body = _card(tmp_path / "full")
    wan_base = json.loads((tmp_path / "full" / "generator.json").read_text())["base"]
    assert meta["base_model"] == wan_base and meta["tags"] == ["ddrl", "reinforcement-learning"]
    assert "- **Algorithm:** absent" in body and "- **Iterations trained:** absent" in body
    assert "WanTransformer3DModel.from_pretrained(folder, subfolder=" in _snippet(body)
    # Cosmos: the packages its pipeline needs to load, and its guidance g = cfg_scale − 1
    assert main(["export", str(runs("cosmos")), "--out", str(tmp_path / "cos"), "--merge"]) == 0
    cosmos = (tmp_path / "cos" / "README.md").read_text()
    assert "cosmos_guardrail torchvision" in cosmos and "guidance_scale=0.0" in cosmos


def test_export_and_sample_write_all_or_nothing(runs, tmp_path, monkeypatch):
    import ddrl.cli.export as export
    import ddrl.evaluation.pictures as pictures

    run = runs("digits")
    monkeypatch.setattr(export, "CARD", "no/such/folder/README.md")  # fails after the weights
    with pytest.raises(FileNotFoundError):
        main(["export", str(run), "--out", str(tmp_path / "e")])
    assert not (tmp_path / "e").exists()
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    real = pictures.save_image
    monkeypatch.setattr(pictures, "save_image", fail_second)
    with pytest.raises(OSError):
        _sample(run, tmp_path / "s", "digits")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "args, says",
    [
        (["{run}", "--out", "{tmp}/o"], "no prompt given"),
        (["{run}", "--out", "{tmp}/o", "--prompt", "3", "--n", "0"], "--n=0"),
        (["{run}", "--out", "{tmp}/o", "--prompt", "3", "--seed", "-1"], "--seed=-1"),
        (["{run}", "--out", "{tmp}/full", "--prompt", "3"], "not an empty folder"),
        (["{tmp}", "--out", "{tmp}/o", "--prompt", "3"], "is not a run folder"),
        (["{tmp}/bad", "--out", "{tmp}/o", "--prompt", "3"], "corrupt"),
        (["{run}/final", "--out", "{tmp}/o", "--prompt", "3", "--step", "1"], "--step does not"),
        (["{run}", "--out", "{tmp}/o", "--prompt", "3", "--step", "7"], "--step 7: no such"),
        (["{run}", "--out", "{tmp}/o", "--prompt", "3", "model.resolution=8"], "model.resolution"),
        (["{run}", "--out", "{tmp}/o", "--prompt", "3", "sampler.eval_steps=0"], "eval_steps=0"),
        (["{run}", "--out", "", "--prompt", "3"], "--out ''"),
    ],
)
def test_bad_sample_input_is_one_line_before_any_work(
    runs, tmp_path, capsys, monkeypatch, args, says
):
    import ddrl.training.saved as saved  # what ddrl sample loads with, once the checks pass

    run = runs("digits")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.png").write_bytes(b"")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "generator.json").write_text("{")
    monkeypatch.setattr(saved, "load_for_sampling", lambda *a: pytest.fail("work started"))
    capsys.readouterr()
    code = main(["sample", *(a.format(run=run, tmp=tmp_path) for a in args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "o").exists()

"""The reward recipes (ImageReward, HPSv3, VideoAlign) against fake packages put in sys.modules
with the real packages' call signatures (file:line in docs/CONFORMANCE.md): image conversion,
prompt order, score extraction, chunking and video files are what is tested."""

import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddrl.errors import DDRLError
from ddrl.rewards.base import RewardContext
from ddrl.rewards.build import build_reward
from ddrl.rewards.config import RewardConfig
from ddrl.rewards.remote.wire import quantize


def ctx(tmp_path, **settings) -> RewardContext:
    return RewardContext("files", tmp_path, "cpu", RewardConfig("ink", **settings))


def images(b, h=6, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def brightness(pic: Image.Image) -> float:
    assert isinstance(pic, Image.Image) and pic.mode == "RGB"
    return float(np.asarray(pic, dtype=np.float64).mean() / 255)


def true_brightness(x):
    """What brightness() sees for images x [B, 3, H, W]: their 8-bit quantisation's mean."""
    return quantize(x).double().flatten(1).mean(1) / 255


# ImageReward (THUDM/ImageReward @ c1392c6): ImageReward/utils.py:45 load; ImageReward.py:103 score


def fake_imagereward(seen):
    mod = types.ModuleType("ImageReward")

    class ImageReward:
        def score(self, prompt, image):
            if type(image).__name__ == "list":  # ImageReward.py:105-107 → inference_rank
                seen["calls"].append((prompt, len(image), [p.size for p in image]))
                rewards = [brightness(p) + 10 * len(prompt) for p in image]
                return rewards[0] if len(rewards) == 1 else rewards  # squeezed: one → a float
            return brightness(image) + 10 * len(prompt)

    def load(name="ImageReward-v1.0", device="cpu", download_root=None, med_config=None):
        seen["load"] = (name, device, download_root, med_config)
        return ImageReward()

    mod.load = load
    return mod


def test_imagereward_groups_by_prompt_and_keeps_the_order(tmp_path, monkeypatch):
    seen = {"calls": []}
    monkeypatch.setitem(sys.modules, "ImageReward", fake_imagereward(seen))
    r = build_reward("ddrl.rewards.recipes:imagereward", ctx(tmp_path))
    x = images(5)
    prompts = ["a", "bb", "a", "ccc", "bb"]
    out = r(x, prompts)
    want = true_brightness(x) + torch.tensor([10.0, 20, 10, 30, 20], dtype=torch.float64)
    assert out.dtype == torch.float32 and torch.allclose(out, want.float())
    assert seen["load"] == ("ImageReward-v1.0", "cpu", str(tmp_path / "ImageReward"), None)
    assert [(p, n) for p, n, _ in seen["calls"]] == [("a", 2), ("bb", 2), ("ccc", 1)]
    assert seen["calls"][0][2] == [(10, 6), (10, 6)]  # PIL (W, H) of [.., 6, 10] images


def test_imagereward_scores_videos_frame_by_frame_and_nan_for_non_finite(tmp_path, monkeypatch):
    seen = {"calls": []}
    monkeypatch.setitem(sys.modules, "ImageReward", fake_imagereward(seen))
    r = build_reward(
        "ddrl.rewards.recipes:imagereward", ctx(tmp_path, model="my.pt", frames="0,-1")
    )
    assert seen["load"][0] == "my.pt"
    v = images(2 * 3).view(2, 3, 3, 6, 10)  # 2 videos [3, F=3, H, W]
    out = r(v, ["a", "b"])
    per = true_brightness(v[:, :, [0, -1]].permute(0, 2, 1, 3, 4).flatten(0, 1)).view(2, 2)
    assert torch.allclose(
        out, (per.mean(1) + torch.tensor([10.0, 10.0], dtype=torch.float64)).float()
    )
    x = images(2)
    x[1, 0, 0, 0] = float("inf")
    assert r(x, ["a", "b"]).isnan().tolist() == [False, True]


# HPSv3 (MizzenAI/HPSv3 @ 72b7eba): hpsv3/inference.py HPSv3RewardInferencer.__init__, reward


class HPSv3Inferencer:
    """The released signature: reward(self, prompts, image_paths)."""

    made, chunks = [], []

    def __init__(self, config_path=None, checkpoint_path=None, device="cuda", differentiable=False):
        HPSv3Inferencer.made.append((config_path, checkpoint_path, device, differentiable))

    def reward(self, prompts, image_paths):
        HPSv3Inferencer.chunks.append(len(prompts))
        mu = [brightness(p) + 10 * len(q) for q, p in zip(prompts, image_paths, strict=True)]
        return torch.tensor([[m, 0.5] for m in mu])  # [n, 2]: mu, sigma


class HPSv3InferencerOtherOrder(HPSv3Inferencer):
    """Another version's order: reward(self, image_paths, prompts)."""

    def reward(self, image_paths, prompts):
        return super().reward(prompts, image_paths)


@pytest.mark.parametrize("cls", [HPSv3Inferencer, HPSv3InferencerOtherOrder])
def test_hpsv3_takes_mu_in_chunks_whatever_the_argument_order(tmp_path, monkeypatch, cls):
    HPSv3Inferencer.made, HPSv3Inferencer.chunks = [], []
    monkeypatch.setitem(sys.modules, "hpsv3", types.SimpleNamespace(HPSv3RewardInferencer=cls))
    r = build_reward("ddrl.rewards.recipes:hpsv3", ctx(tmp_path, batch=2))
    x = images(5)
    prompts = ["a", "bb", "ccc", "dddd", "e"]
    out = r(x, prompts)
    want = true_brightness(x) + 10 * torch.tensor([1.0, 2, 3, 4, 1], dtype=torch.float64)
    assert torch.allclose(out, want.float())
    assert HPSv3Inferencer.made == [(None, None, "cpu", False)]
    assert HPSv3Inferencer.chunks == [2, 2, 1]


# VideoAlign (KwaiVGI/VideoAlign @ 219ab9d): inference.py:29-30 __init__, :176-203 reward


class VideoVLMRewardInference:
    made = []

    def __init__(
        self, load_from_pretrained, load_from_pretrained_step=-1, device="cuda", dtype=None
    ):
        VideoVLMRewardInference.made.append((load_from_pretrained, device))

    def reward(
        self, video_paths, prompts, fps=None, num_frames=None, max_pixels=None, use_norm=True
    ):
        import cv2

        assert use_norm and fps is None and num_frames is None and max_pixels is None
        out = []
        for path, prompt in zip(video_paths, prompts, strict=True):
            assert path.endswith(".mp4") and Path(path).is_file()
            cap = cv2.VideoCapture(path)
            frames = []
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                frames.append(frame)  # BGR, as OpenCV and decord's callers see it
            assert cap.get(cv2.CAP_PROP_FPS) == 16.0
            red = frames[0][..., 2].mean() / 255  # the red channel of the first frame
            d = {"VQ": red, "MQ": float(len(frames)), "TA": float(len(prompt))}
            d["Overall"] = d["VQ"] + d["MQ"] + d["TA"]
            out.append(d)
        return out


@pytest.fixture
def videoalign(tmp_path, monkeypatch):
    pytest.importorskip("cv2")
    VideoVLMRewardInference.made = []
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    mod = types.SimpleNamespace(VideoVLMRewardInference=VideoVLMRewardInference)
    monkeypatch.setitem(sys.modules, "inference", mod)
    ckpt = tmp_path / "VideoReward"
    ckpt.mkdir()
    (ckpt / "model_config.json").write_text("{}")
    return ckpt


def red_videos(reds, f=5, h=16, w=24):
    """Videos [B, 3, F, H, W]: video i has red = reds[i], green -1, blue 0 in every frame."""
    v = torch.zeros(len(reds), 3, f, h, w)
    v[:, 0] = torch.tensor(reds).view(-1, 1, 1, 1)
    v[:, 1] = -1.0
    return v


def test_videoalign_writes_rgb_videos_and_reads_the_overall_score(tmp_path, videoalign):
    r = build_reward(
        "ddrl.rewards.recipes:videoalign", ctx(tmp_path, model=str(videoalign), batch=2)
    )
    assert r.accepts_video and VideoVLMRewardInference.made == [(str(videoalign), "cpu")]
    reds = [1.0, -1.0, 0.5]
    prompts = ["a", "bb", "ccc"]
    out = r(red_videos(reds), prompts)
    red = quantize(torch.tensor(reds)).float() / 255
    overall = red + 5 + torch.tensor([1.0, 2, 3])  # VQ (red, lossy codec) + MQ (frames) + TA
    assert torch.allclose(out, overall, atol=0.03)
    assert list((tmp_path / "tmp").iterdir()) == []  # the video files are removed


def test_videoalign_dimensions_and_bad_inputs(tmp_path, videoalign):
    mq = build_reward("ddrl.rewards.recipes:videoalign_mq", ctx(tmp_path, model=str(videoalign)))
    assert mq(red_videos([0.0, 0.0], f=4), ["a", "b"]).tolist() == [4.0, 4.0]
    ta = build_reward("ddrl.rewards.recipes:videoalign_ta", ctx(tmp_path, model=str(videoalign)))
    assert ta(red_videos([0.0, 0.0]), ["a", "bbb"]).tolist() == [1.0, 3.0]
    with pytest.raises(DDRLError, match="F >= 2"):
        ta(images(2), ["a", "b"])
    with pytest.raises(DDRLError, match="1 frame"):
        ta(red_videos([0.0], f=1), ["a"])
    with pytest.raises(DDRLError, match="not a VideoReward checkpoint folder"):
        build_reward("ddrl.rewards.recipes:videoalign", ctx(tmp_path, model=str(tmp_path)))


@pytest.mark.parametrize(
    ("factory", "module", "install"),
    [
        ("imagereward", "ImageReward", "pip install image-reward"),
        ("hpsv3", "hpsv3", "pip install hpsv3"),
        ("videoalign", "inference", "git clone https://github.com/KwaiVGI/VideoAlign"),
    ],
)
def test_a_missing_package_is_one_line_saying_what_to_install(
    tmp_path, monkeypatch, factory, module, install
):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    (tmp_path / "model_config.json").write_text("{}")
    with pytest.raises(DDRLError) as e:
        build_reward(f"ddrl.rewards.recipes:{factory}", ctx(tmp_path, model=str(tmp_path)))
    msg = str(e.value)
    assert "\n" not in msg and install in msg and repr(module) in msg

"""The OCR (text-rendering) reward, flow_grpo's formula, and scoring image files."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from ddrl.errors import DDRLError
from ddrl.rewards.base import RewardContext
from ddrl.rewards.build import build_reward
from ddrl.rewards.ocr import OCRReward, levenshtein, ocr_score, target_text
from ddrl.rewards.score import load_image, read_prompt_args, score_files

PROMPT = 'a sign that says "hello"'


def render(text: str, size: int = 256) -> Image.Image:
    """Large black text on white with Pillow's bundled default (FreeType) font."""
    img = Image.new("RGB", (size, size), "white")
    if text:
        font = ImageFont.load_default(size=size // 6)
        xy = (size // 10, size // 2 - size // 12)
        ImageDraw.Draw(img).text(xy, text, fill="black", font=font)
    return img


def as_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1


def ctx(tmp_path):
    return RewardContext(data="files", cache_dir=tmp_path)


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    pytest.importorskip("rapidocr_onnxruntime")
    return build_reward("ocr", ctx(tmp_path_factory.mktemp("ocr")))


# ---- the formula, re-derived by hand (no OCR) ----


def test_levenshtein():
    assert levenshtein("hello", "hallo") == 1
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("world", "hello") == 4  # w→h o→e r→l l d→o
    assert levenshtein("abc", "abc") == 0


def test_target_text_and_score_by_hand():
    assert target_text(PROMPT) == "hello"
    assert target_text('A "Hello World" banner, "ignored"') == "helloworld"
    assert ocr_score("hallo", "hello") == pytest.approx(1 - 1 / 5)
    assert ocr_score("Hello", "hello") == 1.0  # lower-cased
    assert ocr_score("OPEN 24 HOURS", "open24hours") == 1.0  # spaces dropped
    assert ocr_score("welcome: hello there", "hello") == 1.0  # target inside: distance 0
    assert ocr_score("helo", "hello") == pytest.approx(1 - 1 / 5)
    assert ocr_score("", "hello") == 0.0  # nothing read: distance len(target)
    # distance 9 > len("hi") = 2 is clamped to 2: unrelated text scores 0, never below
    assert ocr_score("completely", "hi") == 0.0
    assert ocr_score("hx", "hi") == pytest.approx(0.5)


@pytest.mark.parametrize("prompt", ["a sign that says hello", "", 'quotes "" nothing', '" "'])
def test_prompt_without_quoted_text_is_one_line_error(prompt):
    with pytest.raises(DDRLError) as e:
        target_text(prompt)
    assert "\n" not in str(e.value) and "quote" in str(e.value)


def test_missing_package_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # import raises ImportError
    with pytest.raises(DDRLError) as e:
        OCRReward(ctx(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "pip install 'ddrl[ocr]'" in msg


# ---- real OCR (RapidOCR's bundled PP-OCRv4 ONNX models) ----


def test_right_word_beats_wrong_word(reward):
    x = torch.cat([as_tensor(render(w)) for w in ("hello", "hallo", "world")])
    r = reward(x, [PROMPT] * 3)
    assert r.dtype == torch.float32 and r.shape == (3,)
    assert r[0].item() == pytest.approx(1.0)  # exact match
    assert r[1].item() == pytest.approx(0.8)  # one substitution in five letters
    assert r[0] > r[1] > r[2]


def test_blank_image_scores_zero(reward):
    white = torch.ones(1, 3, 128, 128)
    assert reward(white, [PROMPT]).tolist() == [0.0]


def test_case_spaces_and_surrounding_text(reward):
    x = torch.cat([as_tensor(render("Hello World")), as_tensor(render("say hello"))])
    r = reward(x, ['a banner reading "hello world"', PROMPT])
    assert r.tolist() == pytest.approx([1.0, 1.0])


def test_batched_and_single_agree(reward):
    x = torch.cat([as_tensor(render(w)) for w in ("hello", "help", "")])
    batched = reward(x, [PROMPT] * 3)
    single = torch.cat([reward(x[i : i + 1], [PROMPT]) for i in range(3)])
    assert torch.equal(batched, single)


def test_bad_inputs_are_one_line_errors(reward):
    x = torch.zeros(2, 3, 32, 32)
    for images, prompts in [
        (x, [PROMPT]),  # count mismatch
        (x, [PROMPT, "no quotes here"]),  # a prompt without quoted text
        (torch.zeros(2, 3, 4, 32, 32), [PROMPT] * 2),  # a video, not images
    ]:
        with pytest.raises(DDRLError) as e:
            reward(images, prompts)
        assert "\n" not in str(e.value)


# ---- ddrl score: files on disk ----


def test_score_files(reward, tmp_path):
    paths = []
    for i, (w, size) in enumerate([("hello", 256), ("world", 256), ("hello", 192)]):
        paths.append(tmp_path / f"{i}.png")
        render(w, size).save(paths[-1])
    x = load_image(paths[0])
    assert x.shape == (1, 3, 256, 256) and x.min() >= -1 and x.max() <= 1
    scores = score_files(reward, paths, read_prompt_args(PROMPT, None, 3), batch=2)
    assert scores[0] == pytest.approx(1.0) and scores[2] == pytest.approx(1.0)
    assert scores[1] < 0.5
    assert score_files(reward, paths, [PROMPT] * 3, batch=1) == scores


def test_score_files_batches_by_size(tmp_path):
    calls = []

    def fake(images, prompts):
        calls.append((tuple(images.shape), list(prompts)))
        return images.flatten(1).mean(1)

    paths = []
    for i, size in enumerate([8, 8, 8, 4, 8]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (size, size), "white").save(paths[-1])
    Image.new("L", (8, 8), 0).save(paths[4])  # greyscale: read as RGB
    out = score_files(fake, paths, list("abcde"), batch=2)
    assert out == pytest.approx([1, 1, 1, 1, -1])
    assert [c[0][0] for c in calls] == [2, 1, 1, 1]
    assert [c[1] for c in calls] == [["a", "b"], ["c"], ["d"], ["e"]]


def test_score_files_errors(tmp_path):
    good = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(good)
    bad = tmp_path / "b.png"
    bad.write_text("not an image")
    for images, prompts in [
        ([good], ["x", "y"]),
        ([tmp_path / "missing.png"], ["x"]),
        ([bad], ["x"]),
        ([tmp_path], ["x"]),
    ]:
        with pytest.raises(DDRLError) as e:
            score_files(lambda x, p: x.flatten(1).mean(1), images, prompts)
        assert "\n" not in str(e.value)
    with pytest.raises(DDRLError, match="returned shape"):
        score_files(lambda x, p: torch.zeros(3), [good], ["x"])


def test_read_prompt_args(tmp_path):
    assert read_prompt_args("p", None, 3) == ["p", "p", "p"]
    assert read_prompt_args(None, None, 2) == ["", ""]
    f = tmp_path / "prompts.txt"
    f.write_text('a "hi"\r\nb "yo"\n', encoding="utf-8")
    assert read_prompt_args(None, f, 2) == ['a "hi"', 'b "yo"']
    for args in [("p", f, 2), (None, f, 3), (None, tmp_path / "missing.txt", 2)]:
        with pytest.raises(DDRLError) as e:
            read_prompt_args(*args)
        assert "\n" not in str(e.value)
    f.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DDRLError, match="UTF-8"):
        read_prompt_args(None, f, 1)

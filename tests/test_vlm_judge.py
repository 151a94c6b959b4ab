"""The VLM judge against a fake OpenAI-compatible server (stdlib http.server in a thread) that
checks every request's shape and answers from the image it decodes: exact scores, retries,
refusals, unparsable answers, the concurrency limit, the key header and config errors."""

import base64
import contextlib
import io
import json
import re
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddrl.config import set_key
from ddrl.config.resolve import tomllib  # tomli on Python 3.10
from ddrl.errors import DDRLError
from ddrl.rewards import check_reward_name
from ddrl.rewards.base import RewardContext
from ddrl.rewards.build import build_reward, build_rewards
from ddrl.rewards.config import JudgeConfig, RewardConfig
from ddrl.rewards.remote.wire import quantize
from ddrl.rewards.vlm_judge import DEFAULT_PATTERN, TEMPLATES, VLMJudge, read_score

MODEL = "judge-7b"
FAST = {"retries": 2, "backoff": 0.01, "timeout": 5.0}


class Fake:
    """What the fake server does and saw. ``answer(png, text) -> str`` makes the reply;
    ``fail`` lists statuses for the first requests (then 200); ``delay`` seconds per answer."""

    def __init__(self, answer=None, fail=(), delay=0.0, body=None):
        self.answer = answer or brightness_answer
        self.fail = list(fail)
        self.delay = delay
        self.body = body  # raw 200 body instead of a chat answer
        self.lock = threading.Lock()
        self.requests, self.problems, self.sizes, self.auth = 0, [], [], []
        self.texts = []
        self.in_flight = self.max_in_flight = 0

    def check(self, req: dict):
        """The decoded PNG and the text of a well-formed request (problems are recorded)."""
        if req.get("model") != MODEL:
            self.problems.append(f"model {req.get('model')!r}")
        if not isinstance(req.get("max_tokens"), int) or req.get("temperature") != 0.0:
            self.problems.append(f"sampling {req.get('max_tokens')!r} {req.get('temperature')!r}")
        (msg,) = req["messages"]
        image_part, text_part = msg["content"]
        assert msg["role"] == "user" and image_part["type"] == "image_url"
        assert text_part["type"] == "text"
        url = image_part["image_url"]["url"]
        prefix = "data:image/png;base64,"
        if not url.startswith(prefix):
            self.problems.append(f"url {url[:40]!r}")
        png = Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))
        if png.format != "PNG" or png.mode != "RGB":
            self.problems.append(f"{png.format} {png.mode}")
        return png, text_part["text"]


def brightness_answer(png: Image.Image, text: str) -> str:
    """A wordy answer ending "Score: k/10", k = round(mean pixel / 25.5)."""
    mean = np.asarray(png, dtype=np.float64).mean()
    return f"The image looks fine. Score: {round(mean / 25.5)}/10"


@contextlib.contextmanager
def fake_server(fake: Fake):
    """``fake`` served on a free port; yields the API base http://127.0.0.1:PORT/v1."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status, obj):
            body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            if self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no {self.path}", "code": 404}})

        def do_POST(self):  # noqa: N802
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with fake.lock:
                fake.requests += 1
                status = fake.fail.pop(0) if fake.fail else 200
                fake.auth.append(self.headers.get("Authorization"))
                fake.in_flight += 1
                fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            try:
                time.sleep(fake.delay)
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": "Not Found", "code": 404}})
                elif status != 200:
                    self._send(status, {"object": "error", "message": f"busy {status}"})
                elif fake.body is not None:
                    self._send(200, fake.body)
                else:
                    png, text = fake.check(req)
                    with fake.lock:
                        fake.sizes.append(png.size)
                        fake.texts.append(text)
                    content = fake.answer(png, text)
                    message = {"role": "assistant", "content": content}
                    choice = {"index": 0, "message": message, "finish_reason": "stop"}
                    self._send(200, {"object": "chat.completion", "choices": [choice]})
            finally:
                with fake.lock:
                    fake.in_flight -= 1

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def flat(values, h=6, w=10):
    """Images [B, 3, h, w], image i filled with values[i]."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, h, w)


def expected(values):
    """What brightness_answer gives for flat images, mapped to [0, 1]."""
    u = quantize(torch.tensor(values)).double()
    return torch.round(u / 25.5) / 10


def judge(url, **settings) -> VLMJudge:
    net = {k: settings.pop(k) for k in list(settings) if k in FAST}
    return VLMJudge(url, JudgeConfig(model=MODEL, **settings), **{**FAST, **net})


def test_scores_follow_the_images_in_order_and_the_request_is_well_formed():
    values = [-1.0, 0.3, 1.0, -0.2, 0.55]
    fake = Fake()
    with fake_server(fake) as url:
        out = judge(url, concurrency=3)(flat(values), [f"a cat {i}" for i in range(5)])
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.equal(out, expected(values).float())
    assert fake.problems == [] and fake.requests == 5
    assert fake.sizes == [(10, 6)] * 5  # PIL size is (W, H)
    assert sorted(fake.texts) == sorted(
        TEMPLATES["score"].replace("{prompt}", f"a cat {i}") for i in range(5)
    )
    assert fake.auth == [None] * 5  # no key configured, none sent


def test_the_png_carries_the_quantised_pixels_and_image_size_resizes_the_longest_side():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 12, 20, generator=g) * 2 - 1
    seen = []
    fake = Fake(answer=lambda png, text: seen.append(png.copy()) or "5")
    with fake_server(fake) as url:
        judge(url)(x, ["p"])
        judge(url, image_size=8)(x, ["p"])
    exact = torch.from_numpy(np.array(seen[0])).permute(2, 0, 1)
    assert torch.equal(exact, quantize(x)[0])
    assert seen[1].size == (8, 5)  # 20 x 12 → 8 x round(12 * 8 / 20)


def test_custom_template_pattern_scale_and_mean_of_matches():
    answer = "Alignment Score (1-5): 4\nCoherence Score (1-5): 3.5\nStyle Score (1-5): 5"
    fake = Fake(answer=lambda png, text: answer)
    pattern = r"(?:Alignment|Coherence|Style) Score \(1-5\):\s*([0-9.]+)"
    with fake_server(fake) as url:
        j = judge(url, template="Caption: [{prompt}]", pattern=pattern, matches="mean",
                  scale_min=1.0, scale_max=5.0)  # fmt: skip
        out = j(flat([0.0, 0.5]), ["a {prompt} b", "dog"])
    assert torch.allclose(out, torch.full((2,), (4.1666666 - 1) / 4))
    # the prompt is substituted literally (braces in it are not a format field)
    assert sorted(fake.texts) == ["Caption: [a {prompt} b]", "Caption: [dog]"]


@pytest.mark.parametrize(
    ("answer", "score"),
    [("7", 7), ("Score: 7/10.", 7), ("7.5 / 10", 7.5), ("Score (0-10): 3", 3), ("**9**", 9)],
)
def test_the_default_pattern_reads_the_last_number_that_is_not_a_denominator(answer, score):
    assert read_score(answer, re.compile(DEFAULT_PATTERN), "last") == score


def test_scores_are_clamped_to_the_unit_interval():
    fake = Fake(answer=lambda png, text: "12" if png.getpixel((0, 0))[0] > 128 else "3")
    with fake_server(fake) as url:
        out = judge(url, scale_min=4.0, scale_max=10.0)(flat([1.0, -1.0]), ["a", "b"])
    assert out.tolist() == [1.0, 0.0]  # (12 - 4) / 6 and (3 - 4) / 6, clamped


def test_ocr_template_scores_the_transcription_against_the_quoted_text():
    def transcribe(png, text):
        assert text == TEMPLATES["ocr"]
        return "Hello\nWORLD" if png.getpixel((0, 0))[0] > 128 else "Help"

    fake = Fake(answer=transcribe)
    with fake_server(fake) as url:
        j = judge(url, template="ocr")
        out = j(flat([1.0, -1.0]), ['a sign that says "hello world"'] * 2)
        with pytest.raises(DDRLError, match="no quoted text"):
            j(flat([1.0]), ["no quotes here"])
    # "helpw" vs "helloworld": distance 7 of 10 characters (flow_grpo's clamped edit distance)
    assert out.tolist() == pytest.approx([1.0, 1 - 7 / 10])
    assert fake.requests == 2  # the prompt without a quote failed before any request


def test_transient_failures_are_retried_then_succeed():
    fake = Fake(fail=[503, 429, 502])
    with fake_server(fake) as url:
        out = judge(url, concurrency=1, retries=3)(flat([1.0, -1.0]), ["a", "b"])
    assert out.tolist() == [1.0, 0.0] and fake.requests == 5  # 3 failures on the first


def test_a_service_that_stays_busy_fails_after_the_retries():
    fake = Fake(fail=[503] * 10)
    with fake_server(fake) as url:
        with pytest.raises(DDRLError) as e:
            judge(url, concurrency=1, retries=2)(flat([0.0]), ["a"])
    msg = str(e.value)
    assert "\n" not in msg and "did not answer after 3 attempts" in msg and "HTTP 503" in msg
    assert url in msg and fake.requests == 3


def test_a_refusal_is_one_line_naming_the_url_and_not_retried():
    fake = Fake(fail=[400])
    with fake_server(fake) as url:
        with pytest.raises(DDRLError) as e:
            judge(url, concurrency=1)(flat([0.0]), ["a"])
        assert fake.requests == 1
        with pytest.raises(DDRLError, match=r"HTTP 404.*ending in /v1"):
            judge(url.removesuffix("/v1"))(flat([0.0]), ["a"])
    assert "\n" not in str(e.value)
    assert f"{url}/chat/completions refused the request (HTTP 400): busy 400" in str(e.value)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"<html>oops</html>", "not JSON"),
        ({"choices": []}, "no choices"),
        ({"choices": [{"message": {"content": ["a"]}}]}, "not text"),
    ],
)
def test_garbled_answers_are_one_line_errors(body, match):
    with fake_server(Fake(body=body)) as url:
        with pytest.raises(DDRLError, match=match) as e:
            judge(url)(flat([0.0]), ["a"])
    assert "\n" not in str(e.value) and "bad answer" in str(e.value) and url in str(e.value)


def test_an_unparsable_answer_is_an_error_quoting_it_or_nan_when_asked():
    long = "I cannot rate this picture, as it shows nothing that I can recognise at all, sorry"
    fake = Fake(answer=lambda png, text: long)
    with fake_server(fake) as url:
        with pytest.raises(DDRLError) as e:
            judge(url)(flat([0.0]), ["a"])
        with pytest.warns(UserWarning, match="scored NaN"):
            out = judge(url, unparsable="nan")(flat([0.0, 0.5]), ["a", "b"])
    msg = str(e.value)
    assert repr(long[:80]) in msg and repr(DEFAULT_PATTERN) in msg and "\n" not in msg
    assert "unparsable=nan" in msg and out.isnan().all()


def test_concurrency_limit_is_respected():
    fake = Fake(delay=0.1)
    with fake_server(fake) as url:
        t = time.monotonic()
        out = judge(url, concurrency=3)(flat([0.0] * 9), ["a"] * 9)
        took = time.monotonic() - t
    assert fake.max_in_flight == 3 and fake.requests == 9 and not out.isnan().any()
    assert took < 9 * 0.1  # in parallel, not one after another


def test_the_bearer_key_is_read_from_the_named_variable(monkeypatch):
    monkeypatch.setenv("DDRL_TEST_JUDGE_KEY", "sk-test-123")
    fake = Fake()
    with fake_server(fake) as url:
        judge(url, api_key_env="DDRL_TEST_JUDGE_KEY")(flat([0.0, 1.0]), ["a", "b"])
    assert fake.auth == ["Bearer sk-test-123"] * 2
    monkeypatch.delenv("DDRL_TEST_JUDGE_KEY")
    with pytest.raises(DDRLError, match="DDRL_TEST_JUDGE_KEY.*not set") as e:
        judge("http://127.0.0.1:9/v1", api_key_env="DDRL_TEST_JUDGE_KEY")
    assert "sk-test" not in str(e.value)


def test_non_finite_samples_are_nan_without_a_request():
    x = flat([0.0, 1.0, 0.2]).clone()
    x[1, 0, 0, 0] = float("nan")
    fake = Fake()
    with fake_server(fake) as url:
        out = judge(url)(x, ["a", "b", "c"])
    assert out.isnan().tolist() == [False, True, False] and fake.requests == 2


def test_videos_are_scored_frame_by_frame_through_multi_reward():
    frames = torch.tensor([[-1.0, 1.0], [0.2, 0.2]])  # 2 videos of 2 flat frames
    videos = frames.view(2, 1, 2, 1, 1).expand(2, 3, 2, 4, 4)
    fake = Fake()
    with fake_server(fake) as url:
        rc = RewardConfig("vlm_judge", url=url, judge=JudgeConfig(model=MODEL), **FAST)
        multi = build_rewards(rc, RewardContext("files", Path("."), "cpu", rc))
        out = multi(videos, ["a", "b"])
        with pytest.raises(DDRLError, match="reward.frames"):
            multi.rewards[0](videos, ["a", "b"])
    assert fake.requests == 4
    assert torch.allclose(out, expected(frames.flatten().tolist()).view(2, 2).mean(1).float())


def test_health_checks_the_served_model():
    with fake_server(Fake()) as url:
        judge(url).health()
        with pytest.raises(DDRLError, match=r"model='other' is not served.*served: judge-7b"):
            VLMJudge(url, JudgeConfig(model="other"), **FAST).health()
    with pytest.raises(DDRLError, match="is not reachable"):
        VLMJudge(url, JudgeConfig(model=MODEL), timeout=1.0, retries=0).health()


def test_registered_for_every_data_set_and_built_from_config():
    for data in ("files", "digits", "toy2d"):
        check_reward_name(data, "vlm_judge")
    rc = RewardConfig("vlm_judge", url="http://127.0.0.1:8000/v1")
    set_key(rc, "judge.model", MODEL, "reward.")
    set_key(rc, "judge.concurrency", "4", "reward.")
    r = build_reward("vlm_judge", RewardContext("files", Path("."), "cpu", rc))
    assert isinstance(r, VLMJudge) and r.judge.concurrency == 4
    assert r.endpoint == "http://127.0.0.1:8000/v1/chat/completions"


@pytest.mark.parametrize(
    ("url", "settings", "match"),
    [
        ("", {"model": MODEL}, "reward.url is empty"),
        ("http://h:1/v1", {}, "reward.judge.model is empty"),
        ("http://h:1/v1", {"model": MODEL, "template": "Rate it."}, "has no {prompt}"),
        ("http://h:1/v1", {"model": MODEL, "pattern": "(\\d+"}, "is not a regex"),
        ("http://h:1/v1", {"model": MODEL, "pattern": "\\d+"}, "has no group"),
        ("http://h:1/v1", {"model": MODEL, "scale_min": 5.0, "scale_max": 5.0}, "scale_min <"),
        ("http://h:1/v1", {"model": MODEL, "concurrency": 0}, "concurrency=0 is out of range"),
        ("http://h:1/v1", {"model": MODEL, "api_key_env": "MY KEY"}, "api_key_env='MY KEY'"),
        ("http://h:1/v1", {"model": MODEL, "matches": "max"}, "matches 'max'"),
        ("ftp://h/v1", {"model": MODEL}, "reward.url='ftp://h/v1'"),
    ],
)
def test_bad_settings_are_one_line_errors_before_any_request(url, settings, match):
    with pytest.raises(DDRLError, match=re.escape(match) if "{" in match else match) as e:
        VLMJudge(url, replace(JudgeConfig(), **settings), **FAST)
    assert "\n" not in str(e.value)


def test_the_unifiedreward_config_in_the_docs_parses_and_averages_the_three_scores():
    text = (Path(__file__).resolve().parents[1] / "docs" / "REWARDS.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", text, re.S)
    answer = "Alignment Score (1-5): 4\nCoherence Score (1-5): 2.5\nStyle Score (1-5): 3"
    fake = Fake(answer=lambda png, t: answer)
    with fake_server(fake) as url:
        rc = RewardConfig()
        for key, value in tomllib.loads(block)["reward"].items():
            set_key(rc, key, value, "reward.")
        rc.url, rc.judge.model = url, MODEL  # the fake's address and name
        rc.check()
        out = build_reward("vlm_judge", RewardContext("files", Path("."), "cpu", rc))(
            flat([0.0]), ["a red bus"]
        )
    assert out.tolist() == pytest.approx([(9.5 / 3 - 1) / 4])
    assert fake.texts[0].endswith("Text Caption: [a red bus]")
    assert fake.texts[0].startswith("You are presented with a generated image")

"""The reward service: a reward served over HTTP (in a thread and in a real subprocess) scores
what it scores in-process; dead, slow and garbled services are one-line DDRLErrors."""

import contextlib
import json
import math
import os
import select
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ddrl.errors import DDRLError
from ddrl.rewards.base import RewardContext
from ddrl.rewards.config import RewardConfig
from ddrl.rewards.pixels import BrightnessReward
from ddrl.rewards.remote import client as remote
from ddrl.rewards.remote.client import RemoteReward, remote_factory
from ddrl.rewards.remote.server import make_server, server_url
from ddrl.rewards.remote.wire import decode_request, dequantize, encode_request, quantize

FAST = {"retries": 2, "backoff": 0.01, "timeout": 5.0}


@contextlib.contextmanager
def serving(reward, name="test"):
    """``reward`` served on a free port in a thread; yields the URL and the server."""
    server = make_server(reward, "127.0.0.1", 0, name=name)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server_url(server), server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def raw_server(status=200, body=b"", content_type="application/json"):
    """A server answering every request with ``status`` and ``body``; counts the requests."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self):
            seen.append(self.path)
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(n)
            s, b = (status, body) if not callable(body) else body(len(seen))
            self.send_response(s)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(b)))
            self.end_headers()
            self.wfile.write(b)

        do_GET = do_POST = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def dead_url() -> str:
    """A URL where nothing listens (a server bound, then closed)."""
    server = make_server(BrightnessReward())
    url = server_url(server)
    server.server_close()
    return url


def count_attempts(monkeypatch) -> list:
    calls = []
    real = remote._open

    def counting(request, timeout):
        calls.append(request.full_url)
        return real(request, timeout)

    monkeypatch.setattr(remote, "_open", counting)
    return calls


def images(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


def test_quantisation_is_exact_on_the_uint8_grid():
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(quantize(dequantize(u)), u)
    assert dequantize(u)[0] == -1 and dequantize(u)[-1] == 1
    x = images(4, 3, 5, 5)
    assert (dequantize(quantize(x)) - x).abs().max() <= 1 / 255 + 1e-6
    assert quantize(torch.tensor([-3.0, 3.0, float("nan")])).tolist() == [0, 255, 128]


def test_wire_format_round_trips_and_is_documented_safetensors():
    u8 = quantize(images(2, 3, 3, 4, 4))
    prompts = ["a cat", 'ünïcødé "quoted"\nnewline']
    body = encode_request(u8, prompts)
    n = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + n])
    assert header["images"]["dtype"] == "U8" and header["images"]["shape"] == [2, 3, 3, 4, 4]
    assert header["__metadata__"]["version"] == "1"
    assert json.loads(header["__metadata__"]["prompts"]) == prompts
    got, got_prompts = decode_request(body)
    assert torch.equal(got, u8) and got_prompts == prompts
    bad = body.replace(b'"version":"1"', b'"version":"9"')
    with pytest.raises(ValueError, match="wire version '9'"):
        decode_request(bad)
    with pytest.raises(ValueError, match="not a safetensors"):
        decode_request(b"xy")


@pytest.mark.parametrize("shape", [(5, 3, 8, 8), (2, 3, 4, 6, 6)])
def test_remote_scores_equal_in_process_scores(shape):
    reward = BrightnessReward()
    x = images(*shape)
    prompts = [f"p{i}" for i in range(shape[0])]
    with serving(reward, "brightness") as (url, _):
        remote = RemoteReward(url, **FAST)
        got = remote(x, prompts)
        assert remote.health() == {"ok": True, "reward": "brightness", "version": 1}
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    assert torch.equal(got, reward(dequantize(quantize(x)), prompts))  # exact on the grid
    assert (got - reward(x, prompts)).abs().max() <= 1 / 255  # the quantisation tolerance


def test_prompts_arrive_in_order():
    def by_prompt(imgs, prompts):
        return torch.tensor([float(len(p)) for p in prompts])

    prompts = ["", "ab", "ünï", "x" * 1000]
    with serving(by_prompt) as (url, _):
        got = RemoteReward(url, batch=3, **FAST)(images(4, 3, 2, 2), prompts)
    assert got.tolist() == [0.0, 2.0, 3.0, 1000.0]


def test_nan_and_inf_come_back_as_nan():
    def odd(imgs, prompts):
        return torch.tensor([float("nan"), 0.25, float("inf"), -float("inf")])

    with serving(odd) as (url, _):
        got = RemoteReward(url, **FAST)(images(4, 3, 2, 2), ["p"] * 4)
    assert math.isnan(got[0]) and got[1] == 0.25 and got[2:].isnan().all()

    x = images(3, 3, 2, 2)
    x[1, 0, 0, 0] = float("nan")  # a broken sample scores NaN, its neighbours are unaffected
    with serving(BrightnessReward()) as (url, _):
        got = RemoteReward(url, **FAST)(x, ["p"] * 3)
    assert got.isnan().tolist() == [False, True, False]


def test_large_batches_are_split_and_concatenated():
    sizes = []

    def recording(imgs, prompts):
        sizes.append(imgs.shape[0])
        return BrightnessReward()(imgs, prompts)

    x = images(7, 3, 4, 4)
    with serving(recording) as (url, _):
        whole = RemoteReward(url, batch=16, **FAST)(x, ["p"] * 7)
        split = RemoteReward(url, batch=3, **FAST)(x, ["p"] * 7)
        empty = RemoteReward(url, batch=3, **FAST)(x[:0], [])
    assert sizes == [7, 3, 3, 1]
    assert torch.equal(whole, split) and empty.shape == (0,)


def test_a_failing_reward_is_one_line_and_not_retried(monkeypatch):
    def boom(imgs, prompts):
        raise RuntimeError("out of memory\nsecond line of the trace")

    calls = count_attempts(monkeypatch)
    with serving(boom, "boom") as (url, _), pytest.raises(DDRLError) as e:
        RemoteReward(url, **FAST)(images(2, 3, 2, 2), ["p", "q"])
    msg = str(e.value)
    assert "\n" not in msg and url in msg and "RuntimeError: out of memory second line" in msg
    assert len(calls) == 1

    wrong = lambda imgs, prompts: torch.zeros(imgs.shape[0], 2)  # noqa: E731
    with serving(wrong, "wrong") as (url, _), pytest.raises(DDRLError, match=r"shape \(2, 2\)"):
        RemoteReward(url, **FAST)(images(2, 3, 2, 2), ["p", "q"])


def test_a_dead_service_fails_after_the_retries(monkeypatch):
    url = dead_url()
    calls = count_attempts(monkeypatch)
    with pytest.raises(DDRLError) as e:
        RemoteReward(url, timeout=2.0, retries=3, backoff=0.01)(images(2, 3, 2, 2), ["p", "q"])
    msg = str(e.value)
    assert "\n" not in msg and url in msg and "after 4 attempts" in msg and "connect" in msg
    assert len(calls) == 4


def test_overloaded_answers_are_retried(monkeypatch):
    calls = count_attempts(monkeypatch)
    with raw_server(503, b'{"error": "busy", "version": 1}') as (url, seen):
        with pytest.raises(DDRLError, match=r"after 3 attempts .*HTTP 503: busy"):
            RemoteReward(url, **FAST)(images(2, 3, 2, 2), ["p", "q"])
    assert len(seen) == len(calls) == 3

    ok = json.dumps({"scores": [0.5, None], "version": 1}).encode()
    flaky = lambda n: (503, b"") if n == 1 else (200, ok)  # noqa: E731
    with raw_server(body=flaky) as (url, seen):
        got = RemoteReward(url, **FAST)(images(2, 3, 2, 2), ["p", "q"])
    assert len(seen) == 2 and got[0] == 0.5 and got[1].isnan()


def test_a_slow_service_times_out(monkeypatch):
    release = threading.Event()

    def slow(imgs, prompts):
        release.wait(10)
        return torch.zeros(imgs.shape[0])

    calls = count_attempts(monkeypatch)
    try:
        with serving(slow) as (url, _):
            t = time.monotonic()
            with pytest.raises(DDRLError) as e:
                RemoteReward(url, timeout=0.3, retries=1, backoff=0.01)(images(1, 3, 2, 2), ["p"])
            elapsed = time.monotonic() - t
            release.set()
    finally:
        release.set()
    msg = str(e.value)
    assert "timed out after 0.3 s" in msg and "after 2 attempts" in msg and url in msg
    assert len(calls) == 2 and elapsed < 5


@pytest.mark.parametrize(
    "status,body,match",
    [
        (200, b"<html>hello</html>", "not JSON"),
        (200, b'{"result": [1, 2]}', "no 'scores'"),
        (200, b"[1, 2]", "no 'scores'"),
        (200, b'{"scores": [1.0], "version": 1}', "1 scores for 2 images"),
        (200, b'{"scores": [1.0, 2.0], "version": 2}', "version 2; this client speaks 1"),
        (200, b'{"scores": [1.0, 2.0]}', "version None"),
        (200, b'{"scores": [1.0, "x"], "version": 1}', r"scores\[1\] = 'x'"),
        (404, b"<html>Not Found</html>", r"HTTP 404.*Not Found"),
    ],
)
def test_garbled_answers_are_one_line_errors(monkeypatch, status, body, match):
    calls = count_attempts(monkeypatch)
    with raw_server(status, body) as (url, _), pytest.raises(DDRLError, match=match) as e:
        RemoteReward(url, **FAST)(images(2, 3, 2, 2), ["p", "q"])
    assert "\n" not in str(e.value) and url in str(e.value)
    assert len(calls) == 1  # a garbled answer is not retried


def test_the_server_rejects_bad_requests_with_json_errors():
    with serving(BrightnessReward()) as (url, _):
        for path, data, code, match in [
            ("/score", b"garbage", 400, "bad /score request"),
            ("/nope", b"", 404, "unknown path"),
        ]:
            req = urllib.request.Request(url + path, data=data, method="POST")
            with pytest.raises(urllib.error.HTTPError) as e:
                remote._open(req, 5)
            assert e.value.code == code
            answer = json.loads(e.value.read())
            assert match in answer["error"] and answer["version"] == 1


def test_remote_config_checks_and_factory():
    RemoteReward("http://127.0.0.1:8000")
    for (url, kw), match in [
        (("", {}), "reward.url=''"),
        (("127.0.0.1:8000", {}), "reward.url"),
        (("http://h:99999", {}), "bad port"),
        (("http://h:1/?x=1", {}), "query"),
        (("http://h:1", {"timeout": 0}), "reward.timeout"),
        (("http://h:1", {"retries": -1}), "reward.retries"),
        (("http://h:1", {"retries": 1.5}), "reward.retries"),
        (("http://h:1", {"backoff": float("nan")}), "reward.backoff"),
    ]:
        with pytest.raises(DDRLError, match=match):
            RemoteReward(url, **kw)
    # the same checks on the config, where a url is given
    with pytest.raises(DDRLError, match="bad port"):
        RewardConfig(url="http://h:99999").check()
    with pytest.raises(DDRLError, match="reward.url=''"):
        remote_factory(RewardContext("files", Path("."), config=RewardConfig(batch=4)))
    c = RewardConfig(batch=4, url="http://h:1/", timeout=2.5, retries=0)
    r = remote_factory(RewardContext("files", Path("."), config=c))
    assert (r.url, r.timeout, r.retries, r.backoff, r.batch) == ("http://h:1", 2.5, 0, 0.5, 4)


def test_a_server_in_its_own_process(tmp_path, monkeypatch):
    cmd = [sys.executable, "-m", "ddrl", "reward-server", "--reward", "brightness"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDRL_CACHE": str(tmp_path)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline().decode() if ready else ""
        if "serving brightness at http://127.0.0.1:" not in line:
            proc.kill()
            pytest.fail(f"server did not start: {line!r} {proc.communicate()[1][-2000:]!r}")
        url = line.split(" at ")[1].split()[0]
        remote = RemoteReward(url, **FAST)
        assert remote.health()["reward"] == "brightness"
        x = images(6, 3, 8, 8)
        got = remote(x, ["p"] * 6)
        want = BrightnessReward()(dequantize(quantize(x)), ["p"] * 6)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert proc.poll() is None and proc.pid != os.getpid()
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    calls = count_attempts(monkeypatch)
    with pytest.raises(DDRLError, match=r"did not answer after 3 attempts"):
        remote(x, ["p"] * 6)
    assert len(calls) == 3

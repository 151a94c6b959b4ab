"""The reward service: a reward served over HTTP (in a thread and in a real subprocess) scores
what it scores in-process; dead, slow and garbled services are one-line DDRLErrors."""

import contextlib
import http.client
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
from ddrl.rewards import transport
from ddrl.rewards.base import RewardContext
from ddrl.rewards.config import RewardConfig
from ddrl.rewards.pixels import BrightnessReward
from ddrl.rewards.remote.client import RemoteReward, remote_factory
from ddrl.rewards.remote.server import make_server
from ddrl.rewards.remote.wire import decode_request, dequantize, encode_request, quantize

FAST = {"retries": 2, "backoff": 0.01, "timeout": 5.0}


@contextlib.contextmanager
def serving(reward, name="test", host="127.0.0.1", **options):
    """``reward`` (or a list: one per replica) served on a free port in a thread; yields the
    URL and the server."""
    server = make_server(reward, host, 0, name=name, **options).start()
    try:
        yield server.url, server
    finally:
        server.shutdown()


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
    url = server.url
    server.shutdown()
    return url


def count_attempts(monkeypatch) -> list:
    calls = []
    real = transport.open_url

    def counting(request, timeout):
        calls.append(request.full_url)
        return real(request, timeout)

    monkeypatch.setattr(transport, "open_url", counting)
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
        health = remote.health()  # the v1 answer, plus what the batching server adds
        assert {k: health[k] for k in ("ok", "reward", "version")} == {
            "ok": True,
            "reward": "brightness",
            "version": 1,
        }
        assert health["replicas"] == 1 and health["devices"] == ["cpu"] and health["queued"] == 0
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
    with serving(BrightnessReward(), max_bytes=1000) as (url, _):
        for method, path, data, code, match in [
            ("POST", "/score", b"garbage", 400, "bad /score request"),
            ("POST", "/nope", b"", 404, "unknown path '/nope'"),
            ("GET", "/score", None, 404, "unknown path '/score'"),  # as the http.server one
            ("POST", "/health", b"", 404, "unknown path '/health'"),
        ]:
            req = urllib.request.Request(url + path, data=data, method=method)
            with pytest.raises(urllib.error.HTTPError) as e:
                transport.open_url(req, 5)
            assert e.value.code == code
            raw = e.value.read()
            answer = json.loads(raw)
            assert match in answer["error"] and answer["version"] == 1
            assert raw == json.dumps(answer).encode()  # the wire's bytes: json.dumps' spacing
        # Over max_bytes: refused from the Content-Length, before any body is read.
        port = int(url.rsplit(":", 1)[1])
        for headers, code, match in [
            ({"Content-Length": str(10**12)}, 413, "allowed: up to 1000"),
            ({}, 411, "needs a Content-Length"),
        ]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.putrequest("POST", "/score")
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            resp = conn.getresponse()
            assert resp.status == code and match in json.loads(resp.read())["error"]
            conn.close()


def test_ipv6_host():
    try:
        server = make_server(BrightnessReward(), "::1", 0, name="b").start()
    except DDRLError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        assert server.url.startswith("http://[::1]:")
        x = images(2, 3, 4, 4)
        got = RemoteReward(server.url, **FAST)(x, ["p", "q"])
        assert torch.equal(got, BrightnessReward()(dequantize(quantize(x)), ["p", "q"]))
    finally:
        server.shutdown()


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
    cmd += ["--devices", "cpu,cpu", "--max-batch", "4", "--max-wait-ms", "1"]
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
        health = remote.health()
        assert health["reward"] == "brightness" and health["devices"] == ["cpu", "cpu"]
        assert health["max_batch"] == 4 and health["max_wait_ms"] == 1
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


# Dynamic batching, replicas, /metrics ------------------------------------------------------


class Recording:
    """A per-sample reward (each image's mean plus its prompt's number) that records its calls
    as (images, image shape) and takes ``delay`` seconds per call."""

    def __init__(self, delay=0.0, fail_on=None):
        self.calls, self.delay, self.fail_on = [], delay, fail_on

    def __call__(self, imgs, prompts):
        self.calls.append((imgs.shape[0], tuple(imgs.shape[1:])))
        time.sleep(self.delay)
        if self.fail_on in prompts:
            raise RuntimeError(f"cannot score {self.fail_on!r}")
        return imgs.flatten(1).mean(1) + torch.tensor([float(p.split()[-1]) for p in prompts])


def concurrently(url, requests, **kw):
    """Each (images, prompts) sent by its own client thread, all released at once; returns
    each one's scores or DDRLError, in order."""
    out = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def client(i):
        x, prompts = requests[i]
        start.wait()
        try:
            out[i] = RemoteReward(url, **{**FAST, **kw})(x, prompts)
        except DDRLError as e:
            out[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def alone(x, prompts):
    """What a request's scores must be: the reward on its own (8-bit) images only."""
    return Recording()(dequantize(quantize(x)), prompts)


def metrics(url) -> dict:
    """/metrics parsed: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = transport.open_url(urllib.request.Request(url + "/metrics"), 5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_concurrent_clients_are_batched_and_get_their_own_scores():
    reward = Recording(delay=0.05)
    # 8 clients (trainer ranks): six send 8x8 images, two 6x6 (never in the same call).
    requests = [
        (
            images(4, 3, 8 if i < 6 else 6, 8 if i < 6 else 6, seed=i),
            [f"c{i} {i * 10 + k}" for k in range(4)],
        )
        for i in range(8)
    ]
    with serving(reward, max_batch=64, max_wait=0.3) as (url, _):
        got = concurrently(url, requests)
    for (x, prompts), scores in zip(requests, got, strict=True):
        assert torch.equal(scores, alone(x, prompts))
    by_shape = {}
    for n, shape in reward.calls:
        by_shape.setdefault(shape, []).append(n)
    assert {s: sum(ns) for s, ns in by_shape.items()} == {(3, 8, 8): 24, (3, 6, 6): 8}
    assert len(reward.calls) < 8 and max(n for n, _ in reward.calls) > 4, reward.calls  # merged


def test_max_wait_and_max_batch_bound_the_wait():
    reward = Recording()
    with serving(reward, max_batch=4, max_wait=0.6) as (url, _):
        client = RemoteReward(url, **FAST)
        timed = []
        for n in (4, 6, 2):  # a full batch, one larger than max_batch, a lone small one
            t = time.monotonic()
            client(images(n, 3, 2, 2), [f"p {k}" for k in range(n)])
            timed.append(time.monotonic() - t)
    assert [n for n, _ in reward.calls] == [4, 6, 2]  # the 6 is scored alone, whole
    assert timed[0] < 0.5 and timed[1] < 0.5, timed  # nothing more could join: no wait
    assert 0.6 <= timed[2] < 3, timed  # waited max_wait for company, then went alone


def test_two_replicas_share_the_queue():
    replicas = [Recording(delay=0.1), Recording(delay=0.1)]
    requests = [(images(4, 3, 4, 4, seed=i), [f"p {i}"] * 4) for i in range(4)]
    with serving(replicas, devices=["cpu", "cpu"], max_batch=4, max_wait=0.0) as (url, _):
        got = concurrently(url, requests)
        health = RemoteReward(url).health()
        m = metrics(url)
    for (x, prompts), scores in zip(requests, got, strict=True):
        assert torch.equal(scores, alone(x, prompts))
    assert all(r.calls for r in replicas), [r.calls for r in replicas]  # both were used
    assert health["replicas"] == 2 and health["devices"] == ["cpu", "cpu"]
    counts = [m[("ddrl_reward_batch_images_count", (("replica", r),))] for r in ("0", "1")]
    assert counts == [len(r.calls) for r in replicas]


def test_metrics_count_what_was_sent():
    with serving(Recording(), max_wait=0.0) as (url, _):
        client = RemoteReward(url, **FAST)
        for n in (2, 3, 5):
            client(images(n, 3, 4, 4), ["p 0"] * n)
        for path, data in (("/score", b"garbage"), ("/nope", None)):
            with pytest.raises(urllib.error.HTTPError):
                transport.open_url(urllib.request.Request(url + path, data=data), 5)
        client.health()
        m = metrics(url)

    def requests(path, status):
        return m[("ddrl_reward_requests_total", (("path", path), ("status", status)))]

    assert requests("/score", "200") == 3 and requests("/score", "400") == 1
    assert requests("other", "404") == 1 and requests("/health", "200") == 1
    assert m[("ddrl_reward_images_total", ())] == 10
    assert m[("ddrl_reward_errors_total", ())] == 0
    assert m[("ddrl_reward_batch_images_count", (("replica", "0"),))] == 3
    assert m[("ddrl_reward_batch_images_sum", (("replica", "0"),))] == 10
    assert m[("ddrl_reward_request_seconds_count", ())] == 4
    assert m[("ddrl_reward_queue_depth", ())] == 0


def test_a_failing_request_does_not_fail_its_batch_mates(monkeypatch):
    reward = Recording(fail_on="bad 1")
    requests = [(images(2, 3, 4, 4, seed=0), ["ok 1", "ok 2"])]
    requests.append((images(2, 3, 4, 4, seed=1), ["ok 3", "bad 1"]))
    calls = count_attempts(monkeypatch)
    with serving(reward, max_wait=0.5) as (url, _):
        good, bad = concurrently(url, requests)
        m = metrics(url)
    assert torch.equal(good, alone(*requests[0]))
    msg = str(bad)
    assert isinstance(bad, DDRLError) and "\n" not in msg
    assert "failed on 2 images: reward 'test' failed: RuntimeError: cannot score 'bad 1'" in msg
    assert len([c for c in calls if c.endswith("/score")]) == 2  # a 500 is not retried
    # merged, failed; then each request alone: only the bad one fails again
    assert [n for n, _ in reward.calls] == [4, 2, 2]
    assert m[("ddrl_reward_errors_total", ())] == 2


@pytest.mark.parametrize(
    "args, says",
    [
        (["--max-batch", "0"], "--max-batch=0 is out of range; allowed: [1, inf]"),
        (["--max-wait-ms", "-1"], "--max-wait-ms=-1.0 is out of range"),
        (["--devices", "cpu,tpu"], "'tpu': unknown device; allowed: cpu"),
        (["--devices", "cuda:99"], "'cuda:99': no such CUDA device here; allowed: cpu"),
        (["--devices", "cpu", "reward.device=cpu"], "both say where the reward runs"),
        (["--port", "70000"], "--port 70000 is out of range"),
    ],
)
def test_reward_server_flags_are_checked_before_the_reward_is_built(capsys, args, says):
    from ddrl.cli import main

    assert main(["reward-server", "--reward", "nope", *args]) == 2  # "nope" is never built
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_overlapped_remote_scoring_gives_the_runs_metrics(tmp_path):
    """reward.overlap with reward.name=remote: each rollout chunk (sampler.batch=3 of 8: 3, 3, 2)
    is sent to the service while the next samples, and the run's metrics equal the run that
    scores the whole batch after the rollout."""
    from helpers_quick import quick

    from ddrl.config import build_config
    from ddrl.training.loop import train
    from ddrl.training.runlog import prepare_run_dir, read_jsonl

    sizes = []

    class Recording(BrightnessReward):
        def __call__(self, images, prompts):
            sizes.append(images.shape[0])
            return super().__call__(images, prompts)

    rows = {}
    with serving(Recording(), "brightness", max_wait=0.0) as (url, _):
        for flag in ("false", "true"):
            sizes.clear()
            # (no preflight: its probe's two samples would be scored through the service too)
            ov = ["reward.name=remote", f"reward.url={url}", "sampler.batch=3"]
            cfg = build_config(
                overrides=quick(*ov, f"reward.overlap={flag}", "train.preflight=false")
            )
            run = prepare_run_dir(tmp_path / flag, resume=False, overwrite=False)
            train(cfg, run, log=lambda *a: None)
            rows[flag] = [
                {k: v for k, v in r.items() if not k.startswith("time_")}
                for r in read_jsonl(run / "metrics.jsonl")
            ]
            if flag == "true":  # one request per chunk, as each finished (2 iterations)
                assert sizes == [3, 3, 2] * 2
    assert rows["true"] == rows["false"] and len(rows["true"]) == 2

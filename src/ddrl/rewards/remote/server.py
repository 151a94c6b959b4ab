"""``ddrl reward-server``: a reward served over HTTP from its own process (Starlette on uvicorn),
with requests batched across clients, one replica per device, /health and Prometheus /metrics.

Rewards whose dependencies clash with the trainer's (another torch, another transformers, a
model that needs its own GPU) run as ``ddrl reward-server --reward NAME`` in their own
environment; the trainer uses ``reward.name = "remote"`` with ``reward.url`` pointing at it.

- ``POST /score``: the wire, version 1 (``ddrl.rewards.remote.wire``; the client
  ``ddrl.rewards.remote.client`` needs only the standard library). Errors are
  ``{"error": one line, "version": 1}`` with 400 (bad body), 404 (unknown path), 411 (no
  Content-Length), 413 (over ``max_bytes``, refused from the Content-Length before reading the
  body) or 500 (the reward raised or returned the wrong type or shape).
- ``GET /health``: ``{"ok": true, "reward": NAME, "version": 1}`` plus ``replicas``,
  ``devices``, ``queued`` (requests waiting) and the batching settings.
- ``GET /metrics``: Prometheus text, from a registry of this server's own.

Requests from every client wait in one queue; each replica (one reward instance per device,
built once per device) merges them into one reward call in its own worker thread, so the event
loop goes on reading bodies and answering /health meanwhile (``ddrl.rewards.remote.batching``
has the policy). ``make_server`` binds (``ddrl.serving``); its ``start`` serves in a background
thread (tests, benchmarks), ``serve`` in this one until interrupted (the CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ddrl.errors import DDRLError, check_range
from ddrl.rewards.base import Reward
from ddrl.rewards.remote.batching import JobQueue, run_replica
from ddrl.rewards.remote.wire import WIRE_VERSION, decode_request, encode_scores, error_text
from ddrl.serving import Served, bind

ENDPOINTS = "GET /health, GET /metrics, POST /score"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers can share a
    process: tests, benchmarks)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "ddrl_reward_requests", "HTTP requests answered", ["path", "status"], registry=r
        )
        self.images = Counter("ddrl_reward_images", "images scored and answered", registry=r)
        self.errors = Counter("ddrl_reward_errors", "reward calls that raised", registry=r)
        self.batch = Histogram(
            "ddrl_reward_batch_images",
            "images per reward call",
            ["replica"],
            buckets=[2**k for k in range(11)],
            registry=r,
        )
        self.latency = Histogram(
            "ddrl_reward_request_seconds",
            "POST /score, request received to answer ready",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Gauge("ddrl_reward_queue_depth", "requests waiting for a replica", registry=r)

    def on_call(self, replica: int) -> Callable[[int, bool], None]:
        """What replica ``replica``'s worker reports each reward call to (thread-safe)."""
        batch = self.batch.labels(str(replica))

        def call(images: int, ok: bool) -> None:
            batch.observe(images)
            if not ok:
                self.errors.inc()

        return call


def _error(status: int, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error": message, "version": WIRE_VERSION}).encode()


class _App:
    """The Starlette app of one server: its routes, its queue and its replicas' batchers."""

    def __init__(self, replicas, name: str, max_batch: int, max_wait: float, max_bytes: int):
        self.replicas: list[tuple[str, Reward]] = replicas
        self.name, self.max_bytes = name, max_bytes
        self.max_batch, self.max_wait = max_batch, max_wait
        self.metrics = _Metrics()
        self.queue = JobQueue(max_batch, max_wait, self.metrics.queue.set)

    def starlette(self) -> Starlette:
        paths = [("/score", self.score, "POST"), ("/health", self.health, "GET")]
        paths.append(("/metrics", self.prometheus, "GET"))
        # "/score/" too: the http.server version accepted a trailing slash.
        routes = [Route(p, fn, methods=[m]) for path, fn, m in paths for p in (path, path + "/")]
        handlers = {404: self.not_found, 405: self.not_found}  # 404 for both, as before
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=self.lifespan)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        executors = [ThreadPoolExecutor(1, f"reward-{i}") for i in range(len(self.replicas))]
        tasks = [
            asyncio.create_task(
                run_replica(self.queue, reward, self.name, dev, ex, self.metrics.on_call(i))
            )
            for i, ((dev, reward), ex) in enumerate(zip(self.replicas, executors, strict=True))
        ]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for ex in executors:  # a reward call in progress finishes in its thread
                ex.shutdown(wait=False, cancel_futures=True)

    def _send(self, path: str, status: int, body: bytes, media: str = "application/json"):
        self.metrics.requests.labels(path, str(status)).inc()
        return Response(body, status, media_type=media)

    async def score(self, request: Request) -> Response:
        start = time.perf_counter()
        status, body = await self._score(request)
        self.metrics.latency.observe(time.perf_counter() - start)
        return self._send("/score", status, body)

    async def _score(self, request: Request) -> tuple[int, bytes]:
        try:
            length = int(request.headers.get("content-length", ""))
        except ValueError:
            return _error(411, "POST /score needs a Content-Length")
        if length < 0 or length > self.max_bytes:
            return _error(413, f"body of {length} bytes; allowed: up to {self.max_bytes}")
        try:
            body = b"".join([chunk async for chunk in request.stream()])
        except ClientDisconnect:  # nobody is left to read the answer
            return _error(400, "the client left before sending the whole body")
        try:  # safetensors parsing of a large video body would stall the loop: a thread
            u8, prompts = await run_in_threadpool(decode_request, body)
        except ValueError as e:
            return _error(400, f"bad /score request: {e}")
        try:
            scores = await self.queue.score(u8, prompts)
        except Exception as e:  # the reward's failure (printed by the worker), on one line
            return _error(500, f"reward {self.name!r} failed: {error_text(e)}")
        self.metrics.images.inc(len(scores))
        return 200, encode_scores(scores)

    async def health(self, request: Request) -> Response:
        answer = {
            "ok": True,
            "reward": self.name,
            "version": WIRE_VERSION,
            "replicas": len(self.replicas),
            "devices": [dev for dev, _ in self.replicas],
            "queued": len(self.queue),
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait * 1000,
        }
        return self._send("/health", 200, json.dumps(answer).encode())

    async def prometheus(self, request: Request) -> Response:
        body = generate_latest(self.metrics.registry)
        return self._send("/metrics", 200, body, CONTENT_TYPE_LATEST)

    async def not_found(self, request: Request, exc: Exception) -> Response:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        _, body = _error(404, f"unknown path {path!r}; allowed: {ENDPOINTS}")
        return self._send("other", 404, body)


def parse_devices(text: str) -> list[str]:
    """--devices "cpu,cpu" or "cuda:0,cuda:1" → one replica per entry; DDRLError naming a bad
    entry and the devices this machine has."""
    n = torch.cuda.device_count()
    allowed = ["cpu", *(["cuda", *(f"cuda:{i}" for i in range(n))] if n else [])]
    devices = [d.strip() for d in text.split(",")]
    for d in devices:
        if d not in allowed:
            why = "unknown device" if not d.startswith("cuda") else "no such CUDA device here"
            raise DDRLError(
                f"--devices {text}: {d!r}: {why}; allowed: {', '.join(allowed)} "
                "(comma-separated, one reward replica each)"
            )
    return devices


def make_server(
    rewards: Reward | Sequence[Reward],
    host: str = "127.0.0.1",
    port: int = 0,
    name: str | None = None,
    *,
    devices: Sequence[str] | None = None,
    max_batch: int = 64,
    max_wait: float = 0.005,
    max_bytes: int = 8 << 30,
) -> Served:
    """A bound, not yet serving, server for ``rewards`` (one reward, or one per replica with
    ``devices`` naming each one's device: "cpu" by default). Port 0 takes a free port
    (``server.url`` has it). Requests are merged up to ``max_batch`` images per reward call,
    waiting at most ``max_wait`` seconds after the first; bodies over ``max_bytes`` get 413."""
    rewards = list(rewards) if isinstance(rewards, (list, tuple)) else [rewards]
    devices = list(devices) if devices is not None else ["cpu"] * len(rewards)
    if not rewards or len(devices) != len(rewards):
        raise DDRLError(f"{len(rewards)} rewards for {len(devices)} devices; need one per device")
    check_range("max_batch", max_batch, 1)
    check_range("max_wait", max_wait, 0.0)
    name = name or getattr(rewards[0], "__name__", type(rewards[0]).__name__)
    app = _App(list(zip(devices, rewards, strict=True)), name, max_batch, max_wait, max_bytes)
    # graceful: a reward call still running may hold shutdown this long
    return Served(app.starlette(), bind(host, port), header="ddrl-reward/1", graceful=10)


def serve(
    rewards: Reward | Sequence[Reward],
    host: str = "127.0.0.1",
    port: int = 0,
    ready: Callable[[str], None] | None = None,
    name: str | None = None,
    **options,
) -> None:
    """Serve ``rewards`` until interrupted; ``ready(url)`` is called once listening.
    ``options``: ``make_server``'s keywords (devices, max_batch, max_wait, max_bytes)."""
    server = make_server(rewards, host, port, name, **options)
    try:
        server.serve_forever(ready)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()

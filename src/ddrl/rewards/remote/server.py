"""A reward in its own process: an HTTP scoring service and the client that calls it.

Rewards whose dependencies clash with the trainer's (another torch, another transformers, a
model that needs its own GPU) run as ``ddrl reward-server --reward NAME`` in their own
environment; the trainer uses ``reward.name = "remote"`` with ``reward.url`` pointing at it.
Only the standard library (``http.server``, ``urllib``) and safetensors are used on the wire.

Wire format, version 1
----------------------
``POST {url}/score``, ``Content-Type: application/x-ddrl-reward``, with ``Content-Length``.
The body is one safetensors blob (what ``safetensors.torch.save`` writes: an 8-byte
little-endian header length N, N bytes of JSON header, then the raw tensor bytes) holding

- exactly one tensor, ``"images"``: dtype ``U8``, shape ``[B, 3, H, W]`` (images) or
  ``[B, 3, F, H, W]`` (videos), B >= 1; pixel ``u = round((clamp(x, -1, 1) + 1) * 127.5)``
  for an image ``x`` in [-1, 1], and the server scores ``x' = u / 127.5 - 1`` (float32). The
  reward therefore sees ``x`` quantised to 256 levels (|x' - x| <= 1/255): identical to calling
  it in-process on ``dequantize(quantize(x))``. Samples with any non-finite pixel are sent as
  grey where non-finite and their score is set to NaN by the client (the loop skips them).
- ``__metadata__`` (strings only, as safetensors requires): ``"version": "1"`` and
  ``"prompts"``: a JSON list of B strings.

The answer is JSON (``Content-Type: application/json``):

- 200: ``{"scores": [s_0, ..., s_{B-1}], "version": 1}``, each s_i a number or ``null`` for a
  NaN/inf score (decoded back to NaN: the loop skips those groups either way).
- 400 (bad request: not the format above, wrong version) / 404 (unknown path) /
  500 (the reward raised, or returned the wrong type or shape):
  ``{"error": "<one line>", "version": 1}``.

``GET {url}/health`` answers ``{"ok": true, "reward": NAME, "version": 1}``.

Client policy (``ddrl.rewards.remote.client.RemoteReward``): a batch of more than ``batch`` samples
is split into requests of at most ``batch`` and the scores concatenated in order. A connection
failure, a timeout (no answer within ``timeout`` seconds) or HTTP 502/503/504 is retried
``retries`` times, sleeping ``backoff * 2**k`` seconds before retry k (0.5, 1, 2, ... s; no
jitter: a handful of trainer ranks, not a fleet); then a one-line DDRLError names the URL, the
number of attempts and the last failure. A reward error (HTTP 500), a rejected request (4xx) or a
garbled answer (not JSON, no "scores", wrong length, wrong version) is not retried: the same
images would fail the same way, so it is a one-line DDRLError at once. Proxy environment
variables are ignored (the service is on the trainer's network). The server scores one
request at a time (a lock around the reward; /health answers meanwhile).
"""

from __future__ import annotations

import json
import math
import socket
import struct
import sys
import threading
import traceback
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from torch import Tensor

from ddrl.errors import DDRLError, check_range
from ddrl.rewards.base import Reward, RewardContext, checked_reward

WIRE_VERSION = 1
CONTENT_TYPE = "application/x-ddrl-reward"
MAX_ANSWER_BYTES = 64 << 20  # a longer answer is not a list of B scores
RETRY_STATUS = (502, 503, 504)  # a proxy or an overloaded server: worth another try


@dataclass
class RemoteConfig:
    """Where the remote reward lives and how hard the client tries (reward.* in the config)."""

    url: str = ""  # http://host:port of a `ddrl reward-server` (used when reward.name = remote)
    timeout: float = 60.0  # seconds the client waits on the server (connect, send, answer)
    retries: int = 3  # extra attempts after a connection failure, timeout or HTTP 502/503/504
    backoff: float = 0.5  # seconds before the first retry; doubled before each further one

    def check(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DDRLError(
                f"reward.url={self.url!r}; allowed: http://HOST:PORT of a `ddrl reward-server`"
            )
        if parts.query or parts.fragment:
            raise DDRLError(f"reward.url={self.url!r} has a query or fragment; allowed: none")
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise DDRLError(f"reward.url={self.url!r} has a bad port; allowed: 1..65535") from None
        check_range("reward.timeout", self.timeout, 1e-3, 86400.0)
        if isinstance(self.retries, bool) or not isinstance(self.retries, int):
            raise DDRLError(f"reward.retries={self.retries!r}; allowed: an integer in [0, 100]")
        check_range("reward.retries", self.retries, 0, 100)
        check_range("reward.backoff", self.backoff, 0.0, 3600.0)

    @classmethod
    def from_context(cls, ctx) -> RemoteConfig:
        """The fields ``ctx`` has (RewardContext once it carries them), defaults for the rest."""
        return cls(**{f.name: getattr(ctx, f.name) for f in fields(cls) if hasattr(ctx, f.name)})


# ---------------------------------------------------------------------------------------------
# the wire


def quantize(images: Tensor) -> Tensor:
    """Images in [-1, 1] (any float dtype, any device) → uint8 [0, 255] on the same device."""
    x = images.detach().float().nan_to_num(0.0, 1.0, -1.0).clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8)


def dequantize(u8: Tensor) -> Tensor:
    """uint8 [0, 255] → float32 in [-1, 1]; ``quantize(dequantize(u)) == u`` exactly."""
    return u8.float() / 127.5 - 1


def encode_request(u8: Tensor, prompts: list[str]) -> bytes:
    """The POST /score body: uint8 images [B, ...] and B prompts (see the module docstring)."""
    import safetensors.torch

    meta = {"version": str(WIRE_VERSION), "prompts": json.dumps(list(prompts))}
    return safetensors.torch.save({"images": u8.detach().cpu().contiguous()}, metadata=meta)


def decode_request(body: bytes) -> tuple[Tensor, list[str]]:
    """(uint8 images [B, ...], prompts) from a POST /score body; ValueError saying what is wrong."""
    import safetensors.torch

    if len(body) < 8:
        raise ValueError(f"body of {len(body)} bytes is not a safetensors blob")
    (n,) = struct.unpack("<Q", body[:8])
    if n > len(body) - 8:
        raise ValueError(f"safetensors header of {n} bytes is longer than the body")
    try:
        header = json.loads(body[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("safetensors header is not JSON") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("no __metadata__ with version and prompts")
    if meta.get("version") != str(WIRE_VERSION):
        raise ValueError(f"wire version {meta.get('version')!r}; this server speaks {WIRE_VERSION}")
    try:
        prompts = json.loads(meta.get("prompts", ""))
    except json.JSONDecodeError:
        raise ValueError("metadata 'prompts' is not a JSON list of strings") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("metadata 'prompts' is not a JSON list of strings")
    try:
        tensors = safetensors.torch.load(body)
    except Exception as e:  # SafetensorError: offsets, dtype, truncation
        raise ValueError(f"bad safetensors blob: {_one_line(e)}") from None
    if set(tensors) != {"images"}:
        raise ValueError(f"tensors {sorted(tensors)}; expected exactly ['images']")
    u8 = tensors["images"]
    if u8.dtype != torch.uint8 or u8.ndim < 2 or u8.shape[0] < 1:
        raise ValueError(
            f"images are {str(u8.dtype).removeprefix('torch.')} {list(u8.shape)}; "
            "expected uint8 [B, 3, H, W] or [B, 3, F, H, W] with B >= 1"
        )
    if len(prompts) != u8.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {u8.shape[0]} images")
    return u8, prompts


def encode_scores(scores: Tensor) -> bytes:
    """The 200 answer: finite scores as numbers, NaN/inf as null."""
    vals = [v if math.isfinite(v) else None for v in scores.detach().double().cpu().tolist()]
    return json.dumps({"scores": vals, "version": WIRE_VERSION}, allow_nan=False).encode()


def _one_line(e: BaseException | str) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, BaseException):
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 500 else text[:497] + "..."


# ---------------------------------------------------------------------------------------------
# the server


class _Handler(BaseHTTPRequestHandler):
    server_version = "ddrl-reward/1"
    timeout = 600  # a client that stops sending mid-request frees its thread after this

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # no access log; failures are printed in _score

    def _answer(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode())

    def _send(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
            print(
                f"reward server: client {self.client_address[0]} left before the answer",
                file=sys.stderr,
            )

    def _error(self, status: int, message: str) -> None:
        self._answer(status, {"error": message, "version": WIRE_VERSION})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/health":
            self._answer(
                200, {"ok": True, "reward": self.server.reward_name, "version": WIRE_VERSION}
            )
        else:
            self._error(404, f"unknown path {self.path!r}; allowed: GET /health, POST /score")

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._error(404, f"unknown path {self.path!r}; allowed: GET /health, POST /score")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(411, "POST /score needs a Content-Length")
            return
        if length < 0 or length > self.server.max_bytes:
            self._error(413, f"body of {length} bytes; allowed: up to {self.server.max_bytes}")
            return
        body = self.rfile.read(length)
        try:
            u8, prompts = decode_request(body)
        except ValueError as e:
            self._error(400, f"bad /score request: {e}")
            return
        try:
            with self.server.lock, torch.no_grad():
                scores = checked_reward(
                    self.server.reward, self.server.reward_name, dequantize(u8), prompts
                )
        except Exception as e:  # the reward's failure, reported to the client on one line
            print(
                f"reward {self.server.reward_name!r} failed on {u8.shape[0]} images:",
                file=sys.stderr,
            )
            traceback.print_exc(file=sys.stderr)
            self._error(500, f"reward {self.server.reward_name!r} failed: {_one_line(e)}")
            return
        self._send(200, encode_scores(scores))


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a request still being scored does not hold up shutdown


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(
    reward: Reward,
    host: str = "127.0.0.1",
    port: int = 0,
    name: str | None = None,
    max_bytes: int = 8 << 30,
) -> ThreadingHTTPServer:
    """A bound, not yet serving, server for ``reward`` (port 0: a free port; read it from
    ``server.server_address[1]``). Call ``serve_forever()``; ``shutdown()`` + ``server_close()``
    stop it."""
    cls = _Server6 if ":" in host else _Server
    try:
        server = cls((host, port), _Handler)
    except OSError as e:
        raise DDRLError(f"cannot listen on {host}:{port}: {_one_line(e)}") from e
    server.reward = reward
    server.reward_name = name or getattr(reward, "__name__", type(reward).__name__)
    server.lock = threading.Lock()
    server.max_bytes = max_bytes
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(reward: Reward, host: str = "127.0.0.1", port: int = 0, ready=None, name=None) -> None:
    """Serve ``reward`` until interrupted; ``ready(url)`` is called once listening."""
    server = make_server(reward, host, port, name=name)
    try:
        if ready is not None:
            ready(server_url(server))
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main_server(name: str, ctx: RewardContext, host: str = "127.0.0.1", port: int = 0) -> None:
    """``ddrl reward-server``: build reward ``name`` for ``ctx`` and serve it, printing its URL."""
    from ddrl.rewards import build_reward

    reward = build_reward(name, ctx)

    def ready(url: str) -> None:
        print(f"reward {name!r} listening on {url}  (reward.name=remote reward.url={url})")
        sys.stdout.flush()

    serve(reward, host, port, ready=ready, name=name)

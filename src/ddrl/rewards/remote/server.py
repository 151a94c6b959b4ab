"""A reward in its own process: an HTTP scoring service and the client that calls it.

Rewards whose dependencies clash with the trainer's (another torch, another transformers, a
model that needs its own GPU) run as ``ddrl reward-server --reward NAME`` in their own
environment; the trainer uses ``reward.name = "remote"`` with ``reward.url`` pointing at it.
Only the standard library (``http.server``, ``urllib``) and safetensors are used on the wire.

The server scores one request at a time (a lock around the reward; /health answers meanwhile);
the wire is ``ddrl.rewards.remote.wire``, the client ``ddrl.rewards.remote.client``.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from ddrl.errors import DDRLError
from ddrl.rewards.base import Reward, checked_reward
from ddrl.rewards.remote.wire import (
    WIRE_VERSION,
    decode_request,
    dequantize,
    encode_scores,
    error_text,
)


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
            self._error(500, f"reward {self.server.reward_name!r} failed: {error_text(e)}")
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
        raise DDRLError(f"cannot listen on {host}:{port}: {error_text(e)}") from e
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

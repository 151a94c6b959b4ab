"""The client of ``ddrl reward-server`` (``reward.name = remote``); the wire is
``ddrl.rewards.remote.wire``.

A batch of more than ``batch`` samples
is split into requests of at most ``batch`` and the scores concatenated in order. A connection
failure, a timeout (no answer within ``timeout`` seconds) or HTTP 502/503/504 is retried
``retries`` times, sleeping ``backoff * 2**k`` seconds before retry k (0.5, 1, 2, ... s; no
jitter: a handful of trainer ranks, not a fleet); then a one-line DDRLError names the URL, the
number of attempts and the last failure. A reward error (HTTP 500), a rejected request (4xx) or a
garbled answer (not JSON, no "scores", wrong length, wrong version) is not retried: the same
images would fail the same way, so it is a one-line DDRLError at once. Proxy environment
variables are ignored (the service is on the trainer's network).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import torch
from torch import Tensor

from ddrl.errors import DDRLError, check_range
from ddrl.rewards import transport
from ddrl.rewards.base import RewardContext
from ddrl.rewards.config import RewardConfig, check_url
from ddrl.rewards.remote.wire import (
    CONTENT_TYPE,
    MAX_ANSWER_BYTES,
    RETRY_STATUS,
    WIRE_VERSION,
    encode_request,
    error_text,
    quantize,
)


class RemoteReward:
    """A Reward served by ``ddrl reward-server`` at ``url``: images [B, ...] in [-1, 1] and B
    prompts → Tensor [B] (float32, CPU). See the module docstring for the wire and the policy."""

    accepts_video = True  # videos go whole to the service (a VideoAlign-type model there)

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        batch: int = 16,
    ):
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise DDRLError(f"reward.retries={retries!r}; allowed: an integer in [0, 100]")
        check_url(url)  # also when empty: the service is what this reward is
        RewardConfig("remote", url=url, timeout=timeout, retries=retries, backoff=backoff).check()
        check_range("reward.batch", batch, 1)
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.batch = int(batch)

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, timeout={self.timeout}, retries={self.retries})"

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        if not isinstance(images, Tensor) or images.ndim < 2:
            raise DDRLError(
                f"remote reward {self.url}: images must be a Tensor [B, 3, H, W] or "
                f"[B, 3, F, H, W]; got {getattr(images, 'shape', type(images).__name__)}"
            )
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise DDRLError(
                f"remote reward {self.url}: {len(prompts)} prompts for {images.shape[0]} images"
            )
        if images.shape[0] == 0:
            return torch.zeros(0)
        finite = images.detach().flatten(1).isfinite().all(1).cpu()
        u8 = quantize(images).cpu()
        parts = [
            self._score(u8[i : i + self.batch], prompts[i : i + self.batch])
            for i in range(0, u8.shape[0], self.batch)
        ]
        scores = torch.cat(parts)
        scores[~finite] = float("nan")
        return scores

    def health(self) -> dict:
        """The server's /health answer (one attempt; DDRLError if it does not answer)."""
        req = urllib.request.Request(self.url + "/health", method="GET")
        try:
            with transport.open_url(req, self.timeout) as resp:
                return json.loads(resp.read(MAX_ANSWER_BYTES))
        except (OSError, ValueError) as e:
            raise DDRLError(f"reward service {self.url} is not healthy: {error_text(e)}") from None

    # one request, with retries ---------------------------------------------------------------

    def _score(self, u8: Tensor, prompts: list[str]) -> Tensor:
        body = encode_request(u8, prompts)
        post = lambda: self._post(body, u8.shape[0])  # noqa: E731
        return transport.retried(post, f"reward service {self.url}", self.retries, self.backoff)

    def _post(self, body: bytes, n: int) -> Tensor:
        req = urllib.request.Request(
            self.url + "/score",
            data=body,
            method="POST",
            headers={"Content-Type": CONTENT_TYPE},
        )
        try:
            raw = transport.exchange(req, self.timeout, RETRY_STATUS, MAX_ANSWER_BYTES)
        except urllib.error.HTTPError as e:  # an error status not worth another attempt
            message = transport.error_message(e, MAX_ANSWER_BYTES)
            if e.code == 500:
                raise DDRLError(
                    f"reward service {self.url} failed on {n} images: {message}"
                ) from None
            raise DDRLError(
                f"reward service {self.url} refused /score (HTTP {e.code}): {message}; "
                "is it a `ddrl reward-server` of this version?"
            ) from None
        return self._parse(raw, n)

    def _parse(self, raw: bytes, n: int) -> Tensor:
        def bad(what: str) -> DDRLError:
            return DDRLError(f"reward service {self.url} gave a bad answer to /score: {what}")

        if len(raw) > MAX_ANSWER_BYTES:
            raise bad(f"more than {MAX_ANSWER_BYTES} bytes")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad(f"not JSON (starts {raw[:40]!r})") from None
        if not isinstance(obj, dict) or "scores" not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise bad(f"no 'scores' (got {keys})")
        if obj.get("version") != WIRE_VERSION:
            raise bad(f"version {obj.get('version')!r}; this client speaks {WIRE_VERSION}")
        scores = obj["scores"]
        if not isinstance(scores, list) or len(scores) != n:
            got = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise bad(f"{got} scores for {n} images")
        for i, s in enumerate(scores):
            if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))):
                raise bad(f"scores[{i}] = {s!r}; expected a number or null")
        return torch.tensor(
            [float("nan") if s is None else float(s) for s in scores], dtype=torch.float32
        )


def remote_factory(ctx: RewardContext) -> RemoteReward:
    """reward.name = "remote": the service at reward.url (reward.batch images per request)."""
    c = ctx.config
    return RemoteReward(c.url, c.timeout, c.retries, c.backoff, batch=c.batch)

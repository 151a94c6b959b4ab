"""The wire between a trainer and ``ddrl reward-server``, version 1.

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

``GET {url}/health`` answers ``{"ok": true, "reward": NAME, "version": 1}``, to which a server
may add keys (``ddrl reward-server`` adds its replicas and batching settings); clients read
only these three.
"""

from __future__ import annotations

import json
import math
import struct

import torch
from torch import Tensor

WIRE_VERSION = 1
CONTENT_TYPE = "application/x-ddrl-reward"
MAX_ANSWER_BYTES = 64 << 20  # a longer answer is not a list of B scores
RETRY_STATUS = (502, 503, 504)  # a proxy or an overloaded server: worth another try


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
        raise ValueError(f"bad safetensors blob: {error_text(e)}") from None
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


def error_text(e: BaseException | str) -> str:
    """The wire's one-line error text: whitespace folded, the exception type in front, 500
    characters at most."""
    text = " ".join(str(e).split())
    if isinstance(e, BaseException):
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 500 else text[:497] + "..."

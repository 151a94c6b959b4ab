"""HTTP exchanges with retries, for rewards that call a service (standard library only).

The policy: a connection failure, a timeout (no answer within ``timeout`` seconds), a broken HTTP
answer or a status in ``retry_status`` is retried ``retries`` times, sleeping
``backoff * 2**k`` seconds before retry k (0.5, 1, 2, ... s; no jitter: a handful of trainer
ranks, not a fleet); then a one-line DDRLError names the service, the number of attempts and the
last failure. Any other error status reaches the caller as ``urllib.error.HTTPError`` to be named
there, not retried: the same request would fail the same way. Proxy environment variables are
ignored (the services are on the trainer's network).
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar

from ddrl.errors import DDRLError
from ddrl.rewards.remote.wire import error_text

T = TypeVar("T")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Retry(Exception):
    """A failure worth another attempt (its message says what happened)."""


def open_url(request: urllib.request.Request, timeout: float):
    """One HTTP exchange (a module function so tests can count attempts)."""
    return _OPENER.open(request, timeout=timeout)


def exchange(
    request: urllib.request.Request, timeout: float, retry_status: tuple[int, ...], limit: int
) -> bytes:
    """The body of a 2xx answer to ``request`` (``limit + 1`` bytes at most, so the caller can
    tell an over-long answer). Raises Retry for a transient failure (see the module docstring) and
    ``urllib.error.HTTPError`` for any other error status."""
    try:
        with open_url(request, timeout) as resp:
            return resp.read(limit + 1)
    except urllib.error.HTTPError as e:  # the server answered, with an error status
        if e.code in retry_status:
            raise Retry(f"HTTP {e.code}: {error_message(e, limit)}") from None
        raise
    except TimeoutError:
        raise Retry(f"timed out after {timeout:g} s (reward.timeout)") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise Retry(f"timed out after {timeout:g} s (reward.timeout)") from None
        raise Retry(f"cannot connect: {error_text(e.reason)}") from None
    except OSError as e:  # reset, refused mid-way, closed early
        raise Retry(error_text(e)) from None
    except http.client.HTTPException as e:  # a mangled status line or headers
        raise Retry(f"broken HTTP answer: {error_text(e)}") from None


def retried(attempt: Callable[[], T], what: str, retries: int, backoff: float) -> T:
    """``attempt()`` until it returns, at most ``retries + 1`` times, sleeping
    ``backoff * 2**k`` s before retry k after each Retry; then a one-line DDRLError about
    ``what`` ("reward service http://...") naming the attempts and the last failure."""
    attempts = retries + 1
    start = time.monotonic()
    last = ""
    for k in range(attempts):
        if k:
            time.sleep(backoff * 2 ** (k - 1))
        try:
            return attempt()
        except Retry as e:
            last = str(e)
    raise DDRLError(
        f"{what} did not answer after {attempts} attempts "
        f"({time.monotonic() - start:.1f} s; reward.retries={retries}): {last}"
    )


def error_message(e: urllib.error.HTTPError, limit: int) -> str:
    """One line from an error answer: its JSON "error" (a string, or the OpenAI API's
    ``{"message": ...}``) or "message", else the start of the body, else the HTTP reason."""
    try:
        raw = e.read(limit)
    except Exception:  # the body could not be read: the status and reason still say enough
        raw = b""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error")
        nested = err.get("message") if isinstance(err, dict) else None
        for text in (err, nested, obj.get("message")):
            if isinstance(text, str) and text:
                return error_text(text)
    text = error_text(raw[:200].decode("utf-8", "replace")) if raw else ""
    return text or str(e.reason)

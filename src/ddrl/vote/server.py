"""``ddrl vote serve``'s web page and JSON API (Starlette on uvicorn, ``ddrl.serving``).

- ``GET /``, ``GET /vote.js``: the page (package data, ``ddrl/vote/static``).
- ``GET /api/next?rater=NAME``: ``{"question": id, "prompt", "left": url, "right": url,
  "kind": "image" | "video", "criteria": [...], "progress": {...}}``, or ``{"done": true,
  "criteria", "progress"}`` when nothing is left for NAME (``ddrl.vote.store`` has the policy).
- ``POST /api/vote``: ``{"question": id, "rater": NAME, "choices": {criterion: "left" |
  "right" | "tie"}, "ms": time taken}``, or ``"skip": true`` in place of choices; answers
  ``{"ok": true, "progress"}``.
- ``GET /media/<id>.<ext>``: a sample, looked up by its opaque id in the manifest (never a path
  joined from the request), sent with no Last-Modified or ETag (its file's time would tell the
  order the runs were rendered in).

Errors are ``{"error": one line}`` with 400 (bad request), 404 (unknown path, question or
media), 409 (answered already). Nothing the browser receives names a run: question and media
ids are random, and left and right are resolved to runs only in ``votes.jsonl``.
"""

from __future__ import annotations

import json
import math
import mimetypes
from importlib.resources import files
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ddrl.errors import DDRLError
from ddrl.serving import Served, bind
from ddrl.vote.folder import MEDIA, Manifest
from ddrl.vote.store import VoteStore

STATIC = files("ddrl.vote") / "static"
MAX_BODY = 1 << 16
NO_CACHE = {"cache-control": "no-store"}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers=NO_CACHE)


def _rater(value) -> str:
    """A rater's name: 1-64 printable characters, surrounding spaces dropped."""
    name = value.strip() if isinstance(value, str) else ""
    if not 1 <= len(name) <= 64 or not name.isprintable():
        raise DDRLError(f"rater {value!r}; allowed: a name of 1 to 64 printable characters")
    return name


class VoteApp:
    """The routes over one folder's manifest and votes."""

    def __init__(self, store: VoteStore):
        self.store, self.m = store, store.m
        self.page = (STATIC / "index.html").read_bytes()
        self.script = (STATIC / "vote.js").read_bytes()
        self.files = {Path(x["file"]).name: x for x in self.m.media.values()}

    def starlette(self) -> Starlette:
        routes = [
            Route("/", self.index),
            Route("/vote.js", self.js),
            Route("/api/next", self.next_question),
            Route("/api/vote", self.vote, methods=["POST"]),
            Route("/media/{name}", self.media),
        ]
        handlers = {404: self.not_found, 405: self.not_found}
        return Starlette(routes=routes, exception_handlers=handlers)

    def index(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8", headers=NO_CACHE)

    def js(self, request: Request) -> Response:
        return Response(self.script, media_type="text/javascript; charset=utf-8")

    def next_question(self, request: Request) -> JSONResponse:
        try:
            rater = _rater(request.query_params.get("rater", ""))
        except DDRLError as e:
            return _error(400, str(e))
        q = self.store.next_for(rater)
        answer = {"criteria": self.m.settings.criteria, "progress": self.store.progress(rater)}
        if q is None:
            return JSONResponse({"done": True, **answer}, headers=NO_CACHE)
        left, right = (self.m.media[q[side]]["file"] for side in ("left", "right"))
        kind = "image" if left.endswith(".png") else "video"
        question = {"question": q["id"], "prompt": self.m.settings.prompts[q["prompt"]]}
        urls = {"left": f"/media/{left}", "right": f"/media/{right}", "kind": kind}
        return JSONResponse({**question, **urls, **answer}, headers=NO_CACHE)

    async def vote(self, request: Request) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_BODY:
            return _error(400, f"body of {len(body)} bytes; allowed: up to {MAX_BODY}")
        try:
            v = json.loads(body)
            rater, qid = _rater(v.get("rater")), v.get("question")
            choices = None if v.get("skip") is True else v.get("choices")
            if choices is not None and not isinstance(choices, dict):
                raise DDRLError(f"choices {choices!r}; allowed: an object, or skip: true")
            ms = float(v.get("ms", 0))
            if not (math.isfinite(ms) and ms >= 0):
                raise DDRLError(f"ms {ms}; allowed: a time in milliseconds, 0 or more")
        except (ValueError, AttributeError, TypeError, DDRLError) as e:
            return _error(400, f"bad vote: {e}")
        if qid not in self.store.questions:
            return _error(404, f"unknown question {qid!r}")
        try:
            await run_in_threadpool(self.store.record, rater, qid, choices, ms)
        except DDRLError as e:
            return _error(409 if "already" in str(e) else 400, str(e))
        return JSONResponse({"ok": True, "progress": self.store.progress(rater)})

    def media(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.files:
            return _error(404, f"unknown media {name!r}")
        data = (self.m.root / MEDIA / name).read_bytes()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return Response(data, media_type=kind, headers={"cache-control": "private, max-age=3600"})

    async def not_found(self, request: Request, exc: Exception) -> JSONResponse:
        return _error(404, f"unknown path {request.url.path!r}")


class VoteServer(Served):
    """The page and API over the votes folder of ``manifest``, bound to ``host``:``port``
    (0 = a free one; ``url`` says which), not yet serving (``ddrl.serving.Served``)."""

    def __init__(self, manifest: Manifest, host: str = "127.0.0.1", port: int = 8765):
        self.store = VoteStore(manifest)
        try:
            app = VoteApp(self.store).starlette()
            super().__init__(app, bind(host, port), header="vote", graceful=5)
        except BaseException:
            self.store.close()
            raise

    def shutdown(self) -> None:
        super().shutdown()
        self.store.close()

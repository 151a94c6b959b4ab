"""``ddrl data get``: a published prompt set (``ddrl.data.published``) downloaded into
``<cache>/data/<set>/``.

Each file comes from ``<base>/<repo>/<commit>/<path>`` (base: ``https://raw.githubusercontent.com``
or ``$DDRL_DATA_URL``, so a mirror or a test server can stand in), is written to ``<file>.part``
(continued with an HTTP Range request after an interruption), verified (size, sha256 and git blob
id, whichever the registry knows) and renamed into place; a file already there with the right
checksum is not downloaded again. Standard library only (urllib).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from ddrl.data.published import check_set, set_folder
from ddrl.errors import DDRLError, first_line

DEFAULT_URL = "https://raw.githubusercontent.com"
CHUNK = 1 << 16


def base_url(given: str | None = None) -> str:
    return (given or os.environ.get("DDRL_DATA_URL") or DEFAULT_URL).rstrip("/")


def digests(path: Path) -> dict:
    """size, sha256 and git blob id (SHA-1 of ``b"blob <size>\\0" + content``) of a file."""
    size = path.stat().st_size
    sha256, blob = hashlib.sha256(), hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha256.update(chunk)
            blob.update(chunk)
    return {"size": size, "sha256": sha256.hexdigest(), "blob": blob.hexdigest()}


def mismatch(path: Path, entry: dict) -> str:
    """ "" when ``path`` matches every checksum ``entry`` knows, else what differs."""
    got = digests(path)
    for key in ("size", "sha256", "blob"):
        if entry.get(key) is not None and got[key] != entry[key]:
            return f"{key} {got[key]}, expected {entry[key]}"
    return ""


class _Unreachable(Exception):
    """No answer from the server (offline, refused, DNS, timeout before any byte)."""


class _NotFound(Exception):
    """The server answered 404: try the set's next source."""


def _fetch(url: str, part: Path, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (Range from its size; a server that ignores the
    Range sends it all, and the part is restarted). Raises _Unreachable, _NotFound, DDRLError
    (HTTP errors) or OSError / http.client errors (the connection dropped mid-file)."""
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "ddrl"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the part is already whole (or longer): verified next
            return
        if e.code == 404:
            raise _NotFound(url) from None
        raise DDRLError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
        raise _Unreachable(first_line(getattr(e, "reason", e) or e)) from None
    with resp:
        mode = "ab" if offset and resp.status == 206 else "wb"
        with open(part, mode) as f:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
        length = resp.headers.get("Content-Length")
        if length is not None and part.stat().st_size < int(length) + (
            offset if mode == "ab" else 0
        ):
            raise http.client.IncompleteRead(b"", int(length))


def _download(link: str, part: Path, retries: int, timeout: float, log) -> None:
    """``link`` into ``part``, continued after each interruption (at most ``retries`` times)."""
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        try:
            return _fetch(link, part, timeout)
        except (_NotFound, _Unreachable, DDRLError):
            raise
        except (OSError, http.client.HTTPException) as e:  # the connection dropped mid-file
            done = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise DDRLError(
                    f"download of {link} interrupted after {done} bytes ({first_line(e)}); "
                    f"run the same command again to continue from {part}"
                ) from None
            if done <= have:  # no progress this time: start over rather than loop
                part.unlink(missing_ok=True)
                done = 0
            log(f"{link}: interrupted; continuing from byte {done}")


def get_file(
    name: str,
    file: str,
    cache_dir: str = "",
    url: str | None = None,
    retries: int = 3,
    timeout: float = 30.0,
    log=print,
) -> Path:
    """One file of set ``name`` in the cache, downloaded (resumed, verified, renamed into place)
    unless it is there with the right checksum. One-line DDRLError when it cannot be had."""
    entry = check_set(name)
    spec = entry["files"][file]
    folder = set_folder(name, cache_dir)
    dest, part = folder / file, folder / f"{file}.part"
    if dest.is_file():
        if not (why := mismatch(dest, spec)):
            log(f"{dest}: present, checksum verified")
            return dest
        log(f"{dest}: wrong checksum ({why}); downloading it again")
        dest.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    sources = list(entry["sources"])
    for i, (repo, commit) in enumerate(sources):
        link = f"{base_url(url)}/{repo}/{commit}/{spec['path']}"
        try:
            _download(link, part, retries, timeout, log)
        except _NotFound:
            part.unlink(missing_ok=True)
            if i + 1 < len(sources):
                log(f"{link}: not found (HTTP 404); trying {sources[i + 1][0]}")
                continue
            raise DDRLError(f"download of {link} failed: HTTP 404 (not found)") from None
        except _Unreachable as e:
            raise DDRLError(
                f"cannot reach {link} ({e}); offline? copy {spec['path']} of github.com/{repo} "
                f"(commit {commit[:12]}) by hand to {dest}"
            ) from None
        break
    if why := mismatch(part, spec):
        part.unlink()
        raise DDRLError(
            f"checksum mismatch for {link}: {why}; the partial download was deleted (run "
            f"again, or copy the file by hand to {dest})"
        )
    os.replace(part, dest)  # atomic: the file is whole or absent
    if spec.get("sha256") is None:
        sha = digests(dest)["sha256"]
        log(f"{dest}: downloaded, verified by git blob id {spec['blob'][:12]} (sha256 {sha})")
    else:
        log(f"{dest}: downloaded, sha256 verified")
    return dest


def get_set(name: str, cache_dir: str = "", url: str | None = None, log=print) -> Path:
    """Every file of published set ``name`` into ``<cache>/data/<name>/``; returns the folder."""
    for file in check_set(name)["files"]:
        get_file(name, file, cache_dir, url, log=log)
    return set_folder(name, cache_dir)

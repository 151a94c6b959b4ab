"""Real data encoded once: the VAE latents of ``data.images``, cached on disk.

``cache_dir/latents/<key>/`` holds ``latents.safetensors`` (the pool in ``save_pool``'s format:
tensor ``x`` [N, *latent shape] and the captions as metadata, so ``load_pool`` reads it too) and
``manifest.json`` (source files with size and mtime, captions, resolution, frames, codec id,
shape, the latents file's SHA-256, creation time). ``key`` hashes the source listing (relative
paths, sizes, mtimes, captions), resolution, frames and codec id, so changing any of them (a
file edited, added or removed; another VAE) encodes afresh into a new folder. A cache folder is
written under a temporary name and renamed into place: a killed run leaves no half cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddrl.data import files, media
from ddrl.data.config import DataConfig
from ddrl.data.pool_io import load_pool, save_pool
from ddrl.data.pools import PairedPool
from ddrl.errors import DDRLError
from ddrl.io import remove_stale_tmp, sha256

CACHE_VERSION = 1  # bump when the encoding (reading, resizing) changes


def _stat(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def source_listing(items: list[files.Item]) -> list[dict]:
    """What identifies each item without opening it: relative name, size and mtime (of every
    frame for a frames folder; of the table for embedded bytes), caption."""
    out = []
    for it in items:
        entry = {"path": it.name, "caption": it.caption}
        if it.kind == "frames":
            entry["frames"] = [[f.name, *_stat(f)] for f in files.frame_files(it.path)]
        else:
            entry["size"], entry["mtime_ns"] = _stat(it.path)
            if it.row >= 0:
                entry["row"] = it.row
        out.append(entry)
    return out


def cache_key(listing: list[dict], resolution, frames: int, codec_id: str) -> str:
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "files": listing,
            "resolution": resolution,
            "frames": frames,
            "codec_id": codec_id,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _read_cache(folder: Path, key: str, log) -> PairedPool | None:
    manifest, data = folder / "manifest.json", folder / "latents.safetensors"
    if not (manifest.is_file() and data.is_file()):
        return None
    try:
        meta = json.loads(manifest.read_text())
        if meta.get("key") != key or meta.get("sha256") != sha256(data):
            raise ValueError("key or checksum mismatch")
        pool = load_pool(data)
    except (OSError, ValueError, DDRLError) as e:
        log(f"latent cache {folder} is unusable ({e}); encoding again")
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return pool


@torch.no_grad()
def latent_pool(
    cfg: DataConfig,
    codec,
    codec_id: str,
    resolution,
    frames: int,
    cache_dir: Path,
    log=print,
    batch: int = 8,
) -> PairedPool:
    """The real data ``cfg.images`` as a model-space pool: latents [N, ...] = ``codec.encode``
    of each item ([3, H, W] images if ``frames`` = 0, else [3, F, H, W] videos, in [-1, 1];
    ``resolution``: int or (height, width)) paired with its caption. Encoded once, in chunks of
    ``batch``, then read from ``cache_dir/latents/<key>/`` without opening any image.
    ``codec_id`` must name the codec exactly (model, revision, VAE dtype): it is part of the key.
    """
    if not cfg.images:
        raise DDRLError(
            "data.source='real' needs data.images (an image/video-caption folder or a "
            ".jsonl/.csv/.parquet table); or set data.source=synthetic"
        )
    if batch < 1:
        raise DDRLError(f"latent encoding batch={batch} must be at least 1")
    items = files.list_items(cfg.images)
    listing = source_listing(items)
    res = resolution if isinstance(resolution, int) else list(resolution)
    key = cache_key(listing, res, frames, codec_id)
    root = Path(cache_dir) / "latents"
    folder = root / key
    pool = _read_cache(folder, key, log)
    if pool is not None:
        log(f"{len(pool)} latents of {cfg.images} from the cache {folder}")
        return pool

    log(f"encoding {len(items)} items of {cfg.images} with {codec_id} (once; cached in {folder})")
    out, buf = [], []
    bar = tqdm(total=len(items), desc="encoding", unit="item", disable=None)
    try:
        for i, it in enumerate(items):
            buf.append(media.load_media(it, resolution, frames))
            if len(buf) == batch or i == len(items) - 1:
                z = codec.encode(torch.stack(buf))
                out.append(z.detach().float().cpu())
                bar.update(len(buf))
                buf = []
    finally:
        bar.close()
    x = torch.cat(out).contiguous()
    captions = [it.caption for it in items]
    pool = PairedPool(x, captions)

    root.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(root, ".tmp-")
    tmp = root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_pool(pool, tmp / "latents.safetensors")
    manifest = {
        "version": CACHE_VERSION,
        "key": key,
        "source": str(Path(os.path.expanduser(cfg.images)).resolve()),
        "files": listing,
        "captions": captions,
        "resolution": res,
        "frames": frames,
        "codec_id": codec_id,
        "shape": list(x.shape),
        "dtype": str(x.dtype).removeprefix("torch."),
        "sha256": sha256(tmp / "latents.safetensors"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same cache first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(Exception):
            cached = _read_cache(folder, key, log)
            if cached is not None:
                return cached
    log(f"cached {tuple(x.shape)} latents in {folder}")
    return pool

"""Synthetic regulariser data: samples generated once from the base model before RL.

The paper reports that DDRL's data term works with synthetic data (its SD3.5 setting). A pool
is stored as one safetensors file: the samples (model space) as tensor ``x``, the per-sample
noise seeds as ``seeds`` (synthesized pools), and their text prompts as JSON in the file's
metadata, so any prompt set fits.

``synthesize`` writes the pool in shards (``<out>.shards/``, one atomic safetensors per chunk
plus a manifest), so an interrupted run resumes where it stopped; the noise of sample i depends
only on (seed, i), never on chunking or on where a run was interrupted. When every shard is
there they are combined into ``out`` (what ``load_pool`` reads) and the shards are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from ddrl.data.pool_io import load_pool
from ddrl.data.pools import PairedPool
from ddrl.errors import DDRLError
from ddrl.io import fingerprint, remove_stale_tmp, save_file_atomic
from ddrl.models.base import decode_images
from ddrl.sampling import ode_solve, time_grid

SYNTH_VERSION = 1  # bump when the seeding or the sample → pool steps change
_SHARD = re.compile(r"shard-(\d{9})-(\d{9})\.safetensors")


def sample_seed(seed: int, i: int) -> int:
    """The seed of sample i's initial noise: a function of (seed, i) only."""
    h = hashlib.sha256(f"ddrl-synth:{seed}:{i}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def sample_noise(shape: tuple[int, ...], seeds: list[int]) -> Tensor:
    """ε [len(seeds), *shape] (float32, CPU), row k drawn from its own generator ``seeds[k]``."""
    return torch.stack(
        [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def _samples(gen, prompts: list[str], seeds: list[int], sampler_cfg, device) -> Tensor:
    """Pool rows for (prompt, seed) pairs: ODE sample → decode → clamp to the codec's range →
    re-encode, so a row holds what a real image would encode to. Float32 on the CPU."""
    z = ode_solve(gen, sample_noise(gen.sample_shape, seeds), prompts, sampler_cfg, device)
    return gen.codec.encode(decode_images(gen.codec, z)).detach().float().cpu()


def generate_pool(
    gen, prompts: list[str], per_prompt: int, sampler_cfg, seed: int, device="cpu", chunk=512
):
    """``per_prompt`` ODE samples of the base for every prompt, in memory: PairedPool [P·n, ...]
    in model space, the same samples as ``synthesize`` (up to float rounding across chunk
    sizes). Samples are decoded, clamped to the codec's valid range and re-encoded, so the
    pool holds what a real image would encode to (for digits: pixels in [-1, 1])."""
    rep = [p for p in prompts for _ in range(per_prompt)]
    seeds = [sample_seed(seed, i) for i in range(len(rep))]
    xs = [
        _samples(gen, rep[s : s + chunk], seeds[s : s + chunk], sampler_cfg, device)
        for s in range(0, len(rep), chunk)
    ]
    return PairedPool(torch.cat(xs), rep)


def _identity(gen, prompts, per_prompt, sampler_cfg, seed, model_id) -> tuple[str, dict]:
    info = {
        "version": SYNTH_VERSION,
        "prompts": list(prompts),
        "per_prompt": per_prompt,
        "seed": seed,
        "sample_shape": list(gen.sample_shape),
        "grid": [float(t) for t in time_grid(sampler_cfg, gen, sampler_cfg.eval_steps).tolist()],
        "cfg_scale": float(sampler_cfg.cfg_scale),
        "model": model_id or fingerprint(gen.denoiser),
    }
    blob = json.dumps(info, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:20], info


def _metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError):
        return {}


def _valid_shards(folder: Path, identity: str, log) -> dict[int, tuple[int, Path]]:
    """start → (end, path) of the complete shards of this identity; drops broken ones."""
    found = {}
    for p in sorted(folder.glob("shard-*.safetensors")):
        m = _SHARD.fullmatch(p.name)
        if not m:
            continue
        start, end = int(m.group(1)), int(m.group(2))
        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
                rows = f.get_slice("x").get_shape()[0], f.get_slice("seeds").get_shape()[0]
            ok = meta.get("identity") == identity and rows == (end - start, end - start)
        except (SafetensorError, OSError, KeyError):
            ok = False
        if ok and end > start:
            found[start] = (end, p)
        else:
            log(f"dropping unusable shard {p}")
            p.unlink(missing_ok=True)
    return found


def synthesize(
    gen,
    prompts: list[str],
    per_prompt: int,
    sampler_cfg,
    seed: int,
    out: Path,
    chunk: int = 16,
    device="cpu",
    progress: bool = True,
    log=print,
    model_id: str | None = None,
    on_shard: Callable[[int, int], None] | None = None,
) -> PairedPool:
    """The synthetic regulariser set: ``per_prompt`` ODE samples of ``gen`` for every prompt
    (rows prompt-major: p0 × n, p1 × n, …), written to ``out`` (``load_pool`` reads it).

    Sample i starts from noise seeded by ``sample_seed(seed, i)`` (stored as ``seeds``), so the
    set does not depend on ``chunk`` (rows per ODE batch and per shard) beyond float rounding of
    batched kernels, and a resumed run equals an uninterrupted one with the same ``chunk`` bit
    for bit. Shards live in ``<out>.shards/`` until all are done; a rerun skips every shard
    already written (and returns ``out`` at once if it is already complete). ``model_id``
    identifies the base model in the resume check (default: a hash of the denoiser's weights;
    pass the base path/hub id + revision for large models to skip hashing). ``on_shard(done,
    total)`` is called after each shard is written.
    """
    if not prompts:
        raise DDRLError("synthesize needs at least one prompt")
    if per_prompt < 1:
        raise DDRLError(f"per_prompt={per_prompt} must be at least 1")
    if chunk < 1:
        raise DDRLError(f"chunk={chunk} must be at least 1")
    out = Path(out)
    if out.is_dir():
        raise DDRLError(f"synthetic output {out} is a folder; allowed: a .safetensors file path")
    identity, info = _identity(gen, prompts, per_prompt, sampler_cfg, seed, model_id)
    rep = [p for p in prompts for _ in range(per_prompt)]
    n = len(rep)
    if out.is_file() and _metadata(out).get("identity") == identity:
        log(f"synthetic set {out} is already complete ({n} samples)")
        return load_pool(out)

    shards = out.with_name(out.name + ".shards")
    manifest = shards / "manifest.json"
    if shards.is_dir():
        try:
            same = json.loads(manifest.read_text()).get("identity") == identity
        except (OSError, ValueError):
            same = False
        if not same:
            log(f"discarding {shards}: shards of a different model, prompt set or seed")
            shutil.rmtree(shards)
    shards.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(shards, ".")
    if not manifest.is_file():
        body = {
            "identity": identity,
            "n": n,
            **info,
            "chunk": chunk,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        tmp = shards / f".manifest.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(body, indent=1, ensure_ascii=False))
        tmp.replace(manifest)

    have = _valid_shards(shards, identity, log)
    plan, i = [], 0  # (start, end, existing path or None), covering 0..n
    while i < n:
        if i in have:
            end, path = have[i]
            plan.append((i, end, path))
        else:
            end = min([i + chunk, n, *[s for s in have if s > i]])
            plan.append((i, end, None))
        i = end
    done = sum(e - s for s, e, p in plan if p is not None)
    if done:
        log(f"resuming {out}: {done}/{n} samples already in {shards}")
    else:
        log(f"synthesizing {n} samples ({len(prompts)} prompts × {per_prompt}) into {out}")
    bar = tqdm(total=n, initial=done, desc="synth", unit="sample", disable=not progress)
    try:
        for k, (s, e, path) in enumerate(plan):
            if path is not None:
                continue
            seeds = [sample_seed(seed, j) for j in range(s, e)]
            x = _samples(gen, rep[s:e], seeds, sampler_cfg, device)
            path = shards / f"shard-{s:09d}-{e:09d}.safetensors"
            meta = {"identity": identity, "prompts": json.dumps(rep[s:e])}
            save_file_atomic(
                {"x": x.contiguous(), "seeds": torch.tensor(seeds, dtype=torch.int64)}, path, meta
            )
            plan[k] = (s, e, path)
            done += e - s
            bar.update(e - s)
            if on_shard is not None:
                on_shard(done, n)
    finally:
        bar.close()

    parts = [load_file(path) for _, _, path in plan]
    x = torch.cat([p["x"] for p in parts])
    seeds = torch.cat([p["seeds"] for p in parts])
    if seeds.tolist() != [sample_seed(seed, j) for j in range(n)]:  # never expected
        raise DDRLError(f"shards in {shards} do not line up; delete the folder and rerun")
    meta = {
        "prompts": json.dumps(rep),
        "identity": identity,
        "seed": str(seed),
        "per_prompt": str(per_prompt),
        "format": f"ddrl-synthetic-v{SYNTH_VERSION}",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file_atomic({"x": x.contiguous(), "seeds": seeds}, out, meta)
    shutil.rmtree(shards, ignore_errors=True)
    log(f"wrote {n} synthetic samples to {out}")
    return PairedPool(x, rep)

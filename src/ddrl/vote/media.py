"""The samples a vote shows: each run's samples for the same prompts and the same noise, written
under opaque random names, and what identifies a run's weights.

A run is a finished run folder (its ``final/`` weights, sampled with its own config.json) or a
model folder (``generator.json``, or a diffusers pipeline's ``model_index.json``), loaded and
drawn by ``ddrl.training.saved`` exactly as ``ddrl sample`` draws them: sample j of a prompt
starts from the same noise in every run (the seed's draw, prompt-major), so the two sides of a
question differ by the model only. Images are PNG, videos mp4 (an animated GIF without
imageio-ffmpeg). A file's name is 16 random hexadecimal digits: it says nothing of its run, its
prompt or the order it was rendered in.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import torch

from ddrl.data.files import load_prompts
from ddrl.data.pools import load_data
from ddrl.errors import DDRLError
from ddrl.training.components import device_of
from ddrl.training.saved import draw, load_for_sampling, sample_config, save_sample


def weights_folder(run: Path) -> Path:
    """The folder whose files are RUN's weights: a run's ``final/``, or the model folder."""
    if (run / "config.json").is_file():
        if not (run / "final").is_dir():
            raise DDRLError(
                f"{run} has no final/ (an unfinished run); allowed: a finished run folder or a "
                "model folder"
            )
        return run / "final"
    if (run / "generator.json").is_file() or (run / "model_index.json").is_file():
        return run
    raise DDRLError(
        f"{run} is not a run folder (config.json) or a model folder (generator.json, "
        "model_index.json)"
    )


def weights_stamp(run: Path) -> str:
    """A digest of the name, size and modification time of every file of RUN's weights: a run
    trained again (or a model folder replaced) gets another stamp."""
    folder = weights_folder(run)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(folder).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def run_labels(runs: list[Path]) -> list[str]:
    """A short, distinct name per run for votes.jsonl and the summary: the folder's name, or
    with its parent's where two runs share a name."""
    names = [r.name or str(r) for r in runs]
    longer = [f"{r.parent.name}/{r.name}" for r in runs]
    labels = [longer[i] if names.count(n) > 1 else n for i, n in enumerate(names)]
    if len(set(labels)) < len(labels):
        return [str(r) for r in runs]
    return labels


def file_prompts(path: str | Path) -> list[str]:
    """The prompts of a prompt file (any format ``data.prompts`` reads), each once, in order."""
    return list(dict.fromkeys(row["prompt"] for row in load_prompts(path)))


def run_prompts(run: Path) -> list[str]:
    """RUN's evaluation prompts (``data.eval_prompts``, else its training prompts), each once,
    in order."""
    try:
        data = load_data(sample_config(run, (), "ddrl vote").data)
    except DDRLError as e:
        raise DDRLError(f"the prompts of {run}: {e} (or give --prompts FILE)") from None
    return list(dict.fromkeys(data.eval_prompts or data.prompts))


def render_run(
    run: Path, prompts: list[str], n: int, seed: int, media: Path, index: int
) -> dict[str, dict]:
    """Draw ``n`` samples per prompt of RUN from ``seed`` into the folder ``media``; returns
    media id → {"run": ``index``, "prompt": i, "sample": j, "file": name}."""
    cfg = sample_config(run, (), "ddrl vote")
    dev = device_of(cfg)
    gen = load_for_sampling(run, None).to(dev)
    if getattr(gen, "needs_condition_images", False):
        raise DDRLError(
            f"{run} edits a given image per prompt; ddrl vote renders text prompts only"
        )
    x = draw(gen, cfg, prompts, n, seed, dev)
    del gen
    if dev != "cpu":
        torch.cuda.empty_cache()  # the next run's model loads into the same memory
    if x.dim() == 2:
        raise DDRLError(f"{run} draws 2-D points; ddrl vote shows images or videos")
    media.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, sample in enumerate(x):
        media_id = secrets.token_hex(8)
        path = save_sample(sample, media / media_id)
        out[media_id] = {"run": index, "prompt": k // n, "sample": k % n, "file": path.name}
    return out

"""Votes folders built by hand (no model, no torch): a manifest over small PNGs, for the tests
of the vote's statistics, its store and its page (``ddrl.vote``)."""

import secrets
from pathlib import Path

from PIL import Image

from ddrl.vote.folder import MEDIA, Manifest, Settings


def hand_folder(
    root: Path,
    labels: list[str],
    prompts: list[str],
    n: int = 1,
    criteria: tuple[str, ...] = ("overall",),
    raters: int = 2,
    seed: int = 0,
) -> Manifest:
    """A votes folder at ``root`` for runs named ``labels``: one 64 × 64 PNG per (run, prompt,
    sample), grey levels apart, and the plan of every (run pair, prompt, sample)."""
    (root / MEDIA).mkdir(parents=True)
    settings = Settings(list(prompts), n, seed, list(criteria), None, raters)
    runs = [{"label": x, "path": f"/nowhere/{x}", "stamp": "0"} for x in labels]
    m = Manifest(root, settings, runs, {})
    for r in range(len(labels)):
        for p in range(len(prompts)):
            for s in range(n):
                media_id = secrets.token_hex(8)
                grey = 40 + 50 * r + 7 * p + 3 * s
                Image.new("L", (64, 64), grey).save(root / MEDIA / f"{media_id}.png")
                m.media[media_id] = {"run": r, "prompt": p, "sample": s, "file": f"{media_id}.png"}
    m.make_plan()
    m.save()
    return m

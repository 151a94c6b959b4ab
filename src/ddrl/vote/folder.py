"""A votes folder's layout and manifest (no torch: the summary and the server read it).

``VOTES/manifest.json`` (never served) holds the settings, the runs (label, path, weights
stamp), every media id → (run, prompt, sample, file) and the plan's questions (opaque id, the
two runs, prompt, sample, left and right media ids). ``VOTES/media/`` holds the samples
(``ddrl.vote.media``), ``VOTES/votes.jsonl`` the votes (``ddrl.vote.store``); the folder is
made or continued by ``ddrl.vote.prepare``.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ddrl.errors import DDRLError
from ddrl.vote.plan import balanced_plan

MANIFEST, MEDIA, VOTES = "manifest.json", "media", "votes.jsonl"
VERSION = 1


@dataclass
class Settings:
    """What a votes folder was made with (``None``: not given; the folder's own, else the
    default)."""

    prompts: list[str] | None = None
    n_per_prompt: int | None = None
    seed: int | None = None
    criteria: list[str] | None = None
    pairs: int | None = None  # questions in the plan; None = every (run pair, prompt, sample)
    raters_per_question: int | None = None


DEFAULTS = Settings(n_per_prompt=2, seed=0, criteria=["overall"], raters_per_question=2)


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of the folder ``root``."""

    root: Path
    settings: Settings
    runs: list[dict]  # {"label", "path", "stamp"}
    media: dict[str, dict]  # media id → {"run", "prompt", "sample", "file"}
    questions: list[dict] = field(default_factory=list)  # plan order

    @classmethod
    def load(cls, root: Path) -> Manifest:
        if not (root / MANIFEST).is_file():
            raise DDRLError(f"{root} is not a votes folder (no {MANIFEST})")
        try:
            m = json.loads((root / MANIFEST).read_text())
            return cls(root, Settings(**m["settings"]), m["runs"], m["media"], m["questions"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DDRLError(f"{root / MANIFEST} is not a votes manifest: {e}") from None

    def save(self, root: Path | None = None) -> None:
        """Write manifest.json (under ``root``, default its own folder) whole."""
        path = (root or self.root) / MANIFEST
        doc = {
            "version": VERSION,
            "settings": asdict(self.settings),
            "runs": self.runs,
            "media": self.media,
            "questions": self.questions,
        }
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)

    def make_plan(self) -> None:
        """The questions of the settings' plan, each with a new opaque id."""
        s = self.settings
        where = {(m["run"], m["prompt"], m["sample"]): i for i, m in self.media.items()}
        plan = balanced_plan(len(self.runs), len(s.prompts), s.n_per_prompt, s.seed, s.pairs)
        self.questions = [
            {
                "id": secrets.token_hex(8),
                "pair": list(q.pair),
                "prompt": q.prompt,
                "sample": q.sample,
                "left": where[(q.left, q.prompt, q.sample)],
                "right": where[(q.right, q.prompt, q.sample)],
            }
            for q in plan
        ]

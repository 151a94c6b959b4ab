"""Backbones, looked up by name; "module:attr" names a user class with ``from_pretrained``."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DDRLError, lookup
from .base import Backbone, Cond, cond_cat, cond_index, guided_velocity
from .digits import DigitsBackbone
from .toy2d import Toy2DBackbone

BACKBONES = {"digits": DigitsBackbone, "toy2d": Toy2DBackbone}

__all__ = [
    "BACKBONES",
    "Backbone",
    "Cond",
    "cond_cat",
    "cond_index",
    "guided_velocity",
    "load_backbone",
    "resolve",
]


def resolve(name: str):
    """A registered name, or "package.module:Attr" for a user plugin."""
    return lookup("backbone", name, BACKBONES)


def load_backbone(path: str | Path) -> Backbone:
    """Load any saved backbone; its backbone.json names the type."""
    path = Path(path)
    meta_path = path / "backbone.json"
    if not meta_path.is_file():
        raise DDRLError(f"no backbone at {path} (missing backbone.json)")
    try:
        kind = json.loads(meta_path.read_text())["type"]
    except (json.JSONDecodeError, KeyError) as e:
        raise DDRLError(f"corrupt {meta_path}: {e}") from e
    return resolve(kind).from_pretrained(path)

"""``ddrl config``: every key of a resolved config with its type, value, default and help, read
from the fields' own metadata."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from ddrl.errors import choices


def _type_name(t: Any) -> str:
    if (allowed := choices(t)) is not None:
        return " | ".join(allowed)
    return t.__name__ if isinstance(t, type) else str(t).replace("typing.", "")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def describe(cfg: Any, prefix: str = "") -> str:
    """Every key of a resolved config, one per line: ``key: type = value (default d)  # help``
    (the default shown only where the preset, algorithm or overrides changed it; a ``Literal``
    type shown as its choices, ``a | b``)."""
    lines = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):  # a section: its runtime class (loss, sde vary)
            lines.append(describe(value, f"{prefix}{f.name}."))
            continue
        line = f"{prefix}{f.name}: {_type_name(hints[f.name])} = {json.dumps(value)}"
        default = _default(f)
        if default != value and not (isinstance(default, tuple) and list(default) == value):
            line += f" (default {json.dumps(default)})"
        if f.metadata.get("help"):
            line += f"  # {f.metadata['help']}"
        lines.append(line)
    return "\n".join(lines)

"""One exception type for everything the user can get wrong.

The CLI catches :class:`DDRLError` and prints its message on one line (exit code 2), so every
bad name, value, path or checkpoint must be reported through it rather than a deep traceback.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


class DDRLError(ValueError):
    """A user-facing error: its message names the bad value and what is allowed."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error quotes of a library's multi-line message."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_choice(what: str, value: str, allowed) -> None:
    """Raise DDRLError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise DDRLError(f"unknown {what} {value!r}; allowed: {', '.join(sorted(allowed))}")


def choices(annotation: Any) -> tuple[str, ...] | None:
    """The allowed values of a ``Literal[...]`` annotation (None for any other type)."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None


def check_literals(cfg: Any, prefix: str = "") -> None:
    """Every ``Literal`` field of ``cfg`` and its sections holds one of its choices (a value
    set in code, not parsed, is checked here too)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_literals(value, f"{prefix}{f.name}.")
        elif (allowed := choices(hints[f.name])) is not None:
            check_choice(prefix + f.name, value, allowed)


def lookup(kind: str, name: str, table: dict, allowed: list[str] | None = None):
    """``table[name]`` for a registered name, else the attribute named by "package.module:attr"
    (the plugin escape hatch); DDRLError naming the allowed names otherwise."""
    allowed = list(table) if allowed is None else allowed
    if name in allowed:
        return table[name]
    if ":" in name:
        import importlib

        mod, attr = name.split(":", 1)
        # importlib rejects "", ".rel" and "a..b" with ValueError/TypeError: say so plainly.
        if not all(p.isidentifier() for p in mod.split(".")) or not attr.isidentifier():
            raise DDRLError(
                f"{kind} {name!r} is not 'package.module:attr' (an absolute module path and an "
                f"attribute name); allowed: {', '.join(allowed)} or 'module:attr'"
            )
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise DDRLError(f"cannot import {kind} {name!r}: {e}") from e
    raise DDRLError(f"unknown {kind} {name!r}; allowed: {', '.join(allowed)} or 'module:attr'")


def check_range(what: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """Raise DDRLError unless lo <= value <= hi (either bound may be None); NaN never passes."""
    if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        raise DDRLError(f"{what}={value!r} is out of range; allowed: [{lo_s}, {hi_s}]")


class WatchStopped(Exception):
    """A ``stop`` rule of the watch fired: the iteration was finished and checkpointed. The CLI
    exits 3 with ``reason`` on one line."""

    def __init__(self, reason: str, checkpoint):
        super().__init__(reason)
        self.reason, self.checkpoint = reason, checkpoint


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived and the loop stopped after checkpointing the iteration in progress.

    A KeyboardInterrupt, so whatever handles Ctrl-C handles it too; the CLI exits 143 (128 +
    SIGTERM) naming ``checkpoint``."""

    def __init__(self, checkpoint):
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint

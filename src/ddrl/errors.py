"""One exception type for everything the user can get wrong.

The CLI catches :class:`DDRLError` and prints its message on one line (exit code 2), so every
bad name, value, path or checkpoint must be reported through it rather than a deep traceback.
"""

from __future__ import annotations


class DDRLError(ValueError):
    """A user-facing error: its message names the bad value and what is allowed."""


def check_choice(what: str, value: str, allowed) -> None:
    """Raise DDRLError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise DDRLError(f"unknown {what} {value!r}; allowed: {', '.join(sorted(allowed))}")


def check_range(what: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """Raise DDRLError unless lo <= value <= hi (either bound may be None); NaN never passes."""
    if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        raise DDRLError(f"{what}={value!r} is out of range; allowed: [{lo_s}, {hi_s}]")

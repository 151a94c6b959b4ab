"""What the commands share: arguments resolved into a checked config, and who speaks."""

from __future__ import annotations

import os
import sys

from ddrl.config import RunConfig, build_config


def resolve_args(args, extra: list[str] = ()) -> RunConfig:
    """``--config`` files, ``--preset`` and ``key=value`` overrides (after ``extra``), resolved."""
    preset = [f"preset={args.preset}"] if getattr(args, "preset", "") else []
    return build_config(args.config, preset + list(extra) + list(args.overrides))


def say(*lines: str) -> None:
    """Print to stderr from the process that speaks for the run: the only one, or torchrun's
    rank 0 (the other ranks stay quiet; read before any process group is joined)."""
    if os.environ.get("RANK", "0") == "0":
        print(*lines, file=sys.stderr)

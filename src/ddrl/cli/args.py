"""What every config-taking command shares: its arguments resolved into a checked config."""

from __future__ import annotations

from ddrl.config import RunConfig, build_config


def resolve_args(args, extra: list[str] = ()) -> RunConfig:
    """``--config`` files, ``--preset`` and ``key=value`` overrides (after ``extra``), resolved."""
    preset = [f"preset={args.preset}"] if getattr(args, "preset", "") else []
    return build_config(args.config, preset + list(extra) + list(args.overrides))

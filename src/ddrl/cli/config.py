"""`ddrl config` (every key: type, value, default, help) and `ddrl presets`. Torch-free: both
answer at once."""

from __future__ import annotations

from ddrl.cli.args import resolve_args
from ddrl.config import describe, preset_descriptions


def cmd_config(args) -> None:
    print(describe(resolve_args(args)))


def cmd_presets(args) -> None:
    items = preset_descriptions().items()
    width = max(len(n) for n, _ in items)
    for name, text in items:
        print(f"{name:<{width}}  {text}")

"""`ddrl config` (every key: type, value, default, help) and `ddrl presets`. Torch-free: both
answer at once."""

from __future__ import annotations

from ddrl.cli.args import resolve_args, say
from ddrl.config import describe, preset_descriptions
from ddrl.data.published import check_refs


def cmd_config(args) -> None:
    cfg = resolve_args(args)
    check_refs(cfg.data)  # data:<set>/<file> names a published set and file
    print(describe(cfg))
    for line in cfg.data.missing():  # shown, not refused: train, synth and eval need them
        say(f"ddrl: note: {line}")


def cmd_presets(args) -> None:
    items = preset_descriptions().items()
    width = max(len(n) for n, _ in items)
    for name, text in items:
        print(f"{name:<{width}}  {text}")

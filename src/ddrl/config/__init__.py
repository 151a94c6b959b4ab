"""The run configuration: typed sections owned by their components (``schema``), resolved from
defaults, presets, files and overrides (``resolve``), described key by key (``describe``).
Nothing here imports torch, so every config error answers at once."""

from ddrl.config.describe import describe
from ddrl.config.resolve import (
    build_config,
    load_config,
    preset_descriptions,
    save_config,
    set_key,
    to_dict,
)
from ddrl.config.schema import PRESET_NAMES, RunConfig

__all__ = [
    "PRESET_NAMES",
    "RunConfig",
    "build_config",
    "describe",
    "load_config",
    "preset_descriptions",
    "save_config",
    "set_key",
    "to_dict",
]

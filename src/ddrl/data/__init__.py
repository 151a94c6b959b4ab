"""Data sets by name (embedded ones, or ``files``: a user's own prompts and image/video-caption
data), real data encoded once into cached latents, and synthetic pools generated once from the
base model."""

from __future__ import annotations

from ddrl.data.base import DataConfig, PairedPool, TaskData
from ddrl.data.digits import digits_data
from ddrl.data.files import files_data, list_items, load_prompts
from ddrl.data.latents import latent_pool
from ddrl.data.media import read_items
from ddrl.data.toy2d import toy2d_data
from ddrl.errors import DDRLError, check_choice

DATASETS = {"digits": digits_data, "toy2d": toy2d_data}  # embedded: name → loader()
DATA_NAMES = (*DATASETS, "files")  # every allowed data.name

__all__ = [
    "DATASETS",
    "DATA_NAMES",
    "DataConfig",
    "PairedPool",
    "TaskData",
    "files_data",
    "latent_pool",
    "list_items",
    "load_data",
    "load_prompts",
    "read_items",
]


def load_data(data: str | DataConfig) -> TaskData:
    """The task data of an embedded set (by name or DataConfig) or of ``files`` (DataConfig)."""
    name = data if isinstance(data, str) else data.name
    check_choice("data.name", name, DATA_NAMES)
    if name == "files":
        if isinstance(data, str):
            raise DDRLError("data.name='files' needs its data.prompts/data.images settings")
        return files_data(data)
    return DATASETS[name]()

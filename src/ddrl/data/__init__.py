"""Embedded data sets by name, plus synthetic pools generated once from the base model."""

from __future__ import annotations

from ..errors import check_choice
from .base import DataConfig, PairedPool, TaskData
from .digits import digits_data
from .toy2d import toy2d_data

DATASETS = {"digits": digits_data, "toy2d": toy2d_data}

__all__ = ["DATASETS", "DataConfig", "PairedPool", "TaskData", "load_data"]


def load_data(name: str) -> TaskData:
    check_choice("data.name", name, DATASETS)
    return DATASETS[name]()

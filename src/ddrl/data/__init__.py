"""Task data by name, plus synthetic pools generated once from the reference model."""

from __future__ import annotations

from ..errors import check_choice
from .base import DataConfig, PairedPool, TaskData
from .digits import digits_data
from .toy2d import toy2d_data

TASK_DATA = {"digits": digits_data, "toy2d": toy2d_data}

__all__ = ["DataConfig", "PairedPool", "TASK_DATA", "TaskData", "load_task_data"]


def load_task_data(task: str) -> TaskData:
    check_choice("task", task, TASK_DATA)
    return TASK_DATA[task]()

"""Data sets by name: embedded ones (digits, toy2d) and ``files``, a user's own prompts and
image/video-caption data. Each loader is a "module:attr" string imported on use; the pools the
data term draws from are ``ddrl.data.pools``, real data encoded once is ``latents``, synthetic
sets generated once from the base are ``synthetic``."""

from __future__ import annotations

DATASETS = {  # data.name → "module:loader(DataConfig) -> TaskData"
    "digits": "ddrl.data.digits:digits_data",
    "toy2d": "ddrl.data.toy2d:toy2d_data",
    "files": "ddrl.data.files:files_data",
}
DATA_NAMES = tuple(DATASETS)

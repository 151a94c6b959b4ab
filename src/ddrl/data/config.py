"""The data section of a run's config (torch-free)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ddrl.data import DATA_NAMES
from ddrl.errors import DDRLError, check_choice, check_literals

TABLE_EXT = (".jsonl", ".csv", ".parquet")
PROMPT_EXT = (".txt", ".json", *TABLE_EXT)  # prompt files (data.prompts, data.eval_prompts)


@dataclass
class DataConfig:
    """The prompt set and the data the data term draws x0 from."""

    name: str = field(
        default="digits",
        metadata={
            "help": "data set: digits | toy2d (embedded) | files (your own, diffusers models)"
        },
    )
    source: Literal["real", "synthetic"] = field(
        default="real",
        metadata={"help": '"real": the task\'s training images; "synthetic": `ddrl synth` samples'},
    )
    synthetic_path: str = field(
        default="",
        metadata={"help": 'synthetic pool (.safetensors); "" = the cache default for the base'},
    )
    prompts: str = field(
        default="",
        metadata={"help": "files: training prompt file (.txt, .jsonl, .json, .csv, .parquet)"},
    )
    eval_prompts: str = field(
        default="",
        metadata={"help": 'files: held-out prompt file, same formats; "" = data.prompts'},
    )
    images: str = field(
        default="",
        metadata={
            "help": "files: real data for source=real: caption folder or .jsonl/.csv/.parquet"
        },
    )
    eval_images: str = field(
        default="",
        metadata={
            "help": "files: held-out image/video-caption set (same formats) for the held-out "
            'diffusion loss in evaluation; "" = none'
        },
    )
    condition_images: str = field(
        default="",
        metadata={
            "help": "files: one condition image per prompt (edit models; Cosmos image-to-video): "
            "a caption folder or table as data.images, whose captions are the prompts"
        },
    )
    synthetic_per_prompt: int = field(
        default=8,
        metadata={
            "help": "files: samples per prompt when the synthetic set is generated (by `ddrl "
            "synth`, or by the first `ddrl train` that needs it)"
        },
    )

    def check(self) -> None:
        check_literals(self, "data.")
        check_choice("data.name", self.name, DATA_NAMES)
        given = [
            k
            for k in ("prompts", "eval_prompts", "images", "eval_images", "condition_images")
            if getattr(self, k)
        ]
        if self.name != "files":
            if given:
                raise DDRLError(
                    f"data.{given[0]}={getattr(self, given[0])!r} needs data.name='files' "
                    f"(data.name={self.name!r} has its own prompts and data)"
                )
            return
        if self.synthetic_per_prompt < 1:
            raise DDRLError(f"data.synthetic_per_prompt={self.synthetic_per_prompt}: at least 1")
        for key in ("prompts", "eval_prompts"):
            value = getattr(self, key)
            shipped = Path(__file__).parents[1] / "presets" / "prompts" / value
            if value and not Path(os.path.expanduser(value)).exists() and shipped.is_file():
                setattr(self, key, str(shipped))  # a prompt file shipped with the presets
                value = str(shipped)
            if value and Path(value).suffix.lower() not in PROMPT_EXT:
                raise DDRLError(f"data.{key}={value!r}: allowed formats: {', '.join(PROMPT_EXT)}")
        for key in given:
            value = getattr(self, key)
            if not Path(os.path.expanduser(value)).exists():
                raise DDRLError(f"data.{key}={value!r} does not exist")
        if not self.prompts and not self.images:
            raise DDRLError("data.name='files' needs data.prompts (a prompt file) or data.images")

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
PATH_KEYS = ("prompts", "eval_prompts", "images", "eval_images", "condition_images")
SCHEME = "data:"  # data:<set>/<file>: a file of a published set (`ddrl data get <set>`)


def cache_root(configured: str = "") -> Path:
    """The cache every part of ddrl shares: ``configured`` (model.cache_dir, ``--cache``), else
    $DDRL_CACHE, else ~/.cache/ddrl."""
    return Path(configured or os.environ.get("DDRL_CACHE") or Path.home() / ".cache" / "ddrl")


def data_ref(value: str) -> tuple[str, str] | None:
    """``"data:<set>/<file>"`` → (set, file); None for a path. The names are checked against
    the registry by ``ddrl.data.published.check_refs``."""
    if not str(value).startswith(SCHEME):
        return None
    name, sep, file = str(value)[len(SCHEME) :].partition("/")
    if not name or not file or "/" in file or file in (".", ".."):
        raise DDRLError(f"{value!r} is not data:<set>/<file>, e.g. data:flow_grpo-ocr/train.txt")
    return name, file


def data_path(value: str, cache_dir: str = "") -> Path:
    """The one place a data path is resolved: ``data:<set>/<file>`` → the file in the cache
    (``<cache>/data/<set>/<file>``), any other value → that path (``~`` expanded)."""
    ref = data_ref(value)
    if ref is None:
        return Path(os.path.expanduser(str(value)))
    return cache_root(cache_dir) / "data" / ref[0] / ref[1]


def missing(key: str, value: str, cache_dir: str = "") -> str:
    """Empty when ``value`` (of config key ``key``) exists, else the one-line message naming the
    missing file and, for a published set, the ``ddrl data get`` that fetches it."""
    path = data_path(value, cache_dir)
    if path.exists():
        return ""
    ref = data_ref(value)
    if ref is None:
        return f"{key}={value!r} does not exist"
    get = f"ddrl data get {ref[0]}" + (f" --cache {cache_dir}" if cache_dir else "")
    return f"{key}={value!r}: {path} is missing; fetch it with: {get}"


@dataclass
class DataConfig:
    """The prompt set and the data the data term draws x0 from."""

    # Not a config key: where data:<set>/<file> is looked up, model.cache_dir (RunConfig.check
    # sets it; "" = $DDRL_CACHE or ~/.cache/ddrl).
    _cache_dir = ""

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
        for key in ("prompts", "eval_prompts", "condition_images"):
            value = getattr(self, key)
            shipped = Path(__file__).parents[1] / "presets" / "prompts" / value
            published = data_ref(value)  # data:<set>/<file>: its form checked here
            if not published and value and not data_path(value).exists() and shipped.exists():
                setattr(self, key, str(shipped))  # a file or folder shipped with the presets
                value = str(shipped)
            if key == "condition_images":
                continue
            if value and Path(value).suffix.lower() not in PROMPT_EXT:
                raise DDRLError(f"data.{key}={value!r}: allowed formats: {', '.join(PROMPT_EXT)}")
        for key in given:  # whether the files exist: missing(), asked by train, synth and eval
            if key not in ("prompts", "eval_prompts") and data_ref(getattr(self, key)):
                raise DDRLError(
                    f"data.{key}={getattr(self, key)!r}: data:<set>/<file> names a published "
                    "prompt file; allowed for data.prompts and data.eval_prompts"
                )
        if not (self.prompts or self.images or self.condition_images):
            raise DDRLError(
                "data.name='files' needs data.prompts (a prompt file), data.images or "
                "data.condition_images (whose captions are then the prompts)"
            )

    def missing(self) -> list[str]:
        """One line per file this config names that is not there, each naming the file (and
        for a published set the ``ddrl data get`` that fetches it); [] when all are."""
        if self.name != "files":
            return []
        keys = [k for k in PATH_KEYS if getattr(self, k, "")]
        return [m for k in keys if (m := missing(f"data.{k}", getattr(self, k), self._cache_dir))]

    def require(self) -> None:
        """Before any work (train, synth, eval): a one-line error for the first missing file."""
        if gone := self.missing():
            others = ", ".join(m.split("=", 1)[0] for m in gone[1:])
            raise DDRLError(gone[0] + (f" (also missing: {others})" if others else ""))

    def file(self, key: str) -> Path:
        """``data.<key>`` resolved (``data:<set>/<file>`` → the file in the cache), or the
        one-line missing-file error."""
        value = getattr(self, key)
        if message := missing(f"data.{key}", value, self._cache_dir):
            raise DDRLError(message)
        return data_path(value, self._cache_dir)

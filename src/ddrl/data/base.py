"""Paired (prompt, data) pools: the p̃_data that DDRL's forward-KL term is taken over."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ddrl.errors import DDRLError, check_choice


@dataclass
class DataConfig:
    """The prompt set and the data the data term draws x0 from."""

    name: str = "digits"  # data set: digits | toy2d (embedded) | files (your own, diffusers models)
    source: str = "real"  # "real": the task's training images; "synthetic": `ddrl synth` samples
    synthetic_path: str = ""  # synthetic pool (.safetensors); "" = the cache default for the base
    prompts: str = ""  # files: training prompt file (.txt, .jsonl, .json, .csv, .parquet)
    eval_prompts: str = ""  # files: held-out prompt file, same formats; "" = data.prompts
    images: str = ""  # files: real data for source=real: caption folder or .jsonl/.csv/.parquet
    eval_images: str = ""  # files: held-out image/video-caption set (same formats) for the
    # held-out diffusion loss in evaluation; "" = none
    synthetic_per_prompt: int = 8  # files: samples per prompt when the synthetic set is
    # generated (by `ddrl synth`, or by the first `ddrl train` that needs it)

    def check(self) -> None:
        from ddrl.data import DATA_NAMES
        from ddrl.data.files import PROMPT_EXT

        check_choice("data.name", self.name, DATA_NAMES)
        check_choice("data.source", self.source, ("real", "synthetic"))
        given = [
            k for k in ("prompts", "eval_prompts", "images", "eval_images") if getattr(self, k)
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
            shipped = Path(__file__).parent.parent / "presets" / "prompts" / value
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


class PairedPool:
    """Data items x [N, ...] (model space) with their text prompts; draws an item for each
    requested prompt."""

    def __init__(self, x: Tensor, prompts: list[str]):
        if len(prompts) != x.shape[0]:
            raise DDRLError(f"pool has {x.shape[0]} items but {len(prompts)} prompts")
        self.x, self.prompts = x, list(prompts)
        self._by_prompt: dict[str, Tensor] = {}
        for i, p in enumerate(self.prompts):
            self._by_prompt.setdefault(p, []).append(i)
        self._by_prompt = {p: torch.tensor(ix) for p, ix in self._by_prompt.items()}

    def __len__(self) -> int:
        return self.x.shape[0]

    def covers(self, prompts: list[str]) -> bool:
        """Whether every prompt has data items of its own (prompt-paired data)."""
        return all(p in self._by_prompt for p in prompts)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, list[str]]:
        """n items drawn uniformly with their own captions: (x [n, ...], captions [n])."""
        idx = torch.randint(len(self.prompts), (n,), generator=generator)
        return self.x[idx], [self.prompts[i] for i in idx.tolist()]

    def paired(self, prompts: list[str], generator: torch.Generator | None = None) -> Tensor:
        """One x0 per prompt [len(prompts), ...], uniformly among items with that prompt."""
        out = []
        for p in prompts:
            ix = self._by_prompt.get(p)
            if ix is None:
                raise DDRLError(
                    f"no data item for prompt {p!r}; data has {sorted(self._by_prompt)}"
                )
            out.append(ix[torch.randint(len(ix), (1,), generator=generator)])
        return self.x[torch.cat(out)]


@dataclass
class TaskData:
    """A task's data: the prompt set, a training pool and a held-out pool (embedded data sets);
    for ``data.name = "files"`` only prompts (the real data is encoded by ``latent_pool``)."""

    prompts: list[str]  # training prompts (sampled uniformly; duplicates weigh more)
    train: PairedPool | None  # image-space training data; None for "files" (see latent_pool)
    heldout: PairedPool | None  # image-space held-out data; None for "files"
    eval_prompts: list[str] = field(default_factory=list)  # evaluation prompts; [] = prompts
    records: list[dict] = field(default_factory=list)  # prompts' metadata rows ({"prompt", ...})
    eval_records: list[dict] = field(default_factory=list)  # eval_prompts' metadata rows

    def sample_prompts(self, n: int, generator: torch.Generator | None = None) -> list[str]:
        """n prompts drawn uniformly (with replacement) from the prompt set."""
        idx = torch.randint(len(self.prompts), (n,), generator=generator)
        return [self.prompts[i] for i in idx.tolist()]

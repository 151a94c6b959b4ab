"""Paired (prompt, data) pools: the p̃_data that DDRL's forward-KL term is taken over."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DDRLError, check_choice


@dataclass
class DataConfig:
    """The prompt set and the data the data term draws x0 from."""

    name: str = "digits"  # embedded data set: digits | toy2d
    source: str = "real"  # "real": the task's training images; "synthetic": `ddrl synth` samples
    synthetic_path: str = ""  # synthetic pool (.safetensors); "" = the cache default for the base

    def check(self) -> None:
        from . import DATASETS

        check_choice("data.name", self.name, DATASETS)
        check_choice("data.source", self.source, ("real", "synthetic"))


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
    """A task's data: the prompt set, a training pool and a held-out pool."""

    prompts: list[str]
    train: PairedPool
    heldout: PairedPool

    def sample_prompts(self, n: int, generator: torch.Generator | None = None) -> list[str]:
        """n prompts drawn uniformly (with replacement) from the prompt set."""
        idx = torch.randint(len(self.prompts), (n,), generator=generator)
        return [self.prompts[i] for i in idx.tolist()]

"""Paired (prompt, data) pools: the p̃_data that DDRL's forward-KL term is taken over."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ddrl.data import DATASETS
from ddrl.data.config import DataConfig
from ddrl.errors import DDRLError, check_choice, lookup


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


def load_data(cfg: DataConfig | str) -> TaskData:
    """The task data named by ``cfg.name``: an embedded set, or ``files`` (the user's own,
    from its data.* settings); a bare name stands for its default DataConfig."""
    cfg = DataConfig(name=cfg) if isinstance(cfg, str) else cfg
    check_choice("data.name", cfg.name, DATASETS)
    return lookup("data.name", DATASETS[cfg.name], {})(cfg)

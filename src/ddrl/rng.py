"""The run's two random streams, each a pure function of its key so a resumed run is exact.

- shared (seed, iteration): the same on every rank — prompts and the trained-timestep subsets,
  so all ranks agree on the iteration's plan;
- own (seed, iteration, rank): the rank's noise — initial noise, SDE noise, data pairing.
"""

from __future__ import annotations

import numpy as np
import torch

SHARED, OWN = 0, 1  # spawn-key tags of the two streams


def _generator(seed: int, key: tuple[int, ...]) -> torch.Generator:
    state = np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def shared_generator(seed: int, iteration: int) -> torch.Generator:
    """Stream for decisions every rank must agree on."""
    return _generator(seed, (SHARED, iteration))


def rank_generator(seed: int, iteration: int, rank: int) -> torch.Generator:
    """Stream for this rank's noise."""
    return _generator(seed, (OWN, iteration, rank))


def current_rank() -> int:
    """torch.distributed's rank when a process group is up, else 0."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

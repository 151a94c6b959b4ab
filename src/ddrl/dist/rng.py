"""The run's random streams, each a pure function of its key so a resumed run is exact.

- shared (seed, iteration): the same on every rank — prompts and the trained-timestep subsets,
  so all ranks agree on the iteration's plan;
- split (seed, iteration, rank): the order in which the rank's trajectories are split into
  optimizer steps (``train.update_split = "shuffled"``); a stream of its own, so turning the
  split on changes no other draw;
- own (seed, iteration, rank): the rank's noise. The noise of the trajectories (initial noise,
  SDE noise, data pairing) comes from rank 0's key on every rank (``noise_generator``): each rank
  draws the whole global batch's noise and keeps its own rows, so a trajectory is the same
  whatever the number of ranks, and a single-process run is what it always was. Only noise drawn
  later, per micro-batch (the "random" data timesteps), comes from each rank's own key.
"""

from __future__ import annotations

import numpy as np
import torch

SHARED, OWN, SPLIT = 0, 1, 2  # spawn-key tags of the streams


def _generator(seed: int, key: tuple[int, ...]) -> torch.Generator:
    state = np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def shared_generator(seed: int, iteration: int) -> torch.Generator:
    """Stream for decisions every rank must agree on."""
    return _generator(seed, (SHARED, iteration))


def rank_generator(seed: int, iteration: int, rank: int) -> torch.Generator:
    """Stream for this rank's noise."""
    return _generator(seed, (OWN, iteration, rank))


def split_generator(seed: int, iteration: int, rank: int) -> torch.Generator:
    """Stream for the order of this rank's trajectories across its optimizer steps."""
    return _generator(seed, (SPLIT, iteration, rank))


def noise_generator(seed: int, iteration: int) -> torch.Generator:
    """Stream for the global batch's trajectory noise, the same on every rank (see above)."""
    return rank_generator(seed, iteration, 0)


def current_rank() -> int:
    """torch.distributed's rank when a process group is up, else 0."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

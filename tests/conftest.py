"""Shared fixtures: tiny, deterministic generators for the unit tests (no pretraining)."""

import pytest
import torch

from ddrl.models.digits import DigitsArch, DigitsGenerator
from ddrl.models.toy2d import Toy2DGenerator


@pytest.fixture
def tiny_model():
    """A small MLP velocity model on 2-D points (Toy2DGenerator), initialised from seed 0."""
    torch.manual_seed(0)
    gen = Toy2DGenerator(hidden=16)
    return gen


@pytest.fixture
def tiny_digits():
    """A one-block SD3 transformer on 8×8 digits (DigitsGenerator), initialised from seed 0."""
    torch.manual_seed(0)
    arch = DigitsArch(num_layers=1, attention_head_dim=8, num_attention_heads=2, cond_tokens=1)
    return DigitsGenerator(arch)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Base models and reward models go to a per-session cache, never the user's ~/.cache."""
    import os

    old = os.environ.get("DDRL_CACHE")
    os.environ["DDRL_CACHE"] = str(tmp_path_factory.mktemp("ddrl_cache"))
    yield
    if old is None:
        os.environ.pop("DDRL_CACHE", None)
    else:
        os.environ["DDRL_CACHE"] = old


def group_ids(n: int, group_size: int) -> torch.Tensor:
    """Trajectory i's group, i // group_size, for n trajectories [n]."""
    return torch.arange(n) // group_size


def step_batches_of(ro, adv, valid, x0, steps, micro, g=None, data_cond=None, plan=0, stack=1):
    """The StepBatches the loop trains on, for a hand-made iteration (``training.step``)."""
    from ddrl.training.iteration import Iteration
    from ddrl.training.step import step_batches

    g = g if g is not None else torch.Generator()
    b = Iteration(0, ro, adv[:, None], adv, adv, valid, valid, x0, data_cond, steps, plan, g)
    return list(step_batches(b, micro, stack))

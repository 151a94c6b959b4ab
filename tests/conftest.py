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

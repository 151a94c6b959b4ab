"""Shared fixtures: tiny, deterministic backbones for the unit tests (no pretraining)."""

import pytest
import torch

from ddrl.backbones.digits import DigitsArch, DigitsBackbone
from ddrl.backbones.toy2d import Toy2DBackbone


@pytest.fixture
def tiny_model():
    """A small MLP velocity model on 2-D points, initialised from seed 0."""
    torch.manual_seed(0)
    return Toy2DBackbone(hidden=16)


@pytest.fixture
def tiny_digits():
    """A one-block SD3 transformer on 8×8 digits, initialised from seed 0."""
    torch.manual_seed(0)
    arch = DigitsArch(num_layers=1, attention_head_dim=8, num_attention_heads=2, cond_tokens=1)
    return DigitsBackbone(arch)


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

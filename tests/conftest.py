"""Shared fixtures and helpers: tiny, deterministic generators (no pretraining), the one-line
error check, a quick training run, hand-made iterations; markers (``slow``, ``distributed``,
``cuda``: skipped without a GPU)."""

from pathlib import Path

import pytest
import torch

from ddrl.errors import DDRLError
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


def iteration_of(ro, adv, valid, x0, steps, g=None, data_cond=None, plan=0, index=0):
    """A hand-made ``Iteration`` (one process, one reward: the advantages stand in for it)."""
    from ddrl.training.iteration import Iteration

    g = g if g is not None else torch.Generator()
    return Iteration(index, ro, adv[:, None], adv, adv, valid, valid, x0, data_cond, steps, plan, g)


def step_batches_of(ro, adv, valid, x0, steps, micro, g=None, data_cond=None, plan=0, stack=1):
    """The StepBatches the loop trains on, for a hand-made iteration (``training.step``)."""
    from ddrl.training.step import step_batches

    return list(
        step_batches(iteration_of(ro, adv, valid, x0, steps, g, data_cond, plan), micro, stack)
    )


def one_line(error) -> str:
    """The message of a DDRLError (or a ``pytest.raises`` record of one): one line, not empty."""
    msg = str(error.value if hasattr(error, "value") else error)
    assert msg and "\n" not in msg, msg
    return msg


def one_line_error(fn, *args, match: str | tuple[str, ...] = "", **kw) -> str:
    """``fn(*args, **kw)`` raises a one-line DDRLError containing every ``match`` word."""
    with pytest.raises(DDRLError) as e:
        fn(*args, **kw)
    msg = one_line(e)
    for word in (match,) if isinstance(match, str) else match:
        assert word in msg, msg
    return msg


def run_quick(tmp_path: Path, name: str, *overrides: str):
    """A quick digits run (``helpers_quick``) into ``tmp_path/name``: (config, folder, last row)."""
    from helpers_quick import quick

    from ddrl.config import build_config
    from ddrl.training.loop import train
    from ddrl.training.runlog import prepare_run_dir

    cfg = build_config(overrides=quick(*overrides))
    out = prepare_run_dir(tmp_path / name, resume=False, overwrite=False)
    return cfg, out, train(cfg, out, log=lambda *a, **k: None)


def pytest_collection_modifyitems(config, items):
    """``cuda`` tests need a GPU: skipped (with the reason) where torch sees none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

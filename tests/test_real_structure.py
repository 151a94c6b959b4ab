"""Published checkpoint configs (``src/ddrl/models/shapes/*.json``) and the tiny pipelines shrunk
from them.

For every facts file present: its form (a source per part, a diffusers pipeline class, no
private keys), and every diffusers part built from it at its REAL size on the meta device (no
memory, no weights): the class's signature accepts every key, the model constructs, and its
parameter count is what the configs say (checked against the published size where ``PUBLISHED``
knows it). For every family's tiny pipeline (``ensure_tiny``): each part's saved config differs
from its checkpoint's only in sizes (``shapes.structural_differences`` is empty).
"""

from __future__ import annotations

import inspect
import json
import typing

import pytest
import torch

from ddrl.models import shapes

DIFFUSERS_PARTS = ("transformer", "transformer_2", "vae", "scheduler")
NOT_PARTS = ("source", "pipeline", "unverified", "pipeline_config")

# family → the checkpoint its tiny pipeline is shrunk from (a family class's own ``checkpoint``
# string, when it has one, wins). A missing facts file or family module skips with the reason.
TINY_CHECKPOINTS = shapes.DEFAULT_CHECKPOINT

# Published transformer sizes in billions of parameters (model cards: "2.5B", "8.1B", "12B",
# "2B"); the count from the configs must be within 15 % (names round).
PUBLISHED = {
    "sd3.5-medium": 2.5,
    "sd3.5-large": 8.1,
    "flux.1-dev": 12.0,
    "cosmos-predict2.5-2b": 2.0,
}


def part_classes(pipeline: str, part: str) -> list[type]:
    """The diffusers classes the pipeline's constructor annotates for ``part``."""
    import diffusers

    param = inspect.signature(getattr(diffusers, pipeline).__init__).parameters.get(part)
    if param is None:
        return []
    out = []
    for c in typing.get_args(param.annotation) or (param.annotation,):
        if isinstance(c, str):
            c = getattr(diffusers, c.strip("'\" "), None)
        if isinstance(c, type) and c.__module__.startswith("diffusers"):
            out.append(c)
    return out


def accepts(cls: type, config: dict) -> bool:
    return set(config) <= set(inspect.signature(cls.__init__).parameters) - {"self"}


def scheduler_class(pipeline: str, config: dict) -> type | None:
    """The annotated scheduler class if it takes every key, else any diffusers scheduler that
    does (Wan's pipeline annotates FlowMatchEuler, its checkpoints ship UniPC)."""
    import diffusers

    for cls in part_classes(pipeline, "scheduler"):
        if accepts(cls, config):
            return cls
    for name in (n for n in dir(diffusers) if n.endswith("Scheduler")):
        try:
            cls = getattr(diffusers, name)
        except (AttributeError, ImportError):  # an optional backend's dummy
            continue
        if isinstance(cls, type) and accepts(cls, config):
            return cls
    return None


@pytest.mark.parametrize("name", shapes.checkpoints())
def test_facts_form(name):
    import diffusers

    d = shapes.real_config(name)
    assert hasattr(diffusers, d["pipeline"]), f"{name}: no diffusers.{d['pipeline']}"
    assert isinstance(d["source"], dict)
    parts = [k for k, v in d.items() if k not in NOT_PARTS and isinstance(v, dict)]
    assert {"transformer", "vae", "scheduler"} <= set(parts), parts
    for part in parts:
        assert isinstance(d["source"].get(part), str) and d["source"][part], f"{name}: {part}"
        assert not [k for k in d[part] if k.startswith("_")], f"{name}: private keys in {part}"
    assert isinstance(d.get("unverified", []), list)


@pytest.mark.parametrize("name", shapes.checkpoints())
def test_parts_build_at_real_size(name):
    """Each diffusers part from its published config, at full size on the meta device."""
    d = shapes.real_config(name)
    for part in (p for p in DIFFUSERS_PARTS if p in d):
        config = d[part]
        if part == "scheduler":
            cls = scheduler_class(d["pipeline"], config)
            assert cls is not None, f"{name}: no diffusers scheduler takes {sorted(config)}"
            sched = cls.from_config(config)
            assert all(sched.config[k] == v or isinstance(v, list) for k, v in config.items())
            continue
        classes = [c for c in part_classes(d["pipeline"], part) if accepts(c, config)]
        assert classes, (
            f"{name}: {part} keys not all accepted by {part_classes(d['pipeline'], part)}"
        )
        with torch.device("meta"):
            model = classes[0].from_config(config)
        n = sum(p.numel() for p in model.parameters())
        assert n > 0
        if part == "transformer" and name in PUBLISHED:
            assert abs(n / 1e9 / PUBLISHED[name] - 1) < 0.15, f"{name}: {n / 1e9:.2f}B"


def test_sd35_structure_is_the_published_one():
    """SD3.5 Medium: 24 MMDiT-X blocks, dual attention on 0..12, RMS qk-norm; Large: none."""
    medium = shapes.real_config("sd3.5-medium")["transformer"]
    large = shapes.real_config("sd3.5-large")["transformer"]
    assert (
        medium["dual_attention_layers"] == list(range(13)) and large["dual_attention_layers"] == []
    )
    assert medium["qk_norm"] == large["qk_norm"] == "rms_norm"
    assert (medium["pos_embed_max_size"], large["pos_embed_max_size"]) == (384, 192)


def family_checkpoint(family: str):
    """(generator class, checkpoint name) of a family, or skip with the reason."""
    from ddrl.models import resolve

    try:
        cls = resolve(family)
    except Exception as e:  # a family module not written yet
        pytest.skip(f"family {family!r} not importable: {e}")
    name = getattr(cls, "checkpoint", None)
    name = name if isinstance(name, str) and name else TINY_CHECKPOINTS[family]
    if name not in shapes.checkpoints():
        pytest.skip(f"no shapes/{name}.json for the {family} family yet")
    return cls, name


CONFIG_FILES = {"scheduler": "scheduler_config.json"}


@pytest.mark.parametrize("family", sorted(TINY_CHECKPOINTS))
def test_tiny_pipeline_keeps_the_real_structure(family):
    from ddrl.models.hf import ensure_tiny
    from ddrl.training.pretrain import cache_root

    cls, name = family_checkpoint(family)
    real = shapes.real_config(name)
    folder = ensure_tiny(cls, cache_root(""), log=lambda _: None)
    bad = []
    for part in (p for p in DIFFUSERS_PARTS if p in real):
        saved = json.loads((folder / part / CONFIG_FILES.get(part, "config.json")).read_text())
        bad += [f"{part}.{d}" for d in shapes.structural_differences(real[part], saved)]
    if real.get("pipeline_config"):
        index = json.loads((folder / "model_index.json").read_text())
        # registered pipeline settings (e.g. Wan2.2's boundary_ratio), not component names
        given = {
            k: v
            for k, v in real["pipeline_config"].items()
            if k in index and not (isinstance(index[k], list) and len(index[k]) == 2)
        }
        bad += [f"pipeline.{d}" for d in shapes.structural_differences(given, index)]
    assert bad == [], f"tiny {family} vs {name}: {bad}"

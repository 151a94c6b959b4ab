"""The run configuration: nested dataclasses, each owned by its component.

Resolution order (later wins): dataclass defaults → task preset (presets/task_<task>.toml) →
algorithm preset (presets/<algorithm>.toml) → user files (``--config a.toml``) → ``key=value``
overrides. The resolved config is written to ``<run>/config.json``; ``load_config`` reads it
back, so a run can always be repeated or resumed from its own folder.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .advantages import AdvantageConfig
from .backbones import resolve as resolve_backbone
from .data import DataConfig
from .errors import DDRLError, check_choice, check_range
from .eval.evaluate import EvalConfig
from .losses import LOSSES, LossConfig
from .pretrain import PretrainConfig
from .rewards import RewardConfig, reward_factory
from .rollout import SamplerConfig
from .train_config import ModelConfig, OptimConfig, TrainConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PRESETS = Path(__file__).parent / "presets"
TASKS = ("digits", "toy2d")


@dataclass
class RunConfig:
    """Everything a run needs; every leaf has a default and a one-line comment at its owner."""

    seed: int = 0  # all randomness derives from (seed, rank, iteration)
    task: str = "digits"  # embedded task: "digits" (8×8 SD3 transformer) or "toy2d"
    algorithm: str = "ddrl"  # ddrl | flow_grpo | dance_grpo | grpo | sft | "module:Loss"
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        check_choice("task", self.task, TASKS)
        if self.algorithm not in LOSSES and ":" not in self.algorithm:
            check_choice("algorithm", self.algorithm, LOSSES)
        # Names are checked here, before any model is built or pretrained: a typo fails fast.
        reward_factory(self.task, self.reward.name)
        if self.model.backbone:
            resolve_backbone(self.model.backbone)
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if hasattr(sub, "check"):
                sub.check()
        check_range("seed", self.seed, 0)


def _parse(key: str, raw: Any, typ: Any) -> Any:
    """Coerce ``raw`` (a TOML value or a command-line string) to the annotated type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw in (None, "none", "None"):
            return None
        return _parse(key, raw, args[0])
    if origin is tuple:
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        args = typing.get_args(typ)
        if len(items) != len(args):
            raise DDRLError(f"{key}={raw!r} needs {len(args)} comma-separated values")
        return tuple(_parse(key, v, a) for v, a in zip(items, args, strict=True))
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("true", "1", "yes", "on"):
            return True
        if str(raw).lower() in ("false", "0", "no", "off"):
            return False
        raise DDRLError(f"{key}={raw!r} is not a bool; allowed: true, false")
    if typ in (int, float):
        if isinstance(raw, bool) or (typ is int and isinstance(raw, float)):
            raise DDRLError(f"{key}={raw!r} is not {'an int' if typ is int else 'a float'}")
        try:
            return typ(raw)
        except (TypeError, ValueError):
            raise DDRLError(
                f"{key}={raw!r} is not {'an int' if typ is int else 'a float'}"
            ) from None
    if typ is str:
        if not isinstance(raw, (str, int, float)):
            raise DDRLError(f"{key}={raw!r} is not a string")
        return str(raw)
    raise DDRLError(f"{key}: unsupported type {typ}")


def _set(obj: Any, dotted: str, raw: Any, prefix: str = "") -> None:
    head, _, rest = dotted.partition(".")
    hints = typing.get_type_hints(type(obj))
    if head not in hints:
        names = ", ".join(f.name for f in dataclasses.fields(obj))
        raise DDRLError(f"unknown config key {prefix + head!r}; allowed: {names}")
    if dataclasses.is_dataclass(hints[head]):
        if rest:
            return _set(getattr(obj, head), rest, raw, prefix + head + ".")
        if not isinstance(raw, dict):
            raise DDRLError(
                f"{prefix + head!r} is a section; set one of its keys, e.g. "
                f"{prefix + head}.{dataclasses.fields(hints[head])[0].name}=..."
            )
        for k, v in raw.items():
            _set(getattr(obj, head), k, v, prefix + head + ".")
        return None
    if rest:
        raise DDRLError(f"{prefix + head!r} is not a section (no key {rest!r})")
    setattr(obj, head, _parse(prefix + head, raw, hints[head]))


def apply(cfg: RunConfig, values: dict[str, Any]) -> None:
    """Apply a nested dict (from TOML/JSON) or flat dotted keys."""
    for k, v in values.items():
        _set(cfg, k, v)


def read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DDRLError(f"config file {path} does not exist")
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return tomllib.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise DDRLError(f"cannot parse config {path}: {e}") from e


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise DDRLError(f"override {it!r} is not key=value (e.g. train.iterations=50)")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def build_config(
    files: list[str] = (), overrides: list[str] = (), base: dict[str, Any] | None = None
) -> RunConfig:
    """Resolve defaults, presets, files and overrides into a checked RunConfig."""
    layers = ([base] if base else []) + [read_file(f) for f in files]
    layers.append(parse_overrides(list(overrides)))
    probe = RunConfig()
    for layer in layers:  # task and algorithm pick the presets, so find them first
        for k in ("task", "algorithm"):
            if k in layer:
                _set(probe, k, layer[k])
    cfg = RunConfig()
    for name in (f"task_{probe.task}", probe.algorithm):
        preset = PRESETS / f"{name}.toml"
        if preset.is_file():
            apply(cfg, read_file(preset))
    for layer in layers:
        apply(cfg, layer)
    cfg.check()
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(
    path: str | Path, overrides: list[str] = (), allowed: tuple[str, ...] = (), context: str = ""
) -> RunConfig:
    """Read a resolved config.json (no presets re-applied: it is already complete), then apply
    ``key=value`` overrides whose keys start with one of ``allowed`` (others are an error)."""
    cfg = RunConfig()
    apply(cfg, read_file(path))
    ov = parse_overrides(list(overrides))
    bad = [k for k in ov if not k.startswith(allowed)]
    if bad:
        raise DDRLError(f"{context} may only change {', '.join(allowed) or 'nothing'}; got {bad}")
    apply(cfg, ov)
    cfg.check()
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2))

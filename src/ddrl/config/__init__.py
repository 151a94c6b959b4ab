"""The run configuration: nested dataclasses, each owned by its component.

Resolution order (later wins): dataclass defaults → algorithm preset
(presets/algorithms/<algorithm>.toml: the peer's own loop settings) → run preset
(presets/<preset>.toml: model, data, reward, sizes, and any published value of that setup) →
user files (``--config a.toml``) → ``key=value`` overrides. Two sections are chosen by a key
before any value is applied: ``loss`` is the chosen algorithm's own config class, and
``sampler.sde`` the chosen SDE's (``sampler.sde.kind``), so a knob the choice does not have is
an error, never silently ignored (a run preset's loss.* keys apply only to its own algorithm).
The resolved config is written to ``<run>/config.json``; ``load_config`` reads it back, so a
run can always be repeated or resumed from its own folder.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddrl.advantages import AdvantageConfig
from ddrl.data import DataConfig
from ddrl.dist.parallel import ParallelConfig
from ddrl.errors import DDRLError, check_choice, check_range, lookup
from ddrl.evaluation.evaluate import EvalConfig
from ddrl.losses import loss_class
from ddrl.losses.ddrl import DDRLConfig
from ddrl.models import ModelConfig
from ddrl.rewards import GoldConfig, RewardConfig, parse_names, reward_factory
from ddrl.sampling import SamplerConfig
from ddrl.sde import SDES
from ddrl.training.config import OptimConfig, TrainConfig
from ddrl.training.pretrain import PretrainConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PRESETS = Path(__file__).parent / "presets"
PRESET_NAMES = tuple(sorted(p.stem for p in PRESETS.glob("*.toml")))


def preset_descriptions() -> dict[str, str]:
    """Preset name → its one-line description (the file's first line, a ``#`` comment)."""
    out = {}
    for name in PRESET_NAMES:
        first = (PRESETS / f"{name}.toml").read_text().splitlines()[:1]
        out[name] = first[0].lstrip("#").strip() if first else ""
    return out


@dataclass
class RunConfig:
    """Everything a run needs; every leaf has a default and a one-line comment at its owner."""

    seed: int = 0  # the run's randomness: (seed, iteration) shared, (seed, rank, iteration) own
    preset: str = "digits"  # presets/<name>.toml: model, data, reward, sizes (`ddrl presets`)
    algorithm: str = "ddrl"  # ddrl | flow_grpo | dance_grpo | grpo | sft | "module:Loss"
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    gold: GoldConfig = field(default_factory=GoldConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: Any = field(default_factory=DDRLConfig)  # the algorithm's own config (its Config)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        check_choice("preset", self.preset, PRESET_NAMES)
        check_range("seed", self.seed, 0, 2**32 - 1)
        check_range("eval.seed", self.eval.seed, 0, 2**32 - 1)  # EvalConfig seeds torch with it
        # Names are checked here, before any model is built or pretrained: a typo fails fast.
        for name in parse_names(self.reward.name):
            reward_factory(self.data.name, name)
        for name in parse_names(self.eval.rewards) if self.eval.rewards else []:
            reward_factory(self.data.name, name)
        if self.eval.features:
            reward_factory(self.data.name, self.eval.features)
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if hasattr(sub, "check"):
                sub.check()
        per_step = getattr(self.loss, "data_on_first_only", False) or (
            getattr(self.loss, "data_steps", 1.0) < 1
        )
        if self.train.steps_per_forward > 1 and per_step:
            raise DDRLError(
                "train.steps_per_forward > 1 stacks trained steps, but loss.data_on_first_only "
                "/ loss.data_steps choose per step; allowed: steps_per_forward=1 with them"
            )


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
        owner = f" of {type(obj).__name__}" if prefix else ""
        raise DDRLError(f"unknown config key {prefix + head!r}{owner}; allowed: {names}")
    sub = getattr(obj, head)
    if dataclasses.is_dataclass(sub):  # a section (its runtime class: loss and sde vary)
        if rest:
            return _set(sub, rest, raw, prefix + head + ".")
        if not isinstance(raw, dict):
            names = [f.name for f in dataclasses.fields(sub)]
            example = "kind" if "kind" in names else names[0]  # a chosen section: its selector
            raise DDRLError(
                f"{prefix + head!r} is a section; set one of its keys, e.g. "
                f"{prefix + head}.{example}=..."
            )
        for k, v in raw.items():
            _set(sub, k, v, prefix + head + ".")
        return None
    if rest:
        raise DDRLError(f"{prefix + head!r} is not a section (no key {rest!r})")
    setattr(obj, head, _parse(prefix + head, raw, hints[head]))


def apply(cfg: RunConfig, values: dict[str, Any]) -> None:
    """Apply a nested dict (from TOML/JSON) or flat dotted keys."""
    for k, v in values.items():
        _set(cfg, k, v)


def _flatten(layer: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}, so layers can be searched for selector keys."""
    out: dict[str, Any] = {}
    for k, v in layer.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _last(layers: list[dict[str, Any]], key: str, default: Any) -> Any:
    """The value the last layer that sets ``key`` gives it."""
    for layer in reversed(layers):
        if key in layer:
            return layer[key]
    return default


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


def resolve(layers: list[dict[str, Any]], presets: bool = True) -> RunConfig:
    """Defaults, then (if ``presets``) the preset and algorithm preset files chosen by the
    layers, then the layers, with ``loss`` and ``sampler.sde`` typed by their selectors."""
    flat = [_flatten(x) for x in layers]
    files: list[dict[str, Any]] = []
    if presets:
        name = str(_last(flat, "preset", RunConfig.preset))
        check_choice("preset", name, PRESET_NAMES)
        run_preset = _flatten(read_file(PRESETS / f"{name}.toml"))
        algorithm = str(_last([run_preset, *flat], "algorithm", RunConfig.algorithm))
        alg_file = PRESETS / "algorithms" / f"{algorithm}.toml"
        if alg_file.is_file():  # first: a run preset's published values override it
            files.append(_flatten(read_file(alg_file)))
        files.append(run_preset)
    all_layers = files + flat
    algorithm = str(_last(all_layers, "algorithm", RunConfig.algorithm))
    sde_kind = str(_last(all_layers, "sampler.sde.kind", "flow"))
    cfg = RunConfig()
    cfg.loss = loss_class(algorithm).Config()
    cfg.sampler.sde = lookup("sampler.sde.kind", sde_kind, SDES)()
    for layer in all_layers:
        # A layer written for another SDE kind (an algorithm preset the user overrode) keeps
        # its other keys; its sampler.sde.* keys do not apply.
        other_sde = layer.get("sampler.sde.kind", sde_kind) != sde_kind
        # Likewise a run preset written for another algorithm keeps all but its loss.* keys.
        other_alg = layer.get("algorithm", algorithm) != algorithm
        for k, v in layer.items():
            if other_sde and k.startswith("sampler.sde."):
                continue
            if other_alg and (k == "loss" or k.startswith("loss.")):
                continue
            if k == "loss" or k.startswith("loss."):
                _set_loss(cfg, algorithm, k, v)
            else:
                _set(cfg, k, v)
    cfg.check()
    return cfg


def _set_loss(cfg: RunConfig, algorithm: str, key: str, value: Any) -> None:
    try:
        _set(cfg, key, value)
    except DDRLError as e:
        if "unknown config key" not in str(e):
            raise
        names = ", ".join(f.name for f in dataclasses.fields(cfg.loss))
        raise DDRLError(
            f"{key!r} is not a setting of algorithm {algorithm!r}; its loss.* keys: {names}"
        ) from None


def build_config(
    files: list[str] = (), overrides: list[str] = (), base: dict[str, Any] | None = None
) -> RunConfig:
    """Resolve defaults, presets, files and overrides into a checked RunConfig."""
    layers = ([base] if base else []) + [read_file(f) for f in files]
    layers.append(parse_overrides(list(overrides)))
    return resolve(layers)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(
    path: str | Path, overrides: list[str] = (), allowed: tuple[str, ...] = (), context: str = ""
) -> RunConfig:
    """Read a resolved config.json (no presets re-applied: it is already complete), then apply
    ``key=value`` overrides whose keys start with one of ``allowed`` (others are an error)."""
    ov = parse_overrides(list(overrides))
    bad = [k for k in ov if not k.startswith(allowed)]
    if bad:
        raise DDRLError(f"{context} may only change {', '.join(allowed) or 'nothing'}; got {bad}")
    return resolve([read_file(path), ov], presets=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write config.json atomically (a resume rewrites it: a kill must not leave half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2))
    tmp.replace(path)


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Field name → its one-line ``# comment`` in ``cls``'s source (with the comment-only lines
    that continue it). ast finds the fields and tokenize the comments, so a '#' inside a
    string is never taken for one. {} when the source is not available."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
        body = ast.parse(src).body[0].body
        tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (OSError, TypeError, SyntaxError, tokenize.TokenError, IndexError, AttributeError):
        return {}
    comments = {
        t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT
    }
    lines = src.splitlines()
    out = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        parts = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        n = node.end_lineno + 1
        while parts and n in comments and lines[n - 1].lstrip().startswith("#"):
            parts.append(comments[n])
            n += 1
        out[node.target.id] = " ".join(parts)
    return out


def _type_name(t: Any) -> str:
    return t.__name__ if isinstance(t, type) else str(t).replace("typing.", "")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def describe(cfg: Any, prefix: str = "") -> str:
    """Every key of a resolved config, one per line: ``key: type = value (default d)  # what``
    (the default shown only where the preset, algorithm or overrides changed it)."""
    lines = []
    hints = typing.get_type_hints(type(cfg))
    comments = field_comments(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):  # a section: its runtime class (loss, sde vary)
            lines.append(describe(value, f"{prefix}{f.name}."))
            continue
        line = f"{prefix}{f.name}: {_type_name(hints[f.name])} = {json.dumps(value)}"
        default = _default(f)
        if default != value and not (isinstance(default, tuple) and list(default) == value):
            line += f" (default {json.dumps(default)})"
        if comments.get(f.name):
            line += f"  # {comments[f.name]}"
        lines.append(line)
    return "\n".join(lines)

"""The run configuration: nested dataclasses, each owned by its component.

Resolution order (later wins): dataclass defaults → algorithm preset
(presets/algorithms/<algorithm>.toml: the peer's own loop settings) → run preset
(presets/<preset>.toml: model, data, reward, sizes, and any published value of that setup) →
user files (``--config a.toml``) → ``key=value`` overrides. Two sections are chosen by keys
before any value is applied: ``loss`` is the config of the chosen objective and regularisers
(the algorithm's, or ``objective=`` / ``regularisers=``; ``ddrl.losses``), and
``sampler.sde`` the chosen SDE's (``sampler.sde.kind``), so a knob the choice does not have is
an error, never silently ignored (a preset's loss.* keys apply only to its own algorithm, and
only those the chosen parts have).
The resolved config is written to ``<run>/config.json``; ``load_config`` reads it back, so a
run can always be repeated or resumed from its own folder.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from ddrl.config.core import SDES
from ddrl.config.schema import PRESET_NAMES, PRESETS, RunConfig
from ddrl.errors import DDRLError, check_choice, choices, lookup
from ddrl.losses import cell, loss_config
from ddrl.watch.config import with_loss_warn

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def preset_descriptions() -> dict[str, str]:
    """Preset name → its one-line description (the file's first line, a ``#`` comment)."""
    out = {}
    for name in PRESET_NAMES:
        first = (PRESETS / f"{name}.toml").read_text().splitlines()[:1]
        out[name] = first[0].lstrip("#").strip() if first else ""
    return out


def _parse(key: str, raw: Any, typ: Any) -> Any:
    """Coerce ``raw`` (a TOML value or a command-line string) to the annotated type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw in (None, "none", "None"):
            return None
        return _parse(key, raw, args[0])
    if origin is list:  # a TOML/JSON list, '["a", "b"]' or "a,b" from the command line
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("["):
                try:
                    raw = json.loads(text)
                except json.JSONDecodeError:
                    raise DDRLError(
                        f'{key}={raw!r} is not a JSON list; allowed: e.g. \'["a", "b"]\' or a,b'
                    ) from None
            else:
                raw = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(raw, (list, tuple)):
            raise DDRLError(f"{key}={raw!r} is not a list; allowed: e.g. a,b")
        (item,) = typing.get_args(typ)
        return [_parse(key, v, item) for v in raw]
    if origin is tuple:
        # "0.9,0.99" or the TOML form "[0.9, 0.99]"
        items = raw.strip().strip("[]()").split(",") if isinstance(raw, str) else list(raw)
        args = typing.get_args(typ)
        if len(items) != len(args):
            raise DDRLError(f"{key}={raw!r} needs {len(args)} comma-separated values")
        return tuple(_parse(key, v, a) for v, a in zip(items, args, strict=True))
    if (allowed := choices(typ)) is not None:
        check_choice(key, raw, allowed)
        return raw
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


def set_key(obj: Any, dotted: str, raw: Any, prefix: str = "") -> None:
    head, _, rest = dotted.partition(".")
    hints = typing.get_type_hints(type(obj))
    if head not in hints:
        names = ", ".join(f.name for f in dataclasses.fields(obj))
        owner = f" of {type(obj).__name__}" if prefix else ""
        raise DDRLError(f"unknown config key {prefix + head!r}{owner}; allowed: {names}")
    sub = getattr(obj, head)
    if dataclasses.is_dataclass(sub):  # a section (its runtime class: loss and sde vary)
        if rest:
            return set_key(sub, rest, raw, prefix + head + ".")
        if not isinstance(raw, dict):
            names = [f.name for f in dataclasses.fields(sub)]
            example = "kind" if "kind" in names else names[0]  # a chosen section: its selector
            raise DDRLError(
                f"{prefix + head!r} is a section; set one of its keys, e.g. "
                f"{prefix + head}.{example}=..."
            )
        for k, v in raw.items():
            set_key(sub, k, v, prefix + head + ".")
        return None
    if rest:
        raise DDRLError(f"{prefix + head!r} is not a section (no key {rest!r})")
    setattr(obj, head, _parse(prefix + head, raw, hints[head]))


def apply(cfg: RunConfig, values: dict[str, Any]) -> None:
    """Apply a nested dict (from TOML/JSON) or flat dotted keys."""
    for k, v in values.items():
        set_key(cfg, k, v)


def flatten(layer: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": (1, 2)} → {"a.b": 1, "c": [1, 2]}: dotted keys, so layers can be
    searched for selector keys and configs compared key by key."""
    out: dict[str, Any] = {}
    for k, v in layer.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
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


def algorithm_preset(name: str) -> list[dict[str, Any]]:
    """presets/algorithms/<name>.toml as flat layers, after the preset it names in ``inherit``
    (its own values win); [] for an algorithm without one (a plugin)."""
    path = PRESETS / "algorithms" / f"{name}.toml"
    if not path.is_file():
        return []
    layer = flatten(read_file(path))
    parent = layer.pop("inherit", None)
    return [*(algorithm_preset(parent) if parent else []), layer]


def resolve(layers: list[dict[str, Any]], presets: bool = True) -> RunConfig:
    """Defaults, then (if ``presets``) the preset and algorithm preset files chosen by the
    layers, then the layers, with ``loss`` and ``sampler.sde`` typed by their selectors."""
    flat = [flatten(x) for x in layers]
    files: list[dict[str, Any]] = []
    if presets:
        name = str(_last(flat, "preset", RunConfig.preset))
        check_choice("preset", name, PRESET_NAMES)
        run_preset = flatten(read_file(PRESETS / f"{name}.toml"))
        algorithm = str(_last([run_preset, *flat], "algorithm", RunConfig.algorithm))
        files += algorithm_preset(algorithm)  # first: a run preset's published values win
        files.append(run_preset)
    all_layers = files + flat
    algorithm = str(_last(all_layers, "algorithm", RunConfig.algorithm))
    objective = str(_last(all_layers, "objective", ""))
    regularisers = str(_last(all_layers, "regularisers", ""))
    sde_kind = str(_last(all_layers, "sampler.sde.kind", "flow"))
    cfg = RunConfig()
    cfg.loss = loss_config(algorithm, objective, regularisers)()
    own_keys = {f"loss.{f.name}" for f in dataclasses.fields(cfg.loss)}
    cfg.sampler.sde = lookup("sampler.sde.kind", sde_kind, SDES)()
    for layer in all_layers:
        # A layer written for another SDE kind (an algorithm preset the user overrode) keeps
        # its other keys; its sampler.sde.* keys do not apply.
        other_sde = layer.get("sampler.sde.kind", sde_kind) != sde_kind
        # A preset's loss.* keys apply where the chosen cell has those parts (a preset written
        # for nft gives nft_data its NFT values, not flow_grpo its KL); a user's file written for
        # another algorithm keeps all but its loss.* keys; a user's key the cell lacks is an error.
        preset = any(layer is f for f in files)
        other_alg = not preset and layer.get("algorithm", algorithm) != algorithm
        for k, v in layer.items():
            if other_sde and k.startswith("sampler.sde."):
                continue
            if other_alg and (k == "loss" or k.startswith("loss.")):
                continue
            if preset and k.startswith("loss.") and k not in own_keys:
                continue
            if k == "eval.loss_warn":  # the key the watch replaced (docs/WATCH.md)
                cfg.watch.rules = with_loss_warn(cfg.watch.rules, v)
            elif k == "loss" or k.startswith("loss."):
                _set_loss(cfg, algorithm, k, v)
            else:
                set_key(cfg, k, v)
    chosen = cell(algorithm, objective, regularisers)
    if chosen is not None:  # the resolved cell, written out in config.json
        cfg.objective, cfg.regularisers = chosen[0], ",".join(chosen[1]) or "none"
    cfg.check()
    return cfg


def _set_loss(cfg: RunConfig, algorithm: str, key: str, value: Any) -> None:
    try:
        set_key(cfg, key, value)
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

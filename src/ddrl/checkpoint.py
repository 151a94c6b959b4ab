"""Atomic checkpoints of stateful objects keyed by parameter name (safetensors + JSON only).

Layout: ``<run>/checkpoints/step-000040/{model,ema,optimizer,rng}.safetensors + state.json``
and ``<run>/checkpoints/latest`` naming the newest. Every tensor is keyed by its parameter's
fully qualified name (the optimizer's state through torch.distributed.checkpoint's
``get_optimizer_state_dict``), which is the layout DCP shards when runs go multi-GPU. A
checkpoint is written under a temporary name and renamed into place, so a crash mid-write
never leaves a checkpoint that looks whole; state.json holds each file's SHA-256 and the base
model's fingerprint, both verified on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import DDRLError


def save_file_atomic(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """safetensors ``save_file`` under a temporary name, then rename into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, tmp, metadata=metadata)
    tmp.replace(path)


@contextlib.contextmanager
def atomic_dir(path: Path, race_ok: bool = True):
    """Yields a fresh temporary sibling folder; when the block finishes it is renamed to
    ``path``, so a crash never leaves half a folder there. If ``path`` appeared meanwhile
    (another process built the same thing) the temporary folder is dropped (``race_ok``) or
    that is a one-line error."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not race_ok:
            raise DDRLError(
                f"{path} appeared while it was written; nothing was overwritten"
            ) from None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name, shape, dtype and bytes: the identity of a model."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def split_tensors(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """A nested state dict → (flat tensors keyed by dotted path, the rest as JSON-able data)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, key: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[key] = x.detach().contiguous().cpu()
            return {"__tensor__": key}
        if isinstance(x, dict):
            return {str(k): walk(v, f"{key}/{k}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{key}/{i}") for i, v in enumerate(x)]
        return x

    return tensors, walk(state, prefix)


def join_tensors(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of ``split_tensors``."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        return {k: join_tensors(tensors, v) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(tensors, v) for v in skeleton]
    return skeleton


def save_checkpoint(
    run_dir: Path, iteration: int, parts: dict[str, dict[str, Any]], meta: dict, keep: int = 2
) -> Path:
    """Write ``parts`` (name → state dict) as checkpoint ``step-<iteration>`` atomically and
    prune to the newest ``keep``. Tensors go to <name>.safetensors, the rest to state.json."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{iteration:06d}"
    tmp = root / f".tmp-step-{iteration:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    skeletons, digests = {}, {}
    for name, state in parts.items():
        tensors, skeletons[name] = split_tensors(state)
        save_file(tensors, tmp / f"{name}.safetensors")
        digests[name] = sha256(tmp / f"{name}.safetensors")
    state_json = {"iteration": iteration, **meta, "skeletons": skeletons, "sha256": digests}
    (tmp / "state.json").write_text(json.dumps(state_json, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    latest_tmp = root / f".latest-{os.getpid()}"
    latest_tmp.write_text(final.name)
    latest_tmp.replace(root / "latest")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint named by ``<run>/checkpoints/latest``; DDRLError if there is none."""
    root = Path(run_dir) / "checkpoints"
    ptr = root / "latest"
    if not ptr.is_file():
        raise DDRLError(f"no checkpoint in {run_dir} (missing {ptr})")
    path = root / ptr.read_text().strip()
    if not (path / "state.json").is_file():
        raise DDRLError(f"checkpoint {path} named by {ptr} is missing or incomplete")
    return path


def load_newest_valid(run_dir: Path, log=print) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(path, state.json, parts) of the newest kept checkpoint that loads intact. A damaged
    newer one (checksum, truncation, missing files) is passed over with a warning naming both,
    so one bad write costs checkpoint_every iterations, not the run; DDRLError if none is valid."""
    root = Path(run_dir) / "checkpoints"
    found = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    if not found:
        raise DDRLError(f"no checkpoint in {run_dir} (no {root}/step-*)")
    errors = []
    for path in found:
        try:
            state, parts = load_checkpoint(path)
        except DDRLError as e:
            errors.append(str(e))
            continue
        if errors:
            log(f"warning: checkpoint {found[0]} is damaged ({errors[0]}); resuming from {path}")
        return path, state, parts
    raise DDRLError(f"no valid checkpoint in {root}: {'; '.join(errors)}")


def remove_orphans(run_dir: Path) -> list[Path]:
    """Delete what a write killed midway left behind (.tmp-step-* folders, .latest-* files);
    only one process writes a run's checkpoints, so none of them is in use. Returns them."""
    root = Path(run_dir) / "checkpoints"
    orphans = sorted([*root.glob(".tmp-step-*"), *root.glob(".latest-*")])
    for p in orphans:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return orphans


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json, name → state dict) of a checkpoint, every file's SHA-256 verified."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        parts = {}
        for name, skeleton in state["skeletons"].items():
            file = path / f"{name}.safetensors"
            if sha256(file) != state["sha256"][name]:
                raise DDRLError(f"checkpoint file {file} is damaged (SHA-256 mismatch)")
            parts[name] = join_tensors(load_file(file), skeleton)
    except (OSError, json.JSONDecodeError, SafetensorError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DDRLError(f"corrupt or incompatible checkpoint {path}: {msg}") from e
    return state, parts


def load_into(
    module_params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor], what: str
) -> None:
    """Copy ``state`` into parameters by name; the names must match exactly."""
    if set(state) != set(module_params):
        missing, extra = set(module_params) - set(state), set(state) - set(module_params)
        raise DDRLError(
            f"{what} does not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]}"
        )
    with torch.no_grad():
        for k, p in module_params.items():
            if p.shape != state[k].shape:
                raise DDRLError(
                    f"{what}: {k} has shape {tuple(state[k].shape)}, model {tuple(p.shape)}"
                )
            p.copy_(state[k])

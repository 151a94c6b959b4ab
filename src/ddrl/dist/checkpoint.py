"""Atomic checkpoints of stateful objects keyed by parameter name: torch.distributed.checkpoint
(DCP) for the tensors, JSON for the rest, safetensors for each rank's RNG state.

Layout: ``<run>/checkpoints/step-000040/{state.json, dcp/, rng-rank<r>.safetensors}`` and
``<run>/checkpoints/latest`` naming the newest. Every tensor is keyed by its parameter's fully
qualified name (the optimizer's state through DCP's ``get_optimizer_state_dict``), so DCP
saves each rank's shards under FSDP2 and reshards them on load for another world size, and an
unsharded run's checkpoint loads into a sharded one and back. Every rank writes into one
temporary folder that rank 0 renames into place once state.json (each file's SHA-256, hashed
by all ranks in parallel) is written, so a kill mid-write never leaves a checkpoint that looks
whole. The pickle DCP keeps in ``dcp/.metadata`` holds torch's own metadata classes only: the
non-tensor state (optimizer hyper-parameters) is JSON in state.json.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed import checkpoint as dcp

from ddrl.dist.group import barrier, gather_objects, world_size
from ddrl.errors import DDRLError, first_line
from ddrl.io import fingerprint, sha256, trainable
from ddrl.dist.rng import current_rank










def split_tensors(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """A nested state dict → (flat tensors keyed by /-path, the rest as JSON-able data). The
    tensors are the state's own (detached, same storage): DCP loads into them in place."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, key: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[key] = x.detach()
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


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns whenever it runs without a process group; one process is a normal run here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _share(names: list[str]) -> list[str]:
    """This rank's share of the files to hash: every rank hashes 1/W of them."""
    return names[current_rank() :: world_size()]


def _split_parts(parts: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """name → state dict as (flat tensors keyed "<name>/<path>", name → skeleton)."""
    tensors, skeletons = {}, {}
    for name, state in parts.items():
        t, skeletons[name] = split_tensors(state, name)
        tensors.update(t)
    return tensors, skeletons


def _tensor_keys(skeleton: Any) -> set[str]:
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return {skeleton["__tensor__"]}
        return set().union(*map(_tensor_keys, skeleton.values())) if skeleton else set()
    if isinstance(skeleton, list):
        return set().union(*map(_tensor_keys, skeleton)) if skeleton else set()
    return set()


def save_checkpoint(
    run_dir: Path,
    iteration: int,
    parts: dict[str, dict[str, Any]],
    meta: dict,
    keep: int = 2,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``parts`` (name → state dict; DTensors are saved as this rank's shards) and this
    rank's ``rng`` tensors as checkpoint ``step-<iteration>``, atomically, and prune to the
    newest ``keep``. A collective: every rank calls it; rank 0 writes state.json and renames."""
    rank, world = current_rank(), world_size()
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{iteration:06d}", root / f".tmp-step-{iteration:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    tensors, skeletons = _split_parts(parts)
    with _single_process_ok():
        dcp.save(tensors, checkpoint_id=tmp / "dcp", no_dist=world == 1)
    save_file(
        {k: v.contiguous() for k, v in (rng or {}).items()}, tmp / f"rng-rank{rank}.safetensors"
    )
    barrier()
    names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    digests: dict[str, str] = {}
    for part in gather_objects({n: sha256(tmp / n) for n in _share(names)}):
        digests.update(part)
    if rank == 0:
        state = {"iteration": iteration, **meta, "world_size": world, "skeletons": skeletons}
        state["sha256"] = dict(sorted(digests.items()))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        old = root / f".old-step-{iteration:06d}"  # a re-save of this iteration (a resumed run)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        latest_tmp = root / ".latest-tmp"
        latest_tmp.write_text(final.name)
        latest_tmp.replace(root / "latest")
        for stale in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def find_checkpoint(run_dir: Path, spec: str | int | None = None, flag: str = "--step") -> Path:
    """A run's checkpoint: the newest (``spec`` None: the one ``checkpoints/latest`` names), or
    the one ``spec`` names: an iteration (40), a name (step-000040) or a checkpoint folder. A
    one-line error naming ``flag`` and the kept checkpoints otherwise."""
    if spec is None:
        return latest_checkpoint(run_dir)
    root = Path(run_dir) / "checkpoints"
    for cand in (Path(str(spec)), root / str(spec), root / f"step-{str(spec):0>6}"):
        if (cand / "state.json").is_file():
            return cand
    kept = ", ".join(sorted(p.name for p in root.glob("step-*"))) if root.is_dir() else ""
    allowed = ("auto, or one of " if flag == "--resume" else "one of ") + (kept or "(none)")
    raise DDRLError(f"{flag} {spec}: no such checkpoint; allowed: {allowed}")


def load_trained(denoiser: torch.nn.Module, path: Path) -> dict:
    """Load checkpoint ``path``'s trained weights (its EMA when it kept one) into ``denoiser``'s
    trainable parameters, in one process, after checking it was trained from this base.
    Returns its state.json."""
    meta, parts = load_checkpoint(path)
    if meta.get("base_fingerprint") != fingerprint(denoiser):
        raise DDRLError(f"checkpoint {path} was not trained from this run's base model")
    load_into(trainable(denoiser), parts["ema" if "ema" in parts else "model"], f"checkpoint {path}")
    return meta


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


def _files_of(state: dict) -> dict[str, str]:
    """file (relative to the checkpoint) → its recorded SHA-256."""
    return dict(state["sha256"])


def _check_files(path: Path, names: list[str], digests: dict[str, str]) -> str | None:
    try:
        for n in names:
            if sha256(path / n) != digests[n]:
                return f"checkpoint file {path / n} is damaged (SHA-256 mismatch)"
    except OSError as e:
        return f"corrupt or incompatible checkpoint {path}: {first_line(e)}"
    return None


def read_state(path: Path) -> dict:
    try:
        state = json.loads((Path(path) / "state.json").read_text())
        _files_of(state), state["skeletons"], state["iteration"]  # noqa: B018 (complete?)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        msg = first_line(e)
        raise DDRLError(f"corrupt or incompatible checkpoint {path}: {msg}") from e
    return state


def verify(path: Path) -> str | None:
    """None if checkpoint ``path`` is whole, else why not. A collective: each rank hashes its
    share of the files and every rank gets the same answer."""
    try:
        files = _files_of(read_state(path))
        err = _check_files(Path(path), _share(sorted(files)), files)
    except DDRLError as e:
        err = str(e)
    errors = [e for e in gather_objects(err) if e]
    return errors[0] if errors else None


def remove_orphans(run_dir: Path) -> list[Path]:
    """Delete what a write killed midway left behind (.tmp-step-*, .old-step-* folders,
    .latest-* files); only one run writes a run's checkpoints, so none is in use."""
    root = Path(run_dir) / "checkpoints"
    orphans = sorted(
        [*root.glob(".tmp-step-*"), *root.glob(".old-step-*"), *root.glob(".latest-*")]
    )
    for p in orphans:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return orphans


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, newest first (as rank 0 sees them, on every rank)."""
    root = Path(run_dir) / "checkpoints"
    found = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    return [Path(p) for p in gather_objects([str(p) for p in found])[0]]


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json, name → state dict of full CPU tensors) of a checkpoint, in one process
    (export, evaluation); every file's SHA-256 verified. ``parts["rng"]``: rank 0's RNG."""
    path = Path(path)
    state = read_state(path)
    files = _files_of(state)
    err = _check_files(path, sorted(files), files)
    if err:
        raise DDRLError(err)
    try:
        md = dcp.FileSystemReader(path / "dcp").read_metadata().state_dict_metadata
        tensors = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.items()}
        with _single_process_ok():
            dcp.load(tensors, checkpoint_id=path / "dcp", no_dist=True)
        parts = {n: join_tensors(tensors, sk) for n, sk in state["skeletons"].items()}
        rng = path / "rng-rank0.safetensors"
        parts["rng"] = load_file(rng) if rng.is_file() else {}
    except (OSError, SafetensorError, KeyError, AttributeError, RuntimeError) as e:
        msg = first_line(e)
        raise DDRLError(f"corrupt or incompatible checkpoint {path}: {msg}") from e
    return state, parts


def restore_into(
    path: Path, parts: dict[str, Any], state: dict
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load checkpoint ``path`` (verified; ``state``: its state.json) into the live state
    ``parts`` (name → state dict whose tensors are the run's own: parameters, EMA shadow,
    optimizer state; DTensors under FSDP2) in place, resharding for this world size. A
    collective. Returns (the parts rebuilt with the saved non-tensor values, this rank's RNG
    tensors or {})."""
    path = Path(path)
    live = _split_parts(parts)[0]
    saved = set().union(*(_tensor_keys(state["skeletons"].get(n, {})) for n in parts))
    if saved != set(live):
        missing, extra = sorted(set(live) - saved), sorted(saved - set(live))
        raise DDRLError(
            f"checkpoint {path} does not match the model: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    try:
        with _single_process_ok():
            dcp.load(live, checkpoint_id=path / "dcp", no_dist=world_size() == 1)
        file = path / f"rng-rank{current_rank()}.safetensors"
        rng = load_file(file) if file.is_file() else {}
    except (RuntimeError, ValueError, SafetensorError, OSError) as e:
        msg = first_line(e)
        raise DDRLError(f"checkpoint {path} does not fit the model: {msg}") from e
    rebuilt = {n: join_tensors(live, state["skeletons"][n]) for n in parts}
    return rebuilt, rng


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

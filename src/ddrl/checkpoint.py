"""Atomic checkpoints: everything needed to resume a run, as safetensors plus JSON.

Layout: ``<run>/checkpoints/step-000040/{model,ema,optimizer,rng}.safetensors + state.json``
and ``<run>/checkpoints/latest`` naming the newest. A checkpoint is written under a temporary
name and renamed into place, so a crash mid-write never leaves a checkpoint that looks whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import DDRLError


def _state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}.{name}"] = val.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{name}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, val in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def save_file_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors ``save_file`` under a temporary name, then rename into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, tmp)
    tmp.replace(path)


def save_checkpoint(
    run_dir: Path,
    iteration: int,
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    opt: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step-<iteration>`` atomically; prune to the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{iteration:06d}"
    tmp = root / f".tmp-step-{iteration:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_state_tensors(model), tmp / "model.safetensors")
    if ema is not None:
        save_file(_state_tensors(ema), tmp / "ema.safetensors")
    opt_tensors, opt_meta = _optimizer_split(opt)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(
        json.dumps({"iteration": iteration, "optimizer": opt_meta, **extra}, indent=1)
    )
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


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    ema: torch.nn.Module | None = None,
    opt: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Restore weights (and EMA, optimizer, RNG) in place; returns state.json's dict."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        model.load_state_dict(load_file(path / "model.safetensors"))
        if ema is not None and (path / "ema.safetensors").is_file():
            ema.load_state_dict(load_file(path / "ema.safetensors"))
        if opt is not None:
            opt.load_state_dict(
                _optimizer_join(load_file(path / "optimizer.safetensors"), state["optimizer"])
            )
        torch.set_rng_state(load_file(path / "rng.safetensors")["torch"])
    except (OSError, json.JSONDecodeError, SafetensorError, RuntimeError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DDRLError(f"corrupt or incompatible checkpoint {path}: {msg}") from e
    return state

"""Files written whole or not at all, their digests, a model's fingerprint, and the leftovers of
killed writers: the file I/O every part of ddrl shares."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ddrl.errors import DDRLError


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
    that is a one-line error. A block that raises leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """name → parameter for every parameter that requires grad: what a checkpoint holds."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name, shape, dtype and bytes: the identity of a model."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, someone else's
        return True
    return True


def remove_stale_tmp(folder: Path, prefix: str) -> None:
    """Remove ``<prefix>...-<pid>`` leftovers of killed processes (never a live one's)."""
    if not folder.is_dir():
        return
    for p in folder.glob(f"{prefix}*"):
        pid = p.name.rsplit("-", 1)[-1].rsplit("tmp", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

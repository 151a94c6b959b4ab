"""Data-parallel training over torch.distributed (``torchrun``): the process-group plumbing.

Without torchrun (no WORLD_SIZE, or 1) nothing here talks to anyone: every helper is the
identity and a run is exactly the single-process one. With W ranks the loop (``ddrl.training.loop``):
- splits the iteration's global batch of P·G trajectories into W contiguous equal slices
  (``batch_slice``); rank r rolls out, scores and trains on its slice only;
- draws all noise of the global batch from one stream that every rank shares and keeps its rows,
  so a trajectory's noise does not depend on how many ranks there are (``ddrl.dist.rng``);
- gathers the rewards so every rank normalises advantages over whole groups, even a group whose
  samples live on two ranks (``gather_rows``);
- sums the loss denominators (mask counts) and then the gradients over ranks, once per optimizer
  step: each rank's loss is its share of the whole-iteration mean, so the summed gradient is the
  single-process gradient (``all_reduce_sum``, ``sync_grads``);
- reduces the metrics (sums, maxima) so every rank logs the same row; rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from ddrl.config.core import AdvantageConfig
from ddrl.advantages import combine_advantages
from ddrl.errors import DDRLError

T = TypeVar("T")


def group_up() -> bool:
    """Whether a process group is up (torchrun); without one every helper here is local."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if group_up() else 1


def is_main() -> bool:
    """Rank 0 (or no process group): the one process that writes the run folder."""
    return not group_up() or dist.get_rank() == 0


def gather_objects(obj):
    """Every rank's picklable ``obj``, in rank order (a collective; [obj] in one process)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def process_group(device: str) -> Iterator[None]:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA: one GPU per local rank) for the
    duration (also a group of one: FSDP2 on one GPU needs it); without torchrun, do nothing."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ or dist.is_initialized():
        yield
        return
    backend = "gloo"
    if str(device).startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" = this rank's GPU
        backend = "nccl"
    dist.init_process_group(backend)
    try:
        yield
    finally:
        gc.collect()  # wrappers holding communication threads (DDP, FSDP) go first
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only (a collective): a DDRLError there is raised on every rank, so
    no rank waits for a partner that has stopped. Returns ``fn``'s result on rank 0."""
    result, err = None, None
    if is_main():
        try:
            result = fn()
        except DDRLError as e:
            err = str(e)
    err = gather_objects(err)[0]
    if err:
        raise DDRLError(err)
    return result


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (it may write caches, remove orphans), then the others."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def batch_slice(total: int) -> slice:
    """This rank's contiguous rows of a global batch of ``total`` trajectories."""
    w = world_size()
    if total % w:
        raise DDRLError(
            f"train.prompts_per_iter × train.group_size = {total} trajectories do not split "
            f"evenly over {w} processes; allowed: a multiple of the world size"
        )
    r = dist.get_rank() if w > 1 else 0
    n = total // w
    return slice(r * n, (r + 1) * n)


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's equal-sized slice [n, ...], concatenated in rank order: [W·n, ...]."""
    if world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def gathered_advantages(
    mine: torch.Tensor, weights: torch.Tensor, group_size: int, cfg: AdvantageConfig, how: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards [B, K] of the whole batch from this rank's rows ``mine`` [B/W, K], and the
    advantages and valid flags [B] computed over whole groups (trajectory i is in group
    i // group_size), exactly as one process would; every rank gets the same three tensors
    and keeps its rows (``batch_slice``)."""
    each = gather_rows(mine)
    gids = torch.arange(each.shape[0], device=each.device) // group_size
    adv, valid = combine_advantages(each, weights, gids, cfg, how)
    return each, adv, valid


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. a SIGTERM seen by one rank)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def reduce_metrics(m: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-rank shares summed (keys ending in ``_max``: maxed) across ranks; in sorted-key
    order so every rank issues the same collectives."""
    if world_size() == 1:
        return m
    out = dict(m)
    for op, keys in (
        (dist.ReduceOp.SUM, [k for k in sorted(m) if not k.endswith("_max")]),
        (dist.ReduceOp.MAX, [k for k in sorted(m) if k.endswith("_max")]),
    ):
        if keys:
            t = torch.stack([torch.as_tensor(m[k], device=_device()).float() for k in keys])
            dist.all_reduce(t, op=op)
            out.update(zip(keys, t.unbind(), strict=True))
    return out


def _device() -> str:
    """Where this backend's tensors must live: CUDA for nccl, CPU for gloo."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"

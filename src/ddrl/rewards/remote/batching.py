"""Dynamic batching for ``ddrl reward-server``: requests from several clients (trainer ranks)
wait in one queue, and each replica's batcher merges them into one reward call.

The policy (``JobQueue.take``): a batch starts with the oldest waiting request and takes every
later waiting request of the same image shape (``[3, H, W]`` or ``[3, F, H, W]``) in arrival
order while the total stays within ``max_batch`` images. It closes when it holds ``max_batch``
images, when the next request of its shape would not fit (later, smaller ones do not jump it),
or ``max_wait`` seconds after its first request arrived: a request that already waited that long
behind a busy replica goes at once with whatever else is waiting. Requests of another shape stay
queued, in order, for the next batch. A request of more than ``max_batch`` images is scored
alone, whole (not split across calls; a learned reward chunks by ``reward.batch`` itself).

``score_jobs`` runs in the replica's own worker thread (never on the event loop): one reward
call under ``torch.no_grad`` on the concatenated images, the scores split back per request.
Rewards are per-sample, so each request's scores equal scoring it alone. If the merged call
raises, each request is scored alone once more, so that only the request whose images fail gets
the error (a batch-size failure such as out-of-memory then also passes).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import torch
from torch import Tensor

from ddrl.rewards.base import Reward, checked_reward
from ddrl.rewards.remote.wire import dequantize


@dataclass(eq=False)
class Job:
    """One /score request waiting for its scores: uint8 images [n, 3, ...] and n prompts."""

    images: Tensor
    prompts: list[str]
    future: asyncio.Future
    arrived: float  # the event loop's clock

    @property
    def n(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])


class JobQueue:
    """The requests waiting for a replica, shared by every replica's batcher (one event loop)."""

    def __init__(self, max_batch: int, max_wait: float, on_depth: Callable[[int], None]):
        self.max_batch, self.max_wait = max_batch, max_wait
        self._jobs: deque[Job] = deque()
        self._changed = asyncio.Condition()
        self._on_depth = on_depth  # the queue-depth gauge

    def __len__(self) -> int:
        return len(self._jobs)

    async def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Queue one request and wait for its scores [n] (or the reward's exception)."""
        loop = asyncio.get_running_loop()
        job = Job(images, prompts, loop.create_future(), loop.time())
        async with self._changed:
            self._jobs.append(job)
            self._on_depth(len(self._jobs))
            self._changed.notify_all()
        return await job.future

    async def take(self) -> list[Job]:
        """The next batch (the policy in the module docstring); waits for a first request."""
        loop = asyncio.get_running_loop()
        async with self._changed:
            await self._changed.wait_for(self._drop_abandoned)
            first = self._jobs.popleft()
            batch, n = [first], first.n
            deadline = first.arrived + self.max_wait
            while n < self.max_batch:
                full = False
                for job in list(self._jobs):
                    if job.shape != first.shape or job.future.done():
                        continue
                    if n + job.n > self.max_batch:
                        full = True
                        break
                    self._jobs.remove(job)
                    batch.append(job)
                    n += job.n
                wait = deadline - loop.time()
                if full or n >= self.max_batch or wait <= 0:
                    break
                try:
                    async with asyncio.timeout(wait):
                        await self._changed.wait()
                except TimeoutError:
                    pass  # one more pass over the queue, then the deadline closes the batch
            self._on_depth(len(self._jobs))
        return batch

    def _drop_abandoned(self) -> bool:
        """Drop waiting requests whose client went away (cancelled); is any left?"""
        while self._jobs and self._jobs[0].future.done():
            self._jobs.popleft()
        return bool(self._jobs)


async def run_replica(
    queue: JobQueue,
    reward: Reward,
    name: str,
    device: str,
    executor: Executor,
    on_call: Callable[[int, bool], None],
) -> None:
    """One replica's batcher, until cancelled: take a batch, score it in ``executor`` (one
    thread, so the replica's calls are serial and its device stays the thread's), answer."""
    loop = asyncio.get_running_loop()
    while True:
        jobs = await queue.take()
        results = await loop.run_in_executor(
            executor, score_jobs, reward, name, device, jobs, on_call
        )
        for job, result in zip(jobs, results, strict=True):
            if job.future.done():  # the client went away meanwhile
                continue
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)


def score_jobs(
    reward: Reward,
    name: str,
    device: str,
    jobs: list[Job],
    on_call: Callable[[int, bool], None],
) -> list[Tensor | Exception]:
    """Each job's scores [n] (or the exception its images raised): one reward call on all of
    them, each job alone if that call fails. ``on_call(images, ok)`` is told of every call."""
    cuda = torch.cuda.device(device) if device.startswith("cuda") else contextlib.nullcontext()
    with torch.no_grad(), cuda:  # both thread-local: set in the worker thread itself
        try:
            return list(_call(reward, name, jobs, on_call).split([j.n for j in jobs]))
        except Exception as e:
            if len(jobs) == 1:
                return [e]
        out: list[Tensor | Exception] = []
        for job in jobs:
            try:
                out.append(_call(reward, name, [job], on_call))
            except Exception as e:
                out.append(e)
        return out


def _call(reward: Reward, name: str, jobs: list[Job], on_call) -> Tensor:
    u8 = jobs[0].images if len(jobs) == 1 else torch.cat([j.images for j in jobs])
    prompts = [p for j in jobs for p in j.prompts]
    try:
        scores = checked_reward(reward, name, dequantize(u8), prompts)
    except Exception:
        on_call(u8.shape[0], False)
        print(
            f"reward {name!r} failed on {u8.shape[0]} images ({len(jobs)} requests):",
            file=sys.stderr,
        )
        traceback.print_exc(file=sys.stderr)
        raise
    on_call(u8.shape[0], True)
    return scores

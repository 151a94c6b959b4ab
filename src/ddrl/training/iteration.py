"""One iteration's batch, built in one pass: rollout → reward → advantage → data → trained steps.

Every rank builds the whole batch's plan (prompts, noise, trained steps) from the iteration's
keyed generators (``ddrl.dist.rng``) and keeps its own rows, so a trajectory never depends on
the number of ranks and a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from ddrl.config import RunConfig
from ddrl.dist.group import gathered_advantages
from ddrl.dist.rng import (
    current_rank,
    noise_generator,
    rank_generator,
    shared_generator,
    split_generator,
)
from ddrl.models.base import Cond, CondCache, decode_images
from ddrl.phases import phase
from ddrl.rewards.multi import MultiReward, clip_rewards
from ddrl.sampling import Rollout, rollout
from ddrl.training.components import Components


@dataclass
class Iteration:
    """This rank's share (rows) of iteration ``index``'s B = P·G trajectories, ready to train."""

    index: int  # 0-based iteration
    rollout: Rollout  # this rank's trajectories [B/W]
    each: Tensor  # [B, K] every trajectory's K rewards (all ranks), clipped, × reward.scale
    rewards: Tensor  # [B] their weighted sum
    advantages: Tensor  # [B/W] this rank's, normalised over whole groups
    valid: Tensor  # [B/W] bool: False where the group had a non-finite reward
    valid_all: Tensor  # [B] the same for the whole batch
    x0_data: Tensor | None  # [B/W, ...] the data term's x0 (None: the loss uses no data)
    data_cond: Cond | None  # their own condition when unpaired (None: the trajectories')
    steps: Tensor  # [B/W, n] trained step indices, sorted (noise → data)
    plan: int  # the iteration's shared seed for the losses' per-step choices
    generator: torch.Generator  # this rank's own stream (noise drawn per micro-batch)
    rows: slice | None = None  # this rank's rows of the B trajectories (None: all of them)
    order: torch.Generator | None = None  # the split stream (trajectories → optimizer steps)


class OverlappedScorer:
    """Decodes and scores rollout chunks in one worker thread while the next chunk samples
    (``reward.overlap``); ``result()`` waits for the last one. Per-sample rewards, so the
    values are those of scoring the whole batch at once (to the rounding of batched kernels)."""

    def __init__(self, codec, reward: MultiReward, prompts: list[str], device):
        self.codec, self.reward, self.prompts, self.device = codec, reward, prompts, device
        self.pool, self.jobs = ThreadPoolExecutor(1, thread_name_prefix="ddrl-reward"), []

    def _score(self, part: slice, x: Tensor) -> Tensor:
        with torch.no_grad():  # grad mode is per thread
            return self.reward.each(decode_images(self.codec, x), self.prompts[part])

    def __call__(self, part: slice, x: Tensor) -> None:
        self.jobs.append(self.pool.submit(self._score, part, x))

    def result(self) -> Tensor:
        """Rewards [B, K] of every chunk, in order."""
        try:
            return torch.cat([j.result().to(self.device) for j in self.jobs])
        finally:
            self.pool.shutdown()


def select_timesteps(
    num_steps: int,
    fraction: float,
    how: str,
    batch: int,
    g: torch.Generator,
    skip_last=False,
    skip_first=False,
    count: int = 0,
) -> torch.Tensor:
    """Step indices [batch, n] trained this iteration, drawn from the candidate steps 0..N−1,
    or 0..N−2 with ``skip_last``; n = floor(fraction · #candidates), at least 1, as both peers
    count them (flow_grpo: int(10 · 0.99) = 9; DanceGRPO: int((16 − 1) · 0.6) = 9).
    "first": steps 0..n−1; "per_sample": a random subset per trajectory; "per_batch": one
    random subset for all; "strided": every (#candidates/n)-th step from 0. Each row is
    sorted, so the j-th trained step runs from noise towards data. "stratified" (AWM,
    train_sd3_awm.py L1172-1205): ``count`` strata with bounds linspace(f, floor(fraction·N),
    count + 1) truncated to integers, f = 1 with ``skip_first`` else 0, one index drawn
    uniformly in each stratum per trajectory.
    """
    if how == "stratified":
        first, hi = int(skip_first), math.floor(fraction * num_steps + 1e-9)
        bounds = torch.linspace(first, hi, count + 1).long()
        lo, width = bounds[:-1], bounds[1:] - bounds[:-1]
        return lo + (torch.rand(batch, count, generator=g) * width).long()
    pool = num_steps - 1 if skip_last and num_steps > 1 else num_steps
    n = max(1, math.floor(fraction * pool + 1e-9))
    if how == "first":
        row = torch.arange(n)
    elif how == "strided":
        row = torch.arange(n) * pool // n
    elif how == "per_batch":
        row = torch.randperm(pool, generator=g)[:n].sort().values
    else:
        perms = torch.stack([torch.randperm(pool, generator=g) for _ in range(batch)])
        return perms[:, :n].sort(dim=1).values
    return row.expand(batch, n).clone()


def window_steps(it: int, num_steps: int, size: int, every: int, stride: int) -> Tensor:
    """MixGRPO's sliding window at iteration ``it`` (fastvideo/utils/grpo_states.py, its FLUX
    scripts' progressive strategy with prog_overlap and roll_back): the window [s, s + size)
    of steps 0..N−3 (max_timesteps = N − 2, train_grpo_flux.py L915-928), whose start moves by
    ``stride`` every ``every`` iterations (update_iteration, L87-99) and rolls back to 0 at the
    end (L136-139). Deviation: MixGRPO rolls back only once the start passes N − 2, after one
    group of iterations with an empty window (no update); ddrl rolls back instead of emptying
    it (docs/DECISIONS.md). A function of ``it``, so a resumed run continues the schedule."""
    last, cur, in_group = num_steps - 2, 0, 0
    for _ in range(it):
        in_group += 1
        if in_group >= every:
            in_group, cur = 0, cur + stride
        if cur >= last:
            cur, in_group = 0, 0
    return torch.arange(cur, min(cur + size, max(last, 1)))


def given_frames(
    cfg: RunConfig, c: Components, prompts: list[str], g: torch.Generator, rows: slice, device
) -> tuple[Tensor, Tensor] | None:
    """The conditional frames of this rank's trajectories (``model.cond_frames`` = [lo, hi]):
    per group one paired data item x0 [B/W, ...] and a frame count k [B/W] ~ U{lo..hi}, both
    drawn from the shared stream, as the release draws num_conditional_frames for each rollout
    group (cosmos-rl t2v_model.py L585-589) and conditions on its data item (v2v_model.py
    L61-72). None when hi = 0 (text-to-video): nothing is drawn."""
    lo, hi = cfg.model.cond_frames
    if hi == 0:
        return None
    G = cfg.train.group_size
    k = torch.randint(lo, hi + 1, (len(prompts),), generator=g).repeat_interleave(G)
    x0 = c.pool.paired(prompts, g).repeat_interleave(G, dim=0)
    return x0[rows].to(device), k[rows].to(device)


def collect(
    cfg: RunConfig,
    c: Components,
    it: int,
    rows: slice,
    encode: CondCache,
    device,
    record: str = "transitions",
    sampling=contextlib.nullcontext,
    inference: bool = True,
) -> Iteration:
    """Iteration ``it``'s batch for this rank's ``rows`` of the P·G trajectories; the rollout
    keeps what the loss needs (``record``, ``ddrl.sampling.rollout``) and samples in the
    loss's ``sampling()`` context (NFT: with its old policy's weights); ``inference``: a
    final-samples rollout may run under inference mode (not under FSDP2).

    The shared stream (seed, it) draws the prompts, the trained steps, the plan seed and the
    conditional frames, in that order; the noise stream draws the rollout's noise and then the
    data pairing; the rank's own stream is left for per-micro-batch noise
    (``Iteration.generator``)."""
    gen, tc = c.gen, cfg.train
    P, G = tc.prompts_per_iter, tc.group_size
    g_shared, g_noise = shared_generator(cfg.seed, it), noise_generator(cfg.seed, it)
    rank = current_rank()
    g_own = g_noise if rank == 0 else rank_generator(cfg.seed, it, rank)
    with phase("rollout"):
        prompts = c.data.sample_prompts(P, g_shared)
        sde_steps = None  # every step stochastic, except in MixGRPO's window selection
        if tc.timestep_selection == "window":
            size, every, stride = tc.window_size, tc.window_every, tc.window_stride
            win = window_steps(it, cfg.sampler.num_steps, size, every, stride)
            steps = win.expand(P * G, len(win))[rows].to(device)
            sde_steps = torch.zeros(cfg.sampler.num_steps, dtype=torch.bool)
            sde_steps[win] = True
        else:
            steps = select_timesteps(
                cfg.sampler.num_steps,
                tc.timestep_fraction,
                tc.timestep_selection,
                P * G,
                g_shared,
                tc.skip_last_step,
                tc.skip_first_step,
                tc.timestep_count,
            )[rows].to(device)
        plan = int(torch.randint(2**31 - 1, (1,), generator=g_shared))
        given = given_frames(cfg, c, prompts, g_shared, rows, device)  # after every other draw
        every_prompt = [q for q in prompts for _ in range(G)]
        scorer = (  # scores each chunk while the next samples (reward.overlap)
            OverlappedScorer(gen.codec, c.reward, every_prompt[rows], device)
            if cfg.reward.overlap
            else None
        )
        gen.denoiser.eval()
        with sampling():
            ro = rollout(
                gen,
                prompts,
                G,
                cfg.sampler,
                g_noise,
                device,
                encode=encode,
                rows=rows,
                on_chunk=scorer,
                given=given,
                record=record,
                sde_steps=sde_steps,
                inference=inference,
            )
        gen.denoiser.train()
    if scorer is None:
        with phase("decode"):
            images = decode_images(gen.codec, ro.final)
    with phase("reward"):  # with overlap: waiting for the last chunk's rewards
        mine = scorer.result() if scorer else c.reward.each(images, ro.prompts).to(device)
        mine = clip_rewards(mine, cfg.reward.clip) * cfg.reward.scale  # [B/W, K]
    with phase("advantage"):
        # [B, K] and [B]: groups normalise whole, whichever ranks hold their samples
        each, adv_all, valid_all = gathered_advantages(
            mine, c.reward.weights, G, cfg.advantage, cfg.reward.aggregate
        )
        x0_data = data_cond = None
        if c.needs_data:
            if given:  # the item that conditions the group's rollouts (release: one per group)
                x0_data = given[0]
            elif c.paired:
                x0_data = c.pool.paired(every_prompt, g_noise)[rows].to(device)
            else:
                x0_data, captions = c.pool.sample(P * G, g_noise)
                x0_data, data_cond = x0_data[rows].to(device), encode(captions[rows]).to(device)
    return Iteration(
        it,
        ro,
        each,
        each @ c.reward.weights.to(each),
        adv_all[rows],
        valid_all[rows],
        valid_all,
        x0_data,
        data_cond,
        steps,
        plan,
        g_own,
        rows,
        split_generator(cfg.seed, it, rank),
    )

"""The one sampling loop: groups of stochastic trajectories for training (every transition
recorded), and the deterministic Euler ODE for evaluation and synthetic data.

Each trajectory x_{t_0} = ε → … → x_{t_T} = x0 is a product of Gaussian transitions
(``ddrl.sde``), so log p(x_{i+1} | x_i) can be recomputed exactly under new weights later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ddrl.config.core import SamplerConfig
from ddrl.flow import linear_grid
from ddrl.models.base import Cond, CondCache, Generator, guided_velocity, null_cond
from ddrl.sde import ode_step, stepper


@dataclass
class Rollout:
    """B = prompts × group trajectories of T steps."""

    states: Tensor  # [T + 1, B, ...]: x at each grid time, states[0] is the initial noise;
    # [2, B, ...] (initial noise, final sample) for a rollout that records only those
    log_probs: Tensor  # [T, B]: log p(states[i+1] | states[i]) under the sampling weights
    # ([0, B] when not recorded)
    timesteps: Tensor  # [T + 1]: grid from 1 to 0
    cond: Cond  # condition, batch B
    null: Cond | None  # unconditional condition (batch B) when CFG is on, else None
    prompts: list[str]  # [B]
    means: Tensor | None = None  # [T, B, ...]: each step's mean μ_old, when recorded

    @property
    def transitions(self) -> bool:
        """Whether every step (state and log-prob) was recorded."""
        return self.log_probs.shape[0] > 0

    @property
    def final(self) -> Tensor:
        return self.states[-1]


def time_grid(cfg: SamplerConfig, gen: Generator, num_steps: int) -> Tensor:
    """The sampling grid [num_steps + 1] from 1 to 0: ``gen``'s own scheduler's
    (``cfg.grid = "scheduler"``), or DanceGRPO's shift(linspace(1, 0, N + 1)) (``"linear"``)."""
    if cfg.grid == "linear":
        return linear_grid(num_steps, cfg.shift or 1.0)
    return gen.timestep_grid(num_steps, cfg.shift)


def initial_noise(
    n_groups: int, group_size: int, shape: tuple, shared: bool, generator: torch.Generator
) -> Tensor:
    """ε [n_groups·group_size, *shape]: one draw per sample, or one per group repeated."""
    if shared:
        return torch.randn((n_groups, *shape), generator=generator).repeat_interleave(group_size, 0)
    return torch.randn((n_groups * group_size, *shape), generator=generator)


RECORDS = ("transitions", "means", "final")  # what a rollout keeps (``rollout``)


def rollout(
    gen: Generator,
    prompts: list[str],
    group_size: int,
    cfg: SamplerConfig,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
    *,
    encode: CondCache | None = None,
    rows: slice | None = None,
    on_chunk: Callable[[slice, Tensor], None] | None = None,
    given: tuple[Tensor, Tensor] | None = None,
    record: str = "transitions",
    sde_steps: Tensor | None = None,
    inference: bool = True,
) -> Rollout:
    """Roll out ``group_size`` samples per prompt with the stochastic step ``cfg.sde``.

    All noise (initial and per step) comes from ``generator``, drawn on the CPU so that a run
    is reproducible across devices. ``rows``: only these trajectories of the whole batch (one
    rank's share); the noise of the whole batch is drawn and sliced, so a trajectory does not
    depend on the split. ``on_chunk(part, x)``: called with each chunk's rows (a slice of this
    rank's trajectories) and final samples as soon as they are done (``reward.overlap`` scores
    them while the next chunk samples). ``given``: conditional frames of this rank's
    trajectories, (x0 [n, ...], k [n]) (``with_frames``). ``record``: "transitions" (every
    state and log-prob, for objectives that recompute them), "means" (also each step's mean,
    GRPO-Guard), "final" (the initial noise and final sample only, under inference mode: the
    forward-process objectives need nothing else; ``inference=False`` keeps plain no-grad mode,
    for FSDP2, whose all-gather buffers outlive the rollout and are written in place later).
    ``sde_steps`` [T] bool: the steps taken with the SDE, the others with the Euler ODE
    (MixGRPO's window); None = all with the SDE.
    """
    # Forward-process objectives never differentiate through the rollout.
    with torch.inference_mode() if record == "final" and inference else torch.no_grad():
        p = len(prompts)
        rows = rows or slice(None)
        rep = [q for q in prompts for _ in range(group_size)][rows]
        cond = (encode or gen.conditioner.encode)(rep).to(device)
        null = null_cond(gen.conditioner, rep).to(device) if cfg.cfg_scale != 1.0 else None
        cond, null = with_frames(gen, cond, null, given)
        x0 = initial_noise(p, group_size, gen.sample_shape, cfg.shared_noise, generator)
        full = x0.shape
        x0 = x0[rows]
        ts = time_grid(cfg, gen, cfg.num_steps).to(device)
        step = stepper(cfg.sde)
        # All noise is drawn first, in the order of an unchunked rollout, so ``cfg.batch`` changes
        # memory only, never the samples.
        zs = [torch.randn(full, generator=generator)[rows].clone() for _ in range(cfg.num_steps)]
        n, chunk, T = len(rep), cfg.batch or len(rep), cfg.num_steps
        every = record != "final"
        states = torch.empty((T + 1 if every else 2, *x0.shape), device=device)
        logps = torch.empty((T if every else 0, n), device=device)
        means = torch.empty((T, *x0.shape), device=device) if record == "means" else None
        for s in range(0, n, chunk):
            part = slice(s, s + chunk)
            idx = torch.arange(n, device=device)[part]
            c, u = cond.index(idx), null.index(idx) if null is not None else None
            x = x0[part].to(device)
            states[0, part] = x
            for i in range(T):
                t, t_next = ts[i].expand(x.shape[0]), ts[i + 1].expand(x.shape[0])
                v = guided_velocity(gen.denoiser, x, t, c, u, cfg.cfg_scale)
                if sde_steps is None or sde_steps[i]:
                    out = step(x, v, t, t_next, noise=zs[i][part].to(device))
                else:  # outside MixGRPO's window: plain Euler (sampling_utils.py L198-199)
                    out = ode_step(x, v, t, t_next)
                x = out.x_next
                if every:
                    states[i + 1, part] = x
                    logps[i, part] = out.log_prob
                if means is not None:
                    means[i, part] = out.mean
            if not every:  # the final sample (the loop above kept every state otherwise)
                states[-1, part] = x
            if on_chunk is not None:
                on_chunk(part, x)
        return Rollout(states, logps, ts, cond, null, rep, means)


def with_frames(
    gen: Generator, cond: Cond, null: Cond | None, given: tuple[Tensor, Tensor] | None
) -> tuple[Cond, Cond | None]:
    """``cond`` and the CFG ``null`` [B] conditioned on the first k_i frames of x0_i, given =
    (x0 [B, ...], k [B]) (``Generator.condition_frames``); unchanged when ``given`` is None."""
    if given is None:
        return cond, null
    dev = next(iter(cond.batched.values())).device
    x0, k = given[0].to(dev), given[1].to(dev)
    frame = gen.condition_frames
    return frame(cond, x0, k), frame(null, x0, k) if null is not None else None


@torch.no_grad()
def ode_solve(
    gen: Generator,
    noise: Tensor,
    prompts: list[str],
    cfg: SamplerConfig,
    device="cpu",
    given: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Deterministic Euler samples [B, *sample_shape] (model space, on ``device``) from given
    noise [B, ...]: x ← x + v·dt over ``cfg.eval_steps`` steps of ``cfg``'s grid, with
    ``cfg.cfg_scale`` guidance; ``given``: conditional frames (``with_frames``)."""
    ts = time_grid(cfg, gen, cfg.eval_steps).to(device)
    x = noise.to(device)
    cond = gen.conditioner.encode(list(prompts)).to(device)
    null = null_cond(gen.conditioner, list(prompts)).to(device) if cfg.cfg_scale != 1.0 else None
    cond, null = with_frames(gen, cond, null, given)
    for i in range(cfg.eval_steps):
        t = ts[i].expand(x.shape[0])
        v = guided_velocity(gen.denoiser, x, t, cond, null, cfg.cfg_scale)
        x = ode_step(x, v, t, ts[i + 1].expand(x.shape[0])).x_next
    return x


def sample_ode(
    gen: Generator,
    prompts: list[str],
    cfg: SamplerConfig,
    generator: torch.Generator,
    device="cpu",
    batch_size: int = 512,
    given: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``ode_solve`` from fixed noise drawn from ``generator``, in batches of ``batch_size``:
    samples [len(prompts), *sample_shape] on the CPU (evaluation); ``given``: conditional
    frames of every sample (``with_frames``)."""
    noise = torch.randn((len(prompts), *gen.sample_shape), generator=generator)
    part = lambda s: (given[0][s], given[1][s]) if given else None  # noqa: E731
    out = [
        ode_solve(gen, noise[s], prompts[s], cfg, device, part(s))
        for s in (slice(i, i + batch_size) for i in range(0, len(prompts), batch_size))
    ]
    return torch.cat([x.cpu() for x in out])

"""Sample groups of trajectories with a stochastic sampler and record every transition.

Each trajectory x_{t_0} = ε → … → x_{t_T} = x0 is a product of Gaussian transitions
(``ddrl.sde``), so log p(x_{i+1} | x_i) can be recomputed exactly under new weights later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ddrl.errors import check_choice, check_range
from ddrl.flow import GRIDS, linear_grid
from ddrl.models import Cond, CondCache, Generator, guided_velocity
from ddrl.sde import SDES, FlowSDE, ode_step


@dataclass
class SamplerConfig:
    """The rollout sampler (training); evaluation uses the ODE with ``eval_steps``."""

    sde: Any = field(default_factory=FlowSDE)  # [sampler.sde] kind = "flow" (noise_level a) or
    # "dance" (eta): the stochastic step and its own parameter
    grid: str = "scheduler"  # "scheduler": the model's own scheduler's sigmas (diffusers
    # pipelines, flow_grpo; digits: FlowMatchEulerDiscreteScheduler); "linear":
    # shift(linspace(1, 0, N+1)) (DanceGRPO)
    num_steps: int = 10  # sampling steps per rollout (flow_grpo trains on 10)
    shift: float = 0.0  # timestep shift of the grid; 0 = the model's own scheduler's (SD3.5: 3.0,
    # FLUX: resolution-dependent, digits: 1.0); for the linear grid 0 means 1 (no shift)
    cfg_scale: float = 1.0  # classifier-free guidance weight; 1 = off (DDRL's release uses none)
    shared_noise: bool = False  # one initial noise per group (DanceGRPO) instead of per sample
    eval_steps: int = 20  # ODE steps for evaluation samples
    batch: int = 0  # trajectories per denoiser forward in rollouts; 0 = all at once (memory
    # only: the noise is the same, the samples equal up to float rounding of batched kernels)

    def check(self) -> None:
        check_choice("sampler.sde.kind", getattr(self.sde, "kind", "?"), SDES)
        self.sde.check()
        check_choice("sampler.grid", self.grid, GRIDS)
        check_range("sampler.num_steps", self.num_steps, 1, 1000)
        check_range("sampler.eval_steps", self.eval_steps, 1, 1000)
        if self.shift != 0:
            check_range("sampler.shift", self.shift, 1e-3, 100.0)
        check_range("sampler.batch", self.batch, 0)
        check_range("sampler.cfg_scale", self.cfg_scale, 0.0, 100.0)

    def grid_for(self, gen: Generator, num_steps: int) -> Tensor:
        """The sampling grid [num_steps + 1] from 1 to 0: ``gen``'s own scheduler's, or linear."""
        if self.grid == "linear":
            return linear_grid(num_steps, self.shift or 1.0)
        return gen.timestep_grid(num_steps, self.shift)


@dataclass
class Rollout:
    """B = prompts × group trajectories of T steps."""

    states: Tensor  # [T + 1, B, ...]: x at each grid time, states[0] is the initial noise
    log_probs: Tensor  # [T, B]: log p(states[i+1] | states[i]) under the sampling weights
    timesteps: Tensor  # [T + 1]: grid from 1 to 0
    cond: Cond  # condition, batch B
    null: Cond | None  # unconditional condition (batch B) when CFG is on, else None
    prompts: list[str]  # [B]
    group_ids: Tensor  # [B] long: which group (prompt draw) each trajectory belongs to

    @property
    def final(self) -> Tensor:
        return self.states[-1]


def initial_noise(
    n_groups: int, group_size: int, shape: tuple, shared: bool, generator: torch.Generator
) -> Tensor:
    """ε [n_groups·group_size, *shape]: one draw per sample, or one per group repeated."""
    if shared:
        return torch.randn((n_groups, *shape), generator=generator).repeat_interleave(group_size, 0)
    return torch.randn((n_groups * group_size, *shape), generator=generator)


@torch.no_grad()
def rollout(
    gen: Generator,
    prompts: list[str],
    group_size: int,
    cfg: SamplerConfig,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
    encode: CondCache | None = None,
    rows: slice | None = None,
    on_chunk=None,
) -> Rollout:
    """Roll out ``group_size`` samples per prompt with the stochastic step ``cfg.sde``.

    All noise (initial and per step) comes from ``generator``, drawn on the CPU so that a run
    is reproducible across devices. ``rows``: only these trajectories of the whole batch (one
    rank's share); the noise of the whole batch is drawn and sliced, so a trajectory does not
    depend on the split. Its group ids stay global. ``on_chunk(part, x)``: called with each
    chunk's rows (a slice of this rank's trajectories) and final samples as soon as they are
    done (``reward.overlap`` scores them while the next chunk samples).
    """
    p = len(prompts)
    rows = rows or slice(None)
    rep = [q for q in prompts for _ in range(group_size)][rows]
    cond = (encode or gen.conditioner.encode)(rep).to(device)
    null = gen.conditioner.null(len(rep)).to(device) if cfg.cfg_scale != 1.0 else None
    x0 = initial_noise(p, group_size, gen.sample_shape, cfg.shared_noise, generator)
    full = x0.shape
    x0 = x0[rows]
    ts = cfg.grid_for(gen, cfg.num_steps).to(device)
    # All noise is drawn first, in the order of an unchunked rollout, so ``cfg.batch`` changes
    # memory only, never the samples.
    zs = [torch.randn(full, generator=generator)[rows].clone() for _ in range(cfg.num_steps)]
    n, chunk = len(rep), cfg.batch or len(rep)
    states = torch.empty((cfg.num_steps + 1, *x0.shape), device=device)
    logps = torch.empty((cfg.num_steps, n), device=device)
    for s in range(0, n, chunk):
        part = slice(s, s + chunk)
        idx = torch.arange(n, device=device)[part]
        c, u = cond.index(idx), null.index(idx) if null is not None else None
        x = x0[part].to(device)
        states[0, part] = x
        for i in range(cfg.num_steps):
            t = ts[i].expand(x.shape[0])
            v = guided_velocity(gen.denoiser, x, t, c, u, cfg.cfg_scale)
            step = cfg.sde.step(x, v, t, ts[i + 1].expand(x.shape[0]), noise=zs[i][part].to(device))
            x = step.x_next
            states[i + 1, part] = x
            logps[i, part] = step.log_prob
        if on_chunk is not None:
            on_chunk(part, x)
    gid = torch.arange(p, device=device).repeat_interleave(group_size)[rows]
    return Rollout(states, logps, ts, cond, null, rep, gid)


@torch.no_grad()
def sample_ode(
    gen: Generator,
    prompts: list[str],
    cfg: SamplerConfig,
    generator: torch.Generator,
    device="cpu",
    batch_size: int = 512,
) -> Tensor:
    """Deterministic Euler samples [len(prompts), *sample_shape] (model space) from fixed noise,
    on ``cfg``'s grid with ``cfg.eval_steps`` steps (evaluation, synthetic data)."""
    ts = cfg.grid_for(gen, cfg.eval_steps).to(device)
    noise = torch.randn((len(prompts), *gen.sample_shape), generator=generator)
    out = []
    for s in range(0, len(prompts), batch_size):
        x = noise[s : s + batch_size].to(device)
        cond = gen.conditioner.encode(prompts[s : s + batch_size]).to(device)
        null = gen.conditioner.null(x.shape[0]).to(device) if cfg.cfg_scale != 1.0 else None
        for i in range(cfg.eval_steps):
            t = ts[i].expand(x.shape[0])
            v = guided_velocity(gen.denoiser, x, t, cond, null, cfg.cfg_scale)
            x = ode_step(x, v, t, ts[i + 1].expand(x.shape[0])).x_next
        out.append(x.cpu())
    return torch.cat(out)

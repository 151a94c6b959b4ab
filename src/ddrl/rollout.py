"""Sample groups of trajectories with a stochastic sampler and record every transition.

Each trajectory x_{t_0} = ε → … → x_{t_T} = x0 is a product of Gaussian transitions
(``ddrl.sde``), so logp(x_{i+1} | x_i) can be recomputed exactly under new weights later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .backbones import Backbone, Cond, guided_velocity
from .errors import check_choice, check_range
from .flow import timestep_grid
from .sde import SDE_STEPS, ode_step, sde_step


@dataclass
class SamplerConfig:
    """The rollout sampler (training) — evaluation uses the ODE with ``eval_steps``."""

    sde: str = "flow"  # "flow" (Flow-GRPO σ_t = a·sqrt(t/(1−t))) or "dance" (DanceGRPO, std η·√−dt)
    noise_level: float = 0.7  # a for "flow", η for "dance"
    num_steps: int = 10  # sampling steps per rollout (Flow-GRPO trains on 10)
    shift: float = 1.0  # SD3 timestep shift of the grid (3.0 for SD3 at 1024²)
    cfg_scale: float = 1.0  # classifier-free guidance weight; 1 = off (DDRL's release uses none)
    shared_noise: bool = False  # one initial noise per group (DanceGRPO) instead of per sample
    eval_steps: int = 20  # ODE steps for evaluation samples

    def check(self) -> None:
        check_choice("sampler.sde", self.sde, SDE_STEPS)
        check_range("sampler.noise_level", self.noise_level, 1e-4, 10.0)  # 0 ⇒ std 0, no log-prob
        check_range("sampler.num_steps", self.num_steps, 1, 1000)
        check_range("sampler.eval_steps", self.eval_steps, 1, 1000)
        check_range("sampler.shift", self.shift, 1e-3, 100.0)


@dataclass
class Rollout:
    """B = prompts × group trajectories of T steps."""

    states: Tensor  # [T + 1, B, ...]: x at each grid time, states[0] is the initial noise
    log_probs: Tensor  # [T, B]: log p(states[i+1] | states[i]) under the sampling weights
    timesteps: Tensor  # [T + 1]: grid from 1 to 0
    cond: Cond  # condition, batch B
    prompts: list[str]  # [B]
    group_ids: Tensor  # [B] long: which prompt (group) each trajectory belongs to

    @property
    def final(self) -> Tensor:
        return self.states[-1]


@torch.no_grad()
def rollout(
    model: Backbone,
    prompts: list[str],
    group_size: int,
    cfg: SamplerConfig,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> Rollout:
    """Roll out ``group_size`` samples per prompt with the stochastic sampler ``cfg.sde``."""
    p = len(prompts)
    rep = [q for q in prompts for _ in range(group_size)]
    cond = model.encode(rep)
    shape = (p * group_size, *model.sample_shape)
    if cfg.shared_noise:
        x = torch.randn((p, *model.sample_shape), generator=generator)
        x = x.repeat_interleave(group_size, 0)
    else:
        x = torch.randn(shape, generator=generator)
    x = x.to(device)
    ts = timestep_grid(cfg.num_steps, cfg.shift).to(device)
    states, logps = [x], []
    for i in range(cfg.num_steps):
        t = ts[i].expand(shape[0])
        v = guided_velocity(model, x, t, cond, cfg.cfg_scale)
        z = torch.randn(shape, generator=generator).to(device)
        step = sde_step(cfg.sde, x, v, t, ts[i + 1].expand(shape[0]), cfg.noise_level, noise=z)
        x = step.x_next
        states.append(x)
        logps.append(step.log_prob)
    gid = torch.arange(p, device=device).repeat_interleave(group_size)
    return Rollout(torch.stack(states), torch.stack(logps), ts, cond, rep, gid)


@torch.no_grad()
def sample_ode(
    model: Backbone,
    prompts: list[str],
    num_steps: int,
    generator: torch.Generator,
    shift: float = 1.0,
    cfg_scale: float = 1.0,
    device="cpu",
    batch_size: int = 512,
) -> Tensor:
    """Deterministic Euler samples [len(prompts), ...] from fixed noise (evaluation)."""
    ts = timestep_grid(num_steps, shift).to(device)
    noise = torch.randn((len(prompts), *model.sample_shape), generator=generator).to(device)
    out = []
    for s in range(0, len(prompts), batch_size):
        x = noise[s : s + batch_size]
        cond = model.encode(prompts[s : s + batch_size])
        for i in range(num_steps):
            t = ts[i].expand(x.shape[0])
            v = guided_velocity(model, x, t, cond, cfg_scale)
            x = ode_step(x, v, t, ts[i + 1].expand(x.shape[0])).x_next
        out.append(x)
    return torch.cat(out)

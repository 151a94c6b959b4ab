"""Configs of the top-level mathematics: the rollout sampler with its SDE kinds, and how rewards
become advantages. Torch-free, so a config resolves without loading torch; the mathematics that
uses them is ``ddrl.sde``, ``ddrl.sampling`` and ``ddrl.advantages``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ddrl.errors import check_choice, check_literals, check_range


@dataclass
class FlowSDE:
    """Flow-GRPO's SDE: σ_t = a·sqrt(t/(1−t)) (flow_grpo `noise_level` a = 0.7)."""

    noise_level: float = field(
        default=0.7, metadata={"help": "a in σ_t = a·sqrt(t/(1−t)) (flow_grpo: 0.7)"}
    )
    kind: str = field(default="flow", metadata={"help": "selects this SDE (sampler.sde.kind)"})

    def check(self) -> None:
        check_range("sampler.sde.noise_level", self.noise_level, 1e-4, 10.0)


@dataclass
class DanceSDE:
    """DanceGRPO's SDE: std = η·sqrt(−dt), drift from the score of the straight path."""

    eta: float = field(
        default=0.3, metadata={"help": "η (DanceGRPO's FLUX scripts: 0.3; its video scripts: 0.25)"}
    )
    kind: str = field(default="dance", metadata={"help": "selects this SDE (sampler.sde.kind)"})

    def check(self) -> None:
        check_range("sampler.sde.eta", self.eta, 1e-4, 10.0)


@dataclass
class CPSSDE:
    """Coefficients-preserving sampling (IamCreateAI/FlowCPS sd3_sde_with_logprob.py L52-70):
    σ_n = t'·sin(η·π/2), the noise coefficient kept at exactly t'."""

    eta: float = field(
        default=0.8,
        metadata={"help": "η in σ_n = t_next·sin(η·π/2) (flow_grpo's CPS configs: 0.8)"},
    )
    kind: str = field(default="cps", metadata={"help": "selects this SDE (sampler.sde.kind)"})

    def check(self) -> None:
        check_range("sampler.sde.eta", self.eta, 1e-4, 1.0)


@dataclass
class ODESampler:
    """No noise: the Euler ODE (forward-process objectives, NFT and AWM, train on the final
    samples only; log-probs are 0)."""

    kind: str = field(default="ode", metadata={"help": "selects this sampler (sampler.sde.kind)"})

    def check(self) -> None:
        pass


SDES = {  # sampler.sde.kind → its config class
    "flow": FlowSDE,
    "dance": DanceSDE,
    "cps": CPSSDE,
    "ode": ODESampler,
}


@dataclass
class SamplerConfig:
    """The rollout sampler (training); evaluation uses the ODE with ``eval_steps``."""

    sde: Any = field(
        default_factory=FlowSDE,
        metadata={
            "help": '[sampler.sde] kind = "flow" (noise_level a), "dance" (eta), "cps" (eta) or '
            '"ode" (no noise; forward-process objectives only): the step and its own parameter'
        },
    )
    grid: Literal["scheduler", "linear"] = field(
        default="scheduler",
        metadata={
            "help": "\"scheduler\": the model's own scheduler's sigmas (diffusers pipelines, "
            'flow_grpo; digits: FlowMatchEulerDiscreteScheduler); "linear": shift(linspace(1, 0, '
            "N+1)) (DanceGRPO)"
        },
    )
    num_steps: int = field(
        default=10, metadata={"help": "sampling steps per rollout (flow_grpo trains on 10)"}
    )
    shift: float = field(
        default=0.0,
        metadata={
            "help": "timestep shift of the grid; 0 = the model's own scheduler's (SD3.5: 3.0, "
            "FLUX: resolution-dependent, digits: 1.0); for the linear grid 0 means 1 (no shift)"
        },
    )
    cfg_scale: float = field(
        default=1.0,
        metadata={"help": "classifier-free guidance weight; 1 = off (DDRL's release uses none)"},
    )
    shared_noise: bool = field(
        default=False,
        metadata={"help": "one initial noise per group (DanceGRPO) instead of per sample"},
    )
    eval_steps: int = field(default=20, metadata={"help": "ODE steps for evaluation samples"})
    batch: int = field(
        default=0,
        metadata={
            "help": "trajectories per denoiser forward in rollouts; 0 = all at once (memory only: "
            "the noise is the same, the samples equal up to float rounding of batched kernels)"
        },
    )

    def check(self) -> None:
        check_literals(self, "sampler.")
        check_choice("sampler.sde.kind", getattr(self.sde, "kind", "?"), SDES)
        self.sde.check()
        check_range("sampler.num_steps", self.num_steps, 1, 1000)
        check_range("sampler.eval_steps", self.eval_steps, 1, 1000)
        if self.shift != 0:
            check_range("sampler.shift", self.shift, 1e-3, 100.0)
        check_range("sampler.batch", self.batch, 0)
        check_range("sampler.cfg_scale", self.cfg_scale, 0.0, 100.0)


@dataclass
class AdvantageConfig:
    """How rewards become advantages."""

    std: Literal["unbiased", "population", "global"] = field(
        default="unbiased",
        metadata={"help": '"unbiased" (release, DanceGRPO) | "population" | "global" (flow_grpo)'},
    )
    eps: float = field(
        default=1e-4,
        metadata={"help": "added to the std, > 0 (a group of equal rewards gets A = 0)"},
    )
    exp_transform: bool = field(
        default=False,
        metadata={"help": "DDRL's λ(A/β) = −exp(−A/β) (release `exp_reward`: off, β = 1)"},
    )
    beta: float = field(
        default=1.0,
        metadata={"help": "temperature β of λ(A/β); β = 1 is the release; needs exp_transform"},
    )
    clamp: float = field(
        default=5.0,
        metadata={"help": "|A| ≤ clamp (release adv_clip_max/min ±5); see group_advantages"},
    )

    def check(self) -> None:
        check_literals(self, "advantage.")
        check_range("advantage.eps", self.eps, 1e-12)  # 0 ⇒ NaN for a group of equal rewards
        check_range("advantage.beta", self.beta, 1e-3)
        check_range("advantage.clamp", self.clamp, 1.0 + 1e-6)

"""Each algorithm's own typed config (torch-free; the loss classes live beside them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ddrl.errors import DDRLError, check_literals, check_range


@dataclass
class DataTermConfig:
    """The flow-matching loss on data (DDRL's forward KL, SFT)."""

    data_beta: float = field(
        default=0.1,
        metadata={"help": "weight of the flow-matching loss on data (forward KL to p̃_data)"},
    )
    data_t: Literal["rollout", "random", "edm_lognormal"] = field(
        default="rollout",
        metadata={
            "help": '"rollout": the rollout\'s t and initial noise (release '
            'use_rl_sigma_and_noise); "random": logit-normal t and fresh noise; "edm_lognormal": '
            "the release's pretraining σ draw (t = σ/(1+σ)) and fresh noise"
        },
    )
    data_weight: Literal["none", "edm"] = field(
        default="none",
        metadata={
            "help": '"none": the velocity MSE; "edm": × (t² + (1−t)²), the release\'s '
            "EDM-weighted x0 loss (docs/DECISIONS.md)"
        },
    )
    data_caption_dropout: float = field(
        default=0.0,
        metadata={
            "help": "fraction of data items whose condition is zeroed in the data term (release "
            "text dropout_rate: 0.2); drawn per item"
        },
    )
    data_on_first_only: bool = field(
        default=False,
        metadata={
            "help": "computed at the first trained timestep only, still averaged over items × "
            "trained timesteps like the release (so weighted data_beta / n; on digits at data_beta "
            "0.1 this no longer prevents hacking: docs/DECISIONS.md)"
        },
    )
    data_steps: float = field(
        default=1.0,
        metadata={
            "help": "fraction of the trained steps with the data term: a random subset per "
            "iteration, averaged over the chosen steps (unbiased); 1 = every step (release)"
        },
    )
    data_batched: bool = field(
        default=False, metadata={"help": "data term and policy term in one forward (same numbers)"}
    )

    def check(self) -> None:
        check_literals(self, "loss.")
        check_range("loss.data_beta", self.data_beta, 0.0)
        check_range("loss.data_steps", self.data_steps, 1e-6, 1.0)
        check_range("loss.data_caption_dropout", self.data_caption_dropout, 0.0, 1.0)
        if self.data_on_first_only and self.data_steps < 1:
            raise DDRLError(
                "loss.data_on_first_only and loss.data_steps < 1 both thin out the data term; "
                "allowed: one of them"
            )


@dataclass
class FlowGRPOConfig:
    """Flow-GRPO's knobs."""

    clip_range: float = field(default=1e-4, metadata={"help": "PPO ratio clip ε (flow_grpo: 1e-4)"})
    beta_kl: float = field(
        default=0.04,
        metadata={"help": "KL weight in flow_grpo's units (its SD3.5-M OCR config: 0.04)"},
    )
    drop_zero_advantage: bool = field(
        default=False,
        metadata={
            "help": "leave samples whose advantage is exactly 0 (a group of equal rewards) out of "
            "the policy and KL terms and their denominators, as flow_grpo does (its preset: true)"
        },
    )
    reference: Literal["auto", "frozen_copy", "adapter_disabled"] = field(
        default="auto",
        metadata={
            "help": 'the start model: "auto" = adapters disabled under LoRA (no copy), else a '
            'frozen copy; or "frozen_copy" / "adapter_disabled"'
        },
    )

    def check(self) -> None:
        check_literals(self, "loss.")
        check_range("loss.clip_range", self.clip_range, 0.0, 1.0)
        check_range("loss.beta_kl", self.beta_kl, 0.0)


@dataclass
class PolicyConfig:
    """The clipped policy term's knobs (plain GRPO, DanceGRPO; DDRL adds the data term's)."""

    clip_range: float = field(
        default=1e-4,
        metadata={"help": "PPO ratio clip ε (the release, flow_grpo, DanceGRPO: 1e-4)"},
    )
    ratio: Literal["log_density", "edm_squared_error"] = field(
        default="log_density",
        metadata={
            "help": '"log_density": ρ from the per-dimension-mean log-density; '
            '"edm_squared_error": the release\'s unnormalised squared error in EDM space'
        },
    )

    def check(self) -> None:
        check_literals(self, "loss.")
        check_range("loss.clip_range", self.clip_range, 0.0, 1.0)


@dataclass
class DDRLConfig(DataTermConfig, PolicyConfig):
    """DDRL's knobs: the data term's and the policy term's."""

    def check(self) -> None:
        DataTermConfig.check(self)
        PolicyConfig.check(self)


@dataclass
class SFTConfig(DataTermConfig):
    """SFT's knobs: the data term's."""

    data_beta: float = field(
        default=1.0, metadata={"help": "weight of the flow-matching loss (only a scale for SFT)"}
    )

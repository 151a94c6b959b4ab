"""Each objective's and regulariser's own typed config (torch-free; classes live beside them)."""

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
class GRPOConfig:
    """The clipped GRPO surrogate on recorded SDE transitions (DDRL, Flow-GRPO, DanceGRPO)."""

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
    drop_zero_advantage: bool = field(
        default=False,
        metadata={
            "help": "leave samples whose advantage is exactly 0 (a group of equal rewards) out of "
            "the policy term, the regularisers on its samples and their denominators, as flow_grpo "
            "does (its preset: true)"
        },
    )
    ratio_norm: bool = field(
        default=False,
        metadata={
            "help": "GRPO-Guard's ratio normalisation (docs/CONFORMANCE.md §11): the log-ratio "
            "standardised per timestep before clipping"
        },
    )

    def check(self) -> None:
        check_literals(self, "loss.")
        check_range("loss.clip_range", self.clip_range, 0.0, 1.0)


@dataclass
class NFTConfig:
    """DiffusionNFT's knobs (scripts/train_nft_sd3.py, config/nft.py; docs/CONFORMANCE.md §9)."""

    nft_beta: float = field(
        default=1.0,
        metadata={
            "help": "β of the implicit policies v± (config/nft.py `beta`: 1.0 GenEval/PickScore, "
            "0.1 OCR)"
        },
    )
    adv_clip_max: float = field(
        default=5.0,
        metadata={"help": "A clipped to ±this, r = A/(2·this) + ½ (its train.adv_clip_max: 5)"},
    )
    old_flat: int = field(
        default=0,
        metadata={
            "help": "old policy ← d·old + (1−d)·θ after each iteration, d = 0 for the first "
            "old_flat optimizer steps (its decay_type 1: 0; 2: 75)"
        },
    )
    old_rate: float = field(
        default=0.001,
        metadata={"help": "then d = (s − old_flat)·old_rate (decay_type 1: 0.001; 2: 0.0075)"},
    )
    old_cap: float = field(
        default=0.5, metadata={"help": "at most old_cap (decay_type 1: 0.5; 2: 0.999)"}
    )

    def check(self) -> None:
        check_range("loss.nft_beta", self.nft_beta, 1e-6)
        check_range("loss.adv_clip_max", self.adv_clip_max, 1e-6)
        check_range("loss.old_flat", self.old_flat, 0)
        check_range("loss.old_rate", self.old_rate, 0.0, 1.0)
        check_range("loss.old_cap", self.old_cap, 0.0, 1.0 - 1e-9)


@dataclass
class AWMConfig:
    """Advantage-weighted matching's knobs (scxue/advantage_weighted_matching
    scripts/train_sd3_awm.py; docs/CONFORMANCE.md §10)."""

    weighting: Literal["ghuber", "uniform", "t", "t2"] = field(
        default="ghuber",
        metadata={
            "help": 'log p(x0) from the flow-matching error m: "ghuber" −t·((m+1e-10)^p − '
            '1e-10^p)/p (its configs), "uniform" −m, "t" −t·m, "t2" −t²·m'
        },
    )
    ghuber_power: float = field(default=0.25, metadata={"help": "p of ghuber (its configs: 0.25)"})
    clip_range: float = field(
        default=1.0, metadata={"help": "PPO clip of exp(log p − log p_old) (its configs: 1)"}
    )
    adv_clip_max: float = field(
        default=5.0, metadata={"help": "A → clamp(A, ±this)/this (its adv_clip_max 5, max 1)"}
    )

    def check(self) -> None:
        check_literals(self, "loss.")
        check_range("loss.ghuber_power", self.ghuber_power, 1e-3, 1.0)
        check_range("loss.clip_range", self.clip_range, 0.0, 10.0)
        check_range("loss.adv_clip_max", self.adv_clip_max, 1e-6)


@dataclass
class NoObjectiveConfig:
    """No policy objective (SFT: the regularisers alone)."""

    def check(self) -> None:
        pass


@dataclass
class ReverseKLConfig:
    """The reverse KL to the start model, in the units of the objective's own published code."""

    beta_kl: float = field(
        default=0.04,
        metadata={
            "help": "weight: on SDE transitions flow_grpo's mean(Δμ²)/(2σ_t²) (its SD3.5-M OCR "
            "0.04); on forward-process objectives DiffusionNFT's/AWM's mean(Δv²) (1e-4)"
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
        check_range("loss.beta_kl", self.beta_kl, 0.0)


@dataclass
class LaggingKLConfig:
    """AWM's "KL-EMA": mean(v_θ − v_lag)² to a lagging copy of the weights
    (train_sd3_awm.py L1276-1280, L1409-1419)."""

    lag_beta: float = field(default=1.0, metadata={"help": "weight (its ema_beta: 1)"})
    lag_rate: float = field(
        default=0.001,
        metadata={"help": "lagging ← d·lagging + (1−d)·θ each iteration, d = min(rate·s, cap)"},
    )
    lag_cap: float = field(default=0.3, metadata={"help": "the cap of d (its kl_ema_decay: 0.3)"})

    def check(self) -> None:
        check_range("loss.lag_beta", self.lag_beta, 0.0)
        check_range("loss.lag_rate", self.lag_rate, 0.0, 1.0)
        check_range("loss.lag_cap", self.lag_cap, 0.0, 1.0 - 1e-9)

"""The run's config: one typed section per component, each declared by its owner in a
torch-free module, with ``Literal`` choices and a one-line help in every field's metadata."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddrl.config.core import AdvantageConfig, SamplerConfig
from ddrl.data.config import DataConfig
from ddrl.dist.config import ParallelConfig
from ddrl.errors import DDRLError, check_choice, check_range
from ddrl.evaluation.config import EvalConfig
from ddrl.losses import TRANSITIONS, composed_config
from ddrl.models.config import ModelConfig
from ddrl.rewards import check_reward_name
from ddrl.rewards.config import GoldConfig, RewardConfig, parse_names
from ddrl.training.config import OptimConfig, PretrainConfig, TrainConfig
from ddrl.watch.config import WatchConfig

PRESETS = Path(__file__).parents[1] / "presets"
PRESET_NAMES = tuple(sorted(p.stem for p in PRESETS.glob("*.toml")))


@dataclass
class RunConfig:
    """Everything a run needs: one section per component, each owned by it (every leaf has a
    default and a one-line help in its field metadata)."""

    seed: int = field(
        default=0,
        metadata={
            "help": "the run's randomness: (seed, iteration) shared, (seed, rank, iteration) own"
        },
    )
    preset: str = field(
        default="digits",
        metadata={"help": "presets/<name>.toml: model, data, reward, sizes (`ddrl presets`)"},
    )
    algorithm: str = field(
        default="ddrl",
        metadata={
            "help": "ddrl | flow_grpo | dance_grpo | grpo | mix_grpo | sft | nft | nft_data | awm "
            "| awm_data (objective + regularisers, with presets/algorithms/<name>.toml) | "
            '"module:Loss"'
        },
    )
    objective: str = field(
        default="",
        metadata={
            "help": 'the policy objective: grpo | nft | awm | none | "module:Class"; "" = the '
            "algorithm's"
        },
    )
    regularisers: str = field(
        default="",
        metadata={
            "help": 'comma-separated: data, reverse_kl, lagging_kl, "module:Class"; "none" = no '
            'regulariser; "" = the algorithm\'s'
        },
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    gold: GoldConfig = field(default_factory=GoldConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: Any = field(
        default_factory=lambda: composed_config("grpo", ("data",))(),
        metadata={"help": "every setting of the objective and regularisers (their Configs)"},
    )
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)

    def check(self) -> None:
        check_choice("preset", self.preset, PRESET_NAMES)
        check_range("seed", self.seed, 0, 2**32 - 1)
        check_range("eval.seed", self.eval.seed, 0, 2**32 - 1)  # EvalConfig seeds torch with it
        # Names are checked here, before any model is built or pretrained: a typo fails fast.
        for name in parse_names(self.reward.name):
            check_reward_name(self.data.name, name)
        for name in parse_names(self.eval.rewards) if self.eval.rewards else []:
            check_reward_name(self.data.name, name)
        if self.eval.features:
            check_reward_name(self.data.name, self.eval.features)
        self.data._cache_dir = self.model.cache_dir  # where data:<set>/<file> is looked up
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if hasattr(sub, "check"):
                sub.check()
        if self.objective in TRANSITIONS and self.sampler.sde.kind == "ode":
            raise DDRLError(
                f"objective {self.objective!r} trains on the rollout's recorded SDE transitions, "
                "which sampler.sde.kind='ode' does not make; allowed: flow, dance, cps (or a "
                "forward-process objective: nft, awm)"
            )
        tc = self.train
        if tc.timestep_selection == "stratified":
            first = int(tc.skip_first_step)
            hi = math.floor(tc.timestep_fraction * self.sampler.num_steps + 1e-9)
            if tc.timestep_count > hi - first:
                raise DDRLError(
                    f"train.timestep_count={tc.timestep_count} strata of the steps {first}.."
                    f"{hi - 1} (floor(train.timestep_fraction · sampler.num_steps) = {hi}); "
                    f"allowed: 1..{max(hi - first, 1)}, or more sampler.num_steps"
                )
        per_step = getattr(self.loss, "data_on_first_only", False) or (
            getattr(self.loss, "data_steps", 1.0) < 1
        )
        if self.train.steps_per_forward > 1 and per_step:
            raise DDRLError(
                "train.steps_per_forward > 1 stacks trained steps, but loss.data_on_first_only "
                "/ loss.data_steps choose per step; allowed: steps_per_forward=1 with them"
            )

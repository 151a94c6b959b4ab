"""Rewards and gold evaluators by name; "module:attr" names a user factory(ctx) -> Reward."""

from __future__ import annotations

import importlib

from ..errors import DDRLError, check_choice
from .base import GoldEvaluator, Reward, RewardConfig, RewardContext, checked_reward
from .digits import ClassifierReward, DigitsGold, InkReward
from .toy2d import RightReward, Toy2DGold

# name -> (task it applies to, factory(ctx) -> Reward)
REWARDS = {
    "ink": ("digits", lambda ctx: InkReward()),
    "classifier": ("digits", ClassifierReward),
    "right": ("toy2d", lambda ctx: RightReward()),
}
GOLD = {"digits": DigitsGold, "toy2d": lambda seed=0: Toy2DGold()}

__all__ = [
    "GOLD",
    "REWARDS",
    "GoldEvaluator",
    "Reward",
    "RewardConfig",
    "RewardContext",
    "build_gold",
    "build_reward",
    "checked_reward",
]


def build_reward(name: str, ctx: RewardContext) -> Reward:
    """A built-in reward for ``ctx.task`` or a user factory given as "module:attr"."""
    if ":" in name:
        mod, attr = name.split(":", 1)
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise DDRLError(f"cannot import reward {name!r}: {e}") from e
        return factory(ctx)
    allowed = [n for n, (task, _) in REWARDS.items() if task == ctx.task]
    if name not in allowed:
        raise DDRLError(
            f"unknown reward {name!r} for task {ctx.task!r}; allowed: "
            f"{', '.join(allowed)} or 'module:attr'"
        )
    return REWARDS[name][1](ctx)


def build_gold(task: str, seed: int = 0) -> GoldEvaluator:
    check_choice("task", task, GOLD)
    return GOLD[task](seed=seed)

"""Rewards and gold evaluators by name; "module:attr" names a user factory(ctx) -> Reward."""

from __future__ import annotations

from ..errors import check_choice, lookup
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
    "reward_factory",
    "checked_reward",
]


def reward_factory(task: str, name: str):
    """The factory(ctx) -> Reward for a built-in name of ``task``, or "module:attr"."""
    table = {n: factory for n, (t, factory) in REWARDS.items() if t == task}
    return lookup(f"reward for task {task!r}", name, table)


def build_reward(name: str, ctx: RewardContext) -> Reward:
    """A built-in reward for ``ctx.task`` or a user factory given as "module:attr"."""
    return reward_factory(ctx.task, name)(ctx)


def build_gold(task: str, seed: int = 0) -> GoldEvaluator:
    check_choice("task", task, GOLD)
    return GOLD[task](seed=seed)

"""Build the configured rewards and the gold evaluator from their names (``ddrl.rewards``)."""

from __future__ import annotations

from ddrl.errors import DDRLError, check_choice, lookup
from ddrl.rewards import GOLD, applicable, check_reward_name
from ddrl.rewards.base import GoldEvaluator, Reward, RewardContext
from ddrl.rewards.config import GoldConfig, RewardConfig, parse_names, parse_weights
from ddrl.rewards.multi import MultiReward


def build_reward(name: str, ctx: RewardContext) -> Reward:
    """A built-in reward for ``ctx.data`` or a user factory given as "module:attr"."""
    check_reward_name(ctx.data, name)
    factory = lookup("reward", applicable(ctx.data).get(name, name), {})  # built-in or plugin
    reward = factory(ctx)
    if not callable(reward):
        raise DDRLError(
            f"reward {name!r}: its factory returned a {type(reward).__name__}, not a callable; "
            "allowed: a factory(ctx) returning reward(images, prompts) -> Tensor [B]"
        )
    return reward


def build_rewards(cfg: RewardConfig, ctx: RewardContext) -> MultiReward:
    """Every reward named in ``reward.name`` ("a,b"), with ``reward.weights``."""
    names = parse_names(cfg.name)
    rewards = [build_reward(n, ctx) for n in names]
    return MultiReward(names, rewards, parse_weights(cfg.weights, len(names)), cfg.frames)


def build_gold(cfg: GoldConfig) -> GoldEvaluator | None:
    """The gold evaluator, or None when ``gold.name`` is empty."""
    if not cfg.name:
        return None
    check_choice("gold.name", cfg.name, GOLD)
    return lookup("gold", GOLD[cfg.name], {})(seed=cfg.seed)

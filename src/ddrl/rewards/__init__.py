"""Rewards and gold evaluators by name; "module:attr" names a user factory(ctx) -> Reward."""

from __future__ import annotations

import inspect

from ddrl.errors import DDRLError, check_choice, lookup
from ddrl.rewards.base import (
    GoldConfig,
    GoldEvaluator,
    Reward,
    RewardConfig,
    RewardContext,
    checked_reward,
)
from ddrl.rewards.clip_rewards import FACTORIES as CLIP_FACTORIES
from ddrl.rewards.digits import ClassifierReward, DigitsGold, InkReward
from ddrl.rewards.multi import MultiReward, parse_names, parse_weights
from ddrl.rewards.ocr import OCRReward
from ddrl.rewards.pixels import BrightnessReward
from ddrl.rewards.remote.client import remote_factory
from ddrl.rewards.toy2d import RightReward, Toy2DGold

# name -> (data set it applies to, factory(ctx) -> Reward); "files" = a user's own image/video
# data (the diffusers families), "*" = any
REWARDS = {
    "ink": ("digits", lambda ctx: InkReward()),
    "classifier": ("digits", ClassifierReward),
    "right": ("toy2d", lambda ctx: RightReward()),
    "brightness": ("files", lambda ctx: BrightnessReward()),
    # the paper's SD3.5 text-rendering reward (flow_grpo's ocr.py)
    "ocr": ("files", OCRReward),
    # any reward served by `ddrl reward-server` (reward.url), for every data set
    "remote": ("*", remote_factory),
}
# The CLIP family (clipscore, pickscore, aesthetic, hpsv2) on a user's images; models load lazily.
REWARDS |= {n: ("files", f) for n, f in CLIP_FACTORIES.items()}
GOLD = {"digits": DigitsGold, "toy2d": lambda seed=0: Toy2DGold()}

__all__ = [
    "GOLD",
    "REWARDS",
    "GoldConfig",
    "GoldEvaluator",
    "Reward",
    "RewardConfig",
    "RewardContext",
    "build_gold",
    "build_reward",
    "build_rewards",
    "MultiReward",
    "parse_names",
    "reward_factory",
    "checked_reward",
]


def reward_factory(data: str, name: str):
    """The factory(ctx) -> Reward for a built-in name that applies to ``data``, or "module:attr"."""
    table = {n: factory for n, (d, factory) in REWARDS.items() if d in (data, "*")}
    factory = lookup(f"reward for data {data!r}", name, table)
    kind = f"allowed: {', '.join(table)} or 'module:attr' naming a factory(ctx) -> Reward"
    if not callable(factory):
        raise DDRLError(f"reward {name!r} is a {type(factory).__name__}, not callable; {kind}")
    try:  # checked here, before any work: a factory must accept the one RewardContext
        inspect.signature(factory).bind(None)
    except TypeError:
        raise DDRLError(
            f"reward {name!r} cannot take one argument (signature "
            f"{inspect.signature(factory)}); {kind}"
        ) from None
    except ValueError:  # a builtin without a signature: it is checked when built
        pass
    return factory


def build_reward(name: str, ctx: RewardContext) -> Reward:
    """A built-in reward for ``ctx.data`` or a user factory given as "module:attr"."""
    reward = reward_factory(ctx.data, name)(ctx)
    if not callable(reward):
        raise DDRLError(
            f"reward {name!r}: its factory returned a {type(reward).__name__}, not a callable; "
            "allowed: a factory(ctx) returning reward(images, prompts) -> Tensor [B]"
        )
    return reward


def build_rewards(cfg, ctx: RewardContext) -> MultiReward:
    """Every reward named in ``reward.name`` ("a,b"), with ``reward.weights``."""
    names = parse_names(cfg.name)
    rewards = [build_reward(n, ctx) for n in names]
    return MultiReward(names, rewards, parse_weights(cfg.weights, len(names)), cfg.frames)


def build_gold(cfg: GoldConfig) -> GoldEvaluator | None:
    """The gold evaluator, or None when ``gold.name`` is empty."""
    if not cfg.name:
        return None
    check_choice("gold.name", cfg.name, GOLD)
    return GOLD[cfg.name](seed=cfg.seed)

"""Rewards and gold evaluators by name. Each built-in is a "module:attr" string loaded on first
use, so naming or checking one imports no model code; "module:attr" also names a user
factory(ctx) -> Reward. Build them with ``ddrl.rewards.build``."""

from __future__ import annotations

import inspect

from ddrl.errors import DDRLError, lookup

# name -> (data set it applies to, "module:factory(ctx) -> Reward"); "files" = a user's own
# image/video data (the diffusers families), "*" = any
REWARDS = {
    "ink": ("digits", "ddrl.rewards.digits:ink_reward"),
    "classifier": ("digits", "ddrl.rewards.digits:ClassifierReward"),
    "right": ("toy2d", "ddrl.rewards.toy2d:right_reward"),
    "brightness": ("files", "ddrl.rewards.pixels:brightness_reward"),
    # the paper's SD3.5 text-rendering reward (flow_grpo's ocr.py)
    "ocr": ("files", "ddrl.rewards.ocr:OCRReward"),
    # the CLIP family on a user's images; models load when the reward is built
    "clipscore": ("files", "ddrl.rewards.clip_rewards:clipscore_reward"),
    "pickscore": ("files", "ddrl.rewards.clip_rewards:pickscore_reward"),
    "aesthetic": ("files", "ddrl.rewards.aesthetic:aesthetic_reward"),
    "hpsv2": ("files", "ddrl.rewards.hpsv2:hpsv2_reward"),
    # any reward served by `ddrl reward-server` (reward.url), for every data set
    "remote": ("*", "ddrl.rewards.remote.client:remote_factory"),
    # a VLM judge over the OpenAI chat API (vLLM, SGLang) at reward.url; reward.judge.*
    "vlm_judge": ("*", "ddrl.rewards.vlm_judge:judge_factory"),
}
GOLD = {"digits": "ddrl.rewards.digits:DigitsGold", "toy2d": "ddrl.rewards.toy2d:Toy2DGold"}


def applicable(data: str) -> dict[str, str]:
    """The built-in rewards that apply to data set ``data``: name → "module:factory"."""
    return {n: factory for n, (d, factory) in REWARDS.items() if d in (data, "*")}


def check_reward_name(data: str, name: str) -> None:
    """Fail fast, importing nothing for a built-in: ``name`` applies to ``data``, or is a
    "module:attr" naming a factory that takes one argument (imported now, like any plugin)."""
    table = applicable(data)
    kind = f"allowed: {', '.join(table)} or 'module:attr' naming a factory(ctx) -> Reward"
    if name in table:
        return
    factory = lookup(f"reward for data {data!r}", name, table)
    if not callable(factory):
        raise DDRLError(f"reward {name!r} is a {type(factory).__name__}, not callable; {kind}")
    try:
        inspect.signature(factory).bind(None)
    except TypeError:
        raise DDRLError(
            f"reward {name!r} cannot take one argument (signature "
            f"{inspect.signature(factory)}); {kind}"
        ) from None
    except ValueError:  # a builtin without a signature: it is checked when built
        pass

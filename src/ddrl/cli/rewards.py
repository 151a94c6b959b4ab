"""`ddrl score` (image files scored by a reward) and `ddrl reward-server` (a reward served over
HTTP for ``reward.name = remote``)."""

from __future__ import annotations

import json
from pathlib import Path

from ddrl.config import set_key
from ddrl.config.resolve import parse_overrides
from ddrl.data.config import cache_root
from ddrl.errors import DDRLError
from ddrl.rewards.base import RewardContext
from ddrl.rewards.build import build_reward
from ddrl.rewards.config import RewardConfig
from ddrl.rewards.remote.server import serve
from ddrl.rewards.score import read_prompt_args, score_files


def _reward_from_args(args):
    """(reward config, reward) from --reward/--data and reward.* key=value overrides."""
    rc = RewardConfig(name=args.reward)
    for key, value in parse_overrides(args.overrides).items():
        if not key.startswith("reward."):
            raise DDRLError(f"ddrl {args.command} takes reward.* settings only; got {key!r}")
        set_key(rc, key.removeprefix("reward."), value, "reward.")
    rc.check()
    device = "cpu" if rc.device == "auto" else rc.device
    ctx = RewardContext(args.data, cache_root(""), device, rc)
    return rc, ctx, build_reward(args.reward, ctx)


def cmd_score(args) -> None:
    # argparse hands key=value items after the images to them: they are overrides.
    settings = [a for a in args.images if "=" in a and not Path(a).exists()]
    args.overrides = [*settings, *args.overrides]
    rc, _, reward = _reward_from_args(args)
    images = [Path(p) for p in args.images if p not in settings]
    prompts_file = Path(args.prompts) if args.prompts else None
    prompts = read_prompt_args(args.prompt, prompts_file, len(images))
    scores = score_files(reward, images, prompts, batch=rc.batch, name=args.reward)
    if args.json:
        rows = [
            {"image": str(p), "prompt": q, "score": s}
            for p, q, s in zip(images, prompts, scores, strict=True)
        ]
        print(json.dumps(rows, indent=1))
    else:
        for p, s in zip(images, scores, strict=True):
            print(f"{s:.6g}\t{p}")


def cmd_reward_server(args) -> None:
    if not 0 <= args.port <= 65535:  # before the reward is built; socket would overflow
        raise DDRLError(f"--port {args.port} is out of range; allowed: 0..65535 (0 = a free one)")
    _, _, reward = _reward_from_args(args)
    serve(
        reward,
        args.host,
        args.port,
        ready=lambda url: print(f"serving {args.reward} at {url}", flush=True),
        name=args.reward,
    )

"""`ddrl score` (image files scored by a reward) and `ddrl reward-server` (a reward served over
HTTP for ``reward.name = remote``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ddrl.config import set_key
from ddrl.config.resolve import parse_overrides
from ddrl.data.config import cache_root
from ddrl.errors import DDRLError, check_range
from ddrl.rewards.base import RewardContext
from ddrl.rewards.build import build_reward
from ddrl.rewards.config import RewardConfig
from ddrl.rewards.score import read_prompt_args, score_files


def _reward_config(args) -> RewardConfig:
    """The reward config from --reward and reward.* key=value overrides (checked)."""
    rc = RewardConfig(name=args.reward)
    for key, value in parse_overrides(args.overrides).items():
        if not key.startswith("reward."):
            raise DDRLError(f"ddrl {args.command} takes reward.* settings only; got {key!r}")
        set_key(rc, key.removeprefix("reward."), value, "reward.")
    rc.check()
    return rc


def _device(rc: RewardConfig) -> str:
    """reward.device, "auto" being the CPU here (no run to take a device from)."""
    return "cpu" if rc.device == "auto" else rc.device


def _build(args, rc: RewardConfig, device: str):
    """The reward named by --reward for --data, on ``device``."""
    return build_reward(args.reward, RewardContext(args.data, cache_root(""), device, rc))


def cmd_score(args) -> None:
    # argparse hands key=value items after the images to them: they are overrides.
    settings = [a for a in args.images if "=" in a and not Path(a).exists()]
    args.overrides = [*settings, *args.overrides]
    rc = _reward_config(args)
    reward = _build(args, rc, _device(rc))
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
    # Every flag is checked before the reward is built (a learned reward loads for minutes).
    if not 0 <= args.port <= 65535:  # socket would overflow
        raise DDRLError(f"--port {args.port} is out of range; allowed: 0..65535 (0 = a free one)")
    check_range("--max-batch", args.max_batch, 1)
    check_range("--max-wait-ms", args.max_wait_ms, 0.0, 60_000.0)
    rc = _reward_config(args)
    from ddrl.rewards.remote.server import parse_devices, serve

    if args.devices and rc.device != "auto":
        raise DDRLError(
            f"--devices {args.devices} and reward.device={rc.device} both say where the reward "
            "runs; allowed: one of them"
        )
    devices = parse_devices(args.devices) if args.devices else [_device(rc)]
    rewards = [_build(args, rc, device) for device in devices]  # one instance per replica

    def ready(url: str) -> None:
        print(f"serving {args.reward} at {url}", flush=True)  # the line scripts read
        print(
            f"{len(devices)} replica(s) on {','.join(devices)}; up to {args.max_batch} images "
            f"per reward call, waiting up to {args.max_wait_ms:g} ms; GET {url}/health, "
            f"GET {url}/metrics",
            file=sys.stderr,
            flush=True,
        )

    serve(
        rewards,
        args.host,
        args.port,
        ready=ready,
        name=args.reward,
        devices=devices,
        max_batch=args.max_batch,
        max_wait=args.max_wait_ms / 1000,
    )

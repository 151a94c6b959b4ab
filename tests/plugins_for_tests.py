"""User plugins loaded through the "module:attr" escape hatch in the tests."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ddrl.models.toy2d import Toy2DGenerator


def nan_first_group(ctx):
    """A reward that is NaN for the first sample of every call (so its group is skipped)."""

    def reward(images, prompts):
        r = images.flatten(1).mean(1).clone()
        r[0] = float("nan")
        return r

    return reward


def wrong_shape(ctx):
    return lambda images, prompts: torch.zeros(images.shape[0], 2)


def not_a_tensor(ctx):
    return lambda images, prompts: [0.0] * images.shape[0]


class PluginToy(Toy2DGenerator):
    """A user model family ("plugins_for_tests:PluginToy"): the 2-D toy generator saved in its
    own layout (weights.safetensors + plugin.json, no generator.json), so it can only be loaded
    through its own ``from_pretrained``."""

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.denoiser.state_dict().items()}
        save_file(sd, path / "weights.safetensors")
        (path / "plugin.json").write_text(json.dumps({"hidden": self.denoiser.hidden}))

    @classmethod
    def from_pretrained(cls, path, config=None) -> "PluginToy":
        path = Path(path)
        gen = cls(hidden=json.loads((path / "plugin.json").read_text())["hidden"])
        gen.denoiser.load_state_dict(load_file(path / "weights.safetensors"))
        return gen


def all_nan(ctx):
    """A reward that is NaN for every sample (every group is skipped, every iteration)."""
    return lambda images, prompts: torch.full((images.shape[0],), float("nan"))


def returns_a_number(ctx):
    """A "factory" whose product is not a reward (not callable)."""
    return 3


def spread_ink(ctx):
    """The ink reward stretched to about [-25, 25]: a reward ``reward.clip`` has to clamp."""

    def reward(images, prompts):
        return (((images.clamp(-1, 1) + 1) / 2).flatten(1).mean(1) * 50.0).float()

    return reward


@dataclass
class VelocityNormConfig:
    vn_beta: float = field(default=0.5, metadata={"help": "weight of mean(v²)"})

    def check(self) -> None:
        pass


class VelocityNorm:
    """A user regulariser ("plugins_for_tests:VelocityNorm"): vn_beta·mean(v_θ²) at the
    objective's own points, from its forward."""

    Config = VelocityNormConfig
    needs_data, needs_reference = False, False
    seen: list = []

    def __init__(self, cfg, ctx):
        self.cfg = cfg

    def masks(self, b, keep):
        return {"vnorm": keep}

    def __call__(self, denoiser, b, fwd, pre, batched):
        VelocityNorm.seen.append(fwd.v.detach())
        return {"vnorm": (fwd.v.pow(2).flatten(1).mean(1), self.cfg.vn_beta)}

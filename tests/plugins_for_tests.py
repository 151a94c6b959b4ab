"""User plugins loaded through the "module:attr" escape hatch in the tests."""

import torch


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

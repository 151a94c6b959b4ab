"""The named algorithms' losses and configs as the tests build them: cells of the objective ×
regulariser matrix (``ddrl.losses``), under the names the tests have used since before it."""

import functools

from ddrl.losses import build_loss, composed_config

DDRLConfig = composed_config("grpo", ("data",))
FlowGRPOConfig = composed_config("grpo", ("reverse_kl",))
PolicyConfig = composed_config("grpo", ())
_SFT = composed_config("none", ("data",))


def SFTConfig(**kw):  # noqa: N802 - a config class's name; SFT's preset sets data_beta = 1
    return _SFT(**{"data_beta": 1.0, **kw})


DDRLLoss = functools.partial(build_loss, "ddrl")
FlowGRPOLoss = functools.partial(build_loss, "flow_grpo")
PolicyOnlyLoss = functools.partial(build_loss, "grpo")
SFTLoss = functools.partial(build_loss, "sft")

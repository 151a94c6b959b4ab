"""SFT: the data term alone, L = data_beta · L_data (rollouts are still drawn, for logging and so
that every algorithm sees the same prompts, noise and budget)."""

from __future__ import annotations

from ddrl.losses.base import LossOut
from ddrl.losses.config import SFTConfig
from ddrl.losses.data import data_applies, data_mask, data_term


class SFTLoss:
    Config = SFTConfig
    needs_data, needs_reference = True, False

    def __init__(self, cfg: SFTConfig, ctx):
        self.cfg = cfg

    def masks(self, b):
        return {"data": data_mask(self.cfg, b)}

    def active(self, b):  # data_on_first_only: later steps have no term (and no backward)
        return data_applies(self.cfg, b)

    def __call__(self, denoiser, b):
        if not data_applies(self.cfg, b):
            return LossOut({}, {})
        return LossOut({"data": (data_term(denoiser, b, self.cfg), self.cfg.data_beta)}, {})

"""DDRL: L = L_pg + data_beta · L_data (reward term + forward KL to the data).

The release (cosmos-rl) sums the clipped policy term and data_beta × the flow-matching loss on
data at every trained timestep; no reference model is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from ddrl.errors import check_range
from ddrl.losses.base import LossOut, policy_term
from ddrl.losses.data import DataTermConfig, data_applies, data_mask, data_term, policy_and_data


@dataclass
class DDRLConfig(DataTermConfig):
    """DDRL's knobs (the data term's, plus the policy term's clip)."""

    clip_range: float = 1e-4  # PPO ratio clip ε (release: 1e-4; the ratio is ≡ 1 on-policy)

    def check(self) -> None:
        super().check()
        check_range("loss.clip_range", self.clip_range, 0.0, 1.0)


class DDRLLoss:
    """Clipped policy term plus the flow-matching loss on data paired with the prompts."""

    Config = DDRLConfig

    def __init__(self, cfg: DDRLConfig, ctx):
        self.cfg, self.ctx = cfg, ctx

    def masks(self, b):
        return {"policy": b.valid, "data": data_mask(self.cfg, b)}

    def __call__(self, denoiser, b):
        c = self.cfg
        with_data = c.data_beta > 0 and data_applies(c, b)
        if with_data and c.data_batched:
            pg, _, stats, fm = policy_and_data(denoiser, b, self.ctx, c, c.clip_range)
            return LossOut({"policy": (pg, 1.0), "data": (fm, c.data_beta)}, stats)
        pg, _, stats = policy_term(denoiser, b, self.ctx, c.clip_range)
        terms = {"policy": (pg, 1.0)}
        if with_data:
            terms["data"] = (data_term(denoiser, b, c), c.data_beta)
        return LossOut(terms, stats)

"""DDRL: L = L_pg + data_beta · L_data (reward term + forward KL to the data).

The release (cosmos-rl) sums the clipped policy term and data_beta × the flow-matching loss on
data at every trained timestep; no reference model is kept. Its ratio (``loss.ratio =
"edm_squared_error"``), data weighting (``loss.data_weight = "edm"``) and caption dropout
(``loss.data_caption_dropout``) are options (docs/CONFORMANCE.md §5, docs/DECISIONS.md).
"""

from __future__ import annotations

from ddrl.losses.base import LossOut, policy_term
from ddrl.losses.config import DDRLConfig
from ddrl.losses.data import data_applies, data_mask, data_term, policy_and_data


class DDRLLoss:
    """Clipped policy term plus the flow-matching loss on data paired with the prompts."""

    Config = DDRLConfig
    needs_data, needs_reference = True, False

    def __init__(self, cfg: DDRLConfig, ctx):
        self.cfg, self.ctx = cfg, ctx

    def masks(self, b):
        return {"policy": b.valid, "data": data_mask(self.cfg, b)}

    def __call__(self, denoiser, b):
        c = self.cfg
        with_data = c.data_beta > 0 and data_applies(c, b)
        if with_data and c.data_batched:
            pg, _, stats, fm = policy_and_data(denoiser, b, self.ctx, c, c.clip_range, c.ratio)
            return LossOut({"policy": (pg, 1.0), "data": (fm, c.data_beta)}, stats)
        pg, _, stats = policy_term(denoiser, b, self.ctx, c.clip_range, c.ratio)
        terms = {"policy": (pg, 1.0)}
        if with_data:
            terms["data"] = (data_term(denoiser, b, c), c.data_beta)
        return LossOut(terms, stats)

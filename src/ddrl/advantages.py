"""Group-relative advantages (GRPO): A = (r − mean_group) / (std_group + eps)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import check_range


@dataclass
class AdvantageConfig:
    """How rewards become advantages."""

    eps: float = 1e-4  # added to the group std (a group of equal rewards gets A = 0)
    exp_transform: bool = False  # DDRL's λ(x) = −exp(−x) applied to A/β (release: off)
    beta: float = 1.0  # temperature β in λ((r − Z)/β); only used with exp_transform
    clamp: float = 5.0  # |A| ≤ clamp

    def check(self) -> None:
        check_range("advantage.eps", self.eps, 0.0)
        check_range("advantage.beta", self.beta, 1e-8)
        check_range("advantage.clamp", self.clamp, 0.0)


def group_advantages(
    rewards: Tensor, group_ids: Tensor, cfg: AdvantageConfig
) -> tuple[Tensor, Tensor]:
    """Normalise within each group of trajectories that share a prompt.

    rewards [B], group_ids [B] → (advantages [B], valid [B] bool). A group with any non-finite
    reward is skipped whole (valid False, A = 0): one bad sample would poison its group's mean.
    Uses the population std (unbiased=False) like flow_grpo's per-prompt stat tracker.
    """
    adv = torch.zeros_like(rewards)
    valid = torch.zeros_like(rewards, dtype=torch.bool)
    for g in group_ids.unique():
        m = group_ids == g
        r = rewards[m]
        if not torch.isfinite(r).all():
            continue
        a = (r - r.mean()) / (r.std(unbiased=False) + cfg.eps)
        if cfg.exp_transform:
            # As in DDRL's release (`exp_reward`): not re-centred; λ is monotone, so the order
            # of samples is kept; large negative advantages are amplified, positive ones saturate.
            a = -torch.exp(-a / cfg.beta)
        adv[m] = a.clamp(-cfg.clamp, cfg.clamp)
        valid[m] = True
    return adv, valid

"""Group-relative advantages (GRPO): A = (r − mean_group) / (std + eps), optional λ transform.

Which std the peers divide by differs (docs/CONFORMANCE.md), so it is a setting:
"unbiased" — the group's sample std (DDRL release, DanceGRPO); "population" — the group's
population std (flow_grpo's per-prompt tracker); "global" — the population std of every reward
in the iteration, with the per-group mean (flow_grpo's shipped configs, ``global_std=True``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddrl.config.core import AdvantageConfig


def _normalise(rewards: Tensor, group_ids: Tensor, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """(r − mean_group)/(std + eps) [B] and valid [B]; groups with a non-finite reward → 0."""
    adv = torch.zeros_like(rewards)
    valid = torch.zeros_like(rewards, dtype=torch.bool)
    finite_groups = [g for g in group_ids.unique() if torch.isfinite(rewards[group_ids == g]).all()]
    if cfg.std == "global" and finite_groups:
        keep = torch.isin(group_ids, torch.stack(finite_groups))
        global_std = rewards[keep].std(unbiased=False)
    for g in finite_groups:
        m = group_ids == g
        r = rewards[m]
        if cfg.std == "global":
            std = global_std
        else:
            std = r.std(unbiased=cfg.std == "unbiased") if len(r) > 1 else torch.zeros(())
        adv[m] = (r - r.mean()) / (std + cfg.eps)
        valid[m] = True
    return adv, valid


def _finish(adv: Tensor, valid: Tensor, cfg: AdvantageConfig) -> Tensor:
    """The λ transform (or none) and the clamp; skipped samples stay 0."""
    if cfg.exp_transform:
        # Not re-centred, as in the release; λ is monotone, so the order is kept.
        adv = -torch.exp(-adv.clamp(min=-math.log(cfg.clamp)) / cfg.beta)
    else:
        adv = adv.clamp(-cfg.clamp, cfg.clamp)
    return torch.where(valid, adv, torch.zeros_like(adv))


def group_advantages(
    rewards: Tensor, group_ids: Tensor, cfg: AdvantageConfig
) -> tuple[Tensor, Tensor]:
    """Normalise within each group of trajectories that share a prompt draw.

    rewards [B], group_ids [B] → (advantages [B], valid [B] bool). A group with any non-finite
    reward is skipped whole (valid False, A = 0): one bad sample would poison its group's mean.

    Without the transform A is clamped to [−clamp, clamp] (flow_grpo, the release). With
    ``exp_transform`` A is clamped from below to −ln(clamp) and then A ← −exp(−A/β). At β = 1
    this is exactly the release's −exp(−A) followed by a clamp to [−clamp, clamp]
    (−exp(−A) ≥ −clamp ⟺ A ≥ −ln clamp; the upper bound never binds since −exp(−A) < 0), and
    for β ≠ 1 every A above −ln(clamp) keeps its own weight exp(−A/β): β is a real
    temperature rather than being swallowed by the output clamp (docs/DECISIONS.md).
    """
    adv, valid = _normalise(rewards, group_ids, cfg)
    return _finish(adv, valid, cfg), valid


def combine_advantages(
    rewards: Tensor, weights: Tensor, group_ids: Tensor, cfg: AdvantageConfig, how: str
) -> tuple[Tensor, Tensor]:
    """Advantages [B] (and valid [B]) from K rewards [B, K] with weights [K].

    "flow_grpo": A = norm(Σ_k w_k·r_k), the weighted sum of raw rewards normalised in its
    group (flow_grpo's MultiScorer). "cosmos_rl": A = Σ_k w_k·norm(r_k) / Σ_k w_k, each reward
    normalised in its group first, then averaged (the DDRL release, wfm_trainer.py L544-546,
    equal weights there); the λ transform and the clamp come after the average, as there.
    A group with a non-finite value of any reward is skipped. K = 1: both are group_advantages.
    """
    if how == "flow_grpo" or rewards.shape[1] == 1:
        return group_advantages(rewards @ weights.to(rewards), group_ids, cfg)
    parts = [_normalise(rewards[:, k], group_ids, cfg) for k in range(rewards.shape[1])]
    valid = torch.stack([v for _, v in parts]).all(0)
    w = weights.to(rewards)
    adv = sum(w[k] * a for k, (a, _) in enumerate(parts)) / w.sum()
    return _finish(adv, valid, cfg), valid

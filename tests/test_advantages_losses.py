"""Group advantages, the clipped surrogate and every algorithm's loss on one hand-built step."""

import copy
import math

import pytest
import torch

from ddrl.advantages import AdvantageConfig, group_advantages
from ddrl.errors import DDRLError
from ddrl.flow import sample_training_t
from ddrl.losses import LossConfig, StepBatch, build_loss, clipped_policy_loss, policy_step
from ddrl.losses.dance_grpo import PolicyOnlyLoss
from ddrl.losses.ddrl import DDRLLoss
from ddrl.losses.flow_grpo import FlowGRPOLoss
from ddrl.losses.sft import SFTLoss
from ddrl.rollout import SamplerConfig, rollout
from ddrl.sde import sde_step

B = 6

# ---------------------------------------------------------------------------- advantages


def test_group_advantages_hand_groups():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv, valid = group_advantages(r, g, AdvantageConfig())
    std = math.sqrt(1.25)  # population std of 1, 2, 3, 4
    want = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4)
    assert torch.allclose(adv[:4], want, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))
    assert valid.all()


def test_group_advantages_interleaved_groups():
    # the same two groups, interleaved: each sample keeps its own group's normalisation.
    r = torch.tensor([1.0, 10.0, 2.0, 30.0, 3.0, 20.0])
    g = torch.tensor([0, 1, 0, 1, 0, 1])
    adv, _ = group_advantages(r, g, AdvantageConfig(eps=0.0))
    s = math.sqrt(2 / 3)
    assert torch.allclose(adv[0::2], torch.tensor([-1.0, 0.0, 1.0]) / s, atol=1e-6)
    assert torch.allclose(adv[1::2], torch.tensor([-10.0, 10.0, 0.0]) / (10 * s), atol=1e-6)


def test_group_advantages_clamp_outlier():
    # 29 zeros and one 1: mean 1/30, population std sqrt(29)/30 → the outlier's A = sqrt(29) > 5.
    r = torch.zeros(30)
    r[7] = 1.0
    g = torch.zeros(30, dtype=torch.long)
    free, _ = group_advantages(r, g, AdvantageConfig(eps=0.0, clamp=100.0))
    assert free[7].item() == pytest.approx(math.sqrt(29), rel=1e-5)
    assert free[0].item() == pytest.approx(-1 / math.sqrt(29), rel=1e-5)
    adv, _ = group_advantages(r, g, AdvantageConfig(eps=0.0, clamp=5.0))
    assert adv[7].item() == 5.0
    assert torch.equal(adv[torch.arange(30) != 7], free[torch.arange(30) != 7])
    # symmetric: one low outlier is clamped at −5.
    low, _ = group_advantages(-r, g, AdvantageConfig(eps=0.0, clamp=5.0))
    assert low[7].item() == -5.0


def test_group_advantages_exp_transform():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = torch.zeros(4, dtype=torch.long)
    a = (r - 2.5) / (math.sqrt(1.25) + 1e-4)
    adv, _ = group_advantages(r, g, AdvantageConfig(exp_transform=True, beta=2.0))
    assert torch.allclose(adv, -torch.exp(-a / 2.0), atol=1e-6)
    assert (adv < 0).all() and (adv[1:] > adv[:-1]).all()  # λ is monotone and negative
    # a small β makes −exp(−A/β) of the worst sample ≈ −14.6: clamped to −5 after the transform.
    hot, _ = group_advantages(r, g, AdvantageConfig(exp_transform=True, beta=0.5))
    want = (-torch.exp(-a / 0.5)).clamp(-5, 5)
    assert want[0].item() == -5.0 and -torch.exp(-a[0] / 0.5).item() < -14
    assert torch.allclose(hot, want, atol=1e-6)


def test_group_advantages_non_finite_group_is_invalid():
    r = torch.tensor([1.0, float("nan"), 3.0, 1.0, 2.0, 3.0, float("inf"), 0.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    adv, valid = group_advantages(r, g, AdvantageConfig())
    assert valid.tolist() == [False] * 3 + [True] * 3 + [False] * 2
    assert torch.equal(adv[:3], torch.zeros(3)) and torch.equal(adv[6:], torch.zeros(2))
    alone, _ = group_advantages(r[3:6], torch.zeros(3, dtype=torch.long), AdvantageConfig())
    assert torch.equal(adv[3:6], alone)
    assert torch.allclose(alone, torch.tensor([-1.0, 0.0, 1.0]) / (math.sqrt(2 / 3) + 1e-4))


# ---------------------------------------------------------------------------- clipped surrogate


def test_clipped_policy_loss_on_policy_is_minus_advantage():
    logp = torch.tensor([-1.3, 0.2, 5.0])
    adv = torch.tensor([0.7, -2.0, 0.0])
    loss, ratio = clipped_policy_loss(logp, logp.clone(), adv, 1e-4)
    assert torch.equal(ratio, torch.ones(3))
    assert torch.equal(loss, -adv)


@pytest.mark.parametrize(
    "dlogp, a, want",
    [
        (0.5, 1.0, -1.2),  # ρ = e^0.5 > 1+ε, A > 0: clipped, −A·1.2
        (0.5, -1.0, math.exp(0.5)),  # ρ > 1+ε, A < 0: unclipped, −A·ρ
        (-0.5, 1.0, -math.exp(-0.5)),  # ρ = e^−0.5 < 1−ε, A > 0: unclipped, −A·ρ
        (-0.5, -1.0, 0.8),  # ρ < 1−ε, A < 0: clipped, −A·0.8
        (0.1, 2.0, -2 * math.exp(0.1)),  # inside [1−ε, 1+ε]: plain −A·ρ
    ],
)
def test_clipped_policy_loss_hand_values(dlogp, a, want):
    logp_old = torch.tensor([-0.3])
    loss, ratio = clipped_policy_loss(logp_old + dlogp, logp_old, torch.tensor([a]), 0.2)
    assert ratio.item() == pytest.approx(math.exp(dlogp), rel=1e-6)
    assert loss.item() == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------------- one step batch


def _batch(model, kind="flow", noise_level=0.7, seed=0, t=0.6, t_next=0.5):
    """An on-policy StepBatch: x_next sampled from the model, logp_old its own log-prob."""
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn(B, 2, generator=gen)
    tt, tn = torch.full((B,), t), torch.full((B,), t_next)
    cond = model.encode([""] * B)
    with torch.no_grad():
        v = model.velocity(x_t, tt, cond)
        z = torch.randn(B, 2, generator=gen)
        step = sde_step(kind, x_t, v, tt, tn, noise_level, noise=z)
    return StepBatch(
        x_t=x_t,
        x_next=step.x_next,
        t=tt,
        t_next=tn,
        logp_old=step.log_prob,
        advantages=torch.randn(B, generator=gen),
        valid=torch.ones(B, dtype=torch.bool),
        cond=cond,
        x0_data=torch.randn(B, 2, generator=gen),
        noise0=torch.randn(B, 2, generator=gen),
        first=True,
        generator=torch.Generator().manual_seed(seed + 1),
    )


def _fm_by_hand(model, b, t=None, noise=None):
    t = b.t if t is None else t
    eps = b.noise0 if noise is None else noise
    tb = t[:, None]
    v = model.velocity((1 - tb) * b.x0_data + tb * eps, t, b.cond)
    return ((v - (eps - b.x0_data)) ** 2).mean(1).mean()


def test_ddrl_data_only_is_flow_matching_loss(tiny_model):
    b = _batch(tiny_model)
    loss, metrics = DDRLLoss(LossConfig(reward_weight=0.0, data_beta=1.0), SamplerConfig())(
        tiny_model, b
    )
    want = _fm_by_hand(tiny_model, b)
    assert want.item() > 1e-3
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert metrics["data_loss"] == pytest.approx(want.item(), abs=1e-6)
    assert "policy_loss" not in metrics


def test_data_t_random_draws_t_and_noise_from_generator(tiny_model):
    b = _batch(tiny_model)
    cfg = LossConfig(reward_weight=0.0, data_beta=1.0, data_t="random")
    loss, _ = DDRLLoss(cfg, SamplerConfig())(tiny_model, b)
    gen = torch.Generator().manual_seed(1)  # the batch's generator was seeded with seed + 1
    t = sample_training_t(B, gen)
    eps = torch.randn(B, 2, generator=gen)
    want = _fm_by_hand(tiny_model, b, t=t, noise=eps)
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert abs(want.item() - _fm_by_hand(tiny_model, b).item()) > 1e-4


def test_ddrl_policy_only_equals_policy_only_loss_and_minus_mean_advantage(tiny_model):
    b = _batch(tiny_model)
    cfg = LossConfig(data_beta=0.0)
    loss, metrics = DDRLLoss(cfg, SamplerConfig())(tiny_model, b)
    pol, _ = PolicyOnlyLoss(cfg, SamplerConfig())(tiny_model, b)
    assert loss.item() == pol.item()
    assert loss.item() == pytest.approx((-b.advantages).mean().item(), abs=1e-6)
    assert metrics["ratio_mean"] == 1.0 and metrics["ratio_max_dev"] == 0.0
    assert metrics["clip_frac"] == 0.0 and "data_loss" not in metrics
    # off-policy (logp_old shifted) the two still agree, and differ from −mean(A).
    b.logp_old = b.logp_old + torch.linspace(-0.3, 0.3, B)
    loss2, m2 = DDRLLoss(cfg, SamplerConfig())(tiny_model, b)
    pol2, _ = PolicyOnlyLoss(cfg, SamplerConfig())(tiny_model, b)
    assert loss2.item() == pytest.approx(pol2.item(), abs=1e-7)
    assert m2["clip_frac"] > 0.5
    assert abs(loss2.item() - loss.item()) > 1e-3


def test_policy_term_averages_over_valid_only(tiny_model):
    b = _batch(tiny_model)
    b.valid = torch.tensor([True, True, True, False, False, False])
    loss, _ = PolicyOnlyLoss(LossConfig(), SamplerConfig())(tiny_model, b)
    assert loss.item() == pytest.approx((-b.advantages[:3]).mean().item(), abs=1e-6)
    b.valid = torch.zeros(B, dtype=torch.bool)
    none, _ = PolicyOnlyLoss(LossConfig(), SamplerConfig())(tiny_model, b)
    assert none.item() == 0.0
    none.backward()  # an all-invalid batch still has a graph


@pytest.mark.parametrize("reward_weight", [1.0, 2.5])
def test_ddrl_total_is_policy_plus_beta_data(tiny_model, reward_weight):
    b = _batch(tiny_model)
    cfg = LossConfig(reward_weight=reward_weight, data_beta=0.3)
    loss, m = DDRLLoss(cfg, SamplerConfig())(tiny_model, b)
    assert loss.item() == pytest.approx(reward_weight * m["policy_loss"] + 0.3 * m["data_loss"])
    pol, _ = PolicyOnlyLoss(cfg, SamplerConfig())(tiny_model, b)
    sft, _ = SFTLoss(cfg, SamplerConfig())(tiny_model, b)
    assert loss.item() == pytest.approx(pol.item() + sft.item(), abs=1e-6)
    want = -reward_weight * b.advantages.mean() + 0.3 * _fm_by_hand(tiny_model, b)
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)


def test_data_on_first_only_drops_data_term_after_first_step(tiny_model):
    b = _batch(tiny_model)
    b.first = False
    cfg = LossConfig(data_beta=0.3, data_on_first_only=True)
    loss, m = DDRLLoss(cfg, SamplerConfig())(tiny_model, b)
    assert "data_loss" not in m
    assert loss.item() == pytest.approx((-b.advantages).mean().item(), abs=1e-6)


@pytest.mark.parametrize("kind, level", [("flow", 0.7), ("dance", 0.25)])
def test_policy_step_recomputes_on_policy_log_prob(tiny_model, kind, level):
    b = _batch(tiny_model, kind, level)
    sampler = SamplerConfig(sde=kind, noise_level=level)
    step = policy_step(tiny_model, b, sampler)
    assert step.log_prob.requires_grad
    assert (step.log_prob - b.logp_old).abs().max().item() < 1e-6
    _, ratio = clipped_policy_loss(step.log_prob, b.logp_old, b.advantages, 1e-4)
    assert torch.equal(ratio, torch.ones(B))


def _rollout_batch(ro, i, first):
    n = ro.states.shape[1]
    return StepBatch(
        x_t=ro.states[i],
        x_next=ro.states[i + 1],
        t=ro.timesteps[i].expand(n),
        t_next=ro.timesteps[i + 1].expand(n),
        logp_old=ro.log_probs[i],
        advantages=torch.ones(n),
        valid=torch.ones(n, dtype=torch.bool),
        cond=ro.cond,
        x0_data=torch.zeros_like(ro.states[0]),
        noise0=ro.states[0],
        first=first,
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize("kind", ["flow", "dance"])
def test_rollout_log_probs_recomputed_by_policy_step(tiny_model, kind):
    cfg = SamplerConfig(sde=kind, num_steps=4, noise_level=0.7 if kind == "flow" else 0.25)
    ro = rollout(tiny_model, [""] * 2, 3, cfg, torch.Generator().manual_seed(0))
    assert ro.states.shape == (5, 6, 2) and ro.log_probs.shape == (4, 6)
    assert ro.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert ro.timesteps[0].item() == 1.0 and ro.timesteps[-1].item() == 0.0
    assert torch.isfinite(ro.log_probs).all()
    for i in range(4):
        step = policy_step(tiny_model, _rollout_batch(ro, i, i == 0), cfg)
        assert (step.log_prob - ro.log_probs[i]).abs().max().item() < 1e-5, i
    # the same generator seed gives the same rollout.
    again = rollout(tiny_model, [""] * 2, 3, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(again.states, ro.states)


def test_rollout_digits_log_probs_and_shared_noise(tiny_digits):
    cfg = SamplerConfig(sde="dance", noise_level=0.25, num_steps=2, shared_noise=True)
    ro = rollout(tiny_digits, ["3", "7"], 2, cfg, torch.Generator().manual_seed(0))
    assert ro.states.shape == (3, 4, 1, 8, 8)
    assert torch.equal(ro.states[0, 0], ro.states[0, 1])  # one initial noise per group
    assert not torch.equal(ro.states[0, 1], ro.states[0, 2])
    assert not torch.equal(ro.states[1, 0], ro.states[1, 1])  # the SDE noise is per sample
    for i in range(2):
        step = policy_step(tiny_digits, _rollout_batch(ro, i, i == 0), cfg)
        assert (step.log_prob - ro.log_probs[i]).abs().max().item() < 1e-5, i


def test_flow_grpo_kl_zero_at_init_then_hand_formula(tiny_model):
    sampler = SamplerConfig()
    cfg = LossConfig(beta_kl=0.04)
    loss_fn = FlowGRPOLoss(cfg, sampler, copy.deepcopy(tiny_model))
    b = _batch(tiny_model)
    loss, m = loss_fn(tiny_model, b)
    assert m["kl"] == 0.0
    assert loss.item() == pytest.approx(m["policy_loss"], abs=1e-7)

    base = copy.deepcopy(tiny_model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    loss, m = loss_fn(tiny_model, b)
    assert m["kl"] > 1e-6
    # by hand: Δμ = Δv·(1 + σ²(1−t)/(2t))·dt and std² = σ²·(−dt), σ² = a²·t/(1−t).
    with torch.no_grad():
        dv = tiny_model.velocity(b.x_t, b.t, b.cond) - base.velocity(b.x_t, b.t, b.cond)
    t, dt, a = 0.6, -0.1, 0.7
    sig2 = a**2 * t / (1 - t)
    dmu = dv * (1 + sig2 * (1 - t) / (2 * t)) * dt
    kl = (dmu**2 / (2 * sig2 * -dt)).mean(1).mean().item()
    assert m["kl"] == pytest.approx(kl, rel=1e-4)
    assert loss.item() == pytest.approx(m["policy_loss"] + 0.04 * kl, rel=1e-5)


def test_flow_grpo_without_kl_needs_no_reference(tiny_model):
    loss_fn = FlowGRPOLoss(LossConfig(beta_kl=0.0), SamplerConfig())
    loss, m = loss_fn(tiny_model, _batch(tiny_model))
    assert "kl" not in m and loss_fn.ref is None
    with pytest.raises(ValueError):
        FlowGRPOLoss(LossConfig(beta_kl=0.04), SamplerConfig())


def test_sft_is_beta_times_data_term(tiny_model):
    b = _batch(tiny_model)
    cfg = LossConfig(data_beta=0.5, reward_weight=0.0)
    loss, m = SFTLoss(cfg, SamplerConfig())(tiny_model, b)
    d = _fm_by_hand(tiny_model, b).item()
    assert loss.item() == pytest.approx(0.5 * d, abs=1e-6)
    assert m["data_loss"] == pytest.approx(d, abs=1e-6)
    b.first = False
    same, _ = SFTLoss(cfg, SamplerConfig())(tiny_model, b)
    assert same.item() == pytest.approx(0.5 * d, abs=1e-6)
    cfg.data_on_first_only = True
    zero, m0 = SFTLoss(cfg, SamplerConfig())(tiny_model, b)
    assert zero.item() == 0.0 and m0 == {}


def test_ddrl_backward_reaches_every_parameter(tiny_model):
    b = _batch(tiny_model)
    loss, _ = DDRLLoss(LossConfig(), SamplerConfig())(tiny_model, b)
    loss.backward()
    for name, p in tiny_model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum().item() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_build_loss_names():
    cfg, s = LossConfig(), SamplerConfig()
    assert isinstance(build_loss("ddrl", cfg, s), DDRLLoss)
    assert isinstance(build_loss("dance_grpo", cfg, s), PolicyOnlyLoss)
    assert isinstance(build_loss("sft", cfg, s), SFTLoss)
    assert isinstance(build_loss("ddrl.losses.sft:SFTLoss", cfg, s), SFTLoss)
    with pytest.raises(DDRLError, match="unknown algorithm 'nope'"):
        build_loss("nope", cfg, s)
    with pytest.raises(DDRLError, match="cannot import algorithm"):
        build_loss("no_such_module_xyz:Loss", cfg, s)

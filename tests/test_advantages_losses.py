"""Group advantages, the clipped surrogate and every algorithm's loss on hand-built steps.

Log-probs are checked against a Gaussian written here (torch.distributions.Normal with the
DESIGN §3 mean and std), never against the step function that sampled the transition, and
losses are reduced by the loop's own ``optimizer_step`` (whole-iteration denominators).
"""

import copy
import dataclasses
import math
import statistics

import pytest
import torch
from named_losses import (
    DDRLConfig,
    DDRLLoss,
    FlowGRPOConfig,
    FlowGRPOLoss,
    PolicyConfig,
    PolicyOnlyLoss,
    SFTConfig,
    SFTLoss,
)

from ddrl.advantages import group_advantages
from ddrl.config.core import AdvantageConfig, DanceSDE, FlowSDE, SamplerConfig
from ddrl.errors import DDRLError
from ddrl.flow import sample_training_t
from ddrl.losses import build_loss
from ddrl.losses.base import LossContext, StepBatch, clipped_surrogate
from ddrl.losses.grpo import policy_transition
from ddrl.losses.kl import flow_grpo_kl
from ddrl.losses.reference import FrozenCopy
from ddrl.sampling import rollout
from ddrl.sde import stepper
from ddrl.training.step import optimizer_step

B = 6
EPS = 1e-4

# ---------------------------------------------------------------------------- advantages


def _adv(r, g, **kw):
    return group_advantages(r, g, AdvantageConfig(**kw))


def test_advantage_config_defaults_and_checks():
    cfg = AdvantageConfig()
    assert cfg.std == "unbiased" and cfg.eps == 1e-4  # the DDRL release
    assert cfg.exp_transform is False and cfg.beta == 1.0 and cfg.clamp == 5.0
    cfg.check()
    for kw, needle in [
        ({"eps": 0.0}, "advantage.eps=0.0"),
        ({"std": "sample"}, "unknown advantage.std 'sample'; allowed: global, population"),
        ({"beta": 0.0}, "advantage.beta"),
        ({"clamp": 1.0}, "advantage.clamp"),
    ]:
        with pytest.raises(DDRLError, match=needle):
            AdvantageConfig(**kw).check()


def test_group_advantages_population_hand_groups():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv, valid = _adv(r, g, std="population")
    std = math.sqrt(1.25)  # population std of 1, 2, 3, 4
    want = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + EPS)
    assert torch.allclose(adv[:4], want, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # equal rewards: A = 0 (eps > 0)
    assert valid.all()


def test_group_advantages_unbiased_hand_groups_is_default():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv, valid = _adv(r, g, std="unbiased")
    std = math.sqrt(5 / 3)  # sample std (ddof 1) of 1, 2, 3, 4
    want = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + EPS)
    assert torch.allclose(adv[:4], want, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))
    assert valid.all()
    default, _ = group_advantages(r, g, AdvantageConfig())
    assert torch.equal(default, adv)
    pop, _ = _adv(r, g, std="population")
    assert (adv[:4].abs() < pop[:4].abs()).all()  # the larger std shrinks |A|
    # a group of one has no sample std: A = 0, not NaN.
    one, ok = _adv(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0, 1, 1]), std="unbiased")
    assert one[0].item() == 0.0 and ok.all()
    assert torch.allclose(one[1:], torch.tensor([-0.5, 0.5]) / (math.sqrt(0.5) + EPS))


def test_group_advantages_global_hand_groups():
    # per-group mean, one population std of every reward in the batch (flow_grpo's global_std).
    r = torch.tensor([1.0, 10.0, 2.0, 30.0, 3.0, 20.0, 7.0, 7.0], dtype=torch.float64)
    g = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2])
    adv, valid = _adv(r, g, std="global")
    s = statistics.pstdev(r.tolist())
    mean = {0: 2.0, 1: 20.0, 2: 7.0}
    want = torch.tensor(
        [(x - mean[k]) / (s + EPS) for x, k in zip(r.tolist(), g.tolist(), strict=True)]
    )
    assert torch.allclose(adv, want.double(), atol=1e-12)
    assert valid.all()
    assert torch.equal(adv[6:], torch.zeros(2, dtype=torch.float64))
    # every group is scaled by the same std (per-group stds would differ by 10×).
    per, _ = _adv(r, g, std="population")
    assert not torch.allclose(per, adv)


def test_group_advantages_interleaved_groups():
    # the same two groups, interleaved: each sample keeps its own group's normalisation.
    r = torch.tensor([1.0, 10.0, 2.0, 30.0, 3.0, 20.0])
    g = torch.tensor([0, 1, 0, 1, 0, 1])
    adv, _ = _adv(r, g, std="population")
    s = math.sqrt(2 / 3)
    assert torch.allclose(adv[0::2], torch.tensor([-1.0, 0.0, 1.0]) / (s + EPS), atol=1e-6)
    assert torch.allclose(adv[1::2], torch.tensor([-10.0, 10.0, 0.0]) / (10 * s + EPS), atol=1e-6)


def test_group_advantages_clamp_outlier():
    # 29 zeros and one 1: mean 1/30, population std sqrt(29)/30 → the outlier's A ≈ sqrt(29) > 5.
    r = torch.zeros(30)
    r[7] = 1.0
    g = torch.zeros(30, dtype=torch.long)
    s = math.sqrt(29) / 30
    free, _ = _adv(r, g, std="population", clamp=100.0)
    assert free[7].item() == pytest.approx((29 / 30) / (s + EPS), rel=1e-5)
    assert free[7].item() > 5
    assert free[0].item() == pytest.approx((-1 / 30) / (s + EPS), rel=1e-5)
    adv, _ = _adv(r, g, std="population", clamp=5.0)
    assert adv[7].item() == 5.0
    assert torch.equal(adv[torch.arange(30) != 7], free[torch.arange(30) != 7])
    # symmetric: one low outlier is clamped at −5.
    low, _ = _adv(-r, g, std="population", clamp=5.0)
    assert low[7].item() == -5.0


def test_group_advantages_exp_transform():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = torch.zeros(4, dtype=torch.long)
    a = (r - 2.5) / (math.sqrt(1.25) + EPS)  # all above −ln 5: the argument clamp is idle
    assert a.min().item() > -math.log(5)
    adv, _ = _adv(r, g, std="population", exp_transform=True, beta=2.0)
    assert torch.allclose(adv, -torch.exp(-a / 2.0), atol=1e-6)
    assert (adv < 0).all() and (adv[1:] > adv[:-1]).all()  # λ is monotone and negative
    # β is a temperature: a small β gives the worst sample −exp(−A/β) ≈ −14.6, not cut at −5.
    hot, _ = _adv(r, g, std="population", exp_transform=True, beta=0.5)
    assert torch.allclose(hot, -torch.exp(-a / 0.5), atol=1e-5)
    assert hot[0].item() < -14


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_group_advantages_exp_transform_clamps_argument_at_minus_log_clamp(beta):
    # rewards 0, 1, 1, 1: z = (−√3, 1/√3, 1/√3, 1/√3) (population std √3/4); −√3 < −ln 5,
    # so λ's argument is raised to −ln 5: A = −exp(ln 5 / β) = −5^(1/β) (−5 at the release β = 1).
    r = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    g = torch.zeros(4, dtype=torch.long)
    s = math.sqrt(3) / 4
    z = torch.tensor([-0.75, 0.25, 0.25, 0.25], dtype=torch.float64) / (s + EPS)
    assert z[0].item() < -math.log(5)
    adv, _ = _adv(r, g, std="population", exp_transform=True, beta=beta, clamp=5.0)
    assert adv[0].item() == pytest.approx(-(5 ** (1 / beta)), rel=1e-12)
    assert torch.allclose(adv[1:], -torch.exp(-z[1:] / beta), atol=1e-12)
    # a looser clamp lets the argument through.
    loose, _ = _adv(r, g, std="population", exp_transform=True, beta=beta, clamp=100.0)
    assert loose[0].item() == pytest.approx(-math.exp(-z[0].item() / beta), rel=1e-12)


@pytest.mark.parametrize("std", ["unbiased", "population", "global"])
def test_group_advantages_non_finite_group_is_skipped(std):
    """A group with a NaN/inf reward is invalid with A = 0, and the other groups get exactly the
    advantages they would get without it: under "global" the skipped groups' finite rewards do
    not enter the shared std either (skipping a group is the same as removing it)."""
    nan, inf = float("nan"), float("inf")
    r = torch.tensor([1.0, nan, 3.0, 1.0, 2.0, 3.0, inf, 0.0, 10.0, 30.0], dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    adv, valid = _adv(r, g, std=std)
    assert valid.tolist() == [False] * 3 + [True] * 3 + [False] * 2 + [True] * 2
    assert torch.equal(adv[~valid], torch.zeros(5, dtype=torch.float64))
    kept = valid.nonzero().flatten()
    alone, _ = _adv(r[kept], g[kept], std=std)
    assert torch.equal(adv[kept], alone)
    # by hand: group 1 = (1, 2, 3), mean 2; group 3 = (10, 30), mean 20.
    dev = torch.tensor([-1.0, 0.0, 1.0, -10.0, 10.0], dtype=torch.float64)
    if std == "unbiased":
        scale = torch.tensor([1.0] * 3 + [math.sqrt(200)] * 2, dtype=torch.float64)
    elif std == "population":
        scale = torch.tensor([math.sqrt(2 / 3)] * 3 + [10.0] * 2, dtype=torch.float64)
    else:
        scale = torch.full((5,), statistics.pstdev([1.0, 2.0, 3.0, 10.0, 30.0]), dtype=r.dtype)
    assert torch.allclose(alone, (dev / (scale + EPS)).clamp(-5, 5), atol=1e-12)


@pytest.mark.parametrize("std", ["unbiased", "population", "global"])
def test_group_advantages_all_groups_non_finite(std):
    r = torch.tensor([float("nan"), 1.0, 2.0, float("inf")])
    adv, valid = _adv(r, torch.tensor([0, 0, 1, 1]), std=std)
    assert not valid.any() and torch.equal(adv, torch.zeros(4))


# ---------------------------------------------------------------------------- clipped surrogate


def test_clipped_surrogate_on_policy_is_minus_advantage():
    logp = torch.tensor([-1.3, 0.2, 5.0])
    adv = torch.tensor([0.7, -2.0, 0.0])
    loss, ratio = clipped_surrogate(logp - logp.clone(), adv, 1e-4)
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
def test_clipped_surrogate_hand_values(dlogp, a, want):
    logp_old = torch.tensor([-0.3])
    loss, ratio = clipped_surrogate((logp_old + dlogp) - logp_old, torch.tensor([a]), 0.2)
    assert ratio.item() == pytest.approx(math.exp(dlogp), rel=1e-6)
    assert loss.item() == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------------- reference step


def _ref_step(kind, level, x, v, t, tn):
    """DESIGN §3, written independently in float64: (mean, transition std). Flow-SDE with
    flow_grpo's rule at t = 1 (sd3_sde_with_logprob.py L47: the next grid point replaces t in
    the denominator only); Dance-SDE from the score of the straight path."""
    x, v = x.double(), v.double()
    shape = (-1,) + (1,) * (x.dim() - 1)
    tb, tnb = t.double().reshape(shape), tn.double().reshape(shape)
    dt = tnb - tb
    if kind == "flow":
        sig2 = level**2 * tb / (1 - torch.where(tb >= 1, tnb, tb))
        return x + (v + sig2 / (2 * tb) * (x + (1 - tb) * v)) * dt, torch.sqrt(sig2 * -dt)
    score = -(x - (1 - tb) * (x - tb * v)) / tb**2
    return x + dt * v - 0.5 * level**2 * score * dt, level * torch.sqrt(-dt)


def _ref_log_prob(x_next, mean, std):
    """Mean over dims of the Normal log-density (the step's log-prob scale), [B] float64."""
    dist = torch.distributions.Normal(mean, std.expand_as(mean))
    return dist.log_prob(x_next.double()).flatten(1).mean(1)


def _sde(kind, level):
    return FlowSDE(noise_level=level) if kind == "flow" else DanceSDE(eta=level)


def _no_reference(kind):
    raise AssertionError("this loss must not build a reference")


def _ctx(kind="flow", level=0.7, cfg_scale=1.0, make_reference=_no_reference):
    return LossContext(stepper(_sde(kind, level)), cfg_scale, make_reference)


# ---------------------------------------------------------------------------- one step batch


def _batch(gen, kind="flow", level=0.7, seed=0, t=0.6, t_next=0.5, prompts=None, null=False):
    """An on-policy StepBatch: x_next drawn from the reference Gaussian around the model's
    velocity, logp_old its reference log-density (not the library's step function)."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, *gen.sample_shape)
    x_t = torch.randn(shape, generator=g)
    tt, tn = torch.full((B,), t), torch.full((B,), t_next)
    with torch.no_grad():
        cond = gen.conditioner.encode(prompts or [""] * B)
        v = gen.denoiser.velocity(x_t, tt, cond)
        mean, std = _ref_step(kind, level, x_t, v, tt, tn)
        x_next = (mean + std * torch.randn(shape, generator=g).double()).float()
        logp_old = _ref_log_prob(x_next, mean, std).float()
    return StepBatch(
        x_t=x_t,
        x_next=x_next,
        t=tt,
        t_next=tn,
        logp_old=logp_old,
        advantages=torch.randn(B, generator=g),
        valid=torch.ones(B, dtype=torch.bool),
        cond=cond,
        null=gen.conditioner.null(B) if null else None,
        x0_data=torch.randn(shape, generator=g),
        noise0=torch.randn(shape, generator=g),
        first=True,
        generator=torch.Generator().manual_seed(seed + 1),
    )


def _slice(b, idx):
    """Rows ``idx`` of a StepBatch (a micro-batch)."""
    rows = {
        f.name: getattr(b, f.name)[idx]
        for f in dataclasses.fields(b)
        if torch.is_tensor(getattr(b, f.name))
    }
    return dataclasses.replace(b, **rows, cond=b.cond.index(idx))


def _fm_by_hand(gen, b, t=None, noise=None):
    """Per-sample flow-matching loss [B] on the batch's data, conditional."""
    t = b.t if t is None else t
    eps = b.noise0 if noise is None else noise
    tb = t.reshape(-1, *([1] * (b.x0_data.dim() - 1)))
    v = gen.denoiser.velocity((1 - tb) * b.x0_data + tb * eps, t, b.cond)
    return ((v - (eps - b.x0_data)) ** 2).flatten(1).mean(1)


def _run(loss_fn, gen, batches):
    """The loop's reduction (ddrl.training.step.optimizer_step) at lr 0: metrics as floats;
    the weights are unchanged and the gradients stay in .grad."""
    params = list(gen.denoiser.parameters())
    opt = torch.optim.SGD(params, lr=0.0)
    m, finite = optimizer_step(loss_fn, gen.denoiser, batches, params, opt, grad_clip=0.0)
    assert finite
    return {k: float(v) for k, v in m.items()}


# ---------------------------------------------------------------------------- loss configs


def test_loss_configs_defaults_and_checks():
    d = DDRLConfig()
    assert (d.data_beta, d.data_t, d.data_on_first_only, d.clip_range) == (
        0.1,
        "rollout",
        False,
        1e-4,
    )
    f = FlowGRPOConfig()
    assert (f.clip_range, f.beta_kl, f.reference) == (1e-4, 0.04, "auto")
    assert PolicyConfig().clip_range == 1e-4
    assert SFTConfig().data_beta == 1.0 and SFTConfig().data_t == "rollout"
    for cfg in (d, f, PolicyConfig(), SFTConfig()):
        cfg.check()
    assert not hasattr(d, "reward_weight") and not hasattr(d, "beta_kl")
    for bad, needle in [
        (
            DDRLConfig(data_t="x"),
            "unknown loss.data_t 'x'; allowed: edm_lognormal, random, rollout",
        ),
        (DDRLConfig(data_beta=-1.0), "loss.data_beta"),
        (DDRLConfig(clip_range=2.0), "loss.clip_range"),
        (FlowGRPOConfig(beta_kl=-0.1), "loss.beta_kl"),
        (FlowGRPOConfig(reference="lora"), "unknown loss.reference 'lora'"),
        (PolicyConfig(clip_range=-1.0), "loss.clip_range"),
    ]:
        with pytest.raises(DDRLError, match=needle):
            bad.check()


# ---------------------------------------------------------------------------- the terms


def test_ddrl_data_term_is_per_sample_flow_matching(tiny_model):
    b = _batch(tiny_model)
    loss_fn = DDRLLoss(DDRLConfig(data_beta=0.3), _ctx())
    masks = loss_fn.masks(b)
    assert set(masks) == {"policy", "data"} and masks["data"].all()
    out = loss_fn(tiny_model.denoiser, b)
    assert set(out.terms) == {"policy", "data"}
    vals, coef = out.terms["data"]
    want = _fm_by_hand(tiny_model, b)
    assert coef == 0.3 and vals.shape == (B,)
    assert want.mean().item() > 1e-3
    assert torch.allclose(vals, want, atol=1e-6)
    m = _run(loss_fn, tiny_model, [b])
    assert m["loss_data"] == pytest.approx(want.mean().item(), abs=1e-6)


def test_data_t_random_draws_t_and_noise_from_generator(tiny_model):
    b = _batch(tiny_model)
    out = DDRLLoss(DDRLConfig(data_beta=1.0, data_t="random"), _ctx())(tiny_model.denoiser, b)
    gen = torch.Generator().manual_seed(1)  # the batch's generator was seeded with seed + 1
    t = sample_training_t(B, gen)
    eps = torch.randn(B, 2, generator=gen)
    want = _fm_by_hand(tiny_model, b, t=t, noise=eps)
    assert torch.allclose(out.terms["data"][0], want, atol=1e-6)
    assert (want - _fm_by_hand(tiny_model, b)).abs().max().item() > 1e-4


def test_ddrl_policy_only_equals_policy_only_loss_and_minus_advantage(tiny_model):
    b = _batch(tiny_model)
    ddrl = DDRLLoss(DDRLConfig(data_beta=0.0), _ctx())
    pol = PolicyOnlyLoss(PolicyConfig(), _ctx())
    assert set(pol.masks(b)) == {"policy"} and torch.equal(pol.masks(b)["policy"], b.valid)
    out, ref = ddrl(tiny_model.denoiser, b), pol(tiny_model.denoiser, b)
    assert set(out.terms) == {"policy"} and out.terms["policy"][1] == 1.0
    assert torch.equal(out.terms["policy"][0], ref.terms["policy"][0])
    # on-policy the ratio is 1 (to float precision): per-sample −A, nothing clipped.
    assert torch.allclose(out.terms["policy"][0], -b.advantages, atol=1e-5)
    assert out.stats["ratio_dev"].max().item() < 1e-5
    assert torch.equal(out.stats["clipped"], torch.zeros(B))
    m = _run(ddrl, tiny_model, [b])
    assert m["loss"] == pytest.approx((-b.advantages).mean().item(), abs=1e-5)
    assert m["clipped_mean"] == 0.0 and "loss_data" not in m
    # off-policy (logp_old shifted) the two still agree, and differ from −A.
    b.logp_old = b.logp_old + torch.linspace(-0.3, 0.3, B)
    out2, ref2 = ddrl(tiny_model.denoiser, b), pol(tiny_model.denoiser, b)
    assert torch.allclose(out2.terms["policy"][0], ref2.terms["policy"][0], atol=1e-7)
    assert out2.stats["clipped"].mean().item() > 0.5
    m2 = _run(ddrl, tiny_model, [b])
    assert m2["clipped_mean"] > 0.5
    assert abs(m2["loss"] - m["loss"]) > 1e-3


def test_policy_term_averages_over_valid_only(tiny_model):
    b = _batch(tiny_model)
    b.valid = torch.tensor([True, True, True, False, False, False])
    loss_fn = PolicyOnlyLoss(PolicyConfig(), _ctx())
    m = _run(loss_fn, tiny_model, [b])
    assert m["loss_policy"] == pytest.approx((-b.advantages[:3]).mean().item(), abs=1e-5)
    assert m["loss"] == pytest.approx(m["loss_policy"], abs=1e-7)
    # split so that one micro-batch is all invalid: the denominator is still the 3 valid ones.
    split = _run(loss_fn, tiny_model, [_slice(b, torch.arange(4)), _slice(b, torch.arange(4, B))])
    assert split["loss_policy"] == pytest.approx(m["loss_policy"], abs=1e-6)
    b.valid = torch.zeros(B, dtype=torch.bool)
    none = _run(loss_fn, tiny_model, [b])  # an all-invalid batch still runs backward
    assert none["loss"] == 0.0 and none["loss_policy"] == 0.0 and none["grad_norm"] == 0.0


def test_loss_reduction_is_independent_of_the_micro_batch_split(tiny_model):
    b = _batch(tiny_model)
    b.valid = torch.tensor([True, False, True, True, False, True])
    loss_fn = DDRLLoss(DDRLConfig(data_beta=0.3), _ctx())
    whole = _run(loss_fn, tiny_model, [b])
    g_whole = [p.grad.clone() for p in tiny_model.denoiser.parameters()]
    parts = [_slice(b, torch.tensor(i)) for i in ([0, 1], [2], [3, 4, 5])]
    split = _run(loss_fn, tiny_model, parts)
    for k in ("loss", "loss_policy", "loss_data"):
        assert split[k] == pytest.approx(whole[k], abs=1e-6), k
    for p, g in zip(tiny_model.denoiser.parameters(), g_whole, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)
    assert whole["loss_policy"] == pytest.approx((-b.advantages[b.valid]).mean().item(), abs=1e-5)
    assert whole["loss_data"] == pytest.approx(_fm_by_hand(tiny_model, b).mean().item(), abs=1e-6)


@pytest.mark.parametrize("data_beta", [0.3, 2.5])
def test_ddrl_total_is_policy_plus_beta_data(tiny_model, data_beta):
    b = _batch(tiny_model)
    m = _run(DDRLLoss(DDRLConfig(data_beta=data_beta), _ctx()), tiny_model, [b])
    assert m["loss"] == pytest.approx(m["loss_policy"] + data_beta * m["loss_data"], abs=1e-6)
    pol = _run(PolicyOnlyLoss(PolicyConfig(), _ctx()), tiny_model, [b])
    sft = _run(SFTLoss(SFTConfig(data_beta=data_beta), _ctx()), tiny_model, [b])
    assert m["loss"] == pytest.approx(pol["loss"] + sft["loss"], abs=1e-6)
    want = -b.advantages.mean() + data_beta * _fm_by_hand(tiny_model, b).mean()
    assert m["loss"] == pytest.approx(want.item(), abs=1e-5)


def test_data_on_first_only_drops_data_term_after_first_step(tiny_model):
    first = _batch(tiny_model)
    later = _batch(tiny_model, seed=1, t=0.5, t_next=0.4)
    later.first = False
    loss_fn = DDRLLoss(DDRLConfig(data_beta=0.3, data_on_first_only=True), _ctx())
    out = loss_fn(tiny_model.denoiser, later)
    assert set(out.terms) == {"policy"}
    assert loss_fn.masks(later)["data"].all()  # still counted in the denominator
    assert torch.allclose(out.terms["policy"][0], -later.advantages, atol=1e-5)
    # over two trained timesteps the data term is averaged over items × timesteps (release).
    m = _run(loss_fn, tiny_model, [first, later])
    fm_first, fm_later = _fm_by_hand(tiny_model, first), _fm_by_hand(tiny_model, later)
    assert m["loss_data"] == pytest.approx(fm_first.sum().item() / (2 * B), abs=1e-6)
    adv = torch.cat([first.advantages, later.advantages])
    assert m["loss_policy"] == pytest.approx((-adv).mean().item(), abs=1e-5)
    every = _run(DDRLLoss(DDRLConfig(data_beta=0.3), _ctx()), tiny_model, [first, later])
    both = (fm_first.sum() + fm_later.sum()).item() / (2 * B)
    assert every["loss_data"] == pytest.approx(both, abs=1e-6)


# ---------------------------------------------------------------------------- recomputed steps


@pytest.mark.parametrize("kind, level", [("flow", 0.7), ("dance", 0.25)])
@pytest.mark.parametrize("t, t_next", [(0.6, 0.5), (1.0, 0.8)])
def test_policy_transition_is_the_reference_density(tiny_model, kind, level, t, t_next):
    b = _batch(tiny_model, kind, level, t=t, t_next=t_next)
    ctx = _ctx(kind, level)
    step = policy_transition(tiny_model.denoiser, b, ctx)[0]
    assert step.log_prob.requires_grad and step.log_prob.shape == (B,)
    assert torch.equal(step.x_next, b.x_next)
    # logp_old is the reference density of the same transition: the ratio is 1.
    assert (step.log_prob - b.logp_old).abs().max().item() < 1e-5
    _, ratio = clipped_surrogate(step.log_prob - b.logp_old, b.advantages, 1e-4)
    assert (ratio - 1).abs().max().item() < 1e-5
    # any other transition is scored by the same reference Gaussian.
    with torch.no_grad():
        v = tiny_model.denoiser.velocity(b.x_t, b.t, b.cond)
    mean, std = _ref_step(kind, level, b.x_t, v, b.t, b.t_next)
    assert torch.allclose(step.mean.double(), mean, atol=1e-5)
    b.x_next = b.x_next + 0.3
    other = policy_transition(tiny_model.denoiser, b, ctx)[0]
    assert torch.allclose(other.log_prob.double(), _ref_log_prob(b.x_next, mean, std), atol=1e-5)
    assert (other.log_prob - step.log_prob).abs().min().item() > 1e-3


def test_policy_transition_cfg_detaches_the_unconditional_branch(tiny_digits):
    """With CFG the recomputed velocity is v_u + w·(v_c − v_u) and no gradient flows through
    v_u (flow_grpo train_sd3.py L190)."""
    w = 3.0
    b = _batch(tiny_digits, prompts=["3", "7", "3", "7", "1", "0"], null=True)
    d = tiny_digits.denoiser
    params = list(d.parameters())

    def grads(lp):
        return torch.autograd.grad(lp.sum(), params, allow_unused=True, retain_graph=True)

    step = policy_transition(d, b, _ctx(cfg_scale=w))[0]
    v_c, v_u = d.velocity(b.x_t, b.t, b.cond), d.velocity(b.x_t, b.t, b.null)
    assert (v_c - v_u).abs().max().item() > 1e-3  # the condition matters
    mean, std = _ref_step("flow", 0.7, b.x_t, (v_u + w * (v_c - v_u)).detach(), b.t, b.t_next)
    want = _ref_log_prob(b.x_next, mean, std)
    assert torch.allclose(step.log_prob.double(), want, atol=1e-4)
    # the gradient is that of log p with v = sg(v_u) + w·(v_c − sg(v_u)).
    ctx = _ctx()
    v_sg = v_u.detach() + w * (v_c - v_u.detach())
    detached = ctx.step(b.x_t, v_sg, b.t, b.t_next, prev_sample=b.x_next)
    through = ctx.step(b.x_t, v_u + w * (v_c - v_u), b.t, b.t_next, prev_sample=b.x_next)
    g_step, g_det, g_thr = grads(step.log_prob), grads(detached.log_prob), grads(through.log_prob)
    diff = 0.0
    for gs, gd, gt in zip(g_step, g_det, g_thr, strict=True):
        if gs is None:
            assert gd is None
            continue
        assert torch.allclose(gs, gd, rtol=1e-3, atol=1e-5)
        diff = max(diff, (gs - gt).abs().max().item())
    assert diff > 1e-3


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
        null=ro.null,
        x0_data=torch.zeros_like(ro.states[0]),
        noise0=ro.states[0],
        first=first,
        generator=torch.Generator().manual_seed(0),
    )


def _check_rollout_log_probs(gen, ro, kind, level):
    """Each recorded log-prob is the reference density of the recorded transition, and the
    loss's recomputation reproduces it (ratio ≡ 1 on-policy)."""
    ctx = _ctx(kind, level)
    for i in range(ro.log_probs.shape[0]):
        b = _rollout_batch(ro, i, i == 0)
        with torch.no_grad():
            v = gen.denoiser.velocity(b.x_t, b.t, b.cond)
        mean, std = _ref_step(kind, level, b.x_t, v, b.t, b.t_next)
        want = _ref_log_prob(b.x_next, mean, std)
        # float32 steps vs a float64 reference; the last scheduler step (t = 0.001) is tiny
        assert torch.allclose(ro.log_probs[i].double(), want, atol=1e-3), i
        step = policy_transition(gen.denoiser, b, ctx)[0]
        assert (step.log_prob - ro.log_probs[i]).abs().max().item() < 1e-5, i


@pytest.mark.parametrize("kind, level", [("flow", 0.7), ("dance", 0.25)])
def test_rollout_log_probs_are_reference_densities(tiny_model, kind, level):
    cfg = SamplerConfig(sde=_sde(kind, level), num_steps=4)
    ro = rollout(tiny_model, [""] * 2, 3, cfg, torch.Generator().manual_seed(0))
    assert ro.states.shape == (5, 6, 2) and ro.log_probs.shape == (4, 6)
    assert ro.prompts == [""] * 6  # 2 groups of 3
    assert ro.timesteps[0].item() == 1.0 and ro.timesteps[-1].item() == 0.0
    assert ro.null is None  # no CFG
    assert torch.isfinite(ro.log_probs).all()
    _check_rollout_log_probs(tiny_model, ro, kind, level)
    # the same generator seed gives the same rollout.
    again = rollout(tiny_model, [""] * 2, 3, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(again.states, ro.states)


def test_rollout_digits_log_probs_and_shared_noise(tiny_digits):
    cfg = SamplerConfig(sde=DanceSDE(eta=0.25), num_steps=2, shared_noise=True)
    ro = rollout(tiny_digits, ["3", "7"], 2, cfg, torch.Generator().manual_seed(0))
    assert ro.states.shape == (3, 4, 1, 8, 8)
    assert ro.prompts == ["3", "3", "7", "7"]
    assert torch.equal(ro.states[0, 0], ro.states[0, 1])  # one initial noise per group
    assert not torch.equal(ro.states[0, 1], ro.states[0, 2])
    assert not torch.equal(ro.states[1, 0], ro.states[1, 1])  # the SDE noise is per sample
    _check_rollout_log_probs(tiny_digits, ro, "dance", 0.25)


# ---------------------------------------------------------------------------- Flow-GRPO's KL


def test_flow_grpo_kl_hand_value():
    # mean over dims of Δμ²/(2σ²): Δμ = (1, 2), σ = 2 → (1 + 4)/2 / 8 = 0.3125.
    kl = flow_grpo_kl(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.full((1, 1), 2.0))
    assert kl.shape == (1,) and kl.item() == pytest.approx(0.3125)


def test_flow_grpo_kl_zero_at_init_then_hand_formula(tiny_model):
    built = []

    def make_reference(kind):
        assert kind == "auto"
        built.append(FrozenCopy(tiny_model.denoiser))
        return built[-1]

    loss_fn = FlowGRPOLoss(FlowGRPOConfig(beta_kl=0.04), _ctx(make_reference=make_reference))
    assert (
        len(built) == 1 and loss_fn.regularisers[0].ref is built[0]
    )  # built once, at construction
    b = _batch(tiny_model)
    assert set(loss_fn.masks(b)) == {"policy", "kl"}
    out = loss_fn(tiny_model.denoiser, b)
    assert out.terms["kl"][1] == 0.04
    assert torch.equal(out.terms["kl"][0], torch.zeros(B))
    m = _run(loss_fn, tiny_model, [b])
    assert m["loss_kl"] == 0.0 and m["loss"] == pytest.approx(m["loss_policy"], abs=1e-7)

    base = copy.deepcopy(tiny_model.denoiser)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in tiny_model.denoiser.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    kl = loss_fn(tiny_model.denoiser, b).terms["kl"][0].detach()
    assert kl.min().item() > 1e-8
    # by hand, flow_grpo's units (train_sd3.py L894–897): Δμ = Δv·(1 + σ²(1−t)/(2t))·dt,
    # KL = mean_dims(Δμ²)/(2σ²) with σ² = a²·t/(1−t) — the exact Gaussian KL (variance σ²·|dt|)
    # times |dt|.
    with torch.no_grad():
        dv = tiny_model.denoiser.velocity(b.x_t, b.t, b.cond) - base.velocity(b.x_t, b.t, b.cond)
    t, dt, a = 0.6, -0.1, 0.7
    sig2 = a**2 * t / (1 - t)
    dmu = dv * (1 + sig2 * (1 - t) / (2 * t)) * dt
    want = (dmu**2 / (2 * sig2)).mean(1)
    assert torch.allclose(kl, want, rtol=1e-4)
    exact = (dmu**2 / (2 * sig2 * -dt)).mean(1)
    assert torch.allclose(kl, exact * -dt, rtol=1e-4)
    m = _run(loss_fn, tiny_model, [b])
    assert m["loss_kl"] == pytest.approx(want.mean().item(), rel=1e-4)
    assert m["loss"] == pytest.approx(m["loss_policy"] + 0.04 * m["loss_kl"], rel=1e-5)
    # the KL term covers the valid samples only.
    b.valid = torch.tensor([True, False, True, False, True, True])
    m = _run(loss_fn, tiny_model, [b])
    assert m["loss_kl"] == pytest.approx(want[b.valid].mean().item(), rel=1e-4)


def test_flow_grpo_without_kl_needs_no_reference(tiny_model):
    loss_fn = FlowGRPOLoss(FlowGRPOConfig(beta_kl=0.0), _ctx())  # _no_reference never called
    out = loss_fn(tiny_model.denoiser, _batch(tiny_model))
    assert "kl" not in out.terms and loss_fn.regularisers[0].ref is None
    with pytest.raises(AssertionError, match="must not build a reference"):
        FlowGRPOLoss(FlowGRPOConfig(beta_kl=0.04), _ctx())


# ---------------------------------------------------------------------------- SFT


def test_sft_is_beta_times_data_term(tiny_model):
    b = _batch(tiny_model)
    loss_fn = SFTLoss(SFTConfig(data_beta=0.5), _ctx())
    assert set(loss_fn.masks(b)) == {"data"} and loss_fn.masks(b)["data"].all()
    d = _fm_by_hand(tiny_model, b)
    out = loss_fn(tiny_model.denoiser, b)
    assert set(out.terms) == {"data"} and out.terms["data"][1] == 0.5 and out.stats == {}
    assert torch.allclose(out.terms["data"][0], d, atol=1e-6)
    m = _run(loss_fn, tiny_model, [b])
    assert m["loss"] == pytest.approx(0.5 * d.mean().item(), abs=1e-6)
    assert m["loss_data"] == pytest.approx(d.mean().item(), abs=1e-6)
    b.first = False
    same = _run(loss_fn, tiny_model, [b])
    assert same["loss"] == pytest.approx(0.5 * d.mean().item(), abs=1e-6)
    first_only = SFTLoss(SFTConfig(data_beta=0.5, data_on_first_only=True), _ctx())
    zero = first_only(tiny_model.denoiser, b)
    assert zero.terms == {} and zero.stats == {}
    first = _batch(tiny_model, seed=1)
    m = _run(first_only, tiny_model, [first, b])
    d1 = _fm_by_hand(tiny_model, first)
    assert m["loss"] == pytest.approx(0.5 * d1.sum().item() / (2 * B), abs=1e-6)


# ---------------------------------------------------------------------------- gradients, names


def test_ddrl_backward_reaches_every_parameter(tiny_model):
    _run(DDRLLoss(DDRLConfig(), _ctx()), tiny_model, [_batch(tiny_model)])
    for name, p in tiny_model.denoiser.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum().item() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_build_loss_names():
    """Each named algorithm is its cell of the matrix: the objective and regularisers built on
    one config inheriting each part's; a "module:Class" algorithm is a whole loss class."""
    from ddrl.losses import ALGORITHMS, loss_config
    from ddrl.losses.compose import Composite, NoObjective
    from ddrl.losses.data import DataTerm
    from ddrl.losses.grpo import GRPO
    from ddrl.losses.kl import ReverseKL

    ctx = _ctx()
    expect = {
        "ddrl": (GRPO, [DataTerm]),
        "flow_grpo": (GRPO, [ReverseKL]),
        "dance_grpo": (GRPO, []),
        "grpo": (GRPO, []),
        "sft": (NoObjective, [DataTerm]),
    }
    cfgs = {"ddrl": DDRLConfig(), "flow_grpo": FlowGRPOConfig(beta_kl=0.0)}
    for name, (obj, regs) in expect.items():
        cfg = cfgs.get(name, loss_config(name)())
        loss = build_loss(name, cfg, ctx)
        assert isinstance(loss, Composite) and type(loss.objective) is obj, name
        assert [type(r) for r in loss.regularisers] == regs, name
    assert loss_config("ddrl") is DDRLConfig and loss_config("grpo") is PolicyConfig
    assert loss_config("dance_grpo") is PolicyConfig and loss_config("flow_grpo") is FlowGRPOConfig
    assert set(ALGORITHMS) >= {"nft", "nft_data", "awm", "awm_data"}
    plugin = build_loss("test_loop:Recorder", PolicyConfig(), ctx)
    assert type(plugin).__name__ == "Recorder"
    with pytest.raises(DDRLError, match="unknown algorithm 'nope'"):
        build_loss("nope", DDRLConfig(), ctx)
    with pytest.raises(DDRLError, match="cannot import algorithm"):
        build_loss("no_such_module_xyz:Loss", DDRLConfig(), ctx)
    with pytest.raises(DDRLError, match="not a loss class with a Config"):
        build_loss("ddrl.losses.base:clipped_surrogate", DDRLConfig(), ctx)


def test_flow_grpo_drops_zero_advantage_samples_as_flow_grpo_does(tiny_model):
    """flow_grpo (scripts/train_sd3.py L796-817) removes the samples whose advantages are 0 at
    every step before its loss, so the policy and KL means run over the others only (the
    per-sample terms, averaged by hand over the kept samples); with the option off the zeros
    stay in both denominators. The policy is moved off the reference so the KL is not 0."""
    b = _batch(tiny_model)
    adv = b.advantages.clone()
    adv[[1, 4]] = 0.0  # two samples of groups whose rewards were all equal
    b = dataclasses.replace(b, advantages=adv)
    kept = adv != 0

    def run(drop):
        cfg = FlowGRPOConfig(beta_kl=0.5, drop_zero_advantage=drop)
        ref = {}

        def make_reference(kind):
            ref["r"] = FrozenCopy(copy.deepcopy(tiny_model.denoiser))
            return ref["r"]

        loss_fn = FlowGRPOLoss(cfg, _ctx(make_reference=make_reference))
        with torch.no_grad():  # move the policy off the reference so the KL is not 0
            for p in tiny_model.denoiser.parameters():
                p.add_(0.01)
        try:
            masks = loss_fn.masks(b)
            out = loss_fn(tiny_model.denoiser, b)
            m = _run(loss_fn, tiny_model, [b])
        finally:
            with torch.no_grad():
                for p in tiny_model.denoiser.parameters():
                    p.sub_(0.01)
        return masks, out, m

    masks, out, m = run(drop=True)
    assert torch.equal(masks["policy"], kept) and torch.equal(masks["kl"], kept)
    pg, kl = out.terms["policy"][0].detach(), out.terms["kl"][0].detach()
    assert (pg[~kept] == 0).all() and kl.min() > 0  # A = 0 adds nothing but a denominator
    assert m["loss_policy"] == pytest.approx(pg[kept].mean().item(), rel=1e-5, abs=1e-7)
    assert m["loss_kl"] == pytest.approx(kl[kept].mean().item(), rel=1e-5)
    masks, _, m = run(drop=False)
    assert masks["policy"].all() and masks["kl"].all()
    assert m["loss_policy"] == pytest.approx(pg.mean().item(), rel=1e-5, abs=1e-7)
    assert m["loss_kl"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert abs(pg[kept].mean() - pg.mean()) > 1e-4  # the two reductions differ
    # the shipped Flow-GRPO preset drops them; the generic default keeps them
    from ddrl.config import build_config

    assert build_config(overrides=["algorithm=flow_grpo"]).loss.drop_zero_advantage is True
    assert FlowGRPOConfig().drop_zero_advantage is False

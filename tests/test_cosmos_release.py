"""The DDRL release's (cosmos-rl @ 89f2e5b5c817) policy ratio, data-term weighting, caption
dropout and data σ draw, each re-derived by hand inside the test (plain tensor arithmetic in
EDM space, following the release's code, docs/CONFORMANCE.md §5) and compared with ddrl's
options: ``loss.ratio = "edm_squared_error"``, ``loss.data_weight = "edm"``,
``loss.data_caption_dropout`` and ``loss.data_t = "edm_lognormal"``."""

import dataclasses
import math

import pytest
import torch
from conftest import one_line_error
from named_losses import DDRLConfig, DDRLLoss, PolicyConfig
from torch import nn

from ddrl.config import build_config
from ddrl.config.core import DanceSDE, FlowSDE
from ddrl.losses.base import LossContext, StepBatch, clipped_surrogate
from ddrl.losses.data import data_term
from ddrl.losses.grpo import surrogate
from ddrl.models.base import Cond
from ddrl.sde import stepper

D64 = torch.float64
SHAPE = (4, 2, 3, 2, 2)  # [B, C, T, h, w]: a tiny video latent
T = torch.tensor([0.995, 0.9, 0.6, 0.03], dtype=D64)  # the Cosmos grid starts at 200/201
T_NEXT = torch.tensor([0.99, 0.8, 0.5, 0.0], dtype=D64)


def _view(t):
    return t.view(-1, 1, 1, 1, 1)


def _hand_mean_std(kind, x, v, t, tn):
    """μ and std of one step, written out from flow_grpo's / DanceGRPO's formulas."""
    t, dt = _view(t), _view(tn - t)
    if kind == "flow":  # σ_t = a·sqrt(t/(1−t)) (t < 1 here), μ = x + [v + σ²/(2t)(x + (1−t)v)]dt
        sig = 0.7 * torch.sqrt(t / (1 - t))
        return x + (v + sig**2 / (2 * t) * (x + (1 - t) * v)) * dt, sig * torch.sqrt(-dt)
    x0_hat = x - t * v  # DanceGRPO: score = −(x − (1−t)x̂0)/t², μ = x + v·dt − ½η²·score·dt
    score = -(x - (1 - t) * x0_hat) / t**2
    return x + dt * v - 0.5 * 0.3**2 * score * dt, 0.3 * torch.sqrt(-dt)


class FixedVelocity(nn.Module):
    """A 'denoiser' whose velocity is one parameter tensor (so μ_θ is known by hand)."""

    def __init__(self, v):
        super().__init__()
        self.v = nn.Parameter(v.clone())

    def velocity(self, x_t, t, cond):
        return self.v


class Recorder(nn.Module):
    """v(x, t) = tanh(x)·(1 + t) + 0.3·t, recording every call's (x, t, cond)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def velocity(self, x_t, t, cond):
        self.calls.append((x_t, t, cond))
        return torch.tanh(x_t) * (1 + _view(t)) + 0.3 * _view(t)


def _batch(x_t, x_next, logp_old, adv, cond=None, seed=0, t=T, t_next=T_NEXT):
    g = torch.Generator().manual_seed(seed)
    b = x_t.shape[0]
    return StepBatch(
        x_t=x_t,
        x_next=x_next,
        t=t,
        t_next=t_next,
        logp_old=logp_old,
        advantages=adv,
        valid=torch.ones(b, dtype=torch.bool),
        cond=cond or Cond({"prompt_embeds": torch.randn(b, 3, 5, generator=g, dtype=D64)}),
        null=None,
        x0_data=torch.randn(x_t.shape, generator=g, dtype=D64),
        noise0=torch.randn(x_t.shape, generator=g, dtype=D64),
        first=True,
        generator=torch.Generator().manual_seed(seed + 1),
    )


def _transition(kind, seed=0):
    """A recorded transition (x_t, x', logp_old) under v_old and a policy v_θ near it."""
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(SHAPE, generator=g, dtype=D64)
    v_old = torch.randn(SHAPE, generator=g, dtype=D64)
    v_theta = v_old + 0.02 * torch.randn(SHAPE, generator=g, dtype=D64)
    mu_old, std = _hand_mean_std(kind, x_t, v_old, T, T_NEXT)
    x_next = mu_old + std * torch.randn(SHAPE, generator=g, dtype=D64)
    per = -((x_next - mu_old) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    logp_old = per.flatten(1).mean(1)
    adv = torch.tensor([1.3, -0.7, 0.4, -2.0], dtype=D64)
    return x_t, x_next, logp_old, adv, v_theta, mu_old


@pytest.mark.parametrize("kind", ["flow", "dance"])
def test_edm_squared_error_ratio_is_the_releases_and_trains_its_way(kind):
    """wfm_trainer.py L471-490: log ρ = −mean_dims[(x' − μ_θ)² − (x' − μ_old)²] in EDM space
    (x_e = x/(1 − t_next)), no 1/(2·std²); the policy term, and its gradient, are the
    release's clipped surrogate of that ρ."""
    x_t, x_next, logp_old, adv, v_theta, mu_old = _transition(kind)
    b = _batch(x_t, x_next, logp_old, adv)
    sde = FlowSDE(0.7) if kind == "flow" else DanceSDE(0.3)
    ctx = LossContext(stepper(sde), cfg_scale=1.0)
    clip = 2e-3  # some samples clipped, some not
    den = FixedVelocity(v_theta)
    out = DDRLLoss(DDRLConfig(ratio="edm_squared_error", data_beta=0.0, clip_range=clip), ctx)
    pg = out(den, b).terms["policy"][0]
    pg.sum().backward()

    v = v_theta.clone().requires_grad_(True)
    mu_theta, _ = _hand_mean_std(kind, x_t, v, T, T_NEXT)
    e = 1 / _view(1 - T_NEXT)  # rectified flow → EDM: x_e = x/(1 − t)
    diff_cur, diff_old = (x_next * e - mu_theta * e) ** 2, (x_next * e - mu_old * e) ** 2
    ratio = torch.exp((-(diff_cur - diff_old)).flatten(1).mean(1))
    want = torch.maximum(-adv * ratio, -torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    want.sum().backward()

    torch.testing.assert_close(pg.detach(), want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(den.v.grad, v.grad, rtol=1e-8, atol=1e-12)
    clipped = ((ratio - 1).abs() > clip).tolist()
    assert any(clipped) and not all(clipped)  # both branches were exercised
    # the log-density ratio differs from it by exactly 2·std_edm² per sample
    step = ctx.step(x_t, v_theta, T, T_NEXT, prev_sample=x_next)
    _, std = _hand_mean_std(kind, x_t, v_theta, T, T_NEXT)
    scale = (2 * (std * e) ** 2).flatten()
    torch.testing.assert_close(
        (step.log_prob - logp_old) * scale, torch.log(ratio).detach(), rtol=1e-9, atol=1e-12
    )


def test_default_ratio_is_unchanged():
    """``loss.ratio`` defaults to the log-density ratio, computed as before (bit for bit)."""
    x_t, x_next, logp_old, adv, v_theta, _ = _transition("flow")
    b = _batch(x_t.float(), x_next.float(), logp_old.float(), adv.float())
    step = stepper(FlowSDE(0.7))(b.x_t, v_theta.float(), b.t, b.t_next, prev_sample=b.x_next)
    per, _ = surrogate(step, b, PolicyConfig(clip_range=1e-4))
    want, _ = clipped_surrogate(step.log_prob - b.logp_old, b.advantages, 1e-4)
    assert torch.equal(per, want) and DDRLConfig().ratio == "log_density"


def _hand_edm_x0_loss(f, x0, eps, t):
    """The release's data term per sample (t2v_model.py L1384-1394, L840-848; sampler
    RectifiedFlowScaling L867-875), from the rectified-flow velocity model f(x, t)."""
    sigma = _view(t / (1 - t))  # EDM σ of the rollout's t
    x_edm = x0 + sigma * eps  # EDMSDE.marginal_prob: mean x0, std σ
    tt = sigma / (sigma + 1)  # RectifiedFlowScaling: t = σ/(σ+1)
    c_skip, c_out, c_in = 1 - tt, -tt, 1 - tt
    x0_pred = c_skip * x_edm + c_out * f(x_edm * c_in, tt.flatten())
    weight = (sigma**2 + 1.0**2) / (sigma * 1.0) ** 2  # σ_data = 1
    return (weight * (x0 - x0_pred) ** 2).flatten(1).mean(1)


def test_edm_data_weight_is_the_releases_weighted_x0_loss():
    """x0 = x_t − t·v, so the x0 error is t·(v − v*), and (σ² + 1)/σ² · t² = t² + (1 − t)²."""
    x_t, x_next, logp_old, adv, _, _ = _transition("flow")
    b = _batch(x_t, x_next, logp_old, adv)
    den = Recorder()
    f = lambda x, t: torch.tanh(x) * (1 + _view(t)) + 0.3 * _view(t)  # noqa: E731
    want = _hand_edm_x0_loss(f, b.x0_data, b.noise0, b.t)
    got = data_term(den, b, DDRLConfig(data_weight="edm"))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    ctx = LossContext(stepper(FlowSDE(0.7)), cfg_scale=1.0)
    *_, batched = policy_and_data(den, b, ctx, DDRLConfig(data_weight="edm"), 1e-4)
    torch.testing.assert_close(batched, want, rtol=1e-10, atol=1e-12)
    x_rf = (1 - _view(b.t)) * b.x0_data + _view(b.t) * b.noise0  # "none": the velocity MSE
    plain = ((f(x_rf, b.t) - (b.noise0 - b.x0_data)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(data_term(den, b, DDRLConfig()), plain, rtol=1e-12, atol=0)


def policy_and_data(den, b, ctx, cfg, clip):
    """DDRL's terms from one forward (``loss.data_batched``): (policy [B], stats, data [B])."""
    cfg = dataclasses.replace(cfg, data_batched=True, clip_range=clip, data_beta=1.0)
    out = DDRLLoss(cfg, ctx)(den, b)
    return out.terms["policy"][0], out.stats, out.terms["data"][0]


def _cond(b, g):
    return Cond(
        {
            "prompt_embeds": torch.randn(b, 3, 5, generator=g),
            "given": torch.randn(b, 2, 3, 2, 2, generator=g),
            "given_mask": torch.ones(b, 1, 3, 1, 1),
        }
    )


def test_caption_dropout_zeroes_exactly_the_drawn_items():
    """The release zeroes the text embedding of each item with probability dropout_rate
    (emb_models.py L84-97: × Bernoulli(1 − p) per item; masks are kept, L209-210); ddrl draws
    the items from the batch's generator, so a resumed run draws the same ones."""
    n, p, seed = 64, 0.25, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 3, 2, 2, generator=g, dtype=D64)
    own = _cond(n, g)  # the data items' own captions (data_cond) are the ones dropped
    zeros = torch.zeros(n, dtype=D64)
    b = _batch(x, x, zeros, zeros, cond=_cond(n, g), seed=seed - 1)
    b.t, b.t_next, b.data_cond = torch.full((n,), 0.5, dtype=D64), zeros, own
    drop = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p  # the only draw
    den = Recorder()
    data_term(den, b, DDRLConfig(data_caption_dropout=p))
    seen = den.calls[-1][2].batched
    assert 5 < int(drop.sum()) < 30
    assert (seen["prompt_embeds"][drop] == 0).all()
    assert torch.equal(seen["prompt_embeds"][~drop], own.batched["prompt_embeds"][~drop])
    assert torch.equal(seen["given"], own.batched["given"])
    assert torch.equal(seen["given_mask"], own.batched["given_mask"])
    # the one-forward path drops the same items (same generator seed)
    b.generator = torch.Generator().manual_seed(seed)
    ctx = LossContext(stepper(FlowSDE(0.7)), cfg_scale=1.0)
    policy_and_data(den, b, ctx, DDRLConfig(data_caption_dropout=p), 1e-4)
    both = den.calls[-1][2].batched["prompt_embeds"]
    assert torch.equal(both[n:], seen["prompt_embeds"])
    assert torch.equal(both[:n], b.cond.batched["prompt_embeds"])  # policy term: never dropped
    # off (the default): nothing drawn, the condition passed as it is
    b.generator = torch.Generator().manual_seed(seed)
    state = b.generator.get_state()
    data_term(den, b, DDRLConfig())
    assert torch.equal(b.generator.get_state(), state) and den.calls[-1][2] is own


def test_edm_lognormal_data_t_is_the_releases_sigma_draw():
    """draw_training_sigma_and_epsilon (t2v_model.py L825-838): log σ ~ N(P_mean, P_std²) with
    P_mean = ln 4, P_std = 1.2 (config/wfm L92-94), × sqrt(state_t) for videos (L836, config
    L228-230); Vid2VidModel replaces 5% of video σ by log-uniform on [200, 1e5] (v2v_model.py
    L95-109; config L242-243). Rectified-flow t = σ/(1 + σ); ε fresh."""
    n, frames, seed = 4000, 6, 11
    x0 = torch.zeros(n, 2, frames, 2, 2)
    b = _batch(x0, x0, torch.zeros(n), torch.zeros(n), seed=seed - 1)
    b.t, b.t_next, b.x0_data = torch.full((n,), 0.5), torch.zeros(n), x0
    den = Recorder()
    data_term(den, b, DDRLConfig(data_t="edm_lognormal"))
    x_seen, t_seen, _ = den.calls[-1]
    g = torch.Generator().manual_seed(seed)  # by hand, in the option's order of draws
    log_sigma = math.log(4.0) + 1.2 * torch.randn(n, generator=g, dtype=D64)
    sigma = log_sigma.exp() * math.sqrt(frames)
    high = torch.rand(n, generator=g) < 0.05
    u = torch.rand(n, generator=g, dtype=D64)
    sigma = torch.where(high, torch.exp(math.log(200) + u * (math.log(1e5) - math.log(200))), sigma)
    eps = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(t_seen, (sigma / (1 + sigma)).float(), rtol=0, atol=0)
    torch.testing.assert_close(x_seen, _view(t_seen) * eps, rtol=1e-6, atol=1e-6)  # x0 = 0
    assert 0.04 < high.float().mean() < 0.06
    s = t_seen / (1 - t_seen)  # the draws have the release's law
    low = s[~high] / math.sqrt(frames)
    assert abs(low.log().mean() - math.log(4.0)) < 0.06 and abs(low.log().std() - 1.2) < 0.06
    assert (s[high] > 199).all()


def test_release_options_are_typed_and_only_the_cosmos_presets_use_them(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    cosmos = build_config(
        overrides=[
            "preset=cosmos-predict2.5-2b-t2v-ddrl",
            f"data.images={videos}",
            "reward.name=remote",
        ]
    )
    tiny = build_config(overrides=["preset=tiny-cosmos"])
    for c in (cosmos.loss, tiny.loss):
        assert (c.ratio, c.data_weight, c.data_caption_dropout, c.data_t) == (
            "edm_squared_error",
            "edm",
            0.2,
            "rollout",
        )
    assert cosmos.sampler.sde.kind == "flow" and cosmos.loss.data_beta == 0.01
    for preset in ("digits", "tiny-sd3", "tiny-wan"):
        c = build_config(overrides=[f"preset={preset}"]).loss
        assert (c.ratio, c.data_weight, c.data_caption_dropout) == ("log_density", "none", 0.0)
    one_line_error(
        build_config, overrides=["loss.ratio=edm"], match=("loss.ratio", "edm_squared_error")
    )
    one_line_error(DDRLConfig(data_weight="x0").check, match=("loss.data_weight", "edm"))
    one_line_error(DDRLConfig(data_t="lognormal").check, match=("loss.data_t", "edm_lognormal"))
    one_line_error(DDRLConfig(data_caption_dropout=1.5).check, match="loss.data_caption_dropout")

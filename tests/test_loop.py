"""The loop's parts against hand-derived expectations: step batches, whole-iteration
denominators, timestep subsets, learning-rate warm-up, clipping, EMA, the frozen reference,
resume for every algorithm, and the SDEs' marginals on a Gaussian toy with its exact velocity."""

import math

import pytest
import torch
from conftest import group_ids, iteration_of, run_quick, step_batches_of
from helpers_quick import quick

from ddrl.advantages import group_advantages
from ddrl.config import build_config
from ddrl.config.core import AdvantageConfig, DanceSDE, FlowSDE, SamplerConfig
from ddrl.dist.checkpoint import latest_checkpoint, load_checkpoint
from ddrl.losses import build_loss
from ddrl.losses.base import LossContext
from ddrl.losses.reference import FrozenCopy
from ddrl.models.base import Cond
from ddrl.sampling import Rollout, rollout
from ddrl.sde import ode_step, stepper
from ddrl.training.iteration import select_timesteps
from ddrl.training.loop import train
from ddrl.training.runlog import prepare_run_dir, read_jsonl
from ddrl.training.step import optimizer_step

QUIET = {"log": lambda *a: None}


# ------------------------------------------------------------------ timestep subsets
def test_select_timesteps_counts_and_kinds():
    g = torch.Generator().manual_seed(0)
    # flow_grpo: int(10 · 0.99) = 9 first steps, the tiny last step never trained
    first = select_timesteps(10, 0.99, "first", 3, g)
    assert first.tolist() == [list(range(9))] * 3
    # the release: 10 of 20, the even steps
    strided = select_timesteps(20, 0.5, "strided", 2, g)
    assert strided.tolist() == [list(range(0, 20, 2))] * 2
    # DanceGRPO (train_grpo_flux.py L511–525): int((16 − 1) · 0.6) = 9 per sample out of steps
    # 0..14, different per sample; with 10 steps int(9 · 0.6) = 5 out of 0..8
    ps = select_timesteps(16, 0.6, "per_sample", 64, g, skip_last=True)
    assert ps.shape == (64, 9) and int(ps.max()) <= 14
    assert select_timesteps(10, 0.6, "per_sample", 4, g, skip_last=True).shape == (4, 5)
    assert all(len(set(r)) == 9 and r == sorted(r) for r in ps.tolist())
    assert len({tuple(r) for r in ps.tolist()}) > 50
    pb = select_timesteps(10, 0.6, "per_batch", 5, g)
    assert pb.shape == (5, 6) and len({tuple(r) for r in pb.tolist()}) == 1
    assert select_timesteps(10, 1.0, "first", 1, g).tolist() == [list(range(10))]
    assert select_timesteps(10, 0.01, "first", 1, g).tolist() == [[0]]  # at least one


# ------------------------------------------------------------------ step batches
def _fake_rollout(b=6, steps=4, shape=(2,)):
    g = torch.Generator().manual_seed(1)
    states = torch.randn(steps + 1, b, *shape, generator=g)
    ts = torch.linspace(1, 0, steps + 1)
    cond = Cond({"id": torch.arange(b).float()[:, None]})
    return Rollout(
        states, torch.randn(steps, b, generator=g), ts, cond, None, [str(i % 3) for i in range(b)]
    )  # fmt: skip


def test_step_batches_wiring():
    ro = _fake_rollout()
    adv, valid = torch.arange(6.0), torch.tensor([True, True, False, False, True, True])
    x0 = torch.randn(6, 2)
    steps = torch.tensor([[0, 2], [1, 3], [0, 1], [2, 3], [0, 3], [1, 2]])
    got = step_batches_of(ro, adv, valid, x0, steps, 4)
    assert len(got) == 4  # 2 trained positions × 2 micro-batches (4 + 2)
    b = got[1]  # position 0, samples 4 and 5
    idx = torch.tensor([4, 5])
    s = steps[idx, 0]
    assert torch.equal(b.x_t, ro.states[s, idx]) and torch.equal(b.x_next, ro.states[s + 1, idx])
    assert torch.equal(b.t, ro.timesteps[s]) and torch.equal(b.t_next, ro.timesteps[s + 1])
    assert torch.equal(b.logp_old, ro.log_probs[s, idx])
    assert torch.equal(b.noise0, ro.states[0, idx]) and torch.equal(b.x0_data, x0[idx])
    assert torch.equal(b.cond.batched["id"], ro.cond.batched["id"][idx])
    assert b.first and not got[2].first
    assert torch.equal(b.advantages, adv[idx]) and torch.equal(b.valid, valid[idx])


class Recorder:
    """A loss plugin ("test_loop:Recorder") that keeps every StepBatch it is given."""

    Config = __import__("ddrl.losses", fromlist=["loss_config"]).loss_config("grpo")
    seen: list = []

    def __init__(self, cfg, ctx):
        self.inner = build_loss("grpo", cfg, ctx)

    def masks(self, b):
        return self.inner.masks(b)

    def __call__(self, denoiser, b):
        Recorder.seen.append(b)
        return self.inner(denoiser, b)


def test_loop_pairs_data_with_prompts_and_uses_the_rollout_t_and_noise(tmp_path):
    from ddrl.data.pools import load_data

    Recorder.seen.clear()
    # (no preflight: its probe's batches would be recorded too)
    run_quick(
        tmp_path,
        "rec",
        "algorithm=test_loop:Recorder",
        "train.iterations=1",
        "train.preflight=false",
    )
    data = load_data("digits").train
    from ddrl.flow import scheduler_grid

    grid = scheduler_grid(4, 1.0)  # digits: FlowMatchEulerDiscreteScheduler(shift=1)
    assert len(Recorder.seen) == 4  # 4 steps, one micro-batch
    for j, b in enumerate(Recorder.seen):
        assert torch.equal(b.t, grid[j].expand(8)) and torch.equal(b.t_next, grid[j + 1].expand(8))
        ids = b.cond.batched["pooled"]
        # each trajectory's x0 is a training image of the class its condition encodes
        for row in range(8):
            same = (data.x == b.x0_data[row]).flatten(1).all(1).nonzero().flatten().tolist()
            assert same and {data.prompts[i] for i in same} == {data.prompts[same[0]]}
            assert torch.equal(ids[row], ids[(row // 4) * 4])  # a group shares its prompt
    assert torch.equal(Recorder.seen[0].noise0, Recorder.seen[0].x_t)  # step 0 starts at ε


# ------------------------------------------------------------------ denominators
def _setup(tiny_digits, algorithm="ddrl", **loss_kw):
    torch.manual_seed(0)
    sampler = SamplerConfig(num_steps=3)
    cfg = build_config(overrides=[f"algorithm={algorithm}"]).loss
    for k, v in loss_kw.items():
        setattr(cfg, k, v)
    den = tiny_digits.denoiser
    ctx = LossContext(stepper(sampler.sde), 1.0, lambda kind: FrozenCopy(den))
    loss = build_loss(algorithm, cfg, ctx)
    ro = rollout(tiny_digits, ["1", "2", "3"], 4, sampler, torch.Generator().manual_seed(3))
    rewards = ro.final.flatten(1).mean(1)
    return den, loss, ro, rewards


def _grads(den, loss, ro, rewards, micro, skip_group=None):
    if skip_group is not None:
        rewards = rewards.clone()
        rewards[group_ids(12, 4) == skip_group] = float("nan")
    adv, valid = group_advantages(rewards, group_ids(12, 4), AdvantageConfig())
    x0 = torch.rand(ro.final.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1
    steps = select_timesteps(3, 1.0, "first", 12, torch.Generator())
    batches = step_batches_of(ro, adv, valid, x0, steps, micro)
    params = [p for p in den.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    metrics, finite = optimizer_step(loss, den, batches, params, opt, grad_clip=0.0)
    assert finite
    return torch.cat([p.grad.flatten() for p in params]), metrics


@pytest.mark.parametrize("algorithm", ["ddrl", "flow_grpo", "grpo", "sft"])
@pytest.mark.parametrize("skip", [None, 1])
def test_micro_batched_gradients_equal_whole_batch(tiny_digits, algorithm, skip):
    den, loss, ro, r = _setup(tiny_digits, algorithm)
    whole, m_whole = _grads(den, loss, ro, r, micro=12, skip_group=skip)
    for micro in (4, 5):
        part, m_part = _grads(den, loss, ro, r, micro=micro, skip_group=skip)
        # float32 sums in another order: tolerance relative to the gradient's scale
        torch.testing.assert_close(part, whole, rtol=1e-4, atol=1e-5 * whole.abs().max().item())
        # the policy loss is −mean(A) ≈ 0 on-policy: compare absolutely
        torch.testing.assert_close(m_part["loss"], m_whole["loss"], rtol=1e-5, atol=1e-6)


def test_skipped_group_does_not_reweight_the_others(tiny_digits):
    """With group 1 skipped, the policy loss is the mean over the 8 valid samples × 3 steps,
    computed here per sample by hand from the clipped surrogate (ratio ≡ 1 ⇒ −A)."""
    den, loss, ro, r = _setup(tiny_digits, "grpo")
    r = r.clone()
    r[group_ids(12, 4) == 1] = float("nan")
    adv, valid = group_advantages(r, group_ids(12, 4), AdvantageConfig())
    _, m = _grads(den, loss, ro, r, micro=4, skip_group=1)
    by_hand = (-adv[valid]).mean()  # every step contributes −A at ratio 1
    assert m["loss_policy"].item() == pytest.approx(by_hand.item(), abs=1e-6)
    assert valid.sum() == 8


def test_data_on_first_only_is_weighted_like_the_release(tiny_digits):
    """Release: the data term is added at the first trained step only, and every step's loss is
    divided by the number of trained steps, so it weighs data_beta / n_trained."""
    den, loss, ro, r = _setup(tiny_digits, "sft")
    _, m_all = _grads(den, loss, ro, r, micro=12)
    den2, loss2, ro2, r2 = _setup(tiny_digits, "sft", data_on_first_only=True)
    _, m_first = _grads(den2, loss2, ro2, r2, micro=12)
    first_only = m_first["loss_data"].item()
    # by hand: step 0's mean data loss / 3 (3 trained steps)
    x0 = torch.rand(ro.final.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1
    t = ro.timesteps[0].expand(12)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * ro.states[0]
    with torch.no_grad():
        v = den.velocity(xt, t, ro.cond)
    step0 = (v - (ro.states[0] - x0)).pow(2).flatten(1).mean(1).mean().item()
    assert first_only == pytest.approx(step0 / 3, rel=1e-5)
    assert m_all["loss_data"].item() > first_only


# ------------------------------------------------------------------ inner updates, clipping
def test_inner_updates_move_the_ratio_and_clipping_acts(tmp_path):
    _, out, _ = run_quick(
        tmp_path, "inner", "algorithm=grpo", "train.inner_updates=3", "optim.lr=1e-3"
    )
    rows = read_jsonl(out / "metrics.jsonl")
    # the row reports the last inner update: its ratio has left 1 and some samples are clipped
    assert all(r["ratio_dev_max"] > 1e-4 for r in rows)
    assert all(0 < r["clipped_mean"] <= 1 for r in rows)
    _, out1, _ = run_quick(tmp_path, "one", "algorithm=grpo", "optim.lr=1e-3")
    assert all(
        r["ratio_dev_max"] < 1e-5 and r["clipped_mean"] == 0
        for r in read_jsonl(out1 / "metrics.jsonl")
    )


def test_grad_clipping(tiny_digits):
    den, loss, ro, r = _setup(tiny_digits, "ddrl")
    raw, m = _grads(den, loss, ro, r, micro=12)  # grad_clip=0: no clipping
    assert m["grad_norm"].item() == pytest.approx(raw.norm().item(), rel=1e-5)
    adv, valid = group_advantages(r, group_ids(12, 4), AdvantageConfig())
    x0 = torch.rand(ro.final.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1
    steps = select_timesteps(3, 1.0, "first", 12, torch.Generator())
    batches = step_batches_of(ro, adv, valid, x0, steps, 12)
    params = [p for p in den.parameters() if p.requires_grad]
    clip = raw.norm().item() / 10
    optimizer_step(loss, den, batches, params, torch.optim.SGD(params, lr=0.0), grad_clip=clip)
    clipped = torch.cat([p.grad.flatten() for p in params])
    assert clipped.norm().item() == pytest.approx(clip, rel=1e-4)
    torch.testing.assert_close(clipped, raw * (clip / raw.norm()), rtol=1e-4, atol=1e-10)


def test_grad_clip_zero_means_no_clipping_in_config(tiny_digits):
    """optim.grad_clip=0 reaches the Learner's step unclipped: AdamW's first update moves each
    weight by about lr (|m/√v| ≈ 1); a tiny positive clip (1e-12) scales the gradient under
    AdamW's eps and freezes the weights instead."""
    import copy

    from ddrl.dist.config import ParallelConfig
    from ddrl.dist.parallel import Parallel
    from ddrl.training.step import Learner

    den, loss, ro, r = _setup(tiny_digits, "ddrl")
    adv, valid = group_advantages(r, group_ids(12, 4), AdvantageConfig())
    x0 = torch.rand(ro.final.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1
    steps = select_timesteps(3, 1.0, "first", 12, torch.Generator())
    moved = {}
    for clip in ("0", "1e-12"):
        over = [
            f"optim.grad_clip={clip}",
            "optim.lr=1e-3",
            "optim.warmup=1",
            "optim.weight_decay=0",
        ]
        optim = build_config(overrides=over).optim
        d = copy.deepcopy(den)
        before = torch.cat([p.detach().flatten().clone() for p in d.parameters()])
        learner = Learner(loss, d, d, optim, Parallel(ParallelConfig(), "cpu"))
        tc = build_config(overrides=["train.micro_batch=12"]).train
        m = learner.step(iteration_of(ro, adv, valid, x0, steps), tc)
        after = torch.cat([p.detach().flatten() for p in d.parameters()])
        moved[clip] = (after - before).abs().max().item()
        assert m["grad_norm"].item() > 1e-3  # the logged norm is the one before clipping
    assert moved["0"] > 0.5 * optim.lr and moved["1e-12"] < 1e-6, moved


# ------------------------------------------------------------------ lr, EMA, reference
def test_warmup_learning_rates(tmp_path):
    _, out, _ = run_quick(tmp_path, "lr", "train.iterations=3", "optim.warmup=2", "optim.lr=1e-3")
    assert [r["lr"] for r in read_jsonl(out / "metrics.jsonl")] == pytest.approx([5e-4, 1e-3, 1e-3])


def test_evaluation_uses_the_ema(tmp_path):
    from ddrl.evaluation.evaluate import evaluate_components
    from ddrl.io import trainable
    from ddrl.training.components import build_components

    cfg, out, _ = run_quick(tmp_path, "ema", "optim.ema_decay=0.5", "optim.lr=1e-2", "eval.every=2")
    logged = read_jsonl(out / "eval.jsonl")[-1]
    _, parts = load_checkpoint(latest_checkpoint(out))
    c = build_components(cfg, **QUIET)
    den = c.gen.denoiser.requires_grad_(True)
    with torch.no_grad():
        for k, p in trainable(den).items():
            p.copy_(parts["ema"][k])
    m_ema, _, _ = evaluate_components(c.gen, c, cfg)
    assert m_ema["heldout_diffusion_loss"] == pytest.approx(
        logged["heldout_diffusion_loss"], rel=1e-6
    )
    with torch.no_grad():
        for k, p in trainable(den).items():
            p.copy_(parts["model"][k])
    m_raw, _, _ = evaluate_components(c.gen, c, cfg)
    assert m_raw["heldout_diffusion_loss"] != pytest.approx(
        logged["heldout_diffusion_loss"], rel=1e-6
    )


def test_flow_grpo_reference_stays_frozen(tiny_digits):
    den, loss, ro, r = _setup(tiny_digits, "flow_grpo", beta_kl=0.5)
    before = {k: v.clone() for k, v in loss.regularisers[0].ref.model.state_dict().items()}
    assert not any(p.requires_grad for p in loss.regularisers[0].ref.model.parameters())
    adv, valid = group_advantages(r, group_ids(12, 4), AdvantageConfig())
    steps = select_timesteps(3, 1.0, "first", 12, torch.Generator())
    batches = step_batches_of(ro, adv, valid, ro.final, steps, 12)
    params = [p for p in den.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        m, _ = optimizer_step(loss, den, batches, params, opt, 1.0)
    for k, v in loss.regularisers[0].ref.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert m["loss_kl"].item() > 0  # the policy moved away from the reference
    assert any(not torch.equal(p, before[k]) for k, p in den.state_dict().items() if k in before)


# ------------------------------------------------------------------ resume, every algorithm
# flow_grpo's EMA schedule (counted in optimizer steps, called per micro-batch) resumes too
FLOW_GRPO_EMA = (
    "optim.ema_decay=0.9",
    "optim.ema_every=2",
    "optim.ema_warmup=true",
    "optim.ema_per=micro_batch",
    "train.micro_batch=2",
)


@pytest.mark.parametrize(
    "algorithm,extra",
    [("ddrl", ()), ("flow_grpo", FLOW_GRPO_EMA), ("dance_grpo", ()), ("grpo", ()), ("sft", ())]
    # the lagging weights move after every iteration (NFT's old policy, AWM's KL-EMA target)
    + [
        ("nft", ("loss.old_rate=0.3",)),
        ("awm_data", ("loss.lag_rate=0.3", "train.timestep_count=2")),
    ],
)
def test_resume_is_exact_for_every_algorithm(tmp_path, algorithm, extra):
    ov = (f"algorithm={algorithm}", *extra, "train.iterations=3", "train.checkpoint_every=1")
    cfg, full, _ = run_quick(tmp_path, "full", *ov)
    cfg_short = build_config(
        overrides=quick(*ov[:-2], "train.iterations=1", "train.checkpoint_every=1")
    )
    part = prepare_run_dir(tmp_path / "part", resume=False, overwrite=False)
    train(cfg_short, part, **QUIET)
    train(cfg, part, resume=True, **QUIET)
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(part / "metrics.jsonl")
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith("time_")}  # noqa: E731
    assert [drop(r) for r in a] == [drop(r) for r in b]
    _, pa = load_checkpoint(latest_checkpoint(full))
    _, pb = load_checkpoint(latest_checkpoint(part))
    for part in [p for p in ("model", "ema", "loss") if p in pa]:
        assert pa[part].keys() == pb[part].keys()
        for k in pa[part]:
            assert torch.equal(pa[part][k], pb[part][k]), (part, k)
    assert ("loss" in pa) == (algorithm in ("nft", "awm_data"))


# ------------------------------------------------------------------ SDE marginals
def _gauss_velocity(m: float, s: float):
    """Exact rectified-flow velocity for data N(m, s²) and noise N(0, 1), per dimension:
    x_t = (1−t)·x0 + t·ε; v(x, t) = E[ε − x0 | x_t] from the joint Gaussian."""

    def v(x, t):
        tt = t.view(-1, *([1] * (x.dim() - 1)))
        var = (1 - tt) ** 2 * s**2 + tt**2
        dev = x - (1 - tt) * m
        e_x0 = m + (1 - tt) * s**2 / var * dev
        e_eps = tt / var * dev
        return e_eps - e_x0

    return v


@pytest.mark.parametrize("sde", [FlowSDE(noise_level=0.7), DanceSDE(eta=0.5)])
def test_sdes_keep_the_ode_marginals(sde):
    """Sampling N(0.7, 0.3²) with the exact velocity: the SDE's final mean and std match the
    data (and the ODE's) within sampling error plus discretisation error."""
    torch.manual_seed(0)
    m, s, n = 0.7, 0.3, 200_000
    v = _gauss_velocity(m, s)
    grid = torch.linspace(1.0, 0.0, 201, dtype=torch.float64)
    x = torch.randn(n, 1, dtype=torch.float64)
    x_ode = x.clone()
    for i in range(200):
        t, tn = grid[i].expand(n), grid[i + 1].expand(n)
        x = stepper(sde)(x, v(x, t), t, tn, noise=torch.randn_like(x)).x_next
        x_ode = ode_step(x_ode, v(x_ode, t), t, tn).x_next
    se = s / math.sqrt(n)
    assert abs(x_ode.mean().item() - m) < 1e-3 and abs(x_ode.std().item() - s) < 5e-3
    assert abs(x.mean().item() - m) < 5 * se + 2e-3
    assert abs(x.std().item() - s) < 5 * se + 6e-3


def test_every_algorithm_is_evaluated_on_the_same_grid():
    """DanceGRPO trains on its own linear grid, but evaluation samples on eval.grid for every
    arm, so a comparison judges all arms by one protocol."""
    from ddrl.evaluation.evaluate import evaluate_components
    from ddrl.training.components import build_components

    dance = build_config(overrides=quick("algorithm=dance_grpo"))
    ddrl = build_config(overrides=quick("algorithm=ddrl"))
    assert dance.sampler.grid == "linear" and ddrl.sampler.grid == "scheduler"
    c = build_components(ddrl, **QUIET)
    m_dance, raw_dance, _ = evaluate_components(c.gen, c, dance)
    m_ddrl, raw_ddrl, _ = evaluate_components(c.gen, c, ddrl)
    assert torch.equal(raw_dance, raw_ddrl) and m_dance == m_ddrl


def test_overlapped_rewards_score_every_chunk_in_order(tmp_path, monkeypatch):
    """reward.overlap: each rollout chunk (sampler.batch=3 of 8 trajectories: 3, 3, 2) is
    scored in the worker thread as it finishes; the run is the one without overlap."""
    from ddrl.training import iteration as reward_base

    seen = []
    score = reward_base.OverlappedScorer._score

    def spy(self, part, x):
        seen.append((part.start, part.stop, x.shape[0]))
        return score(self, part, x)

    monkeypatch.setattr(reward_base.OverlappedScorer, "_score", spy)
    rows = {}
    for flag in ("false", "true"):
        cfg = build_config(overrides=quick("sampler.batch=3", f"reward.overlap={flag}"))
        run = prepare_run_dir(tmp_path / flag, resume=False, overwrite=False)
        train(cfg, run, log=lambda *a: None)
        rows[flag] = [
            {k: v for k, v in r.items() if not k.startswith("time_")}
            for r in read_jsonl(run / "metrics.jsonl")
        ]
    assert rows["true"] == rows["false"]
    assert seen == [(0, 3, 3), (3, 6, 3), (6, 9, 2)] * 2  # 2 iterations

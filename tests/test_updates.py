"""Several optimizer steps per rollout batch and flow_grpo's EMA schedule, against the peers'
loops written out by hand here: flow_grpo's shuffle-and-halve with an EMA call after every
train batch (scripts/train_sd3.py L827-955, flow_grpo/ema.py L33-49) and DanceGRPO's
in-order steps every ``gradient_accumulation_steps`` samples (train_grpo_flux.py L571-611)."""

import copy

import pytest
import torch
from conftest import iteration_of, one_line_error

from ddrl.advantages import group_advantages
from ddrl.config import build_config
from ddrl.config.core import AdvantageConfig, SamplerConfig
from ddrl.dist.config import ParallelConfig
from ddrl.dist.parallel import Parallel
from ddrl.losses import build_loss
from ddrl.losses.base import LossContext
from ddrl.sampling import rollout
from ddrl.sde import stepper
from ddrl.training.iteration import select_timesteps
from ddrl.training.step import Learner, split_rows

N, G, STEPS = 12, 4, 3  # 3 prompts × 4 samples, 3 sampler steps


def _batch(gen, algorithm="grpo", seed=3, zero_group=False, *over):
    """(loss, iteration pieces) on the tiny digits model: rewards from the samples' brightness."""
    sampler = SamplerConfig(num_steps=STEPS)
    loss = build_loss(algorithm, build_config(overrides=[f"algorithm={algorithm}", *over]).loss,
                      LossContext(stepper(sampler.sde), 1.0, None))  # fmt: skip
    ro = rollout(gen, ["1", "2", "3"], G, sampler, torch.Generator().manual_seed(seed))
    r = ro.final.flatten(1).mean(1)
    if zero_group:
        r[:G] = 0.5  # one group of equal rewards: A = 0 there
    adv, valid = group_advantages(r, torch.arange(N) // G, AdvantageConfig())
    steps = select_timesteps(STEPS, 1.0, "first", N, torch.Generator())
    return loss, ro, adv, valid, steps


def _config(*over):
    return build_config(overrides=["optim.warmup=1", "optim.lr=1e-2", *over])


# ------------------------------------------------------------------ the split
def test_split_rows_by_hand():
    kept = torch.ones(12, dtype=torch.bool)
    pos = torch.arange(12) % 12  # one group of 12 on this rank (DanceGRPO's FLUX script)
    parts = split_rows(3, "within_groups", kept, pos, None)
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    pos = torch.arange(12) % 6  # two groups of 6: part u = the u-th third of each group
    parts = split_rows(3, "within_groups", kept, pos, None)
    assert [p.tolist() for p in parts] == [[0, 6, 1, 7], [2, 8, 3, 9], [4, 10, 5, 11]]
    # shuffled: the kept rows in randperm order, halved; the dropped ones spread after them
    kept = torch.tensor([True, False] * 3 + [True] * 6)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(7)).tolist()
    k = [i for i in perm if kept[i]]
    d = [i for i in perm if not kept[i]]
    want = [k[:5] + d[:2], k[5:] + d[2:]]  # 9 kept → 5 + 4, 3 dropped → 2 + 1
    got = split_rows(2, "shuffled", kept, pos, torch.Generator().manual_seed(7))
    assert [p.tolist() for p in got] == want
    assert split_rows(1, "shuffled", kept, pos, None)[0].tolist() == list(range(12))


def test_too_many_parts_is_a_one_line_error():
    one_line_error(build_config, overrides=["train.updates_per_batch=81"],
                   match=("train.updates_per_batch", "81"))  # fmt: skip


# ------------------------------------------------------------------ the steps, by hand
@pytest.mark.parametrize("how", ["shuffled", "within_groups"])
def test_two_steps_per_batch_equal_the_peers_loops(tiny_digits, how):
    """Each step is the mean surrogate over its part's samples and trained steps, taken with
    AdamW in turn; the second part's ratio has left 1 (it is off-policy)."""
    torch.manual_seed(0)
    gen = tiny_digits
    loss, ro, adv, valid, steps = _batch(gen)
    cfg = _config("algorithm=grpo", "train.updates_per_batch=2", f"train.update_split={how}",
                  "train.micro_batch=4", f"train.group_size={G}")  # fmt: skip
    hand = copy.deepcopy(gen.denoiser)
    den = gen.denoiser
    b = iteration_of(ro, adv, valid, None, steps)
    b.order = torch.Generator().manual_seed(11)
    Learner(loss, den, den, cfg.optim, Parallel(ParallelConfig(), "cpu")).step(b, cfg.train)

    if how == "shuffled":  # flow_grpo: randperm, re-batched, half the batches per step
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(11))
        halves = [perm[: N // 2], perm[N // 2 :]]
    else:  # DanceGRPO: in order within each group, a step every half group
        halves = [torch.tensor([0, 1, 4, 5, 8, 9]), torch.tensor([2, 3, 6, 7, 10, 11])]
    params = [p for p in hand.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    step, clip, ratios = stepper(SamplerConfig().sde), cfg.loss.clip_range, []
    for idx in halves:
        opt.zero_grad()
        total = 0.0
        for j in range(steps.shape[1]):
            s = steps[idx, j]
            x, t, t1 = ro.states[s, idx], ro.timesteps[s], ro.timesteps[s + 1]
            v = hand.velocity(x, t, ro.cond.index(idx))
            lp = step(x, v, t, t1, prev_sample=ro.states[s + 1, idx]).log_prob
            ratio = torch.exp(lp - ro.log_probs[s, idx])
            a = adv[idx]
            per = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))
            total = total + per.mean() / steps.shape[1]
            ratios.append(ratio.detach())
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
    # AdamW moves each weight by ~lr = 1e-2; rounding in a near-zero gradient shows as ≤ 5e-5
    # (1.4e-5 measured with torch 2.13 on a 2-core CPU, in one of 1536 weights; a wrong step
    # would move weights by ~1e-2)
    torch.testing.assert_close(
        list(den.parameters()), list(hand.parameters()), rtol=1e-5, atol=5e-5
    )
    first, second = torch.cat(ratios[:STEPS]), torch.cat(ratios[STEPS:])
    # on-policy to rounding (2.9e-6 measured: the recompute batches 4 rows, the rollout 12)
    assert (first - 1).abs().max() < 1e-5 and (second - 1).abs().max() > 1e-4


def test_zero_advantage_rows_are_shared_out_like_flow_grpo(tiny_digits):
    """flow_grpo drops A = 0 samples before halving: each step gets half of the rest."""
    loss, ro, adv, valid, steps = _batch(tiny_digits, "flow_grpo", 3, True, "loss.beta_kl=0")
    assert loss.objective.cfg.drop_zero_advantage  # the flow_grpo preset's
    kept = loss.kept(adv, valid)
    assert kept.tolist() == [False] * G + [True] * (N - G)
    parts = split_rows(2, "shuffled", kept, torch.arange(N) % G, torch.Generator().manual_seed(1))
    assert [int(kept[p].sum()) for p in parts] == [4, 4]


# ------------------------------------------------------------------ flow_grpo's EMA
def _flow_grpo_ema(thetas, epochs, batches, accumulate, every, cap):
    """flow_grpo's loop, by hand: ``batches`` train batches per epoch, an optimizer step after
    every ``accumulate`` of them (global_step += 1), then ``ema.step(params, global_step)``
    after every batch; a call updates when (gs + 1) % every == 0 with decay
    min((1 + gs)/(10 + gs), cap). ``thetas[g]``: the weights after g steps. Returns the EMA
    at the end of each epoch (when flow_grpo evaluates)."""
    ema, gs, out = thetas[0].clone(), 0, []
    for _ in range(epochs):
        for i in range(batches):
            if (i + 1) % accumulate == 0:
                gs += 1
            if (gs + 1) % every == 0:
                d = min((1 + gs) / (10 + gs), cap)
                ema = ema + (1 - d) * (thetas[gs] - ema)
        out.append(ema.clone())
    return out


@pytest.mark.parametrize("every", [1, 2, 8])
def test_ema_follows_flow_grpos_schedule(tiny_digits, every):
    """6 iterations of 12 trajectories, micro-batches of 2, 2 steps per iteration: flow_grpo's
    6 train batches per epoch with gradient_accumulation_steps 3. Every evaluation point."""
    torch.manual_seed(0)
    loss, ro, adv, valid, steps = _batch(tiny_digits)
    cfg = _config("algorithm=grpo", "train.updates_per_batch=2", "train.micro_batch=2",
                  "optim.ema_decay=0.9", f"optim.ema_every={every}", "optim.ema_warmup=true",
                  "optim.ema_per=micro_batch")  # fmt: skip
    den = tiny_digits.denoiser
    flat = lambda: torch.cat([p.detach().flatten() for p in den.parameters()])  # noqa: E731
    thetas = [flat()]
    learner = Learner(loss, den, den, cfg.optim, Parallel(ParallelConfig(), "cpu"))
    learner.opt.register_step_post_hook(lambda *a: thetas.append(flat()))
    shadows = []
    for it in range(6):
        b = iteration_of(ro, adv, valid, None, steps, index=it)
        b.order = torch.Generator().manual_seed(it)
        learner.step(b, cfg.train)
        shadows.append(torch.cat([v.flatten() for v in learner.ema.shadow.values()]))
    assert len(thetas) == 13
    want = _flow_grpo_ema(thetas, epochs=6, batches=6, accumulate=3, every=every, cap=0.9)
    for it, (a, w) in enumerate(zip(shadows, want, strict=True)):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6, msg=f"after iteration {it + 1}")
    assert not torch.allclose(shadows[-1], thetas[-1])


def test_default_ema_is_one_fixed_decay_per_step(tiny_digits):
    torch.manual_seed(0)
    loss, ro, adv, valid, steps = _batch(tiny_digits)
    cfg = _config("algorithm=grpo", "optim.ema_decay=0.8", "train.micro_batch=2")
    den = tiny_digits.denoiser
    start = torch.cat([p.detach().flatten() for p in den.parameters()])
    learner = Learner(loss, den, den, cfg.optim, Parallel(ParallelConfig(), "cpu"))
    ema = start
    for it in range(3):
        learner.step(iteration_of(ro, adv, valid, None, steps, index=it), cfg.train)
        ema = 0.8 * ema + 0.2 * torch.cat([p.detach().flatten() for p in den.parameters()])
    got = torch.cat([v.flatten() for v in learner.ema.shadow.values()])
    torch.testing.assert_close(got, ema, rtol=1e-5, atol=1e-7)

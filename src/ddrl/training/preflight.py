"""Preflight: before iteration 1, the identities training relies on, checked on the run's own
model, sampler, CFG, loss, reward and data (``ddrl doctor`` runs them alone).

Each check logs one line: "ok", "n/a" with the reason, or "FAIL" with what differs, by how much
and the bound. They run on a probe of the first training prompt × min(G, 2) trajectories:

- SDE at zero noise = ODE: the run's stepper with its noise level set to 0, from the same
  initial noise on the same grid as the Euler ODE (``sample_ode``); every built-in SDE's mean is
  the Euler step x + v·dt there.
- CFG convention: at each recorded state, the velocity the loss recomputes (its ``Forward``)
  and the one the rollout takes there (``sampling.guided_velocity`` with sampler.cfg_scale).
- on-policy ratio: the loss's own statistic ``ratio_dev`` = |ρ − 1| on the rollout's recorded
  transitions at the same weights, in training's batch shapes (``step_batches``).
- reward determinism: the rollout's decoded samples scored twice: the same, and finite.
- data pairing: where the data pairs x0 with prompts, every training prompt has items.

Bounds depend on the denoiser forward's precision (docs/DECISIONS.md "Preflight bounds").
Nothing training reads changes: the probe draws from its own generators, the global RNG is
forked, the denoiser's train/eval mode is restored; weights, optimizer, EMA and the run's
CondCache are not touched. Under torchrun every rank runs it (FSDP forwards are collectives)
and a failure on any rank fails all.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

import ddrl.sampling as sampling
from ddrl.config import RunConfig
from ddrl.dist.group import gather_objects
from ddrl.errors import DDRLError
from ddrl.losses import cell
from ddrl.models.base import decode_images
from ddrl.sampling import Rollout, rollout, sample_ode
from ddrl.training.components import Components
from ddrl.training.iteration import Iteration, given_frames
from ddrl.training.step import step_batches

SEED = 20261207  # the probe's own noise; the run's streams are keyed by (seed, iteration)
BOUNDS = {  # forward precision → (|ρ − 1|, relative |Δx| and |Δv|), docs/DECISIONS.md
    "float32": (1e-4, 1e-5),
    "bfloat16": (2e-2, 2e-2),
    "float16": (2e-2, 5e-3),
}
REWARD_BOUND = 1e-6  # |r₁ − r₂| ≤ this · max(1, |r₁|)
NOISE_KEYS = ("noise_level", "eta")  # an SDE config's noise parameter (flow; dance, cps)


@dataclass
class Check:
    """One check's outcome: status "ok", "n/a" or "FAIL", and what it measured."""

    name: str
    status: str
    detail: str

    def __str__(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}"


def preflight(cfg: RunConfig, c: Components, loss_fn, dev: str, log=print) -> list[str]:
    """Run every check, log one line each and return the lines; a DDRLError after all of them
    when any failed: the first failing line, "(N more failing)" when there are others."""
    den = c.gen.denoiser
    mode, prec = den.training, precision(cfg, den)
    cuda = [torch.cuda.current_device()] if torch.device(dev).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        try:
            checks = [zero_noise_sde(cfg, c, dev, prec)]
            ro = probe_rollout(cfg, c, loss_fn, dev)
            checks += recomputed(cfg, c, loss_fn, ro, prec)
            checks += [reward_determinism(c, ro), data_pairing(cfg, c)]
        finally:
            den.train(mode)
    lines = [str(k) for k in checks]
    for line in lines:
        log(line)
    failed = [k for k in checks if k.status == "FAIL"]
    mine = f"preflight {failed[0].name}: {failed[0].detail}" if failed else None
    if len(failed) > 1:
        mine += f" ({len(failed) - 1} more failing, listed above)"
    err = next((e for e in gather_objects(mine) if e), None)  # every rank stops together
    if err:
        raise DDRLError(err if mine else f"{err} (on another rank)")
    return lines


def precision(cfg: RunConfig, denoiser: torch.nn.Module) -> str:
    """The denoiser forward's precision: model.autocast when on, else its weights' dtype (a
    diffusers family's transformer; LoRA's base in model.dtype)."""
    if cfg.model.autocast != "none":
        return cfg.model.autocast
    dtype = getattr(denoiser, "dtype", None) or next(denoiser.parameters()).dtype
    return str(dtype).removeprefix("torch.")


def _rel(a: Tensor, ref: Tensor) -> tuple[float, float]:
    """max |a − ref| and that relative to max |ref| (NaN propagates: it never passes a bound)."""
    d = (a.double() - ref.double()).abs().max()
    return float(d), float(d / ref.double().abs().max().clamp(min=1e-12))


def _within(value: float, bound: float) -> bool:
    return value <= bound  # False for NaN


def zero_noise_sde(cfg: RunConfig, c: Components, dev: str, prec: str) -> Check:
    """The run's SDE with its noise level 0 against the Euler ODE, one trajectory [1, ...]."""
    name, sde, steps = "SDE at zero noise = ODE", cfg.sampler.sde, cfg.sampler.num_steps
    key = next((k for k in NOISE_KEYS if hasattr(sde, k)), None)
    if sde.kind == "ode":
        return Check(name, "n/a", "sampler.sde.kind = ode: the rollout is the ODE")
    if key is None or not dataclasses.is_dataclass(sde):
        return Check(name, "n/a", f"sampler.sde.kind = {sde.kind} has no noise_level or eta")
    s0 = dataclasses.replace(sde, **{key: 0.0})  # no check(): 0 is outside a run's range
    s0 = dataclasses.replace(cfg.sampler, sde=s0, eval_steps=steps)
    prompts, g = c.data.prompts[:1], torch.Generator().manual_seed(SEED)
    given = given_frames(cfg, c, prompts, g, slice(0, 1), dev)
    c.gen.denoiser.eval()
    noise = lambda: torch.Generator().manual_seed(SEED)  # noqa: E731  both draw ε first
    x = rollout(c.gen, prompts, 1, s0, noise(), dev, given=given, record="final", inference=False)
    x_ode = sample_ode(c.gen, prompts, s0, noise(), dev, given=given)
    d, rel = _rel(x.final.cpu(), x_ode)
    bound = BOUNDS.get(prec, BOUNDS["float32"])[1]
    got = f"max |x_sde − x_ode| = {d:.1e}, relative {rel:.1e} (bound {bound:.0e}, {prec}; "
    got += f"{sde.kind} with {key} = 0, {steps} steps)"
    if _within(rel, bound):
        return Check(name, "ok", got)
    return Check(name, "FAIL", f"{got}: its zero-noise step is not the Euler step x + v·dt")


def probe_rollout(cfg: RunConfig, c: Components, loss_fn, dev: str) -> Rollout:
    """One prompt × min(G, 2) trajectories, recording what the loss records, sampled in its
    ``sampling()`` context, in eval mode, with the run's sampler (as ``collect`` rolls out)."""
    n, prompts = min(cfg.train.group_size, 2), c.data.prompts[:1]
    g = torch.Generator().manual_seed(SEED)
    given = given_frames(cfg, c, prompts, g, slice(0, n), dev)
    record = "means" if getattr(loss_fn, "records_means", False) else "transitions"
    record = record if getattr(loss_fn, "transitions", True) else "final"
    c.gen.denoiser.eval()
    with getattr(loss_fn, "sampling", contextlib.nullcontext)():
        return rollout(
            c.gen, prompts, n, cfg.sampler, g, dev, given=given, record=record, inference=False
        )


def recomputed(cfg: RunConfig, c: Components, loss_fn, ro: Rollout, prec: str) -> list[Check]:
    """The CFG convention and on-policy ratio checks from the loss's recomputation of every
    recorded transition: its objective's forward (a whole user loss class: the loss itself)."""
    objective = (cell(cfg.algorithm, cfg.objective, cfg.regularisers) or (cfg.algorithm,))[0]
    names = ("CFG convention", "on-policy ratio")
    if not ro.transitions:
        why = f"objective {objective} does not recompute the rollout's transitions"
        return [Check(names[0], "n/a", why), Ratio(0, 0).check(names[1], objective, prec)]
    den, part, w = c.gen.denoiser, getattr(loss_fn, "objective", None), cfg.sampler.cfg_scale
    sampling_ctx = getattr(loss_fn, "sampling", contextlib.nullcontext)
    n, T, dev = ro.states.shape[1], ro.log_probs.shape[0], ro.states.device
    ones, g = torch.ones(n, device=dev), torch.Generator().manual_seed(SEED)
    valid = ones.bool()  # A = 1: every row kept (also by flow_grpo's zero-advantage filter)
    x0, dcond = probe_data(c, ro.prompts, g, dev) if part is None else (None, None)
    steps = torch.arange(T, device=dev).expand(n, T)
    it = Iteration(0, ro, ones[:, None], ones, ones, valid, valid, x0, dcond, steps, 0, g)
    micro = min(cfg.train.micro_batch or n, n)
    ratio, worst = Ratio(n, T), None  # (relative |Δv|, |Δv|, the loss's Forward, null, its t)
    for b in step_batches(it, micro, min(cfg.train.steps_per_forward, T)):
        den.train()  # as the Learner trains
        out = part(den, b, part.inputs(b)) if part is not None else loss_fn(den, b)
        ratio.add(out.stats, b.t)
        fwd = getattr(out, "forward", None)
        if fwd is not None and b.null is not None:  # the rollout's velocity at the same point
            den.eval()
            with sampling_ctx():
                v = sampling.guided_velocity(den, fwd.x_t, fwd.t, fwd.cond, b.null, w)
            d, rel = _rel(fwd.v, v)
            if worst is None or not _within(rel, worst[0]):
                row = (fwd.v - v).abs().flatten(1).amax(1).argmax()
                worst = (rel, d, fwd, b.null, float(fwd.t[row]))
    cfg_line = cfg_check(names[0], cfg, ro, worst, prec, den, sampling_ctx)
    return [cfg_line, ratio.check(names[1], objective, prec)]


def probe_data(c: Components, prompts: list[str], g: torch.Generator, dev):
    """A whole user loss class's data (x0 [n, ...], their own condition or None), drawn as
    ``collect`` draws them; (None, None) when it uses none."""
    if not c.needs_data:
        return None, None
    if c.paired:
        return c.pool.paired(prompts, g).to(dev), None
    x0, captions = c.pool.sample(len(prompts), g)
    return x0.to(dev), c.gen.conditioner.encode(captions).to(dev)


def cfg_check(name: str, cfg: RunConfig, ro: Rollout, worst, prec: str, den, ctx) -> Check:
    """Whether the loss's velocity is the rollout's, at the largest relative difference seen;
    on failure, what it matches instead (``cfg_cause``, in the rollout's ``ctx``)."""
    if ro.null is None:
        return Check(name, "n/a", "sampler.cfg_scale = 1: the rollout does not guide")
    if worst is None:
        return Check(name, "n/a", f"the loss of {cfg.algorithm} exposes no forward to compare")
    rel, d, fwd, null, t = worst
    w, bound = cfg.sampler.cfg_scale, BOUNDS.get(prec, BOUNDS["float32"])[1]
    got = f"max |v_loss − v_rollout| = {d:.1e}, relative {rel:.1e} (bound {bound:.0e}, {prec}; "
    got += f"sampler.cfg_scale = {w:g}, {ro.log_probs.shape[0]} steps)"
    if _within(rel, bound):
        return Check(name, "ok", got)
    with ctx():
        cause = cfg_cause(den, fwd, null, w)
    return Check(name, "FAIL", f"{got}, worst at t = {t:.3f}: {cause}")


def cfg_cause(den, fwd, null, w: float) -> str:
    """What the loss's velocity matches instead of the rollout's: the conditional velocity (no
    CFG), the rollout's guidance with cond and null swapped, or else the scale w' fitted by
    least squares along v_c − v_u (v_u + w'·(v_c − v_u); approximate for a family's own mix)."""
    v_c, v_u = den.velocity(fwd.x_t, fwd.t, fwd.cond), den.velocity(fwd.x_t, fwd.t, null)
    if _rel(fwd.v, v_c)[1] <= 1e-3:
        return "the loss's velocity is the conditional one (a training path without CFG)"
    swapped = sampling.guided_velocity(den, fwd.x_t, fwd.t, null, fwd.cond, w)
    if _rel(fwd.v, swapped)[1] <= 1e-3:
        return "the loss guides with cond and null swapped"
    u = (v_c - v_u).double()
    fit = float(((fwd.v - v_u).double() * u).sum() / u.pow(2).sum().clamp(min=1e-30))
    return f"the loss guides with scale ≈ {fit:.3g}, the rollout with {w:g}"


class Ratio:
    """The loss's ``ratio_dev`` (|ρ − 1| [B]) and ``clipped`` statistics over every batch."""

    def __init__(self, n: int, steps: int):
        self.n, self.steps, self.devs, self.ts, self.clipped = n, steps, [], [], 0

    def add(self, stats: dict[str, Tensor], t: Tensor) -> None:
        if "ratio_dev" in stats:
            self.devs.append(stats["ratio_dev"].double().cpu())
            self.ts.append(t.double().cpu())
            self.clipped += int(stats["clipped"].sum()) if "clipped" in stats else 0

    def check(self, name: str, objective: str, prec: str) -> Check:
        if not self.devs:
            return Check(name, "n/a", f"objective {objective} has no likelihood ratio")
        dev, t = torch.cat(self.devs), torch.cat(self.ts)
        worst = int(torch.nan_to_num(dev, nan=float("inf")).argmax())
        bound = BOUNDS.get(prec, BOUNDS["float32"])[0]
        got = f"max |r-1| = {float(dev[worst]):.1e} (bound {bound:.0e}, {prec}; "
        got += f"{self.n} trajectories × {self.steps} steps, {self.clipped} clipped)"
        if _within(float(dev[worst]), bound):
            return Check(name, "ok", got)
        why = "the loss does not recompute the rollout's log-probs at the same weights"
        return Check(name, "FAIL", f"{got}, worst at t = {float(t[worst]):.3f}: {why}")


def reward_determinism(c: Components, ro: Rollout) -> Check:
    """The rollout's decoded samples scored twice by every reward: equal, and finite."""
    name, bound = "reward determinism", f"bound {REWARD_BOUND:.0e}·max(1, |r|)"
    images = decode_images(c.gen.codec, ro.final)
    r1, r2 = (c.reward.each(images, ro.prompts).double().cpu() for _ in range(2))
    finite = torch.isfinite(r1) & torch.isfinite(r2)
    diff = torch.where(finite, (r1 - r2).abs(), torch.zeros_like(r1))
    off = ~finite | (diff > REWARD_BOUND * r1.abs().clamp(min=1))
    if not off.any():
        got = f"{len(ro.prompts)} samples scored twice by {', '.join(c.reward.names)}: "
        return Check(name, "ok", f"{got}max |Δ| = {float(diff.max()):.1e} ({bound}), all finite")
    i, k = (int(v) for v in off.nonzero()[0])
    what = "not finite" if not finite[i, k] else f"|Δ| = {float(diff[i, k]):.1e} ({bound})"
    more = f" ({int(off.sum()) - 1} more)" if off.sum() > 1 else ""
    got = f"sample {i} ({ro.prompts[i]!r}): reward {c.reward.names[k]!r} gave "
    got += f"{float(r1[i, k]):.6g}, then {float(r2[i, k]):.6g} on the same image: {what}{more}"
    return Check(name, "FAIL", got)


def data_pairing(cfg: RunConfig, c: Components) -> Check:
    """Every training prompt has data items where the data pairs them (embedded and synthetic
    sets); a caption set whose captions are not the prompts is drawn unpaired (said so)."""
    name = "data pairing"
    if not c.needs_data:
        return Check(name, "n/a", f"the loss of algorithm {cfg.algorithm} uses no data")
    counts, prompts = Counter(c.pool.prompts), list(dict.fromkeys(c.data.prompts))
    missing = [p for p in prompts if p not in counts]
    if not missing:
        have = [counts[p] for p in prompts]
        got = f"each of the {len(prompts)} training prompts has its own data items "
        return Check(name, "ok", f"{got}({min(have)}–{max(have)} each, {len(c.pool)} in all)")
    if cfg.data.source == "synthetic" or c.data.train is not None:  # built from the prompts
        first = ", ".join(repr(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
        why = (
            "a set made for other prompts? ddrl synth regenerates it"
            if cfg.data.source == "synthetic"
            else f"the {cfg.data.name} set has no items for them"
        )
        got = f"{len(missing)} of {len(prompts)} training prompts have no data item ({first}); "
        got += f"data.source = {cfg.data.source} pairs each prompt with its own items ({why})"
        return Check(name, "FAIL", got)
    among = len(prompts) - len(missing)
    return Check(
        name,
        "ok",
        f"unpaired: the data term draws x0 uniformly from {len(c.pool)} items with their own "
        f"captions ({among} of {len(prompts)} prompts are among them)",
    )

"""The one training loop: rollout → reward → advantage → loss → step.

Algorithms differ only in the loss object and its config (plus sampler and loop settings in
their presets); the loop never asks which algorithm it runs. Simplifications, stated up front:
- data parallel over ``torchrun`` ranks (``ddrl.distributed``): each rank rolls out, scores and
  trains its contiguous slice of the iteration's P·G trajectories; rewards are gathered so
  groups normalise whole, loss denominators and gradients are summed over ranks once per
  optimizer step, so W ranks take the single-process step; rank 0 alone writes the run folder;
- each inner update is one optimizer step, gradients accumulated over every trained timestep
  and micro-batch, each loss term averaged over the whole iteration (``LossOut``);
- the denoiser is trained in place; the conditioner and codec are frozen;
- iteration k's randomness comes from generators keyed by (seed, k) and (seed, k, rank), so a
  resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from .components import Components, build_components, device_of
from .config import RunConfig, save_config
from .distributed import (
    all_reduce_sum,
    any_rank,
    barrier,
    batch_slice,
    gathered_advantages,
    is_main,
    main_first,
    reduce_metrics,
    sync_grads,
)
from .ema import EMA
from .errors import DDRLError, Terminated
from .eval.evaluate import evaluate_components, save_prompt_grid
from .losses import LossContext, StepBatch, build_loss
from .models import Cond, CondCache, decode_images
from .reference import make_reference
from .rewards.base import finite_mean
from .rng import current_rank, noise_generator, rank_generator, shared_generator
from .rollout import Rollout, rollout
from .runlog import NullLogger, RunLogger, read_jsonl
from .train_state import TrainState


def select_timesteps(
    num_steps: int, fraction: float, how: str, batch: int, g: torch.Generator, skip_last=False
) -> torch.Tensor:
    """Step indices [batch, n] trained this iteration, drawn from the candidate steps 0..N−1,
    or 0..N−2 with ``skip_last``; n = floor(fraction · #candidates), at least 1, as both peers
    count them (flow_grpo: int(10 · 0.99) = 9; DanceGRPO: int((16 − 1) · 0.6) = 9).
    "first": steps 0..n−1; "per_sample": a random subset per trajectory; "per_batch": one
    random subset for all; "strided": every (#candidates/n)-th step from 0. Each row is
    sorted, so the j-th trained step runs from noise towards data.
    """
    pool = num_steps - 1 if skip_last and num_steps > 1 else num_steps
    n = max(1, math.floor(fraction * pool + 1e-9))
    if how == "first":
        row = torch.arange(n)
    elif how == "strided":
        row = torch.arange(n) * pool // n
    elif how == "per_batch":
        row = torch.randperm(pool, generator=g)[:n].sort().values
    else:
        perms = torch.stack([torch.randperm(pool, generator=g) for _ in range(batch)])
        return perms[:, :n].sort(dim=1).values
    return row.expand(batch, n).clone()


def iter_step_batches(
    ro: Rollout,
    adv: torch.Tensor,
    valid: torch.Tensor,
    x0_data: torch.Tensor,
    steps: torch.Tensor,
    micro: int,
    g: torch.Generator,
    data_cond: Cond | None = None,
) -> Iterator[StepBatch]:
    """One StepBatch per (trained-step position j, micro-batch); steps [B, n] from
    ``select_timesteps`` (per-sample step indices); ``data_cond``: the data items' own
    condition (batch B) when it is not the trajectories' (unpaired caption data)."""
    b_total = adv.shape[0]
    for j in range(steps.shape[1]):
        for idx in torch.arange(b_total).split(micro):
            s = steps[idx, j]
            dev_idx = idx.to(ro.states.device)
            yield StepBatch(
                x_t=ro.states[s, dev_idx],
                x_next=ro.states[s + 1, dev_idx],
                t=ro.timesteps[s],
                t_next=ro.timesteps[s + 1],
                logp_old=ro.log_probs[s, dev_idx],
                advantages=adv[dev_idx],
                valid=valid[dev_idx],
                cond=ro.cond.index(dev_idx),
                null=ro.null.index(dev_idx) if ro.null is not None else None,
                x0_data=x0_data[dev_idx],
                data_cond=data_cond.index(dev_idx) if data_cond is not None else None,
                noise0=ro.states[0, dev_idx],
                first=j == 0,
                generator=g,
            )


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ values over mask; where(), unlike values·mask, drops NaN/inf of masked-out samples."""
    return torch.where(mask, values, torch.zeros_like(values)).sum()


def optimizer_step(loss_fn, denoiser, batches: list[StepBatch], params, opt, grad_clip: float):
    """Accumulate every batch's loss with whole-iteration denominators and step once.

    Each term's loss is Σ_batches Σ_b mask·value / (its mask's count over all batches), so the
    gradient is the same however the iteration is split. Statistics (ratio deviation, clipped
    fraction) are averaged over the policy term's samples and maxed. Returns (metrics as
    tensors, whether the step was finite and taken). Over several ranks the counts, gradients
    and metrics are summed (maxima maxed) across them, so every rank takes the same step.
    """
    masks = [loss_fn.masks(b) for b in batches]
    counts: dict[str, torch.Tensor] = {}
    for m in masks:
        for k, v in m.items():
            counts[k] = counts.get(k, 0) + v.sum()
    names = sorted(counts)  # the same terms on every rank: one all-reduce of the counts
    counts = dict(zip(names, all_reduce_sum(torch.stack([counts[k] for k in names])), strict=True))
    opt.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    total = torch.zeros(())
    for b, m in zip(batches, masks, strict=True):
        out = loss_fn(denoiser, b)
        loss = 0.0
        for name, (vals, coef) in out.terms.items():
            part = _masked_sum(vals, m[name]) / counts[name].clamp(min=1)
            loss = loss + coef * part
            sums[f"loss_{name}"] = sums.get(f"loss_{name}", 0) + part.detach()
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()
            total = total.to(loss.device) + loss.detach()
        for k, v in out.stats.items():  # stats describe the policy term's samples
            pm, n = m["policy"], counts["policy"].clamp(min=1)
            sums[f"{k}_mean"] = sums.get(f"{k}_mean", 0) + _masked_sum(v, pm) / n
            vmax = torch.where(pm, v, torch.zeros_like(v)).max()
            sums[f"{k}_max"] = torch.maximum(sums.get(f"{k}_max", vmax), vmax)
    sync_grads(params)
    sums = reduce_metrics({"loss": total, **sums})
    total = sums.pop("loss")
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    finite = bool(torch.isfinite(grad_norm) & torch.isfinite(total))  # one sync per step
    if finite:
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)
    return {"loss": total, "grad_norm": grad_norm.detach(), **sums}, finite


def train(
    cfg: RunConfig,
    run_dir: Path,
    resume: bool = False,
    log=print,
    stop: threading.Event | None = None,
    components: Components | None = None,
) -> dict:
    """Run (or resume) training into ``run_dir``; returns the last metrics row ({} when a
    resumed run is already at train.iterations). Once ``stop`` is set (the CLI sets it on
    SIGTERM) the iteration in progress is finished and checkpointed, then Terminated.
    ``components``: already built from ``cfg`` (the CLI builds them before touching the disk)."""
    run_dir = Path(run_dir)
    dev = device_of(cfg)
    main = is_main()  # rank 0 (or the only process): the one that writes the run folder
    if not main:
        log = lambda *a, **k: None  # noqa: E731  (rank 0 says it once)
    c = components or build_components(cfg, log)
    gen = c.gen.to(dev)
    if isinstance(gen.conditioner, torch.nn.Module):
        gen.conditioner.requires_grad_(False)  # frozen, like a real text encoder
    # DDRL's data term pairs each trajectory with data of its own prompt when the data has
    # items for every prompt (embedded sets, synthetic sets); otherwise (a caption set whose
    # captions are not the prompts) it draws data uniformly, conditioned on its own captions.
    paired = c.pool.covers(c.data.prompts)
    if not paired:
        log("data term: x0 drawn uniformly with its own captions (they are not the prompt set)")
    prepare = getattr(gen.conditioner, "prepare", None)  # plugins may not have it
    if prepare is not None:  # every prompt encoded once; text encoders may be freed after
        captions = [] if paired else sorted(set(c.pool.prompts))
        if c.heldout is not None:  # the held-out loss conditions on the held-out captions
            captions = sorted({*captions, *c.heldout.prompts})
        prepare([*c.data.prompts, *c.data.eval_prompts, *captions])
    # Which weights train (all, or LoRA adapters only) is the generator's choice.
    denoiser = gen.denoiser
    ctx = LossContext(
        cfg.sampler.sde, cfg.sampler.cfg_scale, lambda kind: make_reference(denoiser, kind)
    )
    loss_fn = build_loss(cfg.algorithm, cfg.loss, ctx)  # before resume: the reference is the base
    params = [p for p in denoiser.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    ema = EMA(denoiser, o.ema_decay) if o.ema_decay > 0 else None
    state = TrainState(run_dir, denoiser, opt, ema, cfg.algorithm, log)
    with main_first():  # rank 0 removes a killed write's orphans before the others read
        start = state.restore() if resume else 0
    shipped = (lambda: ema.applied(denoiser)) if ema else contextlib.nullcontext
    if resume and start >= cfg.train.iterations:
        n = cfg.train.iterations
        log(
            f"nothing to do: run is at iteration {start} of {n}"
            if start == n
            else f"nothing to do: run is at iteration {start}, beyond train.iterations={n}"
        )
        if main and not (run_dir / "final").is_dir():  # killed between checkpoint and save
            with shipped():
                gen.save_pretrained(run_dir / "final")
        barrier()
        return {}
    # Also on resume: a changed train.iterations is the run's length from now on.
    if main:
        save_config(cfg, run_dir / "config.json")
    logger = RunLogger(run_dir, start, cfg.train.tensorboard) if main else NullLogger()
    tc, P, G = cfg.train, cfg.train.prompts_per_iter, cfg.train.group_size
    rows = batch_slice(P * G)  # this rank's trajectories of the iteration
    micro, rank, encode = tc.micro_batch or P * G, current_rank(), CondCache(gen.conditioner)

    # The held-out diffusion loss at iteration 0 (also after a resume): the reference for the
    # hacking warning.
    hdl0 = [
        r["heldout_diffusion_loss"]
        for r in read_jsonl(run_dir / "eval.jsonl")
        if r.get("iteration") == 0 and r.get("heldout_diffusion_loss")
    ][:1]

    def run_eval(it: int, final: bool = False) -> None:
        with shipped():
            m, raw, _ = evaluate_components(gen, c, cfg, dev)
        hdl = m.get("heldout_diffusion_loss")
        if hdl is not None:
            hdl0[:] = hdl0 or [hdl]
            m["heldout_loss_rise"] = rise = hdl / hdl0[0] - 1
            if rise > cfg.eval.loss_warn:
                log(
                    f"warning: iteration {it}: held-out diffusion loss {rise:+.0%} over "
                    f"iteration 0 (eval.loss_warn {cfg.eval.loss_warn:.0%}): the paper's sign "
                    "of reward hacking"
                )
        logger.eval({"iteration": it, **m})
        if final:
            title = f"{cfg.algorithm} after {it} iterations"
            n_prompts = len(c.data.eval_prompts or c.data.prompts)
            frames = raw[:, :, 0] if raw.dim() == 5 else raw  # videos: their first frames
            save_prompt_grid(frames, n_prompts, run_dir / "samples_final.png", title)

    def maybe_eval(it: int, final: bool = False) -> None:  # rank 0 evaluates, the others wait
        if main:
            run_eval(it, final)
        barrier()

    if cfg.eval.every and start == 0:
        maybe_eval(0)
    row: dict = {}
    bad_steps = all_skipped = 0
    its = range(start, tc.iterations)
    show = tc.progress and main
    bar = tqdm(its, initial=start, total=tc.iterations, disable=not show, desc=cfg.algorithm)
    for it in bar:
        t0 = time.perf_counter()
        # The trajectories' noise (and data pairing) is drawn for the whole batch on every
        # rank and sliced (``ddrl.rng``); rank 0's own stream continues it, other ranks own theirs.
        g_shared, g_noise = shared_generator(cfg.seed, it), noise_generator(cfg.seed, it)
        g_own = g_noise if rank == 0 else rank_generator(cfg.seed, it, rank)
        prompts = c.data.sample_prompts(P, g_shared)
        denoiser.eval()
        ro = rollout(gen, prompts, G, cfg.sampler, g_noise, dev, encode, rows)
        denoiser.train()
        t1 = time.perf_counter()
        images = decode_images(gen.codec, ro.final)
        mine = c.reward.each(images, ro.prompts).to(dev) * cfg.reward.scale  # [B/W, K]
        # [B, K] and [B]: groups normalise whole, whichever ranks hold their samples
        each, adv_all, valid_all = gathered_advantages(
            mine, c.reward.weights, G, cfg.advantage, cfg.reward.aggregate
        )
        adv, valid = adv_all[rows], valid_all[rows]
        rewards = each @ c.reward.weights.to(each)
        every_prompt = [q for q in prompts for _ in range(G)]
        if paired:
            x0_data, data_cond = c.pool.paired(every_prompt, g_noise)[rows].to(dev), None
        else:
            x0_data, captions = c.pool.sample(P * G, g_noise)
            x0_data, data_cond = x0_data[rows].to(dev), encode(captions[rows]).to(dev)
        steps = select_timesteps(
            cfg.sampler.num_steps,
            tc.timestep_fraction,
            tc.timestep_selection,
            P * G,
            g_shared,
            tc.skip_last_step,
        )[rows].to(dev)
        batches = list(iter_step_batches(ro, adv, valid, x0_data, steps, micro, g_own, data_cond))
        t2 = time.perf_counter()
        lr = o.lr * min(1.0, (it + 1) / max(o.warmup, 1))
        for group in opt.param_groups:
            group["lr"] = lr
        for _ in range(tc.inner_updates):
            m, finite = optimizer_step(loss_fn, denoiser, batches, params, opt, o.grad_clip)
            bad_steps = 0 if finite else bad_steps + 1
            if not finite:
                log(f"iteration {it + 1}: non-finite loss or gradient; step skipped")
                if bad_steps >= tc.max_bad_steps:
                    raise DDRLError(
                        f"{bad_steps} consecutive non-finite steps (train.max_bad_steps="
                        f"{tc.max_bad_steps}); last good checkpoint kept. Lower optim.lr or "
                        "check the reward"
                    )
            elif ema is not None:
                ema.update(denoiser)
        t3 = time.perf_counter()
        fin = torch.isfinite(rewards)
        scalars = {
            "reward_mean": finite_mean(rewards),
            "reward_std": rewards[fin].std() if fin.sum() > 1 else torch.tensor(0.0),
            "skipped_groups": (~valid_all).sum() // G,
            **m,
        }
        if each.shape[1] > 1:  # several rewards: each one's raw mean, logged every iteration
            for k, name in enumerate(c.reward.names):
                scalars[f"reward_{name}_mean"] = finite_mean(each[:, k])
        values = torch.stack(  # one device → host copy per iteration
            [torch.as_tensor(v, dtype=torch.float64, device=dev) for v in scalars.values()]
        )
        row = {"iteration": it + 1, **dict(zip(scalars, values.tolist(), strict=True)), "lr": lr}
        row["skipped_groups"] = int(row["skipped_groups"])
        row.update(
            time_rollout=t1 - t0, time_reward=t2 - t1, time_train=t3 - t2, time_iteration=t3 - t0
        )
        if row["skipped_groups"]:
            log(f"iteration {it + 1}: skipped {row['skipped_groups']} group(s) with NaN/inf reward")
        logger.metrics(row)
        all_skipped = all_skipped + 1 if row["skipped_groups"] == P else 0
        if all_skipped >= tc.max_skipped_iterations:  # nothing is learned from the reward
            raise DDRLError(
                f"every group had a NaN/inf reward in {all_skipped} consecutive iterations "
                f"(train.max_skipped_iterations={tc.max_skipped_iterations}); last good "
                f"checkpoint kept. Check reward {cfg.reward.name!r} and reward.scale"
            )
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.3f}")
        done = it + 1 == tc.iterations
        if cfg.eval.every and ((it + 1) % cfg.eval.every == 0 or done):
            maybe_eval(it + 1, final=done)
        stopping = any_rank(stop is not None and stop.is_set()) and not done  # all stop together
        if (it + 1) % tc.checkpoint_every == 0 or done or stopping:
            path = state.save(it + 1, tc.keep_checkpoints) if main else None
            barrier()
        if stopping:
            bar.close()
            logger.close()
            raise Terminated(path)
    bar.close()
    logger.close()
    if main:
        with shipped():
            gen.save_pretrained(run_dir / "final")
    barrier()
    return row

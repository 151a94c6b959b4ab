"""The one training loop: rollout → reward → advantage → loss → step.

Algorithms differ only in the loss object and its config (plus sampler and loop settings in
their presets); the loop never asks which algorithm it runs. Simplifications, stated up front:
- data parallel over ``torchrun`` ranks (``ddrl.dist.group``): each rank rolls out, scores and
  trains its contiguous slice of the iteration's P·G trajectories; rewards are gathered so
  groups normalise whole, loss denominators are summed over ranks and gradients too (torch DDP
  or FSDP2, ``ddrl.dist.parallel``) once per optimizer step, so W ranks take the single-process
  step; rank 0 alone writes the run folder (checkpoints: every rank writes its shards);
- each inner update is one optimizer step, gradients accumulated over every trained timestep
  and micro-batch, each loss term averaged over the whole iteration (``LossOut``);
- the denoiser is trained in place; the conditioner and codec are frozen;
- iteration k's randomness comes from generators keyed by (seed, k) and (seed, k, rank), so a
  resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ddrl.config import RunConfig, save_config
from ddrl.dist.checkpoint import fingerprint
from ddrl.dist.group import (
    any_rank,
    barrier,
    batch_slice,
    gathered_advantages,
    is_main,
)
from ddrl.dist.parallel import Parallel
from ddrl.dist.rng import current_rank, noise_generator, rank_generator, shared_generator
from ddrl.errors import DDRLError, Terminated
from ddrl.evaluation.evaluate import evaluate_components, save_prompt_grid
from ddrl.losses import LossContext, build_loss
from ddrl.losses.reference import make_reference
from ddrl.models import CondCache, decode_images
from ddrl.rewards.base import OverlappedScorer, finite_mean
from ddrl.sampling import rollout
from ddrl.training.components import Components, build_components, device_of
from ddrl.training.ema import EMA
from ddrl.training.phases import PhaseTimer, phase
from ddrl.training.runlog import NullLogger, RunLogger, read_jsonl
from ddrl.training.state import NoCheckpoint, TrainState
from ddrl.training.step import iter_step_batches, optimizer_step, select_timesteps


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
    par = Parallel(cfg.parallel, dev)  # none | ddp | fsdp over torchrun's ranks
    base = fingerprint(denoiser)  # before any update (and sharding)
    ctx = LossContext(
        cfg.sampler.sde,
        cfg.sampler.cfg_scale,
        lambda kind: make_reference(denoiser, kind, par.frozen),
    )
    loss_fn = build_loss(cfg.algorithm, cfg.loss, ctx)  # before resume: the reference is the base
    if cfg.model.compile:  # after the reference copy was taken; compiled in place
        backbone = getattr(denoiser, "transformer", None)
        if backbone is None or par.sharded:
            raise DDRLError(
                "model.compile=true needs a transformer backbone (digits, diffusers families) "
                f"and parallel.strategy none or ddp (here {par.strategy}); allowed: false"
            )
        backbone.compile()
    policy = par.wrap(denoiser)  # what the loss calls; FSDP2 shards ``denoiser`` in place
    params = [p for p in denoiser.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    ema = EMA(denoiser, o.ema_decay) if o.ema_decay > 0 else None
    tc, P, G = cfg.train, cfg.train.prompts_per_iter, cfg.train.group_size
    rows = batch_slice(P * G)  # this rank's trajectories of the iteration (checked first)
    state = TrainState(run_dir, denoiser, opt, ema, cfg.algorithm, log, base, strategy=par.strategy)
    try:
        start = state.restore(resume if isinstance(resume, Path) else None) if resume else 0
    except NoCheckpoint:  # killed before its first checkpoint: nothing to lose by starting
        log(f"no checkpoint in {run_dir} yet; starting it from iteration 0 with its own config")
        start = 0
    shipped = (lambda: ema.applied(denoiser)) if ema else contextlib.nullcontext

    def save_final() -> None:
        """``final/`` from rank 0, with the EMA weights when on; sharded, gathered first from
        every rank (a collective), after which the denoiser is no longer sharded."""
        with shipped():
            full = par.full_state(denoiser) if par.sharded else None
            if main and not par.sharded:
                gen.save_pretrained(run_dir / "final")
        if main and par.sharded:
            par.unshard_into(denoiser, full)
            gen.save_pretrained(run_dir / "final")

    if resume and start >= cfg.train.iterations:
        n = cfg.train.iterations
        log(
            f"nothing to do: run is at iteration {start} of {n}"
            if start == n
            else f"nothing to do: run is at iteration {start}, beyond train.iterations={n}"
        )
        if not (run_dir / "final").is_dir():  # killed between checkpoint and save
            save_final()
        barrier()
        return {}
    # Also on resume: a changed train.iterations is the run's length from now on.
    if main:
        save_config(cfg, run_dir / "config.json")
    logger = RunLogger(run_dir, start, cfg.train.tensorboard) if main else NullLogger()
    micro, rank, encode = tc.micro_batch or P * G, current_rank(), CondCache(gen.conditioner)
    stack = tc.steps_per_forward  # trained steps per forward (the per-step losses need 1)

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
        if final and main:
            title = f"{cfg.algorithm} after {it} iterations"
            n_prompts = len(c.data.eval_prompts or c.data.prompts)
            frames = raw[:, :, 0] if raw.dim() == 5 else raw  # videos: their first frames
            save_prompt_grid(frames, n_prompts, run_dir / "samples_final.png", title)

    def maybe_eval(it: int, final: bool = False) -> None:
        # Rank 0 evaluates while the others wait; sharded, every rank runs the same evaluation
        # (each forward gathers the weights from all of them) and rank 0 alone logs it.
        with phase("eval"):
            if main or par.sharded:
                run_eval(it, final)
            barrier()

    if cfg.eval.every and start == 0:
        maybe_eval(0)
    row: dict = {}
    bad_steps = all_skipped = 0
    its = range(start, tc.iterations)
    show = tc.progress and main
    bar = tqdm(its, initial=start, total=tc.iterations, disable=not show, desc=cfg.algorithm)
    timer = PhaseTimer(
        dev, sync=tc.sync_timing
    )  # the row's time_<phase> (``ddrl.training.phases``)
    for it in bar:
        t0 = time.perf_counter()
        with timer.active():
            # The trajectories' noise (and data pairing) is drawn for the whole batch on every
            # rank and sliced (``ddrl.dist.rng``); rank 0's own stream continues it, the other
            # ranks own theirs.
            g_shared, g_noise = shared_generator(cfg.seed, it), noise_generator(cfg.seed, it)
            g_own = g_noise if rank == 0 else rank_generator(cfg.seed, it, rank)
            with phase("rollout"):
                prompts = c.data.sample_prompts(P, g_shared)
                every_prompt = [q for q in prompts for _ in range(G)]
                scorer = (  # scores each chunk while the next samples (reward.overlap)
                    OverlappedScorer(gen.codec, c.reward, every_prompt[rows], dev)
                    if cfg.reward.overlap
                    else None
                )
                denoiser.eval()
                ro = rollout(gen, prompts, G, cfg.sampler, g_noise, dev, encode, rows, scorer)
                denoiser.train()
            if scorer is None:
                with phase("decode"):
                    images = decode_images(gen.codec, ro.final)
            with phase("reward"):  # with overlap: waiting for the last chunk's rewards
                mine = scorer.result() if scorer else c.reward.each(images, ro.prompts).to(dev)
                mine = mine * cfg.reward.scale  # [B/W, K]
            with phase("advantage"):
                # [B, K] and [B]: groups normalise whole, whichever ranks hold their samples
                each, adv_all, valid_all = gathered_advantages(
                    mine, c.reward.weights, G, cfg.advantage, cfg.reward.aggregate
                )
                adv, valid = adv_all[rows], valid_all[rows]
                rewards = each @ c.reward.weights.to(each)
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
                # Drawn after every earlier use of the shared stream, which it leaves as it was.
                plan = int(torch.randint(2**31 - 1, (1,), generator=g_shared))
                batches = list(
                    iter_step_batches(
                        ro, adv, valid, x0_data, steps, micro, g_own, data_cond, plan, stack
                    )
                )
            lr = o.lr * min(1.0, (it + 1) / max(o.warmup, 1))
            for group in opt.param_groups:
                group["lr"] = lr
            for _ in range(tc.inner_updates):
                m, finite = optimizer_step(loss_fn, policy, batches, params, opt, o.grad_clip, par)
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
                    with phase("optimizer"):
                        ema.update(denoiser)
            with phase("log"):
                fin = torch.isfinite(rewards)
                scalars = {
                    "reward_mean": finite_mean(rewards),
                    "reward_std": rewards[fin].std() if fin.sum() > 1 else torch.tensor(0.0),
                    "skipped_groups": (~valid_all).sum() // G,
                    **m,
                }
                if each.shape[1] > 1:  # several rewards: each one's raw mean, every iteration
                    for k, name in enumerate(c.reward.names):
                        scalars[f"reward_{name}_mean"] = finite_mean(each[:, k])
                values = torch.stack(  # one device → host copy per iteration
                    [torch.as_tensor(v, dtype=torch.float64, device=dev) for v in scalars.values()]
                )
                row = {"iteration": it + 1, **dict(zip(scalars, values.tolist(), strict=True))}
                row.update(lr=lr, skipped_groups=int(row["skipped_groups"]))
        # The iteration's phases; eval and checkpoint after iteration k land in row k + 1.
        row.update({f"time_{k}": v for k, v in timer.reset().items()})
        row["time_iteration"] = time.perf_counter() - t0
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
        with timer.active():
            if cfg.eval.every and ((it + 1) % cfg.eval.every == 0 or done):
                maybe_eval(it + 1, final=done)
            stopping = any_rank(stop is not None and stop.is_set()) and not done  # all together
            if (it + 1) % tc.checkpoint_every == 0 or done or stopping:
                with phase("checkpoint"):
                    path = state.save(it + 1, tc.keep_checkpoints, samples=(it + 1) * P * G)
        if stopping:
            bar.close()
            logger.close()
            raise Terminated(path)
    bar.close()
    logger.close()
    save_final()
    barrier()
    return row

"""The one training loop: rollout → reward → advantage → loss → step.

Algorithms differ only in the loss object and its config (plus sampler and loop settings in
their presets); the loop never asks which algorithm it runs. Simplifications, stated up front:

1. Data parallel over ``torchrun`` ranks (``ddrl.dist``): each rank rolls out, scores and
   trains its contiguous slice of the iteration's P·G trajectories; rewards are gathered so
   groups normalise whole, loss denominators are summed over ranks and gradients too (torch
   DDP or FSDP2) once per optimizer step, so W ranks take the single-process step. Rank 0
   alone writes the run folder; every rank writes its checkpoint shards.
2. Each optimizer step accumulates gradients over every trained timestep and micro-batch of
   its share of the trajectories (all of them, or 1/``updates_per_batch``), each loss term
   averaged over that whole share (``training.step``).
3. The denoiser is trained in place; the conditioner and codec are frozen.
4. Iteration k's randomness comes from generators keyed by (seed, k) and (seed, k, rank), so a
   resumed run continues exactly as the uninterrupted one (``training.iteration``).
5. A loss gets only what it declares: the data pool (``needs_data``) and a reference model
   (``needs_reference``).
6. The watch (``ddrl.watch``) judges each evaluation on rank 0 only; a ``stop`` rule ends the
   run after the iteration's checkpoint, on every rank together; ``keep_best`` saves the
   evaluated weights unsharded (so not under FSDP2).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ddrl.config import RunConfig, save_config
from ddrl.dist.group import any_rank, barrier, batch_slice, is_main
from ddrl.dist.parallel import Parallel
from ddrl.errors import DDRLError, Terminated, WatchStopped
from ddrl.evaluation.evaluate import evaluate_components
from ddrl.evaluation.pictures import save_prompt_grid
from ddrl.io import fingerprint
from ddrl.losses import build_loss, needs
from ddrl.losses.base import LossContext
from ddrl.losses.reference import make_reference
from ddrl.models.base import CondCache, clamp_images
from ddrl.models.random_base import copy_marker
from ddrl.phases import PhaseTimer, phase
from ddrl.rewards.base import finite_mean
from ddrl.sde import stepper
from ddrl.training.components import Components, build_components, device_of
from ddrl.training.iteration import Iteration, collect
from ddrl.training.preflight import preflight
from ddrl.training.runlog import NullLogger, RunLogger, read_jsonl
from ddrl.training.state import NoCheckpoint, TrainState
from ddrl.training.step import Learner
from ddrl.watch import Verdict, Watch
from ddrl.watch.best import save_best


def train(
    cfg: RunConfig,
    run_dir: Path,
    resume: bool | Path = False,
    log=print,
    stop: threading.Event | None = None,
    components: Components | None = None,
) -> dict:
    """Run (or resume: True = the newest valid checkpoint, or a checkpoint folder) training
    into ``run_dir``; returns the last metrics row ({} when a resumed run is already at
    train.iterations). Once ``stop`` is set (the CLI sets it on SIGTERM) the iteration in
    progress is finished and checkpointed, then Terminated. ``components``: already built from
    ``cfg`` (the CLI builds them before touching the disk)."""
    run_dir, dev, main, tc = Path(run_dir), device_of(cfg), is_main(), cfg.train
    log = log if main else (lambda *a, **k: None)  # rank 0 says it once
    c = components or build_components(cfg, log)
    learner, par, base = prepare_learner(cfg, c, dev, log)
    opt, ema = learner.opt, learner.ema
    state = TrainState(
        run_dir,
        learner.denoiser,
        opt,
        ema,
        cfg.algorithm,
        log,
        base,
        loss=learner.loss_fn,
        strategy=par.strategy,
    )
    start = _restore(state, resume, run_dir, log)
    shipped = functools.partial(ema.applied, c.gen.denoiser) if ema else contextlib.nullcontext
    final = functools.partial(_save_final, c, par, run_dir, shipped)
    if resume and start >= tc.iterations:
        n = tc.iterations
        where = f" of {n}" if start == n else f", beyond train.iterations={n}"
        log(f"nothing to do: run is at iteration {start}{where}")
        if not (run_dir / "final").is_dir():  # killed between checkpoint and save
            final()
        barrier()
        return {}
    if main:  # also on resume: a changed train.iterations is the run's length from now on
        save_config(cfg, run_dir / "config.json")
        copy_marker(c.base_path, run_dir)  # model.base=random: RANDOM_WEIGHTS.txt
    logger = RunLogger(run_dir, start, cfg) if main else NullLogger()
    # Replayed from the evaluations up to the checkpoint (the logger has cut any later ones).
    watch = Watch(cfg.watch, read_jsonl(run_dir / "eval.jsonl"), log) if main else None
    if tc.preflight and start == 0:  # every rank: under FSDP2 its forwards are collectives
        preflight(cfg, c, learner.loss_fn, dev, log)
    evaluate = functools.partial(_evaluate, cfg, c, dev, par, shipped, logger, watch, run_dir)
    total = tc.prompts_per_iter * tc.group_size
    rows, encode = batch_slice(total), CondCache(c.gen.conditioner)
    if rows.stop - rows.start < tc.updates_per_batch:
        raise DDRLError(
            f"train.updates_per_batch={tc.updates_per_batch} parts of {rows.stop - rows.start} "
            "trajectories per process; allowed: at most the trajectories per process"
        )
    loss_fn = learner.loss_fn  # what its rollouts record, and whose weights sample them
    record = "means" if getattr(loss_fn, "records_means", False) else "transitions"
    record = record if getattr(loss_fn, "transitions", True) else "final"
    sampling = getattr(loss_fn, "sampling", contextlib.nullcontext)
    if cfg.eval.every and start == 0:
        evaluate(0)
    row, all_skipped = {}, 0
    show = tc.progress and main
    bar = tqdm(range(start, tc.iterations), initial=start, total=tc.iterations, disable=not show)
    bar.set_description(cfg.algorithm)
    timer = PhaseTimer(dev, sync=tc.sync_timing)  # the row's time_<phase> (``ddrl.phases``)
    for it in bar:
        t0 = time.perf_counter()
        with timer.active():
            b = collect(cfg, c, it, rows, encode, dev, record, sampling, not par.sharded)
            m = learner.step(b, tc)
            with phase("log"):
                row = _metrics_row(b, m, c, tc.group_size, dev)
        # The iteration's phases; eval and checkpoint after iteration k land in row k + 1.
        row.update({f"time_{k}": v for k, v in timer.reset().items()})
        row["time_iteration"] = time.perf_counter() - t0
        logger.metrics(row)
        all_skipped = _check_skipped(row, all_skipped, cfg, log)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.3f}")
        done = it + 1 == tc.iterations
        with timer.active():
            due = cfg.eval.every and ((it + 1) % cfg.eval.every == 0 or done)
            verdict = evaluate(it + 1, final=done) if due else Verdict()
            # all ranks together: SIGTERM on any, or a stop rule on rank 0
            terminated = any_rank(stop is not None and stop.is_set()) and not done
            halted = any_rank(bool(verdict.stop)) and not done
            if (it + 1) % tc.checkpoint_every == 0 or done or terminated or halted:
                with phase("checkpoint"):
                    path = state.save(it + 1, tc.keep_checkpoints, samples=(it + 1) * total)
        if terminated or halted:
            bar.close()
            logger.close()
            if halted:
                raise WatchStopped(verdict.stop or "a stop rule fired on rank 0", path)
            raise Terminated(path)
    bar.close()
    logger.close()
    final()
    barrier()
    return row


def prepare_learner(cfg: RunConfig, c: Components, dev: str, log) -> tuple[Learner, Parallel, str]:
    """Freeze the conditioner, encode every prompt once, build the loss (its reference before
    any update), compile and lay out the denoiser, and the Learner that trains it."""
    gen = c.gen.to(dev)
    if isinstance(gen.conditioner, torch.nn.Module):
        gen.conditioner.requires_grad_(False)  # frozen, like a real text encoder
    if c.pool is not None and not c.paired:
        log("data term: x0 drawn uniformly with its own captions (they are not the prompt set)")
    prepare = getattr(gen.conditioner, "prepare", None)  # plugins may not have it
    if prepare is not None:  # every prompt encoded once; text encoders may be freed after
        captions = sorted(set(c.pool.prompts)) if c.pool is not None and not c.paired else []
        if c.heldout is not None:  # the held-out loss conditions on the held-out captions
            captions = sorted({*captions, *c.heldout.prompts})
        prepare([*c.data.prompts, *c.data.eval_prompts, *captions])
    denoiser = gen.denoiser  # which weights train (all, or LoRA adapters) is the family's choice
    par = Parallel(cfg.parallel, dev)  # none | ddp | fsdp over torchrun's ranks
    base = fingerprint(denoiser)  # before any update (and sharding)
    cell = (cfg.algorithm, cfg.objective, cfg.regularisers)
    ctx = LossContext(
        stepper(cfg.sampler.sde),
        cfg.sampler.cfg_scale,
        functools.partial(make_reference, denoiser, place=par.frozen)
        if needs(*cell)["reference"]
        else None,
        denoiser,
    )
    loss_fn = build_loss(
        cfg.algorithm, cfg.loss, ctx, *cell[1:]
    )  # before resume: the reference is the base
    if par.sharded and any(r.action == "keep_best" for r in cfg.watch.parsed()):
        raise DDRLError(
            "a keep_best watch rule saves best/ unsharded; under parallel.strategy=fsdp use "
            "stop rules and the checkpoints instead; allowed: warn and stop rules here"
        )
    if cfg.model.compile:  # after the reference copy was taken; compiled in place
        backbones = [getattr(denoiser, n, None) for n in ("transformer", "transformer_2")]
        backbones = [b for b in backbones if b is not None]  # Wan2.2 A14B: both experts
        if not backbones or par.sharded:
            raise DDRLError(
                "model.compile=true needs a transformer backbone (digits, diffusers families) "
                f"and parallel.strategy none or ddp (here {par.strategy}); allowed: false"
            )
        for b in backbones:
            b.compile()
    return Learner(loss_fn, par.wrap(denoiser), denoiser, cfg.optim, par, log), par, base


def _restore(state: TrainState, resume: bool | Path, run_dir: Path, log) -> int:
    """The iteration to start from: 0, or the restored checkpoint's."""
    if not resume:
        return 0
    try:
        return state.restore(resume if isinstance(resume, Path) else None)
    except NoCheckpoint:  # killed before its first checkpoint: nothing to lose by starting
        log(f"no checkpoint in {run_dir} yet; starting it from iteration 0 with its own config")
        return 0


def _save_final(c: Components, par: Parallel, run_dir: Path, shipped) -> None:
    """``final/`` from rank 0, with the EMA weights when on; sharded, gathered first from every
    rank (a collective), after which the denoiser is no longer sharded."""
    den, main = c.gen.denoiser, is_main()
    with shipped():
        full = par.full_state(den) if par.sharded else None
        if main and not par.sharded:
            c.gen.save_pretrained(run_dir / "final")
    if main and par.sharded:
        par.unshard_into(den, full)
        c.gen.save_pretrained(run_dir / "final")


def _evaluate(cfg, c, dev, par, shipped, logger, watch, run_dir, it: int, final=False) -> Verdict:
    """Evaluate the shipped weights (the EMA when on) after ``it`` iterations, let the watch
    judge them (``best/`` saved from the same weights), log the metrics, firings and sample
    grid; at the end also ``samples_final.png``. Rank 0 evaluates while the others wait;
    sharded, every rank runs it (each forward gathers the weights from all) and rank 0 alone
    logs and watches."""
    verdict = Verdict()
    with phase("eval"):
        if is_main() or par.sharded:
            with shipped():
                m, raw, _ = evaluate_components(c.gen, c, cfg, dev)
                if watch is not None:
                    verdict = watch.observe(it, m)
                    if verdict.best:
                        save_best(c.gen, run_dir, it, cfg.watch, m)
            logger.eval({"iteration": it, **m})
            for row in verdict.firings:
                logger.firing(row)
            n_prompts = len(c.data.eval_prompts or c.data.prompts)
            logger.samples(it, clamp_images(c.gen.codec, raw), n_prompts)
            if final and is_main():
                frames = raw[:, :, 0] if raw.dim() == 5 else raw  # videos: their first frames
                title = f"{cfg.algorithm} after {it} iterations"
                save_prompt_grid(frames, n_prompts, run_dir / "samples_final.png", title)
        barrier()
    return verdict


def _metrics_row(b: Iteration, m: dict, c: Components, group_size: int, dev) -> dict:
    """The iteration's metrics row: reward statistics, skipped groups and the step's metrics,
    copied to the host at once."""
    lr = m.pop("lr")
    fin = torch.isfinite(b.rewards)
    scalars = {
        "reward_mean": finite_mean(b.rewards),
        "reward_std": b.rewards[fin].std() if fin.sum() > 1 else torch.tensor(0.0),
        "skipped_groups": (~b.valid_all).sum() // group_size,
        **m,
    }
    if b.each.shape[1] > 1:  # several rewards: each one's raw mean, every iteration
        for k, name in enumerate(c.reward.names):
            scalars[f"reward_{name}_mean"] = finite_mean(b.each[:, k])
    values = torch.stack(  # one device → host copy per iteration
        [torch.as_tensor(v, dtype=torch.float64, device=dev) for v in scalars.values()]
    )
    row = {"iteration": b.index + 1, **dict(zip(scalars, values.tolist(), strict=True))}
    row.update(lr=lr, skipped_groups=int(row["skipped_groups"]))
    return row


def _check_skipped(row: dict, all_skipped: int, cfg: RunConfig, log) -> int:
    """Say which groups were skipped; stop the run after ``train.max_skipped_iterations``
    consecutive iterations in which every group was (nothing is learned from the reward).
    Returns the new count of such iterations."""
    if row["skipped_groups"]:
        n = row["skipped_groups"]
        log(f"iteration {row['iteration']}: skipped {n} group(s) with NaN/inf reward")
    tc = cfg.train
    all_skipped = all_skipped + 1 if row["skipped_groups"] == tc.prompts_per_iter else 0
    if all_skipped >= tc.max_skipped_iterations:
        raise DDRLError(
            f"every group had a NaN/inf reward in {all_skipped} consecutive iterations "
            f"(train.max_skipped_iterations={tc.max_skipped_iterations}); last good "
            f"checkpoint kept. Check reward {cfg.reward.name!r} and reward.scale"
        )
    return all_skipped

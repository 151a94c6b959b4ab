"""The step: the iteration's micro-batches, optimizer steps over them with whole-step
denominators, how the trajectories are split across a pass's steps, and the ``Learner`` that
owns the optimizer, the EMA, the learning-rate warm-up and the non-finite-step policy."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from ddrl.dist.group import all_reduce_sum, reduce_metrics
from ddrl.dist.parallel import Parallel, grad_norm_value
from ddrl.errors import DDRLError
from ddrl.losses.base import Loss, StepBatch
from ddrl.phases import phase
from ddrl.training.config import OptimConfig, TrainConfig
from ddrl.training.ema import EMA
from ddrl.training.iteration import Iteration


def step_batches(
    b: Iteration, micro: int, stack: int = 1, rows: torch.Tensor | None = None
) -> Iterator[StepBatch]:
    """One StepBatch per (trained-step position j, micro-batch of ``micro`` trajectories) of
    the iteration's steps [B, n] (per-sample step indices), over the trajectories ``rows``
    (indices into this rank's; None = all, in order). ``stack`` > 1: that many consecutive
    positions in one batch (stack × micro rows, position-major), one forward instead of
    ``stack``; the per-sample t makes it the same computation."""
    ro, steps, data_cond = b.rollout, b.steps, b.data_cond
    n, offset = steps.shape[1], b.rows.start if b.rows is not None else 0
    every = ro.transitions  # else only the initial noise and final sample were kept
    chosen = torch.arange(b.advantages.shape[0]) if rows is None else rows
    for j0 in range(0, n, stack):
        cols = torch.arange(j0, min(j0 + stack, n))
        for idx in chosen.split(micro):
            s = steps[idx][:, cols].T.reshape(-1)  # [k·m]: position j0's rows, then j0 + 1's
            rows = idx.repeat(len(cols)).to(ro.states.device)
            yield StepBatch(
                x_t=ro.states[s, rows] if every else None,
                x_next=ro.states[s + 1, rows] if every else None,
                t=ro.timesteps[s],
                t_next=ro.timesteps[s + 1],
                logp_old=ro.log_probs[s, rows] if every else None,
                advantages=b.advantages[rows],
                valid=b.valid[rows],
                cond=ro.cond.index(rows),
                null=ro.null.index(rows) if ro.null is not None else None,
                x0_data=b.x0_data[rows] if b.x0_data is not None else None,
                data_cond=data_cond.index(rows) if data_cond is not None else None,
                noise0=ro.states[0, rows],
                first=j0 == 0,
                generator=b.generator,
                position=j0,
                positions=n,
                plan=b.plan,
                x0=ro.states[-1, rows],
                ids=offset + rows.cpu(),
                slots=cols.repeat_interleave(len(idx)),
                mean_old=ro.means[s, rows] if ro.means is not None else None,
            )


def split_rows(
    parts: int, how: str, kept: torch.Tensor, group_pos: torch.Tensor, g: torch.Generator | None
) -> list[torch.Tensor]:
    """This rank's trajectories (indices [n]) split into ``parts`` optimizer steps.

    The rows are ordered ("shuffled": a random permutation from ``g``, as flow_grpo's randperm
    before it re-batches, scripts/train_sd3.py L829-836; "within_groups": by position in the
    group ``group_pos`` [n], then row, so part u holds the u-th slice of every group, as
    DanceGRPO's one group per GPU trained in order, fastvideo/train_grpo_flux.py L571-611),
    then the ``kept`` rows [n] bool (those a loss term covers; flow_grpo drops the rest before
    it splits, L796-836) are cut into ``parts`` near-equal consecutive runs, and the others
    spread the same way (their terms are masked out). One part: every row in order."""
    n = kept.shape[0]
    if parts == 1:
        return [torch.arange(n)]
    if how == "shuffled":
        order = torch.randperm(n, generator=g)
    else:
        order = torch.argsort(group_pos * n + torch.arange(n))
    kept = kept.cpu()[order]
    runs = zip(order[kept].tensor_split(parts), order[~kept].tensor_split(parts), strict=True)
    return [torch.cat([a, r]) for a, r in runs]


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ values over mask; where(), unlike values·mask, drops NaN/inf of masked-out samples."""
    return torch.where(mask, values, torch.zeros_like(values)).sum()


def optimizer_step(
    loss_fn: Loss,
    denoiser,
    batches: list[StepBatch],
    params: list[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    grad_clip: float,
    par: Parallel | None = None,
) -> tuple[dict[str, torch.Tensor], bool]:
    """Accumulate every batch's loss with whole-iteration denominators and step once.

    Each term's loss is Σ_batches Σ_b mask·value / (its mask's count over all batches), so the
    gradient is the same however the iteration is split. Statistics (ratio deviation, clipped
    fraction) are averaged over the policy term's samples and maxed. Returns (metrics as
    tensors, whether the step was finite and taken). Over several ranks the counts, gradients
    and metrics are summed (maxima maxed) across them, so every rank takes the same step; the
    gradients are reduced once, in the step's last backward (``par``: ``ddrl.dist.parallel``).
    """
    active = getattr(loss_fn, "active", lambda b: True)
    last = max((i for i, b in enumerate(batches) if active(b)), default=-1)
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
    for i, (b, m) in enumerate(zip(batches, masks, strict=True)):
        # Forward and backward both inside: DDP decides at the forward whether to reduce.
        with par.sync(i == last) if par else contextlib.nullcontext():
            out = loss_fn(denoiser, b)
            loss = 0.0
            for name, (vals, coef) in out.terms.items():
                part = _masked_sum(vals, m[name]) / counts[name].clamp(min=1)
                loss = loss + coef * part
                sums[f"loss_{name}"] = sums.get(f"loss_{name}", 0) + part.detach()
            if torch.is_tensor(loss) and loss.requires_grad:
                with phase("backward"):
                    loss.backward()
                total = total.to(loss.device) + loss.detach()
        for k, v in out.stats.items():  # stats describe the policy term's samples
            pm, n = m["policy"], counts["policy"].clamp(min=1)
            sums[f"{k}_mean"] = sums.get(f"{k}_mean", 0) + _masked_sum(v, pm) / n
            vmax = torch.where(pm, v, torch.zeros_like(v)).max()
            sums[f"{k}_max"] = torch.maximum(sums.get(f"{k}_max", vmax), vmax)
    sums = reduce_metrics({"loss": total, **sums})
    total = sums.pop("loss")
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    with phase("optimizer"):
        grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(params, max_norm))
        finite = bool(torch.isfinite(grad_norm) & torch.isfinite(total))  # one sync per step
        if finite:
            opt.step()
        else:
            opt.zero_grad(set_to_none=True)
    return {"loss": total, "grad_norm": grad_norm.detach(), **sums}, finite


class Learner:
    """The trained side of the loop: ``step`` turns an iteration into ``inner_updates`` passes
    of ``updates_per_batch`` optimizer steps each at the warmed-up learning rate, keeps the
    EMA, and stops the run after ``max_bad_steps`` consecutive non-finite steps (each one
    skipped, the checkpoints kept)."""

    def __init__(
        self,
        loss_fn: Loss,
        policy,
        denoiser: torch.nn.Module,
        optim: OptimConfig,
        par: Parallel,
        log=print,
    ):
        self.loss_fn, self.policy, self.par, self.cfg, self.log = loss_fn, policy, par, optim, log
        self.params = [p for p in denoiser.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            self.params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
        )
        self.ema = (
            EMA(denoiser, optim.ema_decay, optim.ema_every, optim.ema_warmup)
            if optim.ema_decay > 0
            else None
        )
        self.denoiser, self.bad_steps = denoiser, 0

    def lr(self, it: int) -> float:
        """Linear warm-up over ``optim.warmup`` iterations, then ``optim.lr``."""
        return self.cfg.lr * min(1.0, (it + 1) / max(self.cfg.warmup, 1))

    def step(self, b: Iteration, tc: TrainConfig) -> dict[str, torch.Tensor]:
        """Train on iteration ``b``; returns the last update's metrics (tensors), lr, and the
        first (on-policy) update's ratio deviation, ``onpolicy_ratio_dev_max``: it should be
        ~0, and is the check that training recomputes the rollout's log-probs.

        Optimizer steps are counted over the run (s = steps taken, skipped ones included, a
        function of the iteration, so a resumed run counts on). With ``optim.ema_per =
        "micro_batch"`` the EMA is called as flow_grpo calls it, once after each micro-batch
        with the count of steps taken (train_sd3.py L927-955): a step of m micro-batches is
        followed by one call with the new count, and its m − 1 successors' calls (same count,
        same weights) come before the next step; evaluation falls between them, as there.
        m counts the step's share of the rank's trajectories (flow_grpo's gradient-accumulation
        batches, fixed however many its zero-advantage filter drops), the same on every rank."""
        lr = self.lr(b.index)
        for group in self.opt.param_groups:
            group["lr"] = lr
        parts, micro = tc.updates_per_batch, tc.micro_batch or b.advantages.shape[0]
        kept = getattr(self.loss_fn, "kept", lambda adv, valid: valid)(b.advantages, b.valid)
        n, offset = kept.shape[0], b.rows.start if b.rows is not None else 0
        group_pos = (offset + torch.arange(n)) % tc.group_size
        calls = math.ceil(n / parts / micro) if self.cfg.ema_per == "micro_batch" else 1
        # One part: the same batches every pass, gathered once.
        whole = list(step_batches(b, micro, tc.steps_per_forward)) if parts == 1 else None
        s, first = b.index * tc.inner_updates * parts, None
        for _ in range(tc.inner_updates):
            for rows in split_rows(parts, tc.update_split, kept, group_pos, b.order):
                batches = whole or list(step_batches(b, micro, tc.steps_per_forward, rows))
                if self.ema is not None and calls > 1:  # the previous step's later calls
                    with phase("optimizer"):
                        self.ema.update(self.denoiser, s, calls - 1)
                m = self._update(b.index, batches, tc.max_bad_steps)
                first = m if first is None else first
                s += 1
                if self.ema is not None:
                    with phase("optimizer"):
                        self.ema.update(self.denoiser, s)
        if hasattr(self.loss_fn, "end_iteration"):  # lagging weights move towards θ
            self.loss_fn.end_iteration(s)
        if "ratio_dev_max" in first:
            m["onpolicy_ratio_dev_max"] = first["ratio_dev_max"]
        return {**m, "lr": lr}

    def _update(self, index: int, batches: list[StepBatch], max_bad_steps: int) -> dict:
        """One optimizer step over ``batches``, skipped (and counted) when non-finite."""
        m, finite = optimizer_step(
            self.loss_fn, self.policy, batches, self.params, self.opt, self.cfg.grad_clip, self.par
        )
        self.bad_steps = 0 if finite else self.bad_steps + 1
        if not finite:
            self.log(f"iteration {index + 1}: non-finite loss or gradient; step skipped")
            if self.bad_steps >= max_bad_steps:
                raise DDRLError(
                    f"{self.bad_steps} consecutive non-finite steps (train.max_bad_steps="
                    f"{max_bad_steps}); last good checkpoint kept. Lower optim.lr or "
                    "check the reward"
                )
        return m

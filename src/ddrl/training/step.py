"""One optimizer step of the loop: which timesteps are trained, the micro-batches they make,
and the gradient step over all of them with whole-iteration denominators."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from ddrl.dist.group import all_reduce_sum, reduce_metrics
from ddrl.dist.parallel import grad_norm_value
from ddrl.losses import StepBatch
from ddrl.models import Cond
from ddrl.sampling import Rollout
from ddrl.training.phases import phase


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
    plan: int = 0,
    stack: int = 1,
) -> Iterator[StepBatch]:
    """One StepBatch per (trained-step position j, micro-batch); steps [B, n] from
    ``select_timesteps`` (per-sample step indices); ``data_cond``: the data items' own
    condition (batch B) when it is not the trajectories' (unpaired caption data); ``plan``:
    the iteration's shared seed for per-step choices of the losses. ``stack`` > 1: that many
    consecutive positions in one batch (stack × micro rows, position-major), one forward
    instead of ``stack``; the per-sample t makes it the same computation."""
    b_total, n = adv.shape[0], steps.shape[1]
    for j0 in range(0, n, stack):
        cols = torch.arange(j0, min(j0 + stack, n))
        for idx in torch.arange(b_total).split(micro):
            s = steps[idx][:, cols].T.reshape(-1)  # [k·m]: position j0's rows, then j0 + 1's
            rows = idx.repeat(len(cols)).to(ro.states.device)
            yield StepBatch(
                x_t=ro.states[s, rows],
                x_next=ro.states[s + 1, rows],
                t=ro.timesteps[s],
                t_next=ro.timesteps[s + 1],
                logp_old=ro.log_probs[s, rows],
                advantages=adv[rows],
                valid=valid[rows],
                cond=ro.cond.index(rows),
                null=ro.null.index(rows) if ro.null is not None else None,
                x0_data=x0_data[rows],
                data_cond=data_cond.index(rows) if data_cond is not None else None,
                noise0=ro.states[0, rows],
                first=j0 == 0,
                generator=g,
                position=j0,
                positions=n,
                plan=plan,
            )


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ values over mask; where(), unlike values·mask, drops NaN/inf of masked-out samples."""
    return torch.where(mask, values, torch.zeros_like(values)).sum()


def optimizer_step(
    loss_fn, denoiser, batches: list[StepBatch], params, opt, grad_clip: float, par=None
):
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

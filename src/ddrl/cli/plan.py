"""`ddrl plan`: per-GPU memory by part, FLOPs by phase, and what to change when a run does not
fit, computed from the resolved config and the published model configs on the meta device
(``ddrl.plan``): no weights, no data, seconds."""

from __future__ import annotations

import json

from ddrl.cli.args import resolve_args, say
from ddrl.errors import DDRLError

GIB = 2**30


def _number(flag: str, text: str, kind, low) -> float:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value >= low or value != value:
        what = "a whole number" if kind is int else "a number"
        raise DDRLError(f"{flag} {text!r}: allowed: {what} >= {low}")
    return value


def _config(args):
    """The config as ``ddrl config`` resolves it. A reward name that does not resolve here
    (e.g. a plugin of another environment) does not change memory: planned with 'remote'."""
    try:
        return resolve_args(args)
    except DDRLError as e:
        if not str(e).startswith("unknown reward"):
            raise
        say(f"ddrl plan: note: {e}; the reward is not part of the plan (planned as 'remote')")
        return resolve_args(args, extra=["reward.name=remote"])


def cmd_plan(args) -> None:
    gpus = int(_number("--gpus", args.gpus, int, 1))
    memory = _number("--gpu-memory", args.gpu_memory, float, 0.1)
    cfg = _config(args)
    from ddrl.plan.memory import MFU, PEAK_TFLOPS, estimate, suggestions

    est = estimate(cfg, gpus)
    budget = memory * GIB
    fits = est["total"] <= budget
    sugg = [] if fits else suggestions(cfg, gpus, budget)
    if args.json:
        mn = est["model"]
        out = {
            "preset": cfg.preset,
            "algorithm": cfg.algorithm,
            "gpus": gpus,
            "gpu_memory_gib": memory,
            "model": dict(vars(mn)),
            "parts": [
                {
                    "part": p.name,
                    "bytes": p.bytes,
                    "gib": p.bytes / GIB,
                    "phases": list(p.phases),
                    "note": p.note,
                }
                for p in est["parts"]
            ],  # fmt: skip
            "phases_bytes": est["phases"],
            "total_bytes": est["total"],
            "total_gib": est["total"] / GIB,
            "peak_phase": est["peak_phase"],
            "fits": fits,
            "flops": est["flops"],
            "seconds_per_gpu": est["seconds_at_mfu"],
            "assumed": {"peak_tflops": PEAK_TFLOPS, "mfu": MFU},
            "activation_source": est["activation_source"],
            "suggestions": [{**s, "total_gib": s["total"] / GIB} for s in sugg],
        }
        print(json.dumps(out, indent=1))
        return
    print(format_plan(cfg, gpus, memory, est, sugg, PEAK_TFLOPS, MFU))


def format_plan(cfg, gpus, memory, est, sugg, peak, mfu) -> str:
    mn = est["model"]
    lines = [
        f"ddrl plan: preset {cfg.preset}, algorithm {cfg.algorithm}, {gpus} GPU(s) of "
        f"{memory:g} GiB, model.finetune={cfg.model.finetune}",
        f"model: {mn.checkpoint} ({mn.note})",
        f"  transformer {mn.trained:,.0f} trained parameters (+{mn.trained_buffers:,.0f} buffer "
        f"elements{f', +{mn.frozen:,.0f} frozen' if mn.frozen else ''})"
        + (f", LoRA r{cfg.model.lora.rank}: {mn.lora:,.0f}" if mn.lora else "")
        + f"; text encoders {mn.text / 1e9:.3f} B ({mn.text_what}; {mn.text_source}); "
        f"VAE {mn.vae:,.0f}",
        f"  sample {mn.height}×{mn.width}"
        + (f"×{mn.frames}" if mn.frames else "")
        + f": latent {mn.latent:,} elements, {mn.tokens:,} tokens per sequence"
        + (f" (+{mn.cross_tokens} text tokens by cross-attention)" if mn.cross_tokens else "")
        + f", {mn.layers} blocks × width {mn.hidden}",
        "",
        f"{'part':24}{'GiB':>9}  {'live in':18}note",
    ]
    for p in est["parts"]:
        live = {4: "all", 3: "after startup"}.get(len(p.phases), " ".join(p.phases))
        lines.append(f"{p.name:24}{p.bytes / GIB:>9.2f}  {live:18}{p.note}")
    lines.append("")
    lines.append(f"{'phase':24}{'GiB':>9}")
    for ph, b in est["phases"].items():
        lines.append(f"{ph:24}{b / GIB:>9.2f}")
    verdict = "fits" if est["total"] <= memory * GIB else "does NOT fit"
    lines.append(
        f"{'total per GPU':24}{est['total'] / GIB:>9.2f}  (peak phase: {est['peak_phase']}) "
        f"of {memory:g} GiB: {verdict}"
    )
    lines.append(f"activations: {est['activation_source']}")
    lines.append("")
    lines.append(
        f"{'FLOPs per iteration':24}{'TFLOP':>12}  s per GPU at {mfu:.0%} of {peak:g} TFLOP/s"
    )
    total = 0.0
    for ph, f in est["flops"].items():
        total += f
        lines.append(f"{ph:24}{f / 1e12:>12.1f}  {est['seconds_at_mfu'][ph]:.1f}")
    lines.append(f"{'total':24}{total / 1e12:>12.1f}  {sum(est['seconds_at_mfu'].values()):.1f}")
    if sugg:
        lines.append("")
        lines.append(f"does not fit {memory:g} GiB; change (each alone, cheapest first):")
        for s in sugg:
            ok = "fits" if s["fits"] else "still too large"
            lines.append(f"  {s['change']:64}{s['total'] / GIB:>9.2f} GiB  {ok}")
    return "\n".join(lines)

"""Measured activation memory of real-shape models on this CPU, and the fit ``ddrl plan`` uses.

For each configuration (a family at a size, LoRA or full fine-tuning, gradient checkpointing
on or off), in a fresh process: the base with random weights and the real shapes
(``model.base=random``, ``ddrl.models.random_base``), then one training pass of the denoiser as
the loss runs it (n samples: velocity with gradient, a squared loss, backward). The pass's own
memory is the peak resident set during it (Linux VmHWM, reset first) minus the resident set
before it, less the gradients it leaves (trainable parameters' .grad). Over several token counts
s a line in n·s·h (h the width, L the blocks: ``ddrl.plan.model.model_numbers``) separates what
grows with the tokens, the activations, from what does not (the intercept). Its slope / L is
``ActivationFit.per_block`` (bytes per token · width · block, at the run's activation dtype:
bf16 here, as on a GPU under autocast); with gradient checkpointing the slope is
kept·L + per_block, which gives ``kept``. Writes one JSON line per configuration and prints
the fit.

    python benchmarks/memory_fit.py --out runs/memory-fit.jsonl [--only sd3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# (family, size overrides) at real width and depth unless said: 24 GiB of RAM and 2 cores
# decide the sizes (docs/MODELS.md §3 states them)
CONFIGS = [
    *(("sd3", [f"model.resolution={r}"], "lora", False) for r in (128, 192, 256, 320)),
    *(("sd3", [f"model.resolution={r}"], "lora", True) for r in (256, 384, 512)),
    *(("wan", [f"model.height={r}", f"model.width={r}", "model.frames=9"], "lora", False)
      for r in (128, 192, 256)),
    *(("wan", [f"model.height={r}", f"model.width={r}", "model.frames=9"], "lora", True)
      for r in (192, 256, 320)),
    *(("wan", [f"model.height={r}", f"model.width={r}", "model.frames=9"], "full", False)
      for r in (128, 192)),
]  # fmt: skip
SAMPLES = 2  # sequences per pass (a micro-batch of 2)


def vm(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def one(family: str, size: list[str], finetune: str, ckpt: bool, shrink: dict | None = None):
    """Measure one configuration in this process (see the module docstring); ``shrink``: size
    overrides of the published transformer (``random_base.TEST_SIZES``; give a ``model.cache_dir``
    of its own in ``size``): the same structure, narrower or shallower."""
    import torch

    from ddrl.config import build_config
    from ddrl.models import random_base
    from ddrl.plan.model import model_numbers
    from ddrl.plan.sizes import dims
    from ddrl.training.components import load_base

    ov = [
        f"preset=tiny-{family}",  # its LoRA targets, prompts and reward; then the real shapes
        "model.base=random",
        "model.lora.rank=32",
        "model.dtype=bfloat16",
        "model.autocast=bfloat16",
        f"model.finetune={finetune}",
        f"model.gradient_checkpointing={str(ckpt).lower()}",
        "model.max_sequence_length=32",
        *size,
    ]
    cfg = build_config(overrides=ov)
    if shrink:
        random_base.TEST_SIZES[random_base.DEFAULT_CHECKPOINT[family]] = shrink
    gen, _ = load_base(cfg, log=lambda *a: None)
    mn = model_numbers(cfg.model)  # tokens; blocks and width from the model actually built
    layers, hidden = dims(dict(gen.denoiser.transformer.config))
    den = gen.denoiser.train()
    cond = gen.conditioner.encode(["a sign that says OPEN", "a red apple"][:SAMPLES])
    x = torch.randn(SAMPLES, *gen.sample_shape)
    t = torch.full((SAMPLES,), 0.5)
    with torch.no_grad():  # every weight page in memory first: the safetensors files are
        for p in [*den.parameters(), *den.buffers()]:  # mapped lazily, and pages touched
            p.sum()  # during the pass would count as its own memory
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = vm("VmRSS")
    den.velocity(x, t, cond).float().square().mean().backward()
    peak = vm("VmHWM")
    grads = sum(p.grad.nbytes for p in den.parameters() if p.grad is not None)
    act = peak - before - grads
    return {
        "family": family,
        "checkpoint": mn.checkpoint,
        "size": size,
        "finetune": finetune,
        "checkpointing": ckpt,
        "samples": SAMPLES,
        "tokens": mn.tokens,
        "layers": layers,
        "hidden": hidden,
        "peak_bytes": peak,
        "before_bytes": before,
        "grad_bytes": grads,
        "activation_bytes": act,
    }


def line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of y on x."""
    mx = statistics.mean(x for x, _ in points)
    my = statistics.mean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


def fit(rows: list[dict]) -> dict[str, dict]:
    """Per family, a line of the pass's memory in n·s·h (sequences × tokens × width): without
    checkpointing its slope / L is ``per_block``; with checkpointing its slope is kept·L +
    per_block. The intercepts are what does not grow with the tokens (on this CPU: oneDNN's
    reordered bf16 weight copies and workspaces); ``residual``: the largest relative miss."""
    out = {}
    for fam in sorted({r["family"] for r in rows}):
        res = {}
        for ckpt in (False, True):
            pts = [
                (r["samples"] * r["tokens"] * r["hidden"], r["activation_bytes"])
                for r in rows
                if r["family"] == fam and r["checkpointing"] == ckpt and r["finetune"] == "lora"
            ]
            if len(pts) >= 2:
                slope, icpt = line(pts)
                miss = max(abs(slope * x + icpt - y) / y for x, y in pts)
                res[ckpt] = (slope, icpt, miss)
        if False not in res:
            continue
        layers = next(r["layers"] for r in rows if r["family"] == fam)
        per_block = res[False][0] / layers
        out[fam] = {
            "per_block": per_block,
            "intercept_gib": res[False][1] / 2**30,
            "residual": res[False][2],
            "kept": (res[True][0] - per_block) / layers if True in res else None,
            "kept_intercept_gib": res[True][1] / 2**30 if True in res else None,
            "kept_residual": res[True][2] if True in res else None,
            "layers": layers,
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON lines, one per configuration")
    p.add_argument("--only", default="", help="one family (sd3, wan)")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # a child process's config
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(*json.loads(args.one))))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in CONFIGS:
        if args.only and c[0] != args.only:
            continue
        done = subprocess.run(
            [sys.executable, __file__, "--out", str(out), "--one", json.dumps(c)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print(f"{c}: failed\n{done.stderr[-1500:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{c[0]} {' '.join(c[1])} {c[2]} ckpt={c[3]}: s={r['tokens']} "
            f"pass {r['activation_bytes'] / 2**30:.3f} GiB",
            flush=True,
        )
        with open(out, "a") as f:
            f.write(json.dumps(r) + "\n")
    print(json.dumps(fit(rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measured activation memory of real-shape models on this CPU, and the fit ``ddrl plan`` uses.

For each configuration (a family at a size, LoRA or full fine-tuning, gradient checkpointing
on or off), in a fresh process: the base with random weights and the real shapes
(``model.base=random``, ``ddrl.models.random_base``), then one training pass of the denoiser as
the loss runs it (n samples: velocity with gradient, a squared loss, backward). The pass's own
memory is the peak resident set during it (Linux VmHWM, reset first) minus the resident set
before it, less the gradients it leaves (trainable parameters' .grad): the activations the
forward kept for the backward, plus the backward's transients. Per configuration this gives

    c = activations / (n · s · h · L)         bytes per token · width · block

(s tokens per sequence, h width, L blocks: ``ddrl.plan.model.model_numbers``), at the
activation dtype of the run (bf16 here, as on a GPU under autocast). Without checkpointing c is
``ActivationFit.per_block``; with checkpointing the measured bytes are (kept·L + per_block)·s·h,
which gives ``kept``. Writes one JSON line per configuration and prints the fit.

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
    ("sd3", ["model.resolution=128"], "lora", False),
    ("sd3", ["model.resolution=256"], "lora", False),
    ("sd3", ["model.resolution=256"], "lora", True),
    ("sd3", ["model.resolution=384"], "lora", True),
    ("wan", ["model.height=128", "model.width=128", "model.frames=9"], "lora", False),
    ("wan", ["model.height=192", "model.width=192", "model.frames=9"], "lora", False),
    ("wan", ["model.height=192", "model.width=192", "model.frames=9"], "lora", True),
    ("wan", ["model.height=128", "model.width=128", "model.frames=9"], "full", False),
]
SAMPLES = 2  # sequences per pass (a micro-batch of 2)


def vm(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def one(family: str, size: list[str], finetune: str, ckpt: bool) -> dict:
    """Measure one configuration in this process (see the module docstring)."""
    import torch

    from ddrl.config import build_config
    from ddrl.plan.model import model_numbers
    from ddrl.training.components import load_base

    ov = [
        f"model.name={family}",
        "model.base=random",
        "data.name=files",
        "data.prompts=tiny.txt",
        "model.dtype=bfloat16",
        "model.autocast=bfloat16",
        f"model.finetune={finetune}",
        f"model.gradient_checkpointing={str(ckpt).lower()}",
        "model.max_sequence_length=32",
        *size,
    ]
    cfg = build_config(overrides=ov)
    gen, _ = load_base(cfg, log=lambda *a: None)
    mn = model_numbers(cfg.model)
    den = gen.denoiser.train()
    cond = gen.conditioner.encode(["a sign that says OPEN", "a red apple"][:SAMPLES])
    x = torch.randn(SAMPLES, *gen.sample_shape)
    t = torch.full((SAMPLES,), 0.5)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = vm("VmRSS")
    den.velocity(x, t, cond).float().square().mean().backward()
    peak = vm("VmHWM")
    grads = sum(p.grad.nbytes for p in den.parameters() if p.grad is not None)
    act = peak - before - grads
    per = act / (SAMPLES * mn.tokens * mn.hidden)
    return {
        "family": family,
        "checkpoint": mn.checkpoint,
        "size": size,
        "finetune": finetune,
        "checkpointing": ckpt,
        "samples": SAMPLES,
        "tokens": mn.tokens,
        "layers": mn.layers,
        "hidden": mn.hidden,
        "peak_bytes": peak,
        "before_bytes": before,
        "grad_bytes": grads,
        "activation_bytes": act,
        # bytes / (token · width · block) without checkpointing; with it, (kept·L + c)
        "per_token_width": per,
        "per_token_width_block": per / mn.layers,
    }


def fit(rows: list[dict]) -> dict[str, dict]:
    """Per family: per_block = mean c without checkpointing; kept = (c_ckpt − per_block) / L."""
    out = {}
    for fam in sorted({r["family"] for r in rows}):
        plain = [
            r["per_token_width_block"]
            for r in rows
            if r["family"] == fam and not r["checkpointing"]
        ]
        ckpt = [r for r in rows if r["family"] == fam and r["checkpointing"]]
        if not plain:
            continue
        per_block = statistics.mean(plain)
        kept = [(r["per_token_width"] - per_block) / r["layers"] for r in ckpt]
        out[fam] = {
            "per_block": per_block,
            "per_block_spread": (max(plain) - min(plain)) / per_block,
            "kept": statistics.mean(kept) if kept else None,
            "measurements": len(plain) + len(ckpt),
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
            f"act {r['activation_bytes'] / 2**30:.3f} GiB, c={r['per_token_width_block']:.2f}",
            flush=True,
        )
        with open(out, "a") as f:
            f.write(json.dumps(r) + "\n")
    print(json.dumps(fit(rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

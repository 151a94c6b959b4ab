"""One prepared check for a GPU machine (docs/BENCHMARKS.md, "GPU check"): real-shape models with
random weights, timed by phase, with measured peak memory against ``ddrl plan``'s prediction.

Cases, each a separate process (a failure or an out-of-memory stops that case only), run in
order until ``--budget-s`` is spent (the rest are recorded as skipped):

  sd35      SD3.5-Medium shape (``model.base=random``) at 512 px, LoRA r32, the
            sd35-medium-ocr preset's sampler (10 steps) with a shortened batch (2 prompts × 8),
            bf16 weights and autocast: DDRL, Flow-GRPO, DiffusionNFT
  wan       Wan2.1-T2V-1.3B shape at 240×416 × 17 frames, full fine-tuning, bf16 autocast: DDRL
  fsdp1     sd35 DDRL under torchrun with one rank, FSDP2 with bf16 parameters
  compile   sd35 DDRL with ``model.compile=true`` (its compilation falls in the warm-up)

Each case is ``ddrl bench`` (time per phase, rollout samples/s, model FLOP/s and MFU against the
card's bf16 peak, peak memory per phase, the largest on-policy ratio deviation) and ``ddrl plan``
for the same config. ``--dry`` runs the same cases on the tiny pipelines on the CPU (seconds;
``make gpu-check-dry``). Writes OUT/gpu_check.json and OUT/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REAL = {  # what the shapes are run at (docs/BENCHMARKS.md says why these sizes)
    "sd35": [
        "--preset", "sd35-medium-ocr-ddrl", "model.base=random", "reward.name=brightness",
        "data.prompts=tiny.txt", "data.eval_prompts=tiny.txt", "data.synthetic_per_prompt=1",
        "sampler.eval_steps=10", "train.prompts_per_iter=2", "train.group_size=8",
        "train.micro_batch=8", "model.autocast=bfloat16", "eval.every=0",
    ],
    "wan": [
        "--preset", "wan2.1-1.3b-t2v-ddrl", "model.base=random", "reward.name=brightness",
        "data.prompts=tiny.txt", "data.eval_prompts=tiny.txt", "data.synthetic_per_prompt=1",
        "model.height=240", "model.width=416", "model.frames=17", "sampler.num_steps=6",
        "sampler.eval_steps=6", "train.group_size=4", "model.max_sequence_length=128",
        "eval.every=0",
    ],
}  # fmt: skip
DRY = {  # the same code path at toy size on the CPU
    "sd35": ["--preset", "tiny-sd3", "train.prompts_per_iter=1", "train.group_size=2"],
    "wan": ["--preset", "tiny-wan", "train.prompts_per_iter=1", "train.group_size=2"],
}
CASES = [  # name, model, algorithms, extra overrides, under torchrun
    ("sd35", "sd35", "ddrl,flow_grpo,nft", [], False),
    ("wan", "wan", "ddrl", [], False),
    ("fsdp1", "sd35", "ddrl", ["parallel.strategy=fsdp", "parallel.param_dtype=bfloat16"], True),
    ("compile", "sd35", "ddrl", ["model.compile=true"], False),
]


def run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run ``cmd`` with its output into ``log``; (exit code, seconds); 124 on timeout."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            code = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - t0


def case(name, model, algorithms, extra, torchrun, args, out: Path, deadline: float) -> dict:
    """One case: ``ddrl plan`` then ``ddrl bench``; the bench JSON and the plan's prediction."""
    shape = (DRY if args.dry else REAL)[model]
    if args.dry and name == "fsdp1":
        extra = ["parallel.strategy=fsdp"]  # float32 on the CPU
    overrides = [*shape, *extra]
    row = {"case": name, "overrides": overrides, "algorithms": algorithms}
    left = deadline - time.time()
    if name in args.skip or left < 30:
        return {**row, "status": "skipped" + (" (asked)" if name in args.skip else " (time)")}
    py = [sys.executable, "-m", "ddrl"]
    plans = {}
    for alg in algorithms.split(","):  # the prediction for exactly this config
        gpus = ["--gpus", "1"]
        cmd = [*py, "plan", *overrides, f"algorithm={alg}", *gpus, "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        try:
            plans[alg] = json.loads(done.stdout) if done.returncode == 0 else None
        except json.JSONDecodeError:
            plans[alg] = None
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
        if torchrun
        else [sys.executable]
    )
    bench_json = out / f"{name}-bench.json"
    iters = (
        ["--iterations", "1", "--warmup", "0", "--reps", "1"] if args.dry else ["--iterations", "2"]
    )
    cmd = [*launcher, "-m", "ddrl", "bench", *overrides, "--algorithms", algorithms, *iters]
    code, seconds = run([*cmd, "--json", str(bench_json)], out / f"{name}.log", left)
    row.update(
        status="ok" if code == 0 else f"failed (exit {code}, see {name}.log)", seconds=seconds
    )
    if code == 0:
        row["bench"] = json.loads(bench_json.read_text())
    row["plan_gib"] = {a: p and p["total_gib"] for a, p in plans.items()}
    return row


def table(rows: list[dict]) -> str:
    """The markdown summary: one line per case and algorithm."""
    head = (
        "| case | algorithm | s/iteration | rollout s | train s | images/s | TFLOP/s | MFU | "
        "peak GiB (measured) | ddrl plan GiB | ratio dev. max |\n|" + "---|" * 11
    )
    lines = [head]
    for r in rows:
        if "bench" not in r:
            lines.append(f"| {r['case']} | {r['algorithms']} | {r['status']} |" + " |" * 8)
            continue
        for b in r["bench"]["results"]:
            ph = b["phases_s"]
            train = sum(ph.get(k, 0.0) for k in ("policy", "data", "reference", "backward"))
            n = b.get("samples_per_iteration") or 0
            imgs = n / b["iteration_s"] if n else None
            mfu = f"{b['mfu']:.1%}" if b.get("mfu") is not None else "n/a"
            plan = r["plan_gib"].get(b["algorithm"])
            dev = b.get("onpolicy_ratio_dev_max")
            cells = [
                r["case"], b["algorithm"], f"{b['iteration_s']:.2f}", f"{ph['rollout']:.2f}",
                f"{train + ph.get('optimizer', 0.0):.2f}", f"{imgs:.2f}" if imgs else "n/a",
                f"{b['achieved_tflops']:.1f}", mfu, f"{b['peak_memory_mb'] / 1024:.2f}",
                f"{plan:.2f}" if plan is not None else "n/a",
                f"{dev:.2e}" if dev is not None else "n/a",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--dry", action="store_true", help="tiny pipelines on the CPU (CI)")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting cases after this")
    p.add_argument("--skip", default="", help="comma-separated cases to leave out")
    args = p.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - {c[0] for c in CASES}
    if unknown:
        p.error(f"--skip {sorted(unknown)}: allowed {', '.join(c[0] for c in CASES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DDRL_CACHE", str(Path(tempfile.gettempdir()) / "ddrl-gpu-check"))
    deadline = time.time() + args.budget_s
    import torch

    rows = []
    for c in CASES:
        rows.append(case(*c, args, out, deadline))
        print(f"{c[0]}: {rows[-1]['status']}", flush=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    report = {
        "dry": args.dry,
        "gpu": gpu,
        "host": platform.node(),
        "torch": torch.__version__,
        "cases": rows,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(f"GPU: {gpu}, torch {torch.__version__}\n\n" + table(rows))
    print((out / "gpu_check.md").read_text())
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""``ddrl bench``: where an iteration's time goes, against the backbone's own compute.

For each algorithm, in one process: a short real training run (``ddrl.training.loop``) with the
device synchronised around every phase (``train.sync_timing``), whose rows give the time per phase
(``ddrl.phases``) after the warm-up iterations. Meanwhile every call of the denoiser's
``velocity`` is recorded (shapes, with or without gradient). Afterwards the same calls are
replayed on the bare backbone at the same shapes, timed: forward for the calls without
gradient (rollout, reference), forward + backward for the others (policy, data term). Their sum
is the model-compute floor of one iteration; iteration time / floor is the overhead ratio.
FLOPs per call come from ``torch.utils.flop_counter``; MFU is reported where the device's peak
is known (``--peak-tflops`` sets it). Each phase's peak memory is recorded too
(``ddrl.phases.track_memory``): the peak during the phase and that peak minus the memory held
when the phase began (its own working set), the largest over the timed iterations; on CUDA the
allocator's, on a CPU the resident set's (``memory_method``).
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from ddrl.config import build_config
from ddrl.phases import PHASES, track_memory
from ddrl.training.runlog import prepare_run_dir, read_jsonl

QUICK = [  # a few seconds on a CPU: the digits default at a toy size
    "train.prompts_per_iter=2",
    "train.group_size=4",
    "sampler.num_steps=4",
    "pretrain.steps=30",
]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CallLog:
    """Records each ``velocity`` call of a denoiser class: (batch shape, grad) → count, and the
    first call's inputs for the replay."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.inputs: dict = {}
        self.on = True

    @contextlib.contextmanager
    def patch(self, cls: type):
        original = cls.velocity

        def recorded(den, x_t, t, cond):
            if self.on:
                key = (tuple(x_t.shape), torch.is_grad_enabled())
                self.counts[key] += 1
                if key not in self.inputs:
                    self.inputs[key] = (x_t.detach().clone(), t.detach().clone(), cond)
            return original(den, x_t, t, cond)

        cls.velocity = recorded
        try:
            yield self
        finally:
            cls.velocity = original


def _timed(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def replay(den: torch.nn.Module, log: CallLog, per_iteration: int, device, reps: int) -> dict:
    """The bare backbone on the recorded calls: seconds and FLOPs per iteration, by kind."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {"forward_s": 0.0, "forward_backward_s": 0.0, "flops": 0.0, "passes": []}
    for (shape, grad), n in sorted(log.counts.items(), key=str):
        x, t, cond = log.inputs[(shape, grad)]

        def call(x=x, t=t, cond=cond, grad=grad):
            if grad:
                den.velocity(x, t, cond).float().square().mean().backward()
            else:
                with torch.no_grad():
                    den.velocity(x, t, cond)

        seconds = _timed(call, device, reps)
        with FlopCounterMode(display=False) as fc:
            call()
        den.zero_grad(set_to_none=True)
        calls = n / per_iteration
        out["forward_backward_s" if grad else "forward_s"] += calls * seconds
        out["flops"] += calls * fc.get_total_flops()
        out["passes"].append(
            {"batch_shape": list(shape), "grad": grad, "calls": calls, "seconds": seconds}
        )
    out["floor_s"] = out["forward_s"] + out["forward_backward_s"]
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()})"


def phase_memory(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Phase → {"peak_mb", "increase_mb"}: the largest over ``rows`` (``PhaseMemory.rows``);
    0 for a phase that did not run."""
    out = {}
    for p in PHASES:
        seen = [r[p] for r in rows if p in r]
        out[p] = {
            "peak_mb": max((x["peak"] for x in seen), default=0) / 2**20,
            "increase_mb": max((x["increase"] for x in seen), default=0) / 2**20,
        }
    return out


def bench_one(
    files: list[str], overrides: list[str], iterations: int, warmup: int, reps: int, peak
) -> dict:
    """One algorithm: phases of ``iterations`` timed iterations after ``warmup``, and the floor."""
    from ddrl.training.components import build_components, device_of
    from ddrl.training.loop import train

    cfg = build_config(
        files,
        [
            *overrides,
            f"train.iterations={warmup + iterations}",
            "train.sync_timing=true",
            "train.progress=false",
            "eval.every=0",
            "train.preflight=false",  # its one-off forwards are not an iteration's (ddrl doctor)
            "train.checkpoint_every=1",  # each row then carries one checkpoint write
        ],
    )
    dev = torch.device(device_of(cfg))
    comps = build_components(cfg, lambda *a, **k: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    log = CallLog()
    with tempfile.TemporaryDirectory() as tmp:
        run = prepare_run_dir(Path(tmp) / "run", resume=False, overwrite=False)
        with log.patch(type(comps.gen.denoiser)):
            with track_memory(dev) as mem:
                train(cfg, run, log=lambda *a, **k: None, components=comps)
            log.on = False
            rows = read_jsonl(run / "metrics.jsonl")[warmup:]
            peak_mb = mem.total_peak() / 2**20
            memory = phase_memory(mem.rows[warmup:])
            floor = replay(comps.gen.denoiser, log, warmup + iterations, dev, reps)
    phases = {p: statistics.mean(r.get(f"time_{p}", 0.0) for r in rows) for p in PHASES}
    # Each row's checkpoint is the previous iteration's; the first timed row has one too.
    iteration = statistics.mean(r["time_iteration"] for r in rows)
    b = cfg.train.prompts_per_iter * cfg.train.group_size
    achieved = floor["flops"] / iteration / 1e12
    peak = peak or next((v for k, v in PEAK_TFLOPS.items() if k in _device_name(dev)), None)
    return {
        "algorithm": cfg.algorithm,
        "phases_s": phases,
        "iteration_s": iteration,
        "floor_s": floor["floor_s"],
        "floor_forward_s": floor["forward_s"],
        "floor_forward_backward_s": floor["forward_backward_s"],
        "overhead_ratio": iteration / floor["floor_s"],
        "samples_per_iteration": b,
        "rollout_samples_per_s": b / phases["rollout"] if phases["rollout"] else None,
        "peak_memory_mb": peak_mb,
        "phases_memory": memory,
        "memory_method": mem.method,
        "model_tflop_per_iteration": floor["flops"] / 1e12,
        "achieved_tflops": achieved,
        "mfu": achieved / peak if (peak and dev.type == "cuda") else None,
        "passes": floor["passes"],
        # the on-policy check at this precision and these kernels (docs/BENCHMARKS.md)
        "onpolicy_ratio_dev_max": max(
            (r["onpolicy_ratio_dev_max"] for r in rows if "onpolicy_ratio_dev_max" in r),
            default=None,
        ),
    }


def run_bench(
    algorithms: list[str],
    files: list[str],
    base_overrides: list[str],
    iterations: int = 3,
    warmup: int = 1,
    reps: int = 3,
    peak_tflops: float | None = None,
) -> dict:
    """Every algorithm on the same preset and overrides, in this process."""
    results = []
    for alg in algorithms:
        results.append(
            bench_one(
                files, [*base_overrides, f"algorithm={alg}"], iterations, warmup, reps, peak_tflops
            )
        )
    from ddrl.training.components import device_of

    cfg = build_config(files, base_overrides)
    return {
        "preset": cfg.preset,
        "overrides": base_overrides,
        "device": _device_name(torch.device(device_of(cfg))),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "iterations": iterations,
        "warmup": warmup,
        "results": results,
    }


def format_table(report: dict) -> str:
    """The phase table and the summary lines that ``ddrl bench`` prints."""
    res = report["results"]
    shown = [p for p in PHASES if any(r["phases_s"][p] > 0 for r in res)]
    head = f"{'phase (s/iter)':16}" + "".join(f"{r['algorithm']:>12}" for r in res)
    lines = [
        f"ddrl bench: preset {report['preset']}, {report['device']}, torch {report['torch']}, "
        f"{report['threads']} threads, {report['iterations']} iterations after "
        f"{report['warmup']} warm-up",
        head,
    ]
    for p in shown:
        lines.append(f"{p:16}" + "".join(f"{r['phases_s'][p]:>12.4f}" for r in res))
    rows = (
        ("iteration", "iteration_s", "{:>12.3f}"),
        ("model floor", "floor_s", "{:>12.3f}"),
        ("overhead ratio", "overhead_ratio", "{:>12.3f}"),
        ("rollout samp/s", "rollout_samples_per_s", "{:>12.1f}"),
        ("peak mem MiB", "peak_memory_mb", "{:>12.0f}"),
        ("TFLOP/s", "achieved_tflops", "{:>12.4f}"),
    )
    for label, key, fmt in rows:
        lines.append(f"{label:16}" + "".join(fmt.format(r[key] or 0) for r in res))
    mfu = [r["mfu"] for r in res]
    lines.append(
        f"{'MFU':16}" + "".join(f"{m:>12.1%}" if m is not None else f"{'n/a':>12}" for m in mfu)
    )
    base = res[0]["iteration_s"]
    lines.append(
        f"{'vs ' + res[0]['algorithm']:16}"
        + "".join(f"{r['iteration_s'] / base:>12.2f}" for r in res)
    )
    lines.append(
        f"memory by phase, MiB: peak / + over the phase's start ({res[0]['memory_method']})"
    )
    for p in shown:
        cells = (r["phases_memory"][p] for r in res)
        lines.append(
            f"{p:16}" + "".join(f"{c['peak_mb']:>7.0f}/{c['increase_mb']:<+4.0f}" for c in cells)
        )
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=1))

"""The experiments: `ddrl demo`, `ddrl compare`, `ddrl long` and `ddrl bench`."""

from __future__ import annotations

import os
from pathlib import Path

from ddrl.errors import DDRLError
from ddrl.experiments.bench import QUICK, format_table, run_bench, write_json
from ddrl.experiments.compare import run_compare
from ddrl.experiments.demo import run_demo
from ddrl.experiments.long_run import run_long


def cmd_bench(args) -> None:
    """Time each phase of an iteration against the backbone's own compute."""
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if not algorithms:
        raise DDRLError(f"--algorithms {args.algorithms!r} names none; e.g. ddrl,flow_grpo")
    preset = [f"preset={args.preset}"] if args.preset else []
    overrides = [*preset, *(QUICK if args.quick else []), *args.overrides]
    iterations, warmup = (1, 1) if args.quick else (args.iterations, args.warmup)
    from ddrl.config import build_config
    from ddrl.dist.group import process_group
    from ddrl.training.components import device_of

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DDRLError(
            "ddrl bench times one process; under torchrun use --nproc-per-node 1 (FSDP2 on one "
            "GPU: parallel.strategy=fsdp)"
        )
    with process_group(device_of(build_config(args.config, overrides))):  # FSDP2 on one rank
        report = run_bench(
            algorithms, args.config, overrides, iterations, warmup, args.reps, args.peak_tflops
        )
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"json: {args.json}")


def cmd_demo(args) -> None:
    run_demo(Path(args.out), quick=args.quick, overwrite=args.overwrite, overrides=args.overrides)


def cmd_compare(args) -> None:
    run_compare(
        Path(args.out),
        quick=args.quick,
        rewards=_csv(args.rewards, "--rewards"),
        overwrite=args.overwrite,
        overrides=args.overrides,
        algorithms=_csv(args.algorithms, "--algorithms") if args.algorithms else None,
    )


def cmd_long(args) -> None:
    run_long(
        Path(args.out),
        iterations=args.iterations,
        seeds=tuple(int(x) for x in _csv(args.seeds, "--seeds")),
        rewards=tuple(_csv(args.rewards, "--rewards")),
        eval_every=args.eval_every,
        quick=args.quick,
        overwrite=args.overwrite,
        overrides=args.overrides,
    )


def _csv(text: str, flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise DDRLError(f"{flag} {text!r}: give a comma-separated list")
    return items

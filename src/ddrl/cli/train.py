"""``ddrl train``: the run's config from the command line or its own folder, resume, data
parallel under torchrun, SIGTERM handling and the closing summary. The config and the run
folder are checked before torch and the model code are imported (``_train``)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

from ddrl.cli.args import resolve_args
from ddrl.config import load_config, to_dict
from ddrl.config.resolve import flatten
from ddrl.errors import DDRLError
from ddrl.training.runlog import prepare_run_dir, read_jsonl


@contextlib.contextmanager
def sigterm_requested():
    """While inside, SIGTERM (what schedulers send before preemption) only sets the yielded
    event, so training can finish and checkpoint the iteration in progress."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals: main thread only
        yield event
        return
    old = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, old)


def _num(v) -> str:
    return "nan" if v is None else f"{v:.4g}"  # None: a non-finite value logged as null


def train_summary(run: Path, row: dict) -> str:
    """A few lines for a person: final reward, last gold accuracy, where the outputs are."""
    lines = [f"trained {run} to iteration {row.get('iteration', 0)}"]
    if row:
        lines.append(
            f"reward mean (last iteration): {_num(row['reward_mean'])} "
            f"(std {_num(row['reward_std'])})"
        )
    evals = [r for r in read_jsonl(run / "eval.jsonl") if "gold_accuracy" in r]
    if evals:
        lines.append(
            f"gold accuracy (last evaluation, iteration {evals[-1]['iteration']}): "
            f"{_num(evals[-1]['gold_accuracy'])}"
        )
    lines += [f"model:   {run / 'final'}", f"metrics: {run / 'metrics.jsonl'}"]
    if (run / "samples_final.png").is_file():
        lines.append(f"samples: {run / 'samples_final.png'}")
    return "\n".join(lines)


def cmd_train(args) -> None:
    """Under ``torchrun`` every rank runs this (data parallel, ``ddrl.dist.group``): each reads
    the same config; rank 0 builds the components first (it may fill the cache) and alone
    writes the run folder."""
    out = Path(args.out)
    cfg = _train_config(args, out)
    _train(cfg, args, out)


def _train_config(args, out: Path):
    """The run's config, after checking the folder (every rank checks, none writes yet).
    ``--resume auto`` on a folder with no run yet starts it: one command line serves the first
    launch and every restart after a preemption."""
    if args.resume and "=" in args.resume:  # `--resume key=value`: an override, not a name
        args.overrides, args.resume = [args.resume, *args.overrides], "auto"
    if args.resume:
        if args.overwrite:
            raise DDRLError(
                "--resume continues the run in --out and --overwrite moves it aside; pick one"
            )
        empty = not out.exists() or (out.is_dir() and not any(out.iterdir()))
        if args.resume == "auto" and empty:
            print(f"ddrl: no run in {out} yet; starting it", file=sys.stderr)
            args.resume = None
        else:
            prepare_run_dir(out, resume=True, overwrite=False)  # only checks the folder
            return _resume_config(args, out)
    cfg = resolve_args(args)
    prepare_run_dir(out, resume=False, overwrite=args.overwrite, check_only=True)
    return cfg


MAY_CHANGE = ("train.iterations", "parallel.")  # the run's length, and its layout over ranks


def _resume_config(args, out: Path):
    """The run's own config.json; only train.iterations and parallel.* (how the same run is
    laid out over ranks) may change. A --config, --preset or other override must resolve to
    what the run was started with (a restart script repeats the first command), else a
    one-line error naming the first difference."""
    changes = [o for o in args.overrides if o.split("=", 1)[0].strip().startswith(MAY_CHANGE)]
    others = [o for o in args.overrides if o not in changes]
    saved = load_config(out / "config.json", changes, MAY_CHANGE, "--resume")
    if args.config or args.preset or others:
        given = flatten(to_dict(resolve_args(args)))
        had = flatten(to_dict(saved))
        diff = [k for k in sorted(given) if not k.startswith(MAY_CHANGE) and given[k] != had.get(k)]
        if diff:
            k = diff[0]
            raise DDRLError(
                f"--resume may only change train.iterations and parallel.*; {out} has "
                f"{k}={had.get(k)!r}, the command line gives {k}={given[k]!r}"
            )
    return saved


def _train(cfg, args, out: Path) -> None:
    """Every rank: build the components (rank 0 first: it may fill the cache), create the run
    folder (rank 0; only once they are built), train, print the summary (rank 0)."""
    # Imported here: every check above answers before torch and the families load.
    from ddrl.dist.checkpoint import find_checkpoint
    from ddrl.dist.group import barrier, batch_slice, is_main, main_first, process_group
    from ddrl.training.components import build_components, device_of
    from ddrl.training.loop import train

    with process_group(device_of(cfg)):  # device_of: e.g. no CUDA, before an old run moves
        batch_slice(cfg.train.prompts_per_iter * cfg.train.group_size)  # splits over the ranks?
        # Base, data and reward (a plugin's kind of output) are built, or fail, before the run
        # folder is created or an old one is moved aside.
        with main_first():
            c = build_components(cfg)
        if not args.resume and is_main():
            prepare_run_dir(out, resume=False, overwrite=args.overwrite)
        barrier()
        resume = False
        if args.resume:
            resume = (
                True if args.resume == "auto" else find_checkpoint(out, args.resume, "--resume")
            )
        with sigterm_requested() as stop:
            row = train(cfg, out, resume=resume, stop=stop, components=c)
        if is_main() and (row or not args.resume):  # a resume with nothing to do has said so
            print(train_summary(out, row))

"""``ddrl train``: the run's config from the command line or its own folder, resume, data
parallel under torchrun, SIGTERM handling and the closing summary. The config and the run
folder are checked before torch and the model code are imported (``_train``)."""

from __future__ import annotations

import contextlib
import copy
import shutil
import signal
import threading
from pathlib import Path

from ddrl.cli.args import resolve_args, say
from ddrl.config import load_config, set_key, to_dict
from ddrl.config.resolve import flatten, parse_overrides, read_file
from ddrl.data.published import require_data
from ddrl.errors import DDRLError
from ddrl.training.runlog import LOCK_FILE, RunLock, has_records, prepare_run_dir, read_jsonl


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
    cfg.train.require_trackers()  # before the models load: a missing wandb is said at once
    require_data(cfg.data)  # every data file there, before torch and the model load
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
        empty = not out.exists() or (
            out.is_dir() and not [p for p in out.iterdir() if p.name != LOCK_FILE]
        )
        if args.resume == "auto" and empty:
            say(f"ddrl: no run in {out} yet; starting it")
            args.resume = None
        else:
            prepare_run_dir(out, resume=True, overwrite=False)  # only checks the folder
            return _resume_config(args, out)
    cfg = resolve_args(args)
    prepare_run_dir(out, resume=False, overwrite=args.overwrite, check_only=True)
    return cfg


# The run's length, its layout over ranks, and what only changes what is shown.
MAY_CHANGE = (
    "train.iterations",
    "parallel.",
    "train.progress",
    "train.tensorboard",
    "train.wandb",
    "watch.",
)


def _resume_config(args, out: Path):
    """The run's own config.json is the base; only train.iterations, parallel.*, the display
    keys (train.progress, train.tensorboard, train.wandb*) and the watch's rules (watch.*: they
    act on the run, never change its numbers) may change. Every other key the user typed (an
    override, a key of a --config file, --preset) must agree with the run (a restart script
    repeats the first command), else a one-line error naming that key."""
    typed: dict = {}
    for f in args.config:
        typed.update(flatten(read_file(f)))
    if args.preset:
        typed["preset"] = args.preset
    typed.update(parse_overrides(list(args.overrides)))
    changes = [f"{k}={v}" for k, v in typed.items() if k.startswith(MAY_CHANGE)]
    saved = load_config(out / "config.json", changes, MAY_CHANGE, "--resume")
    had = flatten(to_dict(saved))
    for key, raw in typed.items():
        if key.startswith(MAY_CHANGE):
            continue
        probe = copy.deepcopy(saved)
        set_key(probe, key, raw)
        given = flatten(to_dict(probe))
        if given != had:
            k = next((k for k in (key, *sorted(given)) if given.get(k) != had.get(k)), key)
            raise DDRLError(
                f"--resume may only change {', '.join(MAY_CHANGE).replace('.,', '.*,')}; {out} "
                f"has {k}={had.get(k)!r}, the command line gives {k}={given.get(k)!r}"
            )
    return saved


def _train(cfg, args, out: Path) -> None:
    """Every rank: check the layout, take the run's lock (resuming: at once), build the
    components (rank 0 first: it may fill the cache), create the run folder (rank 0, once they
    are built) and take its lock, train, print the summary (rank 0). A run folder this command
    created is removed again when the run fails before it records anything."""
    # Imported here: every check above answers before torch and the families load.
    from ddrl.dist.checkpoint import find_checkpoint
    from ddrl.dist.group import barrier, batch_slice, is_main, main_first, on_main, process_group
    from ddrl.dist.parallel import resolve_strategy
    from ddrl.training.components import build_components, device_of
    from ddrl.training.loop import train

    with process_group(device_of(cfg)):  # device_of: e.g. no CUDA, before an old run moves
        resolve_strategy(cfg.parallel, device_of(cfg))  # e.g. fsdp outside torchrun
        batch_slice(cfg.train.prompts_per_iter * cfg.train.group_size)  # splits over the ranks?
        lock = on_main(RunLock(out).acquire) if args.resume else None  # one writer, at once
        try:
            # Base, data and reward (a plugin's kind of output, a reward service's health) are
            # built, or fail, before the run folder is created or an old one is moved aside.
            with main_first():
                c = build_components(cfg)
            if not args.resume:
                lock = on_main(lambda: _create(out, args.overwrite))
            barrier()
            resume = args.resume == "auto" or (
                bool(args.resume) and find_checkpoint(out, args.resume, "--resume")
            )
            try:
                with sigterm_requested() as stop:
                    row = train(cfg, out, resume=resume, stop=stop, components=c)
            except DDRLError:
                if not args.resume and is_main() and not has_records(out):
                    shutil.rmtree(out, ignore_errors=True)  # ours, and nothing recorded in it
                raise
        finally:
            if lock is not None:
                lock.release()
        if is_main() and (row or not args.resume):  # a resume with nothing to do has said so
            print(train_summary(out, row))


def _create(out: Path, overwrite: bool) -> RunLock:
    """Create the run folder (moving an old one aside with ``overwrite``) and lock it; a
    launch that lost the race to another is refused naming the holder."""
    if (out / LOCK_FILE).is_file():
        RunLock(out).acquire().release()  # held: refused, naming the holder
    prepare_run_dir(out, resume=False, overwrite=overwrite)
    return RunLock(out).acquire()

"""The `ddrl` command: pretrain, synth, train, eval, export, score, reward-server, demo, compare,
long, config, presets.

Every subcommand takes config files (``--config``) and ``key=value`` overrides; user errors
print one line (``ddrl: error: ...``) and exit with status 2. On SIGTERM, ``train`` finishes and
checkpoints the iteration in progress and exits with status 143.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ddrl.cli.train import _cfg, cmd_train
from ddrl.errors import DDRLError, Terminated


def cmd_pretrain(args) -> None:
    from ddrl.training.pretrain import ensure_base

    cfg = _cfg(args)
    _, path = ensure_base(cfg.model.name, cfg.data.name, cfg.pretrain, cfg.model.cache_dir)
    print(path)


def cmd_synth(args) -> None:
    from ddrl.data import load_data
    from ddrl.training.components import load_base, synthesize_for, synthetic_path

    extra = [f"data.synthetic_per_prompt={args.per_prompt}"] if args.per_prompt else []
    cfg = _cfg(args, extra)
    if args.out and Path(args.out).is_dir():  # checked before the base is sampled
        raise DDRLError(f"--out {args.out} is a folder; allowed: a .safetensors file path")
    gen, base_path = load_base(cfg)
    data = load_data(cfg.data)
    path = Path(args.out) if args.out else synthetic_path(cfg, base_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pool = synthesize_for(cfg, gen, data, path)
    print(f"wrote {len(pool)} synthetic samples to {path}")


def cmd_bench(args) -> None:
    """Time each phase of an iteration against the backbone's own compute (``ddrl.experiments.bench``)."""
    from ddrl.experiments.bench import QUICK, format_table, run_bench, write_json

    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if not algorithms:
        raise DDRLError(f"--algorithms {args.algorithms!r} names none; e.g. ddrl,flow_grpo")
    preset = [f"preset={args.preset}"] if args.preset else []
    overrides = [*preset, *(QUICK if args.quick else []), *args.overrides]
    iterations, warmup = (1, 1) if args.quick else (args.iterations, args.warmup)
    report = run_bench(
        algorithms, args.config, overrides, iterations, warmup, args.reps, args.peak_tflops
    )
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"json: {args.json}")


def cmd_presets(args) -> None:
    from ddrl.config import preset_descriptions

    items = preset_descriptions().items()
    width = max(len(n) for n, _ in items)
    for name, text in items:
        print(f"{name:<{width}}  {text}")


def cmd_export(args) -> None:
    from ddrl.training.export import export

    out = export(Path(args.run), Path(args.out), merge=args.merge, step=args.step)
    print(f"exported to {out}")


def _reward_from_args(args):
    """(reward config, reward) from --reward/--data and reward.* key=value overrides."""
    from ddrl.config import _set, parse_overrides
    from ddrl.rewards import RewardConfig, RewardContext, build_reward
    from ddrl.training.pretrain import cache_root

    rc = RewardConfig(name=args.reward)
    for key, value in parse_overrides(args.overrides).items():
        if not key.startswith("reward."):
            raise DDRLError(f"ddrl {args.command} takes reward.* settings only; got {key!r}")
        _set(rc, key.removeprefix("reward."), value, "reward.")
    rc.check()
    device = "cpu" if rc.device == "auto" else rc.device
    ctx = RewardContext.from_config(rc, args.data, cache_root(""), device)
    return rc, ctx, build_reward(args.reward, ctx)


def cmd_score(args) -> None:
    from ddrl.rewards.score import read_prompt_args, score_files

    # argparse hands key=value items after the images to them: they are overrides.
    settings = [a for a in args.images if "=" in a and not Path(a).exists()]
    args.overrides = [*settings, *args.overrides]
    rc, _, reward = _reward_from_args(args)
    images = [Path(p) for p in args.images if p not in settings]
    prompts_file = Path(args.prompts) if args.prompts else None
    prompts = read_prompt_args(args.prompt, prompts_file, len(images))
    scores = score_files(reward, images, prompts, batch=rc.batch, name=args.reward)
    if args.json:
        rows = [
            {"image": str(p), "prompt": q, "score": s}
            for p, q, s in zip(images, prompts, scores, strict=True)
        ]
        print(json.dumps(rows, indent=1))
    else:
        for p, s in zip(images, scores, strict=True):
            print(f"{s:.6g}\t{p}")


def cmd_reward_server(args) -> None:
    from ddrl.rewards.remote.server import serve

    _, _, reward = _reward_from_args(args)
    serve(
        reward,
        args.host,
        args.port,
        ready=lambda url: print(f"serving {args.reward} at {url}", flush=True),
        name=args.reward,
    )


def cmd_report(args) -> None:
    from ddrl.experiments.runs_report import report_runs

    print(report_runs([Path(r) for r in args.runs], Path(args.out)))


def cmd_config(args) -> None:
    from ddrl.config import describe

    print(describe(_cfg(args)))


def cmd_eval(args) -> None:
    from ddrl.evaluation.run_eval import evaluate_run

    result = evaluate_run(
        Path(args.run),
        step=args.step,
        overrides=args.overrides,
        out=Path(args.out) if args.out else None,
        preset=args.preset,
        files=args.config,
    )
    from ddrl.training.runlog import finite_or_null

    print(json.dumps(finite_or_null(result), indent=1))


def cmd_demo(args) -> None:
    from ddrl.experiments.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, overwrite=args.overwrite, overrides=args.overrides)


def cmd_compare(args) -> None:
    from ddrl.experiments.compare import run_compare

    run_compare(
        Path(args.out),
        quick=args.quick,
        rewards=_csv(args.rewards, "--rewards"),
        overwrite=args.overwrite,
        overrides=args.overrides,
    )


def cmd_long(args) -> None:
    from ddrl.experiments.long_run import run_long

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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ddrl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _names() -> str:
    """The registered names, for --help (importing the registries loads torch: only then)."""
    from ddrl.config import PRESET_NAMES
    from ddrl.losses import LOSSES
    from ddrl.models import MODELS
    from ddrl.rewards import REWARDS

    rewards = ", ".join(f"{n} ({data})" for n, (data, _) in REWARDS.items())
    return (
        f"algorithms: {', '.join(LOSSES)} or 'module:Class'\n"
        f"rewards:    {rewards} or 'module:factory'\n"
        f"models:     {', '.join(MODELS)} or 'module:Class'\n"
        f"presets:    {', '.join(PRESET_NAMES)}\n"
        "every key, its type, value and meaning: ddrl config [--preset P] [algorithm=...]"
    )


class _Parser(argparse.ArgumentParser):
    def format_help(self) -> str:
        self.epilog = _names()  # computed when help is shown, not on every command
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ddrl",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"ddrl {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_, config: bool = True):
        s = sub.add_parser(name, help=help_, formatter_class=argparse.RawDescriptionHelpFormatter)
        if config:  # only commands that build a config from presets take these
            s.add_argument("--config", action="append", default=[], help="TOML/JSON config file")
            s.add_argument("--preset", default="", help="a preset (`ddrl presets`)")
        s.set_defaults(fn=fn, config=[], preset="")
        return s

    add("config", cmd_config, "print every config key: type, value (and default), meaning")
    add("presets", cmd_presets, "list every preset with a one-line description", config=False)
    s = add("score", cmd_score, "score image files with a reward (one line each)", False)
    s.add_argument("--reward", required=True, help="reward name (or module:factory)")
    s.add_argument("--prompt", default=None, help="one prompt for every image")
    s.add_argument("--prompts", default=None, help="a file with one prompt per image, in order")
    s.add_argument("--data", default="files", help="the data set the reward belongs to")
    s.add_argument("--json", action="store_true", help="JSON rows instead of lines")
    s.add_argument("images", nargs="+", help="image files")
    s = add("report", cmd_report, "the comparison report (report.html) of run folders", False)
    s.add_argument("runs", nargs="+", help="run folders trained with eval.every > 0")
    s.add_argument("--out", required=True, help="report folder")
    s = add(
        "reward-server", cmd_reward_server, "serve a reward over HTTP (reward.name=remote)", False
    )
    s.add_argument("--reward", required=True, help="reward name (or module:factory)")
    s.add_argument("--data", default="files", help="the data set the reward belongs to")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    s.add_argument("--port", type=int, default=0, help="port (0 = a free one, printed)")
    s = add("export", cmd_export, "write a run's trained weights for the plain pipeline", False)
    s.add_argument("run", help="run folder (RUN/final, or --step) or a saved model folder")
    s.add_argument("--out", required=True, help="new output folder")
    s.add_argument("--merge", action="store_true", help="a whole pipeline with LoRA fused in")
    s.add_argument("--step", type=int, default=None, help="checkpoint iteration")
    s = add("pretrain", cmd_pretrain, "train (or reuse) the preset's base model; prints its path")
    s = add("synth", cmd_synth, "generate the synthetic data set from the base (resumable)")
    s.add_argument(
        "--per-prompt", type=int, default=0, help="samples per prompt (data.synthetic_per_prompt)"
    )
    s.add_argument("--out", default="", help="output .safetensors (default: in the cache)")
    s = add("train", cmd_train, "train one run")
    s.add_argument("--out", required=True, help="run folder")
    s.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|CHECKPOINT",
        help="continue the run in --out from its newest valid checkpoint (auto, the default; "
        "starts the run if --out has none yet) or from the one named (step-000040, or a folder)",
    )
    s.add_argument("--overwrite", action="store_true", help="move an existing --out aside")
    s = add("bench", cmd_bench, "time each phase of an iteration against the model's compute")
    s.add_argument(
        "--algorithms", default="ddrl,flow_grpo,dance_grpo,grpo,sft", help="comma-separated"
    )
    s.add_argument("--iterations", type=int, default=3, help="timed iterations per algorithm")
    s.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    s.add_argument("--reps", type=int, default=3, help="repetitions of each bare-model pass")
    s.add_argument("--quick", action="store_true", help="toy sizes, 1 + 1 iterations (seconds)")
    s.add_argument("--json", default="", help="also write the figures to this JSON file")
    s.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    s = add("eval", cmd_eval, "evaluate a run (latest checkpoint, or --step) into eval.json")
    s.add_argument("run", help="run folder, or a saved model folder")
    s.add_argument("--step", type=int, default=None, help="checkpoint iteration")
    s.add_argument("--out", default="", help="output file (default: RUN/eval.json)")
    for name, fn, h in (
        ("demo", cmd_demo, "pretrain, train DDRL and baselines, evaluate"),
        ("compare", cmd_compare, "the reward-hacking comparison and report"),
    ):
        s = add(name, fn, h, config=False)
        s.add_argument("--out", default=f"runs/{name}", help="output folder")
        s.add_argument("--quick", action="store_true", help="a small, fast version")
        s.add_argument("--overwrite", action="store_true", help="move an existing --out aside")
        if name == "compare":
            s.add_argument(
                "--rewards", default="ink,classifier,toy2d", help="regimes: ink, classifier, toy2d"
            )
    s = add("long", cmd_long, "DDRL vs Flow-GRPO for many iterations, several seeds (slow)", False)
    s.add_argument("--out", default="runs/long", help="output folder")
    s.add_argument("--iterations", type=int, default=200, help="iterations per run")
    s.add_argument("--seeds", default="0,1", help="run seeds (the base model is shared)")
    s.add_argument("--rewards", default="ink,classifier", help="reward regimes")
    s.add_argument("--eval-every", type=int, default=10, help="evaluation interval")
    s.add_argument("--quick", action="store_true", help="tiny batches (a smoke test)")
    s.add_argument("--overwrite", action="store_true", help="move an existing --out aside")
    # Last, so a command's own positionals (eval's RUN) come before the overrides.
    for s in sub.choices.values():
        s.add_argument("overrides", nargs="*", help="key=value, e.g. train.iterations=50")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse takes positionals in one block, so `key=value` items after an option (e.g.
    # `train --out DIR a=1`) come back as extras; they are overrides too, kept in order.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *extra]
    commands_with_out = ("train", "demo", "compare", "long", "export", "report")
    if args.command in commands_with_out and not args.out.strip():
        # Path("") is the current folder: --overwrite would move it aside.
        print(f"ddrl: error: --out {args.out!r} is empty; allowed: a folder path", file=sys.stderr)
        return 2
    import torch

    if argv is None:  # the command line (not a caller's in-process main([...]))
        from ddrl.dist.threads import default_threads

        threads, why = default_threads()
        if threads != torch.get_num_threads():
            print(f"ddrl: {threads} CPU thread(s) ({why})", file=sys.stderr)
        torch.set_num_threads(threads)
    elif os.environ.get("DDRL_THREADS"):
        torch.set_num_threads(int(os.environ["DDRL_THREADS"]))
    t0 = time.time()
    try:
        args.fn(args)
    except DDRLError as e:
        print(f"ddrl: error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(
            f"ddrl: terminated (SIGTERM) after checkpoint {e.checkpoint}; continue with --resume",
            file=sys.stderr,
        )
        return 143  # 128 + SIGTERM, what a killed process reports
    except KeyboardInterrupt:
        print(
            "ddrl: interrupted; the last checkpoint is intact (resume with --resume)",
            file=sys.stderr,
        )
        return 130
    print(f"ddrl {args.command}: done in {time.time() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

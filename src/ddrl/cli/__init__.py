"""The `ddrl` command: pretrain, synth, train, doctor, eval, export, sample, score, reward-server,
report, vote, demo, compare, long, bench, plan, config, presets, data.

Every subcommand takes config files (``--config``) and ``key=value`` overrides; user errors
print one line (``ddrl: error: ...``) and exit with status 2. On SIGTERM, ``train`` finishes and
checkpoints the iteration in progress and exits with status 143. Each command lives in the
module of its group (``ddrl.cli.<group>:cmd_<name>``), imported only when it runs; the command
modules import their heavy parts (torch, diffusers, the families) only after the arguments and
the config are checked, so ``--help``, ``presets``, ``config`` and every mistake answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import import_module

from ddrl.cli.args import say
from ddrl.config import PRESET_NAMES
from ddrl.errors import DDRLError, Terminated, WatchStopped
from ddrl.losses import ALGORITHMS, OBJECTIVES, REGULARISERS
from ddrl.models import MODELS
from ddrl.rewards import REWARDS

LIGHT = ("config", "presets", "data")  # commands that never load torch


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ddrl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _names() -> str:
    """The registered names, for --help (the registries hold names and "module:attr" strings)."""
    rewards = ", ".join(f"{n} ({data})" for n, (data, _) in REWARDS.items())
    return (
        f"algorithms: {', '.join(ALGORITHMS)} or 'module:Class'\n"
        f"  = objective ({', '.join(OBJECTIVES)}) + regularisers ({', '.join(REGULARISERS)}):"
        " objective=... regularisers=a,b\n"
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

    def add(name: str, group: str, help_: str, config: bool = True):
        """Subcommand ``name``, run by ``ddrl.cli.<group>:cmd_<name>`` (imported when it runs)."""
        fn = f"ddrl.cli.{group}:cmd_{name.replace('-', '_')}"
        s = sub.add_parser(name, help=help_, formatter_class=argparse.RawDescriptionHelpFormatter)
        if config:  # only commands that build a config from presets take these
            s.add_argument("--config", action="append", default=[], help="TOML/JSON config file")
            s.add_argument("--preset", default="", help="a preset (`ddrl presets`)")
        s.set_defaults(fn=fn, config=[], preset="")
        return s

    add("config", "config", "print every config key: type, value (and default), meaning")
    add("presets", "config", "list every preset with a one-line description", config=False)
    s = add("data", "data_cmd", "published prompt sets: ddrl data list | get NAME...", False)
    s.add_argument("action", choices=("get", "list"), help="get: download; list: show them")
    s.add_argument("names", nargs="*", help="get: the sets (ddrl data list names them)")
    s.add_argument("--cache", default="", help="cache root (default: $DDRL_CACHE or ~/.cache/ddrl)")
    s = add("score", "rewards", "score image files with a reward (one line each)", False)
    s.add_argument("--reward", required=True, help="reward name (or module:factory)")
    s.add_argument("--prompt", default=None, help="one prompt for every image")
    s.add_argument("--prompts", default=None, help="a file with one prompt per image, in order")
    s.add_argument("--data", default="files", help="the data set the reward belongs to")
    s.add_argument("--json", action="store_true", help="JSON rows instead of lines")
    s.add_argument("images", nargs="+", help="image files")
    s = add("report", "evaluate", "the comparison report (report.html) of run folders", False)
    s.add_argument("runs", nargs="+", help="run folders trained with eval.every > 0")
    s.add_argument("--out", required=True, help="report folder")
    s.add_argument("--votes", default="", help="a votes folder (ddrl vote): its summary too")
    s = add("vote", "vote", "blind human preference: serve RUN_A RUN_B... | summary VOTES", False)
    s.add_argument("action", choices=("serve", "summary"), help="serve: rate; summary: results")
    s.add_argument("paths", nargs="*", help="serve: runs or model folders; summary: VOTES")
    s.add_argument("--out", default="", help="serve: votes folder (new, or one to continue)")
    s.add_argument("--host", default="127.0.0.1", help="serve: interface to listen on")
    s.add_argument("--port", type=int, default=8765, help="serve: port (0 = a free one)")
    s.add_argument("--prompts", default=None, help="serve: prompt file (default: eval prompts)")
    s.add_argument("--n-per-prompt", type=int, default=None, help="serve: samples (default 2)")
    s.add_argument("--seed", type=int, default=None, help="serve: noise and plan seed (0)")
    s.add_argument("--criteria", default=None, help='serve: comma-separated ("overall")')
    s.add_argument("--pairs", type=int, default=None, help="serve: questions (default: all)")
    s.add_argument("--raters-per-question", type=int, default=None, help="serve: (default 2)")
    s.add_argument("--json", action="store_true", help="summary: JSON instead of tables")
    s.add_argument("--min-ms", type=float, default=1500, help="summary: flag faster raters")
    s = add("reward-server", "rewards", "serve a reward over HTTP (reward.name=remote)", False)
    s.add_argument("--reward", required=True, help="reward name (or module:factory)")
    s.add_argument("--data", default="files", help="the data set the reward belongs to")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    s.add_argument("--port", type=int, default=0, help="port (0 = a free one, printed)")
    s.add_argument(
        "--max-batch", type=int, default=64, help="most images merged into one reward call"
    )
    s.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch waits for more requests after its first (milliseconds)",
    )
    s.add_argument(
        "--devices",
        default="",
        help="one reward replica per device: cpu,cpu or cuda:0,cuda:1 (default: reward.device)",
    )
    s = add("export", "export", "write a run's trained weights for the plain pipeline", False)
    s.add_argument("run", help="run folder (RUN/final, or --step) or a saved model folder")
    s.add_argument("--out", required=True, help="new output folder")
    s.add_argument("--merge", action="store_true", help="a whole pipeline with LoRA fused in")
    s.add_argument("--step", type=int, default=None, help="checkpoint iteration")
    s = add("sample", "sample", "render N samples per prompt from a run or a model folder", False)
    s.add_argument("run", help="run folder (RUN/final, or --step) or a saved model folder")
    s.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    s.add_argument(
        "--image",
        action="append",
        default=[],
        help="edit / image-to-video models: the condition image of each --prompt, in order",
    )
    s.add_argument("--n", type=int, default=1, help="samples per prompt")
    s.add_argument("--seed", type=int, default=0, help="noise seed (the same seed, the same files)")
    s.add_argument("--out", required=True, help="new (or empty) output folder")
    s.add_argument("--step", type=int, default=None, help="checkpoint iteration")
    s = add("pretrain", "models", "train (or reuse) the preset's base model; prints its path")
    s = add("synth", "models", "generate the synthetic data set from the base (resumable)")
    s.add_argument(
        "--per-prompt", type=int, default=0, help="samples per prompt (data.synthetic_per_prompt)"
    )
    s.add_argument("--out", default="", help="output .safetensors (default: in the cache)")
    s = add("train", "train", "train one run")
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
    add("doctor", "doctor", "run a config's preflight checks (ratio, SDE, CFG, reward, data)")
    s = add("bench", "experiments", "time each phase of an iteration against the model's compute")
    s.add_argument(
        "--algorithms", default="ddrl,flow_grpo,dance_grpo,grpo,sft,nft,awm", help="comma-separated"
    )
    s.add_argument("--iterations", type=int, default=3, help="timed iterations per algorithm")
    s.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    s.add_argument("--reps", type=int, default=3, help="repetitions of each bare-model pass")
    s.add_argument("--quick", action="store_true", help="toy sizes, 1 + 1 iterations (seconds)")
    s.add_argument("--json", default="", help="also write the figures to this JSON file")
    s.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    s = add("plan", "plan", "per-GPU memory by part and FLOPs by phase, from the config alone")
    s.add_argument("--gpus", default="1", help="GPUs the run uses (FSDP divides the weights)")
    s.add_argument("--gpu-memory", default="80", help="GiB per GPU (an 80 GB H100: 79.6)")
    s.add_argument("--json", action="store_true", help="JSON instead of the table")
    s = add("eval", "evaluate", "evaluate a run (latest checkpoint, or --step) into eval.json")
    s.add_argument("run", help="run folder, or a saved model folder")
    s.add_argument("--step", type=int, default=None, help="checkpoint iteration")
    s.add_argument("--out", default="", help="output file (default: RUN/eval.json)")
    for name, fn, h in (
        ("demo", "experiments", "pretrain, train DDRL and baselines, evaluate"),
        ("compare", "experiments", "the reward-hacking comparison and report"),
    ):
        s = add(name, fn, h, config=False)
        s.add_argument("--out", default=f"runs/{name}", help="output folder")
        s.add_argument("--quick", action="store_true", help="a small, fast version")
        s.add_argument("--overwrite", action="store_true", help="move an existing --out aside")
        if name == "compare":
            s.add_argument(
                "--rewards", default="ink,classifier,toy2d", help="regimes: ink, classifier, toy2d"
            )
            s.add_argument(
                "--algorithms", default="", help="only these algorithms' arms (default: every arm)"
            )
    s = add("long", "experiments", "DDRL vs Flow-GRPO for many iterations and seeds (slow)", False)
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


def _set_threads(from_command_line: bool) -> None:
    """torch's CPU threads: the cores shared among running ddrl processes (``ddrl.dist.threads``)
    for the command line; ``DDRL_THREADS`` when set, for in-process calls."""
    import torch

    from ddrl.dist.threads import default_threads

    if from_command_line:
        threads, why = default_threads()
        if threads != torch.get_num_threads():
            say(f"ddrl: {threads} CPU thread(s) ({why})")
        torch.set_num_threads(threads)
    elif os.environ.get("DDRL_THREADS"):
        torch.set_num_threads(int(os.environ["DDRL_THREADS"]))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse takes positionals in one block, so `key=value` items after an option (e.g.
    # `train --out DIR a=1`) come back as extras; they are overrides too, kept in order.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *extra]
    commands_with_out = ("train", "demo", "compare", "long", "export", "report", "sample")
    if args.command in commands_with_out and not args.out.strip():
        # Path("") is the current folder: --overwrite would move it aside.
        print(f"ddrl: error: --out {args.out!r} is empty; allowed: a folder path", file=sys.stderr)
        return 2
    if args.command not in LIGHT:
        _set_threads(from_command_line=argv is None)
    t0 = time.time()
    try:
        module, name = args.fn.split(":")
        getattr(import_module(module), name)(args)
    except DDRLError as e:
        say(f"ddrl: error: {e}")
        return 2
    except WatchStopped as e:
        say(
            f"ddrl: stopped by the watch: {e.reason}; checkpoint {e.checkpoint} (continue with "
            "--resume, e.g. with other watch.rules)"
        )
        return 3
    except Terminated as e:
        say(f"ddrl: terminated (SIGTERM) after checkpoint {e.checkpoint}; continue with --resume")
        return 143  # 128 + SIGTERM, what a killed process reports
    except KeyboardInterrupt:
        say("ddrl: interrupted; the last checkpoint is intact (resume with --resume)")
        return 130
    say(f"ddrl {args.command}: done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

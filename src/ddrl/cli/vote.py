"""`ddrl vote`: double-blind human preference between runs (docs/VOTE.md).

``ddrl vote serve RUN_A RUN_B [RUN ...] --out VOTES`` renders (or reuses) each run's samples
into VOTES and serves the rating page until interrupted; ``ddrl vote serve --out VOTES``
continues a folder with its own runs and settings. ``ddrl vote summary VOTES`` prints the win
rates, Bradley–Terry scores, inter-rater agreement and rater flags (``--json``: the dict).
"""

from __future__ import annotations

import json
from pathlib import Path

from ddrl.errors import DDRLError, check_range

SERVE_ONLY = ("prompts", "n_per_prompt", "seed", "criteria", "pairs", "raters_per_question")


def _check(args) -> None:
    if args.overrides:
        raise DDRLError(f"ddrl vote takes no key=value overrides; got {' '.join(args.overrides)}")
    if args.action == "summary":
        given = [k for k in SERVE_ONLY if getattr(args, k) is not None]
        if len(args.paths) != 1 or given or args.out:
            extra = f" (and --{given[0].replace('_', '-')})" if given else ""
            raise DDRLError(
                f"ddrl vote summary takes one votes folder, --json and --min-ms; got "
                f"{len(args.paths)} folders{extra}{' and --out' if args.out else ''}"
            )
        check_range("--min-ms", args.min_ms, 0.0)
        return
    if not args.out.strip():
        raise DDRLError("ddrl vote serve needs --out VOTES (a new folder, or one to continue)")
    check_range("--port", args.port, 0, 65535)


def cmd_vote(args) -> None:
    _check(args)
    if args.action == "summary":
        from ddrl.vote.summary import summarise, summary_text

        s = summarise(Path(args.paths[0]), args.min_ms)  # a one-line refusal for no folder
        print(json.dumps(s, indent=1) if args.json else summary_text(s), end="\n" * args.json)
        return
    from ddrl.vote.folder import Settings
    from ddrl.vote.prepare import prepare_votes
    from ddrl.vote.server import VoteServer

    criteria = None if args.criteria is None else [c.strip() for c in args.criteria.split(",")]
    given = Settings(
        prompts=None,
        n_per_prompt=args.n_per_prompt,
        seed=args.seed,
        criteria=criteria,
        pairs=args.pairs,
        raters_per_question=args.raters_per_question,
    )
    if args.prompts is not None:
        from ddrl.vote.media import file_prompts

        given.prompts = file_prompts(args.prompts)
    manifest = prepare_votes([Path(p) for p in args.paths], Path(args.out), given)
    server = VoteServer(manifest, args.host, args.port)
    port = server.url.rsplit(":", 1)[1]

    def ready(url: str) -> None:
        print(
            f"ddrl vote: serving {len(manifest.questions)} questions at {url} (Ctrl-C stops; "
            f"votes go to {manifest.root / 'votes.jsonl'}). From another machine: ssh -L "
            f"{port}:localhost:{port} USER@THIS-HOST, then open http://localhost:{port}",
            flush=True,
        )

    try:
        server.serve_forever(ready)
    except KeyboardInterrupt:  # Ctrl-C is how it stops: uvicorn re-raises it once shut down
        pass
    finally:
        server.shutdown()

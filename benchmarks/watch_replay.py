"""Replay the watch over finished runs: what the rules would have done, from each run's own
``eval.jsonl`` (the watch is a pure function of those rows, ``ddrl.watch.watch``).

    python benchmarks/watch_replay.py RUN [RUN ...] [--rules 'a>1:warn,b<2:stop'] [--write]

Prints, per run, every firing and whether it equals the run's recorded ``watch.jsonl``;
``--write`` replaces ``watch.jsonl`` with the replayed firings (for runs trained before a rule or
signal changed; say so wherever their figures are used). Then the lead-time table of
``ddrl.experiments.hacking.watch_analysis`` over the runs (gold drop: below 0.9 x the base).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ddrl.config import load_config
from ddrl.experiments.hacking import watch_analysis, watch_summary
from ddrl.experiments.runs_report import runs_metrics
from ddrl.training.runlog import read_jsonl
from ddrl.watch import Watch, WatchConfig


def replay(run: Path, rules: list[str] | None) -> list[dict]:
    cfg = load_config(run / "config.json").watch
    if rules is not None:
        cfg = WatchConfig(rules=rules, best_metric=cfg.best_metric, best_mode=cfg.best_mode)
    watch, fired = Watch(cfg, log=lambda m: None), []
    for row in read_jsonl(run / "eval.jsonl"):
        fired += watch.observe(row["iteration"], dict(row)).firings
    return fired


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--rules", default=None, help="comma-separated rules (default: each run's)")
    p.add_argument("--write", action="store_true", help="write the replay to watch.jsonl")
    args = p.parse_args()
    rules = [r for r in args.rules.split(",") if r] if args.rules is not None else None
    metrics, _ = runs_metrics(args.runs)  # curves, base and recorded firings, as ddrl report
    for run, arm in zip(args.runs, metrics["arms"], strict=True):
        fired, recorded = replay(run, rules), arm["watch"]
        same = "equal to" if fired == recorded else "differs from"
        print(f"{run}: {len(fired)} firing(s), {same} its watch.jsonl ({len(recorded)})")
        for f in fired:
            print(f"  iteration {f['iteration']:3d}  {f['reason']}  [{f['rule']}]")
        if args.write:
            (run / "watch.jsonl").write_text("".join(json.dumps(f) + "\n" for f in fired))
        arm["watch"] = fired
    rows = watch_analysis(metrics)
    print()
    print(f"{'run':32} {'first firing':>12} {'gold fell':>9} {'lead':>5}  outcome")
    for r in rows:
        cells = [r["first_firing"], r["first_gold_drop_iteration"], r["lead"]]
        cells = ["-" if v is None else str(v) for v in cells]
        print(f"{r['label']:32} {cells[0]:>12} {cells[1]:>9} {cells[2]:>5}  {r['outcome']}")
    print(watch_summary(rows))
    print()
    print("per rule: hacked arms it fired on (lead = gold drop − firing), false alarms")
    for rule in dict.fromkeys(k for r in rows for k in r["fired"]):
        caught = [
            f"{r['label']} {r['first_gold_drop_iteration'] - r['fired'][rule]:+d}"
            if r["first_gold_drop_iteration"] is not None
            else r["label"]
            for r in rows
            if r["hacked"] and rule in r["fired"]
        ]
        hacked = sum(bool(r["hacked"]) for r in rows)
        alarms = [r["label"] for r in rows if r["hacked"] is False and rule in r["fired"]]
        clean = sum(r["hacked"] is False for r in rows)
        print(
            f"  {rule}: {len(caught)}/{hacked} hacked ({', '.join(caught) or '-'}); "
            f"{len(alarms)}/{clean} false alarms ({', '.join(alarms) or '-'})"
        )


if __name__ == "__main__":
    main()

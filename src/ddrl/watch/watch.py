"""The watch: the run's rules applied to each evaluation, in order, with their streaks.

A pure function of the evaluation rows, so a resumed run rebuilds its state by replaying its
own ``eval.jsonl`` up to the checkpoint and then acts exactly as the uninterrupted run would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ddrl.watch.config import Rule, WatchConfig
from ddrl.watch.signals import NAMED, signals


@dataclass
class Verdict:
    """What one evaluation asks of the loop."""

    firings: list[dict] = field(default_factory=list)  # rows for watch.jsonl
    stop: str = ""  # the reason, when a stop rule fired
    best: bool = False  # a new best/ (keep_best): save the evaluated weights


class Watch:
    """Rules over evaluations: ``observe(it, metrics)`` → Verdict. ``history``: the run's
    evaluation rows already logged (a resume), replayed without acting. The evaluation at
    iteration 0 is the base the signals compare with; rules count from the next one on. A
    rule fires when its streak of holding evaluations reaches its patience, once per streak
    (a run resumed after a stop goes on until the rule stops holding and holds again)."""

    def __init__(self, cfg: WatchConfig, history: list[dict] = (), log=print):
        self.rules: list[Rule] = cfg.parsed()
        self.metric, self.sign = cfg.best_metric, 1.0 if cfg.best_mode == "max" else -1.0
        self.keeps_best = any(r.action == "keep_best" for r in self.rules)
        self.log, self.base, self.best = log, None, -math.inf
        self.streak = [0] * len(self.rules)
        self.told: set[str] = set()
        for row in history:
            self._judge(row.get("iteration", 0), dict(row), quiet=True)

    def observe(self, it: int, metrics: dict) -> Verdict:
        """Judge the evaluation after ``it`` iterations; adds the named signals it measured to
        ``metrics`` (so eval.jsonl holds them) and returns the firings and what to do."""
        return self._judge(it, metrics, quiet=False)

    def _judge(self, it: int, metrics: dict, quiet: bool) -> Verdict:
        if self.base is None or it == 0:
            self.base = dict(metrics)
        sig = signals(metrics, self.base)
        metrics.update({k: v for k, v in sig.items() if k in NAMED})
        verdict, clean = Verdict(), True
        for k, rule in enumerate(self.rules):
            value = sig.get(rule.signal)
            if it == 0:  # the base: a best/ candidate, but nothing to warn of or stop yet
                clean = clean and not (
                    value is not None and rule.action == "keep_best" and rule.holds(value)
                )
                continue
            if value is None:
                if not quiet and rule.signal not in self.told:
                    self.told.add(rule.signal)
                    needs = NAMED.get(rule.signal, f"the metric {rule.signal}")
                    self.log(
                        f"watch: {rule.signal} is not measured in this run (it needs {needs}); "
                        f"rule {rule.text!r} cannot fire"
                    )
                self.streak[k] = 0
                continue
            holds = rule.holds(value)
            self.streak[k] = self.streak[k] + 1 if holds else 0
            clean = clean and not (holds and rule.action == "keep_best")
            if self.streak[k] != rule.patience:  # fires once per streak
                continue
            row = self._firing(it, rule, value)
            verdict.firings.append(row)
            if rule.action == "stop" and not verdict.stop:
                verdict.stop = row["reason"]
            if not quiet:
                self.log(f"watch: iteration {it}: {row['reason']} [{rule.action}]")
        score = metrics.get(self.metric)
        if self.keeps_best and clean and isinstance(score, (int, float)) and score == score:
            if self.sign * score > self.best:
                self.best, verdict.best = self.sign * score, True
        return verdict

    @staticmethod
    def _firing(it: int, rule: Rule, value: float) -> dict:
        times = f" at {rule.patience} evaluations in a row" if rule.patience > 1 else ""
        return {
            "iteration": it,
            "rule": rule.text,
            "signal": rule.signal,
            "value": value,
            "threshold": rule.threshold,
            "action": rule.action,
            "patience": rule.patience,
            "reason": f"{rule.signal} {value:.4g} {rule.op} {rule.threshold:g}{times}",
        }

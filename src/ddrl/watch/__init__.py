"""Reward hacking watched and acted on: rules over the evaluation's signals (``watch.rules``),
firings recorded in ``<run>/watch.jsonl``, ``stop`` and ``keep_best`` carried out by the loop
(docs/WATCH.md)."""

from ddrl.watch.config import DEFAULT_RULES, Rule, WatchConfig, parse_rule
from ddrl.watch.signals import signals
from ddrl.watch.watch import Verdict, Watch

__all__ = ["DEFAULT_RULES", "Rule", "Verdict", "Watch", "WatchConfig", "parse_rule", "signals"]

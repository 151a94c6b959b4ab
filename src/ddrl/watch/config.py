"""The watch section of a run's config and its rule grammar (torch-free, so a bad rule is a
one-line error before anything loads).

A rule is ``SIGNAL>THRESHOLD:ACTION[:PATIENCE]`` (or ``<``): it holds at an evaluation when the
signal (``ddrl.watch.signals``) compares so with the threshold, and fires when it has held at
``PATIENCE`` evaluations in a row (default 1). Actions: ``warn`` (a log line), ``stop`` (finish
the iteration, checkpoint, exit with code 3 and the reason), ``keep_best`` (evaluations where
it holds are not candidates for ``best/``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from ddrl.errors import DDRLError, check_literals

ACTIONS = ("warn", "stop", "keep_best")
_RULE = re.compile(
    r"^\s*(?P<signal>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>[<>])\s*(?P<threshold>[^:\s]+)\s*"
    r":\s*(?P<action>[a-z_]+)\s*(?::\s*(?P<patience>[^:\s]+)\s*)?$"
)

# On for every preset, warn only (docs/DECISIONS.md "The watch's default rules" has the
# measured reasons for each threshold). A signal a run cannot measure never fires.
DEFAULT_RULES = [
    "heldout_loss_rise>0.1:warn",  # the paper's sign of hacking: +10% held-out loss
    "gold_gap>0.05:warn",  # the proxy rose and the gold score fell, each by > 5%
    "ood_drop>0.05:warn",  # an out-of-domain reward fell by > 5%
    "fd_rise>1.0:warn",  # Fréchet distance to held-out data doubled
    "diversity_drop>0.15:warn",  # within-prompt diversity fell by > 15%
    "saturated_rate>0.05:warn",  # 5% more of the pixels blown out or out of range than the base
]


@dataclass(frozen=True)
class Rule:
    """One parsed rule: fires when ``signal op threshold`` held ``patience`` times in a row."""

    text: str
    signal: str
    op: str
    threshold: float
    action: str
    patience: int

    def holds(self, value: float) -> bool:
        return value > self.threshold if self.op == ">" else value < self.threshold


def parse_rule(text: str) -> Rule:
    """ "heldout_loss_rise>0.1:stop:2" → Rule; DDRLError naming the bad part otherwise."""
    m = _RULE.match(str(text))
    example = "heldout_loss_rise>0.1:stop or diversity_drop>0.2:warn:2"
    if m is None:
        raise DDRLError(
            f"watch rule {text!r} is not SIGNAL>THRESHOLD:ACTION[:PATIENCE] (or <); e.g. {example}"
        )
    try:
        threshold = float(m["threshold"])
    except ValueError:
        raise DDRLError(
            f"watch rule {text!r}: threshold {m['threshold']!r} is not a number"
        ) from None
    if threshold != threshold:
        raise DDRLError(f"watch rule {text!r}: threshold is NaN; allowed: a number")
    if m["action"] not in ACTIONS:
        raise DDRLError(
            f"watch rule {text!r}: unknown action {m['action']!r}; allowed: {', '.join(ACTIONS)}"
        )
    patience = m["patience"] or "1"
    if not patience.isdigit() or int(patience) < 1:
        raise DDRLError(
            f"watch rule {text!r}: patience {patience!r}; allowed: an integer >= 1 (evaluations "
            "in a row)"
        )
    return Rule(str(text).strip(), m["signal"], m["op"], threshold, m["action"], int(patience))


def with_loss_warn(rules: list[str], threshold) -> list[str]:
    """``eval.loss_warn=X`` (before the watch existed): the held-out-loss warn rule at X."""
    try:
        x = float(threshold)
    except (TypeError, ValueError):
        raise DDRLError(f"eval.loss_warn={threshold!r} is not a number") from None
    kept = [r for r in rules if parse_rule(r).signal != "heldout_loss_rise"]
    return [*kept, f"heldout_loss_rise>{x:g}:warn"]


@dataclass
class WatchConfig:
    """Rules over the evaluation's hacking signals, acted on during training."""

    rules: list[str] = field(
        default_factory=lambda: list(DEFAULT_RULES),
        metadata={
            "help": "SIGNAL>THRESHOLD:ACTION[:PATIENCE] each (warn | stop | keep_best), e.g. "
            "'[\"heldout_loss_rise>0.1:stop\"]'; [] = none (signals: docs/WATCH.md)"
        },
    )
    best_metric: str = field(
        default="proxy_reward",
        metadata={
            "help": "keep_best: the evaluation metric that ranks best/ candidates (evaluations "
            "where no keep_best rule holds)"
        },
    )
    best_mode: Literal["max", "min"] = field(
        default="max", metadata={"help": "keep_best: the highest (max) or lowest (min) wins"}
    )

    def parsed(self) -> list[Rule]:
        return [parse_rule(r) for r in self.rules]

    def check(self) -> None:
        from ddrl.watch.signals import METRICS, check_signal, is_metric

        check_literals(self, "watch.")
        for rule in self.parsed():
            check_signal(rule.signal, rule.text)
        if not is_metric(self.best_metric):
            raise DDRLError(
                f"watch.best_metric={self.best_metric!r}; allowed: an evaluation metric "
                f"({', '.join(METRICS)}, ood_<reward>)"
            )

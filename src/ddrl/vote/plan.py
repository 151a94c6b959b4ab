"""The pair plan: which two runs, prompt and sample each question shows, and on which side.

Every (run pair, prompt, sample) occurs once. The order is round-robin: question ``t`` of a
block of ``Q·P`` (Q run pairs, P prompts) takes pair ``t mod Q`` and prompt
``(t + ⌊t / lcm(Q, P)⌋) mod P`` — the shift by one after each ``lcm(Q, P)`` questions reaches
the (pair, prompt) combinations that ``t mod Q`` and ``t mod P`` never meet when Q and P share a
factor — and block ``b`` takes sample ``(b + t) mod K``. So every prefix of the plan (``--pairs
N``, or the questions answered so far) has each run pair, and each prompt, within one of the
others' counts. A seeded shuffle then relabels the pairs, prompts and samples and draws each
question's left/right order, so the plan is a function of its settings and the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import combinations

from ddrl.errors import DDRLError, check_range


@dataclass(frozen=True)
class Planned:
    """One question: runs ``pair`` (indices, ascending) on ``prompt``'s ``sample``; ``swap``
    puts ``pair[1]`` on the left."""

    pair: tuple[int, int]
    prompt: int
    sample: int
    swap: bool

    @property
    def left(self) -> int:
        return self.pair[1] if self.swap else self.pair[0]

    @property
    def right(self) -> int:
        return self.pair[0] if self.swap else self.pair[1]


def plan_size(runs: int, prompts: int, samples: int) -> int:
    """How many distinct questions there are: C(runs, 2) · prompts · samples."""
    return math.comb(runs, 2) * prompts * samples


def balanced_plan(
    runs: int, prompts: int, samples: int, seed: int, limit: int | None = None
) -> list[Planned]:
    """The first ``limit`` (default: all) questions of the balanced, seeded plan (module
    docstring) over ``runs`` runs, ``prompts`` prompts and ``samples`` samples per prompt."""
    check_range("runs", runs, 2)
    check_range("prompts", prompts, 1)
    check_range("samples per prompt", samples, 1)
    total = plan_size(runs, prompts, samples)
    if limit is not None and not 1 <= limit <= total:
        raise DDRLError(
            f"--pairs {limit}; allowed: 1 to {total} (C({runs}, 2) run pairs × {prompts} "
            f"prompts × {samples} samples per prompt)"
        )
    rng = random.Random(seed)
    pairs = list(combinations(range(runs), 2))
    rng.shuffle(pairs)
    prompt_of = rng.sample(range(prompts), prompts)
    sample_of = rng.sample(range(samples), samples)
    q, block = len(pairs), len(pairs) * prompts
    shift_every = math.lcm(q, prompts)
    plan = []
    for i in range(limit or total):
        b, t = divmod(i, block)
        pair = pairs[t % q]
        prompt = prompt_of[(t + t // shift_every) % prompts]
        sample = sample_of[(b + t) % samples]
        plan.append(Planned(pair, prompt, sample, swap=rng.random() < 0.5))
    return plan

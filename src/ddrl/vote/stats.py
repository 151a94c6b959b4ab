"""The statistics of a vote: Wilson score intervals, Bradley–Terry scores, Cohen's kappa.

Plain Python (no torch, no numpy): a summary of ten thousand votes takes milliseconds.
"""

from __future__ import annotations

import math
from collections import Counter

Z95 = 1.959964  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n:
    (p̂ + z²/2n ± z·sqrt(p̂(1-p̂)/n + z²/4n²)) / (1 + z²/n); (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _reaches(wins: list[list[float]], start: int, forward: bool) -> set[int]:
    seen, todo = {start}, [start]
    while todo:
        i = todo.pop()
        for j in range(len(wins)):
            w = wins[i][j] if forward else wins[j][i]
            if w > 0 and j not in seen:
                seen.add(j)
                todo.append(j)
    return seen


def bradley_terry(
    wins: list[list[float]], tol: float = 1e-10, max_iter: int = 100_000
) -> list[float] | None:
    """Bradley–Terry strengths p (geometric mean 1) from ``wins[i][j]``, the times i beat j
    (a tie counted as half a win to each), by Hunter's (2004) MM fixed point
    p_i ← W_i / Σ_j n_ij / (p_i + p_j), W_i = Σ_j wins[i][j], n_ij = wins[i][j] + wins[j][i],
    renormalised each sweep, until max_i |Δ log p_i| < ``tol``. The maximum-likelihood
    strengths exist (finite, positive) only when every run beat each other run through some
    chain of wins (Hunter's condition: the win graph is strongly connected); otherwise None."""
    m = len(wins)
    if m < 2 or len(_reaches(wins, 0, True)) < m or len(_reaches(wins, 0, False)) < m:
        return None
    total = [sum(row) for row in wins]
    p = [1.0] * m
    for _ in range(max_iter):
        new = [
            total[i] / sum((wins[i][j] + wins[j][i]) / (p[i] + p[j]) for j in range(m) if j != i)
            for i in range(m)
        ]
        g = math.exp(sum(math.log(x) for x in new) / m)
        new = [x / g for x in new]
        step = max(abs(math.log(a / b)) for a, b in zip(new, p, strict=True))
        p = new
        if step < tol:
            break
    return p


def elo(strength: float) -> float:
    """A Bradley–Terry strength on the Elo scale: 1000 + 400·log10(p), so 400 points = 10:1
    odds and the geometric mean strength is 1000."""
    return 1000 + 400 * math.log10(strength)


def cohen_kappa(a: list[str], b: list[str]) -> tuple[float, float | None]:
    """(percent agreement p_o, Cohen's kappa (p_o − p_e) / (1 − p_e)) of two raters' labels on
    the same items, p_e = Σ_c p_a(c)·p_b(c) from each rater's own label shares; kappa is None
    when p_e = 1 (both gave one same label throughout: agreement by chance alone)."""
    n = len(a)
    if n == 0 or n != len(b):
        raise ValueError(f"two label lists of one non-zero length; got {len(a)} and {len(b)}")
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[c] * cb[c] for c in ca) / (n * n)
    return p_o, None if p_e >= 1 else (p_o - p_e) / (1 - p_e)

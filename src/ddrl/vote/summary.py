"""``ddrl vote summary``: what a votes folder says, as a dict (``--json``), a plain-text table
and an HTML section for ``ddrl report --votes``.

- Per pair of runs (A, B) and criterion: A's wins, ties and B's wins, each as a rate over all
  votes with its 95% Wilson interval, and A's win rate over the votes that were not ties.
- A Bradley–Terry strength per run and criterion (ties as half a win to each side; Hunter's MM;
  geometric mean 1, and on the Elo scale), None where the votes do not determine it.
- Per prompt: wins, ties and losses of each pair on the first criterion.
- Inter-rater agreement on the questions two raters both answered: per pair of raters the
  percent agreement and Cohen's kappa over left / right / tie, and pooled (agreement over every
  shared answer, kappa weighted by each pair's shared answers).
- Rater flags: ``fast`` (median time per vote under ``min_ms``), ``same answer`` (at least 10
  votes with one of left / right / tie in more than 90% of them, first criterion). Flags inform;
  no vote is dropped. Skips count nowhere but in the skip count.
"""

from __future__ import annotations

import html
import statistics
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

from ddrl.vote.folder import VOTES, Manifest
from ddrl.vote.stats import Z95, bradley_terry, cohen_kappa, elo, wilson
from ddrl.vote.store import read_votes

SAME_ANSWER_MIN, SAME_ANSWER_SHARE = 10, 0.9


def _rate(k: int, n: int) -> list[float] | None:
    return [k / n, *wilson(k, n)] if n else None


def _pairs(rows: list[dict], labels: list[str], criterion: str) -> list[dict]:
    out = []
    for a, b in combinations(labels, 2):
        won = Counter(r["winners"][criterion] for r in rows if r["pair"] == [a, b])
        aw, t, bw = won[a], won["tie"], won[b]
        n = aw + t + bw
        out.append(
            {
                **{"a": a, "b": b, "criterion": criterion, "n": n},
                **{"a_wins": aw, "ties": t, "b_wins": bw},
                "a_win_rate": _rate(aw, n),
                "tie_rate": _rate(t, n),
                "b_win_rate": _rate(bw, n),
                "a_win_rate_excl_ties": _rate(aw, aw + bw),
            }
        )
    return out


def _bradley_terry(rows: list[dict], labels: list[str], criterion: str) -> dict | None:
    idx = {x: i for i, x in enumerate(labels)}
    wins = [[0.0] * len(labels) for _ in labels]
    for r in rows:
        a, b = (idx[x] for x in r["pair"])
        w = r["winners"][criterion]
        if w == "tie":
            wins[a][b] += 0.5
            wins[b][a] += 0.5
        else:
            wins[idx[w]][b if idx[w] == a else a] += 1
    p = bradley_terry(wins)
    if p is None:
        return None
    return {
        "strength": dict(zip(labels, p, strict=True)),
        "elo": {x: elo(s) for x, s in zip(labels, p, strict=True)},
    }


def _agreement(rows: list[dict], criterion: str) -> dict:
    by_question: dict[str, dict[str, str]] = defaultdict(dict)
    for r in rows:
        by_question[r["question"]][r["rater"]] = r["choices"][criterion]
    raters = sorted({r["rater"] for r in rows})
    pairs = []
    for x, y in combinations(raters, 2):
        both = [q for q in by_question.values() if x in q and y in q]
        if both:
            p_o, kappa = cohen_kappa([q[x] for q in both], [q[y] for q in both])
            pairs.append({"raters": [x, y], "n": len(both), "agreement": p_o, "kappa": kappa})
    n = sum(p["n"] for p in pairs)
    with_kappa = [p for p in pairs if p["kappa"] is not None]
    nk = sum(p["n"] for p in with_kappa)
    return {
        "pairs": pairs,
        "n": n,
        "agreement": sum(p["agreement"] * p["n"] for p in pairs) / n if n else None,
        "kappa": sum(p["kappa"] * p["n"] for p in with_kappa) / nk if nk else None,
    }


def _raters(rows: list[dict], answered: list[dict], first: str, min_ms: float) -> list[dict]:
    out = []
    for name in sorted({r["rater"] for r in rows}):
        mine = [r for r in answered if r["rater"] == name]
        said = Counter(r["choices"][first] for r in mine)
        ms = statistics.median(r["ms"] for r in mine) if mine else None
        flags = []
        if ms is not None and ms < min_ms:
            flags.append(f"fast (median {ms:.0f} ms < {min_ms:.0f})")
        top, k = said.most_common(1)[0] if said else ("", 0)
        if len(mine) >= SAME_ANSWER_MIN and k > SAME_ANSWER_SHARE * len(mine):
            flags.append(f"same answer ({top} in {k} of {len(mine)})")
        skips = sum(1 for r in rows if r["rater"] == name and r.get("skip"))
        row = {"rater": name, "votes": len(mine), "skips": skips, "median_ms": ms}
        out.append({**row, **{c: said[c] for c in ("left", "right", "tie")}, "flags": flags})
    return out


def summarise(root: Path, min_ms: float = 1500.0) -> dict:
    """The summary of the votes folder ``root`` (module docstring)."""
    m = Manifest.load(Path(root))
    rows = read_votes(m.root / VOTES)
    answered = [r for r in rows if not r.get("skip")]
    labels, criteria = [r["label"] for r in m.runs], m.settings.criteria
    first = criteria[0]
    prompts = []
    for text in m.settings.prompts:
        mine = [r for r in answered if r["prompt"] == text]
        for p in _pairs(mine, labels, first):
            prompts.append({"prompt": text, **{k: p[k] for k in ("a", "b", "n", "a_wins")}})
            prompts[-1].update(ties=p["ties"], b_wins=p["b_wins"])
    return {
        "folder": str(m.root),
        "runs": labels,
        "criteria": criteria,
        "questions": len(m.questions),
        "votes": len(answered),
        "skips": len(rows) - len(answered),
        "z": Z95,
        "pairs": [p for c in criteria for p in _pairs(answered, labels, c)],
        "bradley_terry": {c: _bradley_terry(answered, labels, c) for c in criteria},
        "prompts": prompts,
        "agreement": {c: _agreement(answered, c) for c in criteria},
        "raters": _raters(rows, answered, first, min_ms),
    }


def _ci(rate: list[float] | None) -> str:
    return "—" if rate is None else f"{rate[0]:.2f} [{rate[1]:.2f}, {rate[2]:.2f}]"


def _pooled(s: dict) -> list[str]:
    out = []
    for c, a in s["agreement"].items():
        if a["n"]:
            kappa = "—" if a["kappa"] is None else f"{a['kappa']:.2f}"
            out.append(
                f"pooled ({c}): {a['n']} shared answers, agreement {a['agreement']:.2f}, "
                f"kappa {kappa}"
            )
    return out


def _tables(s: dict) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """(title, header, rows, notes) of every table, for the text and the HTML forms."""
    head = ["criterion", "A", "B", "votes", "A wins", "ties", "B wins", "A win rate [95%]"]
    head += ["tie rate", "B win rate", "A win, no ties"]
    pairs = [
        [p["criterion"], p["a"], p["b"], str(p["n"]), str(p["a_wins"]), str(p["ties"])]
        + [str(p["b_wins"]), _ci(p["a_win_rate"]), _ci(p["tie_rate"]), _ci(p["b_win_rate"])]
        + [_ci(p["a_win_rate_excl_ties"])]
        for p in s["pairs"]
    ]
    out = [("Pairs of runs", head, pairs, [])]
    if len(s["runs"]) > 2:
        bt = [
            [c, x, "—" if fit is None else f"{fit['strength'][x]:.3f}"]
            + ["—" if fit is None else f"{fit['elo'][x]:.0f}"]
            for c, fit in s["bradley_terry"].items()
            for x in s["runs"]
        ]
        out.append(("Bradley–Terry", ["criterion", "run", "strength", "Elo"], bt, []))
    agree = [
        [c, " & ".join(p["raters"]), str(p["n"]), f"{p['agreement']:.2f}"]
        + ["—" if p["kappa"] is None else f"{p['kappa']:.2f}"]
        for c, a in s["agreement"].items()
        for p in a["pairs"]
    ]
    head = ["criterion", "raters", "shared", "agreement", "kappa"]
    out.append(("Agreement", head, agree, _pooled(s)))
    raters = [
        [r["rater"], str(r["votes"]), str(r["skips"])]
        + ["—" if r["median_ms"] is None else f"{r['median_ms']:.0f}"]
        + [str(r[c]) for c in ("left", "right", "tie")]
        + ["; ".join(r["flags"])]
        for r in s["raters"]
    ]
    head = ["rater", "votes", "skips", "median ms", "left", "right", "tie", "flags"]
    out.append(("Raters", head, raters, []))
    prompts = [
        [p["prompt"], p["a"], p["b"], str(p["a_wins"]), str(p["ties"]), str(p["b_wins"])]
        for p in s["prompts"]
    ]
    head = ["prompt", "A", "B", "A wins", "ties", "B wins"]
    out.append((f"Per prompt ({s['criteria'][0]})", head, prompts, []))
    return out


def _headline(s: dict) -> str:
    return (
        f"{s['votes']} votes ({s['skips']} skipped) on {s['questions']} questions by "
        f"{len(s['raters'])} raters. Rates are over all votes with 95% Wilson intervals (z = "
        f"{s['z']}); 'A win, no ties' leaves ties out; Bradley–Terry counts a tie as half a win."
    )


def summary_text(s: dict) -> str:
    """The summary as plain-text tables."""
    lines = [_headline(s)]
    for title, head, rows, notes in _tables(s):
        if not rows:
            lines += ["", title, "none yet"]
            continue
        widths = [max(map(len, col)) for col in zip(head, *rows, strict=True)]
        table = [
            "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
            for cells in (head, *rows)
        ]
        lines += ["", title, *table, *notes]
    return "\n".join(lines) + "\n"


def summary_html(s: dict) -> str:
    """The summary as an HTML section (``ddrl report --votes``)."""
    parts = ["<h2>Blind human preference</h2>\n", f"<p>{html.escape(_headline(s))}</p>\n"]
    for title, head, rows, notes in _tables(s):
        cells = lambda tag, xs: "".join(f"<{tag}>{html.escape(x)}</{tag}>" for x in xs)  # noqa: E731
        body = "".join(f"<tr>{cells('td', r)}</tr>\n" for r in rows)
        if not rows:
            parts += [f"<h3>{html.escape(title)}</h3>\n", "<p>none yet</p>\n"]
            continue
        table = f'<div class="wide"><table>\n<tr>{cells("th", head)}</tr>\n{body}</table></div>\n'
        if title.startswith("Per prompt"):
            table = f"<details><summary>per prompt</summary>\n{table}</details>\n"
        parts += [f"<h3>{html.escape(title)}</h3>\n", table]
        parts += [f"<p>{html.escape(n)}</p>\n" for n in notes]
    return "".join(parts)

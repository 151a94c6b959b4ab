"""Make a votes folder, or continue one: what ``ddrl vote serve`` does before it serves.

A new folder appears whole or not at all: every run's samples (``ddrl.vote.media``), then the
plan (``ddrl.vote.plan``) in its manifest (``ddrl.vote.folder``). An existing one is reused
when its runs (weights unchanged), prompts, samples per prompt and seed are those asked for,
and refused with a one-line error otherwise; its criteria and ``--pairs`` may change only while
it has no votes, its raters per question at any time.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ddrl.errors import DDRLError, check_range
from ddrl.io import atomic_dir
from ddrl.vote.folder import DEFAULTS, MANIFEST, MEDIA, VOTES, Manifest, Settings
from ddrl.vote.media import render_run, run_labels, run_prompts, weights_stamp
from ddrl.vote.plan import balanced_plan

MEDIA_KEYS = ("prompts", "n_per_prompt", "seed")  # what the samples depend on
PLAN_KEYS = ("criteria", "pairs")  # what the questions depend on


def _merge(given: Settings, stored: Settings | None) -> Settings:
    """``given`` where set, else ``stored`` (an existing folder's), else the defaults."""
    pick = lambda k: next(  # noqa: E731
        (v for v in (getattr(given, k), getattr(stored, k, None)) if v is not None),
        getattr(DEFAULTS, k),
    )
    return Settings(**{k: pick(k) for k in asdict(DEFAULTS)})


def _check(s: Settings) -> None:
    check_range("--n-per-prompt", s.n_per_prompt, 1)
    check_range("--seed", s.seed, 0, 2**63 - 1)
    check_range("--raters-per-question", s.raters_per_question, 1)
    if not s.criteria or any(not c.strip() for c in s.criteria):
        raise DDRLError(f"--criteria {','.join(s.criteria)!r}; allowed: comma-separated names")
    if len(set(s.criteria)) < len(s.criteria):
        raise DDRLError(f"--criteria {','.join(s.criteria)!r} names one twice")


def prepare_votes(runs: list[Path], out: Path, given: Settings | None = None, log=print):
    """The votes folder ``out`` for ``runs`` (2 or more; none = the folder's own): rendered
    if new, reused (or refused) if it exists (module docstring). Returns its Manifest."""
    out, given = Path(out), given or Settings()
    runs = [Path(r).resolve() for r in runs]
    if (out / MANIFEST).is_file():
        return _continue(Manifest.load(out), runs, given, log)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DDRLError(f"--out {out} is not a votes folder; allowed: a new or empty folder")
    if len(runs) < 2 or len(set(runs)) < len(runs):
        raise DDRLError(
            f"{len(set(runs))} distinct run(s) given; allowed: 2 or more run or model folders"
        )
    stamps = [weights_stamp(r) for r in runs]  # every folder checked before any rendering
    s = _merge(given, None)
    s.prompts = s.prompts or run_prompts(runs[0])
    _check(s)
    balanced_plan(len(runs), len(s.prompts), s.n_per_prompt, s.seed, s.pairs)  # --pairs, early
    labels = run_labels(runs)
    m = Manifest(out, s, [], {})
    with atomic_dir(out, race_ok=False) as tmp:
        for i, run in enumerate(runs):
            log(f"[vote] rendering {labels[i]}: {len(s.prompts)} prompts × {s.n_per_prompt}")
            m.media.update(render_run(run, s.prompts, s.n_per_prompt, s.seed, tmp / MEDIA, i))
            m.runs.append({"label": labels[i], "path": str(run), "stamp": stamps[i]})
        m.make_plan()
        m.save(tmp)
    return m


def _continue(m: Manifest, runs: list[Path], given: Settings, log) -> Manifest:
    """An existing folder's manifest, checked against what was asked (module docstring)."""
    stored = [Path(r["path"]) for r in m.runs]
    if runs and runs != stored:
        raise DDRLError(
            f"{m.root} holds votes on {', '.join(map(str, stored))}; allowed: the same runs in "
            "the same order (or none), or a new --out"
        )
    for r in m.runs:
        if weights_stamp(Path(r["path"])) != r["stamp"]:
            raise DDRLError(f"{r['path']} changed since {m.root} was rendered; use a new --out")
    s = _merge(given, m.settings)
    _check(s)
    for key in MEDIA_KEYS:
        if getattr(s, key) != getattr(m.settings, key):
            raise DDRLError(
                f"{m.root} was rendered with {key}={getattr(m.settings, key)!r}; allowed: the "
                "same (or leave it out), or a new --out"
            )
    missing = [i for i, x in m.media.items() if not (m.root / MEDIA / x["file"]).is_file()]
    if missing:
        raise DDRLError(f"{m.root / MEDIA} lacks {len(missing)} of its files; use a new --out")
    replan = any(getattr(s, k) != getattr(m.settings, k) for k in PLAN_KEYS)
    if replan and (m.root / VOTES).is_file() and (m.root / VOTES).stat().st_size:
        raise DDRLError(
            f"{m.root} has votes on its plan (criteria {','.join(m.settings.criteria)}, pairs "
            f"{m.settings.pairs or 'all'}); allowed: the same, or a new --out"
        )
    if s != m.settings:
        m.settings = s
        if replan:
            m.make_plan()
        m.save()
    log(f"[vote] reusing {m.root}: {len(m.runs)} runs, {len(m.questions)} questions")
    return m

"""Figures and a self-contained HTML report from a comparison's ``metrics.json``.

Schema (one regime)::

    {"base": {metrics}, "reward": "ink" (optional),
     "arms": [{"algorithm": str, "setting": {...}, "label": str (optional),
               "final": {metrics}, "curve": [{"iteration": int, metrics...}, ...]}, ...]}

where ``{metrics}`` holds at least proxy_reward, gold_accuracy, diversity,
heldout_diffusion_loss and fd. A multi-regime file instead has ``{"regimes": {reward_name:
<one-regime dict>, ...}}``; :func:`write_report` then writes one section per regime.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

from ddrl.experiments.figures import plot_heldout_loss, plot_pareto, plot_reward_curves
from ddrl.experiments.hacking import (
    arm_label,
    hacking_analysis,
    is_num,
    watch_analysis,
    watch_summary,
)

MAIN_KEYS = ("proxy_reward", "gold_accuracy", "diversity", "heldout_diffusion_loss", "fd")


def _fmt(v) -> str:
    return f"{v:.4g}" if is_num(v) else "\u2014"


def _th(key: str) -> str:
    """A header cell that may wrap after its underscores (a 1400 px window fits the table)."""
    return "<th>" + "_<wbr>".join(html.escape(p) for p in key.split("_")) + "</th>"


def _metrics_table(metrics: dict) -> str:
    """Every main metric is a column (a dash where a run lacks it, and a line naming those no
    run has), then any other numeric key; the table scrolls sideways rather than overflow."""
    rows = [("base", metrics.get("base") or {})] + [
        (arm_label(a), a.get("final") or {}) for a in metrics["arms"]
    ]
    extra = sorted({k for _, m in rows for k, v in m.items() if is_num(v)} - set(MAIN_KEYS))
    keys = [*MAIN_KEYS, *extra]
    head = "".join(_th(k) for k in ["run", *keys])
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{_fmt(m.get(k))}</td>" for k in keys)
        + "</tr>\n"
        for name, m in rows
    )
    absent = [k for k in MAIN_KEYS if not any(is_num(m.get(k)) for _, m in rows)]
    note = (
        f'<p class="note">\u2014: not measured. No run here has {", ".join(absent)}.</p>\n'
        if absent
        else ""
    )
    return f'<div class="wide"><table>\n<tr>{head}</tr>\n{body}</table></div>\n{note}'


def _watch_table(metrics: dict, loss_rise: float, gold_drop: float) -> str:
    """Which rules fired on each arm and when, against when gold fell (the lead time)."""
    rows = watch_analysis(metrics, loss_rise, gold_drop)

    def cell(v) -> str:
        return "\u2014" if v is None else html.escape(str(v))

    body = []
    for r in rows:
        fired = "; ".join(f"{rule} @ {it}" for rule, it in r["fired"].items()) or None
        lead = None if r["lead"] is None else f"{r['lead']:+d}"
        cells = (r["label"], fired, r["first_gold_drop_iteration"], lead, r["outcome"])
        body.append("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in cells) + "</tr>\n")
    head = "".join(
        f"<th>{h}</th>"
        for h in ("run", "rule @ first firing", "gold fell at", "lead (iterations)", "outcome")
    )
    return (
        "<h3>The watch</h3>\n"
        f"<p>{html.escape(watch_summary(rows))}</p>\n"
        f'<div class="wide"><table>\n<tr>{head}</tr>\n{"".join(body)}</table></div>\n'
    )


def _img(out_dir: Path, path, caption: str) -> str:
    rel = Path(os.path.relpath(Path(path).resolve(), out_dir.resolve())).as_posix()
    return (
        f'<figure><img src="{html.escape(rel)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>\n"
    )


def _regime_section(
    metrics: dict, out_dir: Path, suffix: str, loss_rise: float, gold_drop: float
) -> str:
    """Figures + HTML for one single-regime metrics dict; file names get ``suffix``."""
    figs = [
        (plot_reward_curves(metrics, out_dir / f"reward_curves{suffix}.png"), "reward curves"),
        (plot_pareto(metrics, out_dir / f"pareto{suffix}.png"), "reward / gold / diversity"),
        (
            plot_heldout_loss(metrics, out_dir / f"heldout_loss{suffix}.png", loss_rise),
            "held-out diffusion loss",
        ),
    ]
    analysis = hacking_analysis(metrics, loss_rise=loss_rise, gold_drop=gold_drop)
    items = "".join(f"<li>{html.escape(a['sentence'])}</li>\n" for a in analysis)
    parts = ["<h3>Reward hacking</h3>\n", f"<ul>\n{items}</ul>\n"]
    if any("watch" in a for a in metrics["arms"]):
        parts.append(_watch_table(metrics, loss_rise, gold_drop))
    parts += ["<h3>Final metrics</h3>\n", _metrics_table(metrics), "<h3>Figures</h3>\n"]
    parts += [_img(out_dir, p, cap) for p, cap in figs]
    return "".join(parts)


_CSS = (
    "body{font-family:sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;line-height:1.4}"
    ".banner{background:#fff4d6;border-left:4px solid #d89c00;padding:0.6em 1em}"
    ".wide{max-width:100%;overflow-x:auto}.note{font-size:0.85em;color:#555}"
    "table{border-collapse:collapse;font-size:0.9em}"
    "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{vertical-align:bottom}"
    "td:first-child,th:first-child{text-align:left;white-space:nowrap}img{max-width:100%}"
    "figure{display:inline-block;margin:0.5em;max-width:100%}"
    "figcaption{font-size:0.9em;color:#555}"
)


def write_report(
    metrics: dict,
    out_dir: Path,
    grids: dict[str, Path] | None = None,
    title: str = "ddrl comparison",
    notes: str = "",
    loss_rise: float = 0.10,
    gold_drop: float = 0.10,
    extra_html: str = "",
    banner: str = "",
) -> Path:
    """Write ``out_dir/report.html`` (plus its PNG figures) for one- or multi-regime metrics.

    ``grids`` maps a caption to a sample-grid image; images are linked by relative path.
    ``banner`` is a highlighted line under the title (what the page can and cannot show).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>{html.escape(title)}</h1>\n"]
    if banner:
        parts.append(f'<p class="banner">{html.escape(banner)}</p>\n')
    if notes:
        parts.append(f"<p>{html.escape(notes)}</p>\n")
    if "regimes" in metrics:
        for name, regime in metrics["regimes"].items():
            suffix = "_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))
            parts.append(f"<h2>Regime: {html.escape(str(name))}</h2>\n")
            parts.append(_regime_section(regime, out_dir, suffix, loss_rise, gold_drop))
    else:
        if metrics.get("reward"):
            parts.append(f"<p>Training reward: {html.escape(str(metrics['reward']))}</p>\n")
        parts.append(_regime_section(metrics, out_dir, "", loss_rise, gold_drop))
    parts.append(extra_html)
    if grids:
        parts.append("<h2>Samples</h2>\n")
        parts += [_img(out_dir, p, str(cap)) for cap, p in grids.items()]
    page = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "".join(parts)
        + "</body>\n</html>\n"
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path

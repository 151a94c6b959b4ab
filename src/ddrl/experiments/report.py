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
import math
import os
import re
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

__all__ = [
    "arm_label",
    "hacking_analysis",
    "legend_if_labelled",
    "plot_heldout_loss",
    "plot_pareto",
    "plot_reward_curves",
    "write_report",
]

_MAIN_KEYS = ("proxy_reward", "gold_accuracy", "diversity", "heldout_diffusion_loss", "fd")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")


def _setting_str(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())


def arm_slug(algorithm: str, setting: dict) -> str:
    """Folder name of an arm: algorithm_key1value1_... (last part of each dotted key)."""
    return "_".join([algorithm] + [f"{k.split('.')[-1]}{v}" for k, v in setting.items()])


def arm_label(arm: dict) -> str:
    """``arm["label"]`` if given, else e.g. ``ddrl(data_beta=0.3)`` or ``dance_grpo``."""
    if arm.get("label"):
        return str(arm["label"])
    setting = arm.get("setting") or {}
    return f"{arm['algorithm']}({_setting_str(setting)})" if setting else str(arm["algorithm"])


def _series(arm: dict, key: str) -> tuple[list[int], list[float]]:
    """(iterations, values) of one curve metric, skipping points that lack it."""
    pts = [p for p in arm.get("curve") or [] if _is_num(p.get(key))]
    return [int(p["iteration"]) for p in pts], [float(p[key]) for p in pts]


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _first(iters: list[int], values: list[float], pred) -> int | None:
    return next((i for i, v in zip(iters, values, strict=True) if pred(v)), None)


def _iters(n: int) -> str:
    return f"{n} iteration{'' if n == 1 else 's'}"


def _loss_part(rise: int | None, loss_rise: float, measured: bool) -> str:
    rise_s = f"{loss_rise:.0%}"
    if not measured:
        return "no held-out diffusion loss was measured"
    if rise is not None:
        return f"held-out diffusion loss rose >{rise_s} over the base at iteration {rise}"
    return f"the held-out diffusion loss stayed within {rise_s} of the base"


def _hacking_sentence(
    label: str,
    rise: int | None,
    drop: int | None,
    final_gold,
    hacked: bool,
    loss_rise,
    gold_floor,
    loss_measured: bool = True,
) -> str:
    """One plain-English sentence for every combination of loss rise / gold drop / final gold
    (and for runs without a held-out loss: ``loss_measured`` False)."""
    floor_s = f"{gold_floor:.2f}"
    loss_part = _loss_part(rise, loss_rise, loss_measured)
    if not hacked:
        final_s = f" (final {final_gold:.2f})" if _is_num(final_gold) else ""
        held = f"gold accuracy stayed \u2265 {floor_s}{final_s}"
        if not loss_measured:
            return f"{label} did not hack: {held}; {loss_part}."
        joiner = ", although the" if rise is not None else " and"
        return f"{label} did not hack: {held}{joiner} {loss_part}."
    if drop is None:
        gold_part = f"final gold accuracy {final_gold:.2f} is below {floor_s}"
    else:
        gold_part = f"gold accuracy fell below {floor_s} at iteration {drop}"
    head = f"{label} hacked the reward: "
    if not loss_measured:
        return f"{head}{gold_part}; {loss_part}."
    if rise is None:
        return f"{head}{gold_part}, but {loss_part} (no warning)."
    if drop is None:
        return f"{head}{loss_part} and {gold_part}."
    if rise > drop:
        late = f"{_iters(rise - drop)} later, so no early warning"
        return f"{head}{gold_part}, and the {loss_part} ({late})."
    tail = (
        f"the loss gave {_iters(drop - rise)} of warning"
        if rise < drop
        else "the loss rose in the same iteration, so no lead time"
    )
    return f"{head}{loss_part} and {gold_part} ({tail})."


def hacking_analysis(metrics: dict, loss_rise: float = 0.10, gold_drop: float = 0.10) -> list[dict]:
    """Per arm: when (if ever) held-out loss rose and gold accuracy fell, plus a sentence.

    Loss rise: first curve iteration with heldout_diffusion_loss > (1 + loss_rise)·base.
    Gold drop: first curve iteration with gold_accuracy < (1 − gold_drop)·(the base's own gold
    accuracy), so a weak base (a quick smoke test) is not declared hacked from the start. An arm
    is "hacked" if gold dropped on the curve or its final gold accuracy is below that floor;
    ``early_warning`` is rise ≤ drop when both happened, else None. Without gold metrics no
    gold claim is made: ``hacked`` is None and the sentence speaks of the loss only. Without a
    base held-out loss (runs evaluated without held-out images) no rise is looked for and the
    sentence says the loss was not measured.
    """
    base = metrics.get("base") or {}
    base_loss, base_gold = base.get("heldout_diffusion_loss"), base.get("gold_accuracy")
    measured = _is_num(base_loss)
    threshold = (1 + loss_rise) * float(base_loss) if measured else math.inf
    out = []
    for arm in metrics["arms"]:
        label = arm_label(arm)
        rise = _first(*_series(arm, "heldout_diffusion_loss"), lambda v: v > threshold)
        if not _is_num(base_gold):
            loss = _loss_part(rise, loss_rise, measured)
            if measured:
                loss = f"its {loss.removeprefix('the ')}"
            sentence = f"{label}: no gold evaluator, so hacking is not judged; {loss}."
            out.append(
                {
                    "label": label,
                    "first_loss_rise_iteration": rise,
                    "first_gold_drop_iteration": None,
                    "hacked": None,
                    "early_warning": None,
                    "sentence": sentence,
                }
            )
            continue
        floor = (1 - gold_drop) * float(base_gold)
        drop = _first(*_series(arm, "gold_accuracy"), lambda v, f=floor: v < f)
        final_gold = (arm.get("final") or {}).get("gold_accuracy")
        hacked = drop is not None or (_is_num(final_gold) and final_gold < floor)
        both = rise is not None and drop is not None
        out.append(
            {
                "label": label,
                "first_loss_rise_iteration": rise,
                "first_gold_drop_iteration": drop,
                "hacked": hacked,
                "early_warning": (rise <= drop) if both else None,
                "sentence": _hacking_sentence(
                    label, rise, drop, final_gold, hacked, loss_rise, floor, measured
                ),
            }
        )
    return out


def save_figure(fig: Figure, path, **kwargs) -> Path:
    # A bare Figure (no pyplot) renders with Agg and leaves the caller's backend untouched.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **{"dpi": 110, "bbox_inches": "tight", **kwargs})
    return path


def legend_if_labelled(ax, **kwargs) -> None:
    """``ax.legend(**kwargs)`` only when something on ``ax`` has a label: an empty legend is
    drawn as nothing and matplotlib warns "No artists with labels found"."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _figure_legend(fig: Figure, axes, loc: str = "outside lower center", ncol: int = 4) -> None:
    """One legend outside the panels (``fig`` has the constrained layout) with every labelled
    artist of ``axes`` once, so it never covers a point or a curve; none if nothing is labelled."""
    seen: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        ncol = min(ncol, len(seen))
        fig.legend(list(seen.values()), list(seen), loc=loc, ncol=ncol, fontsize=8, frameon=False)


# What a panel says when no run has its metric, and which setting would have produced it.
_ABSENT = {
    "gold_accuracy": "no gold accuracy in these runs\n(no gold evaluator: gold.name)",
    "heldout_diffusion_loss": (
        "no held-out diffusion loss in these runs\n(no held-out images: data.eval_images)"
    ),
}


def _absent_panel(ax, key: str, title: str) -> None:
    why = _ABSENT.get(key, f"no {key} in these runs")
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="#555")
    ax.set(title=title, xticks=[], yticks=[])


def _tidy_ticks(ax, integer_x: bool = False) -> None:
    """At most ~5 ticks per axis, labelled with the digits their spacing needs and no offset
    (a 0.002-wide range otherwise gets 0.16425, 0.16450, ... run together)."""
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=5, integer=integer_x and axis is ax.xaxis))
        axis.set_major_formatter(ScalarFormatter(useOffset=False))


def _curve_panel(ax, metrics: dict, key: str, title: str) -> bool:
    """One line per arm (a fixed colour per arm) and the base dashed; False (and a panel saying
    what is missing) when no run has ``key``."""
    drawn = False
    for i, arm in enumerate(metrics["arms"]):
        iters, vals = _series(arm, key)
        if iters:
            ax.plot(iters, vals, marker=".", color=f"C{i % 10}", label=arm_label(arm))
            drawn = True
    base = (metrics.get("base") or {}).get(key)
    if _is_num(base):
        ax.axhline(base, color="k", ls="--", lw=1, label="base")
        drawn = True
    if not drawn:
        _absent_panel(ax, key, title)
        return False
    ax.set(xlabel="iteration", ylabel=key, title=title)
    _tidy_ticks(ax, integer_x=True)
    ax.grid(alpha=0.3)
    return True


def plot_reward_curves(metrics: dict, path) -> Path:
    """Proxy reward and gold accuracy vs iteration, one line per arm, base dashed."""
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    reward = metrics.get("reward")
    _curve_panel(ax1, metrics, "proxy_reward", f"proxy reward{f' ({reward})' if reward else ''}")
    _curve_panel(ax2, metrics, "gold_accuracy", "gold accuracy")
    _figure_legend(fig, (ax1, ax2))
    return save_figure(fig, path)


def _arm_styles(arms: list[dict]) -> list[tuple[str, str]]:
    """(colour, marker) per arm: a colour per algorithm, a marker per arm of that algorithm."""
    algos = list(dict.fromkeys(a["algorithm"] for a in arms))
    seen: dict[str, int] = {}
    styles = []
    for arm in arms:
        k = seen[arm["algorithm"]] = seen.get(arm["algorithm"], -1) + 1
        styles.append((f"C{algos.index(arm['algorithm']) % 10}", _MARKERS[k % len(_MARKERS)]))
    return styles


def plot_pareto(metrics: dict, path) -> Path:
    """Final proxy reward vs gold accuracy and vs diversity; base as a star. Arms are told
    apart by colour (algorithm) and marker (setting) in one legend under the panels: text
    beside the points overlapped wherever arms ended close together."""
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    styles = _arm_styles(metrics["arms"])
    base = metrics.get("base") or {}
    n = len(metrics["arms"])
    for ax, ykey in zip(axes, ("gold_accuracy", "diversity"), strict=True):
        title, drawn = f"reward vs {ykey}", False
        for i, (arm, (color, marker)) in enumerate(zip(metrics["arms"], styles, strict=True)):
            fin = arm.get("final") or {}
            if _is_num(fin.get("proxy_reward")) and _is_num(fin.get(ykey)):
                # Later arms smaller and on top: arms that ended at the same point stay visible
                # as rings around each other.
                ax.scatter(
                    fin["proxy_reward"],
                    fin[ykey],
                    color=color,
                    marker=marker,
                    s=130 - 70 * i / max(n - 1, 1),
                    edgecolors="k",
                    linewidths=0.6,
                    zorder=3 + i,
                    label=arm_label(arm),
                )
                drawn = True
        if _is_num(base.get("proxy_reward")) and _is_num(base.get(ykey)):
            ax.scatter(base["proxy_reward"], base[ykey], marker="*", s=200, c="k", label="base")
            drawn = True
        if not drawn:
            _absent_panel(ax, ykey, title)
            continue
        ax.set(xlabel="final proxy_reward", ylabel=f"final {ykey}", title=title)
        ax.margins(0.1)
        _tidy_ticks(ax)
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes)
    return save_figure(fig, path)


def plot_heldout_loss(metrics: dict, path, loss_rise: float = 0.10) -> Path:
    """Held-out diffusion loss vs iteration per arm, with the base and the hacking threshold
    (no threshold without a base value; a panel saying so when no run has the loss)."""
    fig = Figure(figsize=(8.5, 4.4), layout="constrained")
    ax = fig.subplots()
    key = "heldout_diffusion_loss"
    drawn = _curve_panel(ax, metrics, key, "held-out diffusion loss")
    base = (metrics.get("base") or {}).get(key)
    if drawn and _is_num(base):
        threshold = float(base) * (1 + loss_rise)
        ax.axhline(
            threshold, color="r", ls=":", lw=1.2, label=f"{loss_rise:.0%} rise (hacking signal)"
        )
    _figure_legend(fig, [ax], loc="outside right upper", ncol=1)
    return save_figure(fig, path)


def _fmt(v) -> str:
    return f"{v:.4g}" if _is_num(v) else "\u2014"


def _th(key: str) -> str:
    """A header cell that may wrap after its underscores (a 1400 px window fits the table)."""
    return "<th>" + "_<wbr>".join(html.escape(p) for p in key.split("_")) + "</th>"


def _metrics_table(metrics: dict) -> str:
    """Every main metric is a column (a dash where a run lacks it, and a line naming those no
    run has), then any other numeric key; the table scrolls sideways rather than overflow."""
    rows = [("base", metrics.get("base") or {})] + [
        (arm_label(a), a.get("final") or {}) for a in metrics["arms"]
    ]
    extra = sorted({k for _, m in rows for k, v in m.items() if _is_num(v)} - set(_MAIN_KEYS))
    keys = [*_MAIN_KEYS, *extra]
    head = "".join(_th(k) for k in ["run", *keys])
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{_fmt(m.get(k))}</td>" for k in keys)
        + "</tr>\n"
        for name, m in rows
    )
    absent = [k for k in _MAIN_KEYS if not any(_is_num(m.get(k)) for _, m in rows)]
    note = (
        f'<p class="note">\u2014: not measured. No run here has {", ".join(absent)}.</p>\n'
        if absent
        else ""
    )
    return f'<div class="wide"><table>\n<tr>{head}</tr>\n{body}</table></div>\n{note}'


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

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
from matplotlib.ticker import MaxNLocator

__all__ = [
    "arm_label",
    "hacking_analysis",
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


def _hacking_sentence(
    label: str, rise: int | None, drop: int | None, final_gold, hacked: bool, loss_rise, gold_floor
) -> str:
    """One plain-English sentence for every combination of loss rise / gold drop / final gold."""
    rise_s, floor_s = f"{loss_rise:.0%}", f"{gold_floor:.2f}"
    loss_part = (
        f"held-out diffusion loss rose >{rise_s} over the base at iteration {rise}"
        if rise is not None
        else f"the held-out diffusion loss stayed within {rise_s} of the base"
    )
    if not hacked:
        final_s = f" (final {final_gold:.2f})" if _is_num(final_gold) else ""
        joiner = ", although the" if rise is not None else " and"
        held = f"gold accuracy stayed \u2265 {floor_s}{final_s}"
        return f"{label} did not hack: {held}{joiner} {loss_part}."
    if drop is None:
        gold_part = f"final gold accuracy {final_gold:.2f} is below {floor_s}"
    else:
        gold_part = f"gold accuracy fell below {floor_s} at iteration {drop}"
    head = f"{label} hacked the reward: "
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
    gold claim is made: ``hacked`` is None and the sentence speaks of the loss only.
    """
    threshold = (1 + loss_rise) * float(metrics["base"]["heldout_diffusion_loss"])
    base_gold = metrics["base"].get("gold_accuracy")
    out = []
    for arm in metrics["arms"]:
        label = arm_label(arm)
        rise = _first(*_series(arm, "heldout_diffusion_loss"), lambda v: v > threshold)
        if not _is_num(base_gold):
            rise_s = f"{loss_rise:.0%}"
            loss = (
                f"its held-out diffusion loss rose >{rise_s} over the base at iteration {rise}"
                if rise is not None
                else f"its held-out diffusion loss stayed within {rise_s} of the base"
            )
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
                    label, rise, drop, final_gold, hacked, loss_rise, floor
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


def _curve_panel(ax, metrics: dict, key: str, title: str) -> None:
    for arm in metrics["arms"]:
        iters, vals = _series(arm, key)
        if iters:
            ax.plot(iters, vals, marker=".", label=arm_label(arm))
    base = metrics["base"].get(key)
    if _is_num(base):
        ax.axhline(base, color="k", ls="--", lw=1, label="base")
    ax.set(xlabel="iteration", ylabel=key, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_reward_curves(metrics: dict, path) -> Path:
    """Proxy reward and gold accuracy vs iteration, one line per arm, base dashed."""
    fig = Figure(figsize=(11, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    reward = metrics.get("reward")
    _curve_panel(ax1, metrics, "proxy_reward", f"proxy reward{f' ({reward})' if reward else ''}")
    _curve_panel(ax2, metrics, "gold_accuracy", "gold accuracy")
    ax2.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def plot_pareto(metrics: dict, path) -> Path:
    """Final proxy reward vs gold accuracy and vs diversity; base as a star."""
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    algos = list(dict.fromkeys(a["algorithm"] for a in metrics["arms"]))
    style = {a: (f"C{i % 10}", _MARKERS[i % len(_MARKERS)]) for i, a in enumerate(algos)}
    base = metrics["base"]
    for ax, ykey in zip(axes, ("gold_accuracy", "diversity"), strict=True):
        seen = set()
        for arm in metrics["arms"]:
            fin = arm.get("final") or {}
            if not (_is_num(fin.get("proxy_reward")) and _is_num(fin.get(ykey))):
                continue
            color, marker = style[arm["algorithm"]]
            lab = None if arm["algorithm"] in seen else arm["algorithm"]
            seen.add(arm["algorithm"])
            ax.scatter(fin["proxy_reward"], fin[ykey], c=color, marker=marker, s=50, label=lab)
            note = _setting_str(arm.get("setting") or {}) or arm.get("label", "")
            if note:
                ax.annotate(
                    note,
                    (fin["proxy_reward"], fin[ykey]),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
        if _is_num(base.get("proxy_reward")) and _is_num(base.get(ykey)):
            ax.scatter(base["proxy_reward"], base[ykey], marker="*", s=200, c="k", label="base")
        ax.set(xlabel="final proxy_reward", ylabel=f"final {ykey}", title=f"reward vs {ykey}")
        ax.margins(0.12)  # room for the setting annotations at the edges
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def plot_heldout_loss(metrics: dict, path, loss_rise: float = 0.10) -> Path:
    """Held-out diffusion loss vs iteration per arm, with the base and the hacking threshold."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    _curve_panel(ax, metrics, "heldout_diffusion_loss", "held-out diffusion loss")
    threshold = float(metrics["base"]["heldout_diffusion_loss"]) * (1 + loss_rise)
    ax.axhline(threshold, color="r", ls=":", lw=1.2, label=f"{loss_rise:.0%} rise (hacking signal)")
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def _fmt(v) -> str:
    return f"{v:.4g}" if _is_num(v) else "\u2014"


def _metrics_table(metrics: dict) -> str:
    rows = [("base", metrics["base"])] + [
        (arm_label(a), a.get("final") or {}) for a in metrics["arms"]
    ]
    extra = sorted({k for _, m in rows for k, v in m.items() if _is_num(v)} - set(_MAIN_KEYS))
    keys = [k for k in _MAIN_KEYS if any(_is_num(m.get(k)) for _, m in rows)] + extra
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["run", *keys])
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{_fmt(m.get(k))}</td>" for k in keys)
        + "</tr>\n"
        for name, m in rows
    )
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


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
    "body{font-family:sans-serif;max-width:1150px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    "figure{display:inline-block;margin:0.5em}figcaption{font-size:0.9em;color:#555}"
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
) -> Path:
    """Write ``out_dir/report.html`` (plus its PNG figures) for one- or multi-regime metrics.

    ``grids`` maps a caption to a sample-grid image; images are linked by relative path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>{html.escape(title)}</h1>\n"]
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

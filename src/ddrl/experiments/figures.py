"""The comparison's figures (matplotlib, experiments only): reward curves, reward-vs-quality
Pareto panels, the held-out diffusion loss; a panel says what is missing when no run measured
its metric."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from ddrl.experiments.hacking import arm_label, first_firings, is_num, series

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")  # one per setting of an algorithm
WATCH_MARKERS = ("o", "s", "D", "^", "v", "p", "h", "8")  # one per watch rule (hollow)


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
    """One line per arm (a fixed colour per arm) and the base dashed, with a mark (a shape per
    watch rule, legend "watch: RULE") where each rule first fired on that arm; False (and a
    panel saying what is missing) when no run has ``key``."""
    drawn = False
    rules = list(dict.fromkeys(r for arm in metrics["arms"] for r in first_firings(arm)))
    for i, arm in enumerate(metrics["arms"]):
        iters, vals = series(arm, key)
        if iters:
            ax.plot(iters, vals, marker=".", color=f"C{i % 10}", label=arm_label(arm))
            drawn = True
        at = dict(zip(iters, vals, strict=True))
        for rule, it in first_firings(arm).items():
            if it in at:
                ax.scatter(
                    it,
                    at[it],
                    marker=WATCH_MARKERS[rules.index(rule) % len(WATCH_MARKERS)],
                    s=90,
                    facecolors="none",
                    edgecolors=f"C{i % 10}",
                    linewidths=1.6,
                    zorder=5,
                    label=f"watch: {rule}",
                )
    base = (metrics.get("base") or {}).get(key)
    if is_num(base):
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
        styles.append((f"C{algos.index(arm['algorithm']) % 10}", MARKERS[k % len(MARKERS)]))
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
            if is_num(fin.get("proxy_reward")) and is_num(fin.get(ykey)):
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
        if is_num(base.get("proxy_reward")) and is_num(base.get(ykey)):
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
    if drawn and is_num(base):
        threshold = float(base) * (1 + loss_rise)
        ax.axhline(
            threshold, color="r", ls=":", lw=1.2, label=f"{loss_rise:.0%} rise (hacking signal)"
        )
    _figure_legend(fig, [ax], loc="outside right upper", ncol=1)
    return save_figure(fig, path)

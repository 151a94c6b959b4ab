"""The watch's signals: numbers computed from one evaluation's metrics and the base's (the
evaluation at iteration 0), each named so a rule can use it (torch-free).

Relative changes are taken against the base: rise(m) = m / m₀ − 1 and drop(m) = 1 − m / m₀
(|m₀| in the denominator; m − m₀ when m₀ = 0). Named signals:

* ``heldout_loss_rise``: rise of the held-out diffusion loss (the paper's sign: > 10%).
* ``gold_gap``: min(rise(proxy_reward), drop(gold)), gold = gold_accuracy (else gold_reward):
  positive only when the proxy rose and the gold score fell, and by the smaller of the two.
* ``ood_drop``: the largest drop of any out-of-domain reward (``eval.rewards``);
  ``ood_<name>_drop`` that of one of them.
* ``fd_rise``: rise of the Fréchet distance to held-out data (gold features; else ``fd_feature``).
* ``diversity_drop``: drop of the within-prompt pixel diversity.
* ``saturated_rate``: (saturation_rate + out_of_range_rate) − the same at the base: how many
  more pixels (a fraction) are blown out or outside the codec's range than the base had.

Any evaluation metric may also be used as it is (``gold_accuracy<0.8``) or as ``<metric>_rise``
/ ``<metric>_drop``.
"""

from __future__ import annotations

from ddrl.errors import DDRLError

# Every metric ``ddrl.evaluation.evaluate`` can log (ood_<name> besides).
METRICS = (
    "proxy_reward",
    "gold_reward",
    "gold_accuracy",
    "diversity",
    "diversity_feature",
    "heldout_diffusion_loss",
    "fd",
    "fd_feature",
    "out_of_range_rate",
    "saturation_rate",
)
NAMED = {
    "heldout_loss_rise": "a held-out diffusion loss (held-out images: data.eval_images)",
    "gold_gap": "a gold evaluator (gold.name)",
    "ood_drop": "out-of-domain rewards (eval.rewards)",
    "fd_rise": "a Fréchet distance (a gold evaluator, or eval.features with held-out images)",
    "diversity_drop": "the pixel diversity (always measured)",
    "saturated_rate": "a codec with a value range",
}


def is_metric(name: str) -> bool:
    """An evaluation metric's name (ood_<reward> included)."""
    ood = name.startswith("ood_") and len(name) > 4 and not name.endswith(("_rise", "_drop"))
    return name in METRICS or ood


def check_signal(name: str, rule: str = "") -> None:
    """DDRLError unless ``name`` is a named signal, a metric, or <metric>_rise / _drop."""
    base = name.removesuffix("_rise").removesuffix("_drop")
    if name in NAMED or is_metric(name) or (base != name and is_metric(base)):
        return
    where = f"watch rule {rule!r}: " if rule else ""
    raise DDRLError(
        f"{where}unknown signal {name!r}; allowed: {', '.join(NAMED)}, ood_<reward>_drop, an "
        f"evaluation metric ({', '.join(METRICS)}, ood_<reward>) or <metric>_rise / _drop"
    )


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def rise(value: float, base: float) -> float:
    """(value − base) / |base|: value / base − 1 for a positive base (value − base when 0)."""
    return (value - base) / abs(base) if base else value - base


def signals(row: dict, base: dict) -> dict[str, float]:
    """Every signal measurable from evaluation ``row`` and the base evaluation ``base``."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if is_metric(k) and _num(v):
            out[k] = float(v)
            if _num(base.get(k)):
                out[f"{k}_rise"] = rise(float(v), float(base[k]))
                out[f"{k}_drop"] = -out[f"{k}_rise"]
    if "heldout_diffusion_loss_rise" in out:
        out["heldout_loss_rise"] = out["heldout_diffusion_loss_rise"]
    gold = next((g for g in ("gold_accuracy", "gold_reward") if f"{g}_drop" in out), None)
    if gold is not None and "proxy_reward_rise" in out:
        out["gold_gap"] = min(out["proxy_reward_rise"], out[f"{gold}_drop"])
    ood = [v for k, v in out.items() if k.startswith("ood_") and k.endswith("_drop")]
    if ood:
        out["ood_drop"] = max(ood)
    fd = next((f for f in ("fd", "fd_feature") if f"{f}_rise" in out), None)
    if fd is not None:
        out["fd_rise"] = out[f"{fd}_rise"]
    if "saturation_rate_rise" in out:  # absolute fractions of pixels, over the base's
        out["saturated_rate"] = sum(
            out[k] - float(base[k])
            for k in ("saturation_rate", "out_of_range_rate")
            if f"{k}_rise" in out
        )
    return out

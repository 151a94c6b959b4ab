"""Activation memory and forward FLOPs per sequence: the one place their coefficients live.

``ACTIVATION_FITS`` holds, per family, the bytes per token per unit of width per block that a
forward with gradient keeps for the backward, at 2-byte (bfloat16) activations:

- ``per_block`` (no gradient checkpointing): every block's saved tensors;
- ``kept`` (with checkpointing): what each block keeps (its input), plus one block's
  ``per_block`` recomputed during the backward;
- ``inference``: the live tensors of one block in a forward without gradient (rollout);
- ``source``: "formula ..." or "measured ..." (a fit to measured peaks).

Measured (``benchmarks/memory_fit.py``, docs/MODELS.md §3, 2026-12-07): SD3.5-Medium and
Wan2.1-1.3B at their real width and depth with random weights, bf16 activations (autocast) on
the 2-core CPU, one training pass at 3–4 token counts; the slope of the pass's memory in
tokens is the activations (every weight page touched before the pass; line residuals 0.6–12%,
intercepts within ±0.33 GiB of zero). LoRA keeps more per token than full
fine-tuning (each adapted layer's input is cast and saved again for its adapter). Keys are the
family, or "family:lora" / "family:full"; ``inference`` stays the formula's (not measured).
The other families use the formula.

The formula values are Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", eq. 1: s·b·h·(34 + 5·a·s/h) bytes per layer) without the attention-score
term (flash attention keeps no s×s matrix): 34 bytes; 2 bytes for a checkpointed block's bf16
input; 16 bytes for a no-grad block (input, q/k/v, a 4h-wide MLP hidden: (1 + 3 + 4)·2).
"""

from __future__ import annotations

from dataclasses import dataclass

from ddrl.models import shapes


@dataclass(frozen=True)
class ActivationFit:
    per_block: float  # bytes / (token · width · block), no checkpointing, 2-byte activations
    kept: float  # bytes / (token · width · block) kept with gradient checkpointing
    inference: float  # bytes / (token · width) live in one no-grad block
    source: str


FORMULA = ActivationFit(
    34.0, 2.0, 16.0, "formula: Korthikanti et al. 2022, 34·s·h bytes per block (no s² term)"
)
MEASURED = "measured: benchmarks/memory_fit.py, real shapes, bf16 CPU, 2026-12-07"
ACTIVATION_FITS: dict[str, ActivationFit] = {
    "sd3:lora": ActivationFit(85.0, 12.8, 16.0, MEASURED + " (LoRA)"),
    "wan:lora": ActivationFit(119.5, 16.3, 16.0, MEASURED + " (LoRA)"),
    "wan:full": ActivationFit(54.3, 16.3, 16.0, MEASURED + " (full; kept: LoRA's)"),
}
ACTIVATION_FITS |= {
    family: FORMULA
    for family in (
        "sd3",
        "flux",
        "cosmos",
        "wan",
        "qwen_image",
        "qwen_image_edit",
        "flux2",
        "flux2_klein",
        "z_image",
        "digits",
        "toy2d",
    )
}


def _resolve(family_or_checkpoint: str) -> tuple[str, tuple[int, int] | None]:
    """(family, (blocks, width) of its published transformer, or None)."""
    from ddrl.models import PIPELINES
    from ddrl.plan.sizes import FAMILY_DEFAULT, dims

    name = family_or_checkpoint
    if name in ACTIVATION_FITS and name not in FAMILY_DEFAULT:
        return name, None
    checkpoint = FAMILY_DEFAULT.get(name, name)
    real = shapes.real_config(checkpoint)
    return PIPELINES[real["pipeline"]], dims(real["transformer"])


def fit_of(family: str, finetune: str = "", fits: dict | None = None) -> ActivationFit:
    """The coefficients of ``family`` trained with ``finetune`` ("lora" / "full"): a measured
    "family:finetune" fit where there is one, else the family's entry (the formula)."""
    table = fits or ACTIVATION_FITS
    return table.get(f"{family}:{finetune}") or table[family]


def activation_bytes(
    family_or_checkpoint: str,
    tokens: float,
    *,
    checkpointing: bool = False,
    act_bytes: int = 2,
    layers: int | None = None,
    hidden: int | None = None,
    grad: bool = True,
    fits: dict[str, ActivationFit] | None = None,
    finetune: str = "",
) -> float:
    """Bytes of activations of ONE sequence of ``tokens`` tokens through the transformer:
    with gradient, per_block·L·s·h (no checkpointing) or (kept·L + per_block)·s·h; without
    gradient, inference·s·h. ``family_or_checkpoint``: a family (its published default
    checkpoint gives L and h) or a shapes checkpoint; ``layers`` / ``hidden`` override them.
    ``act_bytes``: bytes per activation element (2 under bf16 autocast, 4 in float32);
    ``finetune``: "lora" / "full" picks a measured fit (``fit_of``)."""
    family, dl = _resolve(family_or_checkpoint)
    if layers is None or hidden is None:
        if dl is None:
            raise ValueError(f"{family_or_checkpoint}: give layers= and hidden=")
        layers, hidden = layers or dl[0], hidden or dl[1]
    fit = fit_of(family, finetune, fits)
    scale = act_bytes / 2
    sh = tokens * hidden * scale
    if not grad:
        return fit.inference * sh
    if checkpointing:
        return (fit.kept * layers + fit.per_block) * sh
    return fit.per_block * layers * sh


def forward_flops(
    params: float, tokens: float, layers: int, hidden: int, cross: float = 0
) -> float:
    """FLOPs of one forward of one sequence: 2·P·s (every weight multiplies every token) +
    4·L·s²·h (attention scores and their weighted sum, 2·s²·h each) + 4·L·s·s_text·h for
    cross-attention to ``cross`` text tokens."""
    return 2 * params * tokens + 4 * layers * hidden * tokens * (tokens + cross)

"""``ddrl plan``: a run's per-GPU memory by part and its FLOPs by phase, computed from the
config and the published model configs on the meta device (no weights, no data).

- ``ddrl.plan.sizes``: hub id → published config, parameter counts, LoRA and text encoders;
- ``ddrl.plan.model``: the configured model's numbers and sample geometry;
- ``ddrl.plan.activations``: activation bytes and forward FLOPs per sequence, with the
  per-family coefficient table (``ACTIVATION_FITS``: "formula" now, "measured" once fitted);
- ``ddrl.plan.memory``: parts, phases, totals, FLOPs and the suggestions.
"""

from ddrl.plan.activations import ACTIVATION_FITS, ActivationFit, activation_bytes
from ddrl.plan.memory import estimate, suggestions

__all__ = ["ACTIVATION_FITS", "ActivationFit", "activation_bytes", "estimate", "suggestions"]

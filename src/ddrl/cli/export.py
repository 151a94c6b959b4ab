"""`ddrl export`: a run's trained weights as files the plain diffusers pipeline reads, with a
model card.

Without ``--merge`` the trained part only (a LoRA adapter in the format diffusers'
``load_lora_weights`` reads, or the full transformer); with ``--merge`` a self-contained
pipeline folder (every component of the base, the adapter fused in) that
``Pipeline.from_pretrained(folder)`` loads like any other checkpoint. Either way the folder gets
a ``README.md`` in the Hugging Face Hub's model-card format: what was trained (family, base,
algorithm, rewards, iterations, LoRA or full, merged or not), the last logged metrics, and a
usage snippet with the sizes the model was trained at (plain diffusers reads no
``ddrl_defaults.json``: without them a pipeline renders at its full default size) and the
packages its pipeline needs. Weights and card appear together or not at all.
"""

from __future__ import annotations

import json
from pathlib import Path

from ddrl.cli.card import CARD, model_card
from ddrl.config import load_config
from ddrl.errors import DDRLError


def export(run: Path, out: Path, merge: bool, step: int | None = None) -> Path:
    """Write the trained weights (``merge``: a whole merged pipeline) and the model card into
    ``out`` (new), all at once."""
    from ddrl.io import atomic_dir
    from ddrl.models.hf import DEFAULTS_FILE
    from ddrl.training.saved import load_run_generator

    run, out = Path(run), Path(out)
    if out.exists():
        raise DDRLError(f"--out {out} exists; choose a new folder (nothing is overwritten)")
    cfg = load_config(run / "config.json") if (run / "config.json").is_file() else None
    gen = load_run_generator(run, step)
    if merge and not hasattr(gen, "export"):
        raise DDRLError(
            f"--merge applies to the diffusers families; a {type(gen).__name__} is saved whole "
            "(export without --merge)"
        )
    card = model_card(gen, out, merge, run, cfg, step)
    with atomic_dir(out, race_ok=False) as tmp:
        if merge:
            gen.export(tmp)
            if gen.frames:  # the trained size travels with the folder (ddrl reads it back)
                size = {"height": gen.height, "width": gen.width, "frames": gen.frames}
                (tmp / DEFAULTS_FILE).write_text(json.dumps(size))
        else:
            gen.save_pretrained(tmp)
        (tmp / CARD).write_text(card)
    return out


def cmd_export(args) -> None:
    out = export(Path(args.run), Path(args.out), merge=args.merge, step=args.step)
    print(f"exported to {out}")

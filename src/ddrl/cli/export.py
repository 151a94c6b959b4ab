"""`ddrl export`: a run's trained weights as files the plain diffusers pipeline reads.

Without ``--merge`` the trained part only (a LoRA adapter in the format diffusers'
``load_lora_weights`` reads, or the full transformer); with ``--merge`` a self-contained
pipeline folder (every component of the base, the adapter fused in) that
``Pipeline.from_pretrained(folder)`` loads like any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from ddrl.config import load_config
from ddrl.dist.checkpoint import find_checkpoint, load_trained
from ddrl.errors import DDRLError
from ddrl.models import load_generator
from ddrl.models.base import Generator
from ddrl.training.components import load_base


def load_run_generator(run: Path, step: int | None = None) -> Generator:
    """RUN/final, or the ``step`` checkpoint (its EMA weights when kept) on the run's base."""
    run = Path(run)
    if not (run / "config.json").is_file():
        if (run / "generator.json").is_file() and step is None:
            return load_generator(run)
        raise DDRLError(f"{run} is not a run folder (no config.json) or a saved model folder")
    cfg = load_config(run / "config.json")
    if step is None and (run / "final" / "generator.json").is_file():
        return load_generator(run / "final", config=cfg.model)
    ckpt = find_checkpoint(run, step)
    gen, _ = load_base(cfg)
    load_trained(gen.denoiser, ckpt)
    return gen


def export(run: Path, out: Path, merge: bool, step: int | None = None) -> Path:
    """Write the trained weights (``merge``: a whole merged pipeline) into ``out`` (new)."""
    out = Path(out)
    if out.exists():
        raise DDRLError(f"--out {out} exists; choose a new folder (nothing is overwritten)")
    gen = load_run_generator(run, step)
    if not merge:
        gen.save_pretrained(out)
        return out
    if not hasattr(gen, "export"):
        raise DDRLError(
            f"--merge applies to the diffusers families; a {type(gen).__name__} is saved whole "
            "(export without --merge)"
        )
    return gen.export(out)


def cmd_export(args) -> None:
    out = export(Path(args.run), Path(args.out), merge=args.merge, step=args.step)
    print(f"exported to {out}")

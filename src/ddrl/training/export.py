"""`ddrl export`: a run's trained weights as files the plain diffusers pipeline reads.

Without ``--merge`` the trained part only (a LoRA adapter in the format diffusers'
``load_lora_weights`` reads, or the full transformer); with ``--merge`` a self-contained
pipeline folder (every component of the base, the adapter fused in) that
``Pipeline.from_pretrained(folder)`` loads like any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from ddrl.config import load_config
from ddrl.dist.checkpoint import fingerprint, load_checkpoint, load_into
from ddrl.errors import DDRLError
from ddrl.models import Generator, load_generator
from ddrl.training.ema import trainable


def load_run_generator(run: Path, step: int | None = None) -> Generator:
    """RUN/final, or the ``step`` checkpoint (its EMA weights when kept) on the run's base."""
    from ddrl.evaluation.run_eval import _checkpoint
    from ddrl.training.components import load_base

    run = Path(run)
    if not (run / "config.json").is_file():
        if (run / "generator.json").is_file() and step is None:
            return load_generator(run)
        raise DDRLError(f"{run} is not a run folder (no config.json) or a saved model folder")
    cfg = load_config(run / "config.json")
    if step is None and (run / "final" / "generator.json").is_file():
        return load_generator(run / "final", config=cfg.model)
    ckpt = _checkpoint(run, step)
    gen, _ = load_base(cfg)
    meta, parts = load_checkpoint(ckpt)
    if meta.get("base_fingerprint") != fingerprint(gen.denoiser):
        raise DDRLError(f"checkpoint {ckpt} was not trained from this run's base model")
    load_into(trainable(gen.denoiser), parts["ema" if "ema" in parts else "model"], str(ckpt))
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

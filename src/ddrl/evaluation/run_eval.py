"""`ddrl eval`: evaluate a run's checkpoint (or any saved model folder) into eval.json."""

from __future__ import annotations

import json
from pathlib import Path

from ddrl.config import PRESET_NAMES, build_config, load_config
from ddrl.dist.checkpoint import fingerprint, latest_checkpoint, load_checkpoint, load_into
from ddrl.errors import DDRLError
from ddrl.evaluation.evaluate import evaluate_components, save_prompt_grid
from ddrl.training.components import build_components, device_of
from ddrl.training.ema import trainable
from ddrl.training.runlog import finite_or_null


def _checkpoint(run: Path, step: int | None) -> Path:
    if step is None:
        return latest_checkpoint(run)
    path = run / "checkpoints" / f"step-{step:06d}"
    if not (path / "state.json").is_file():
        kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
        kept_s = ", ".join(kept) or "none"
        raise DDRLError(f"no checkpoint for step {step} in {run}; kept: {kept_s}")
    return path


def evaluate_run(
    run: Path,
    step: int | None = None,
    overrides: list[str] = (),
    out: Path | None = None,
    preset: str = "",
    files: list[str] = (),
) -> dict:
    """Evaluate RUN (a run folder: its latest or ``step`` checkpoint, EMA weights if kept;
    or a model folder with generator.json). Overrides may set eval.* and reward.* keys."""
    run = Path(run)
    if out is not None and (out.is_dir() or not out.parent.is_dir()):  # before minutes of work
        why = "is a folder" if out.is_dir() else f"is in a missing folder ({out.parent})"
        raise DDRLError(f"--out {out} {why}; allowed: a file path in an existing folder")
    if (run / "config.json").is_file():
        if preset or files:
            raise DDRLError(
                f"{run} is a run: it is evaluated with its own config.json; --preset and "
                "--config apply to model folders only (override eval.*, reward.*, gold.* instead)"
            )
        cfg = load_config(
            run / "config.json",
            list(overrides),
            ("eval.", "reward.", "gold.", "sampler.eval_steps"),
            "ddrl eval of a run",
        )
        c = build_components(cfg)
        ckpt = _checkpoint(run, step)
        meta, parts = load_checkpoint(ckpt)
        den = c.gen.denoiser  # its trainable parameters: all, or the LoRA adapters
        if meta.get("base_fingerprint") != fingerprint(den):
            raise DDRLError(f"checkpoint {ckpt} was not trained from this run's base model")
        has_ema = "ema" in parts
        load_into(trainable(den), parts["ema" if has_ema else "model"], f"checkpoint {ckpt}")
        source = {"checkpoint": str(ckpt), "iteration": meta["iteration"], "ema": has_ema}
    elif (run / "generator.json").is_file():
        if step is not None:
            raise DDRLError(f"{run} is a model folder, not a run; --step does not apply")
        # The model folder is the base: nothing else is loaded or pretrained. A built-in
        # family's folder brings its own preset (data, reward, gold) unless one is given.
        family = json.loads((run / "generator.json").read_text()).get("type", "")
        own = [f"preset={family}"] if family in PRESET_NAMES and not preset else []
        chosen = [f"preset={preset}"] if preset else []
        cfg = build_config(files, [*own, *chosen, *overrides, f"model.base={run}"])
        if family and cfg.model.name != family:
            raise DDRLError(
                f"{run} holds a {family!r} model but the preset's model is {cfg.model.name!r}; "
                f"pass --preset {family} or model.name={family}"
            )
        c = build_components(cfg)
        source = {"model_dir": str(run)}
    else:
        raise DDRLError(f"{run} is neither a run folder (config.json) nor a model (generator.json)")
    dev = device_of(cfg)
    metrics, raw, _ = evaluate_components(c.gen.to(dev), c, cfg, dev)
    result = {
        **metrics,
        **source,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "reward": cfg.reward.name,
        "eval_seed": cfg.eval.seed,
        "samples_per_prompt": cfg.eval.samples_per_prompt,
    }
    out = out or run / "eval.json"
    out.write_text(json.dumps(finite_or_null(result), indent=1, sort_keys=True))
    save_prompt_grid(raw, len(c.data.prompts), out.with_name(out.stem + "_samples.png"))
    return result

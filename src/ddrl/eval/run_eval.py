"""`ddrl eval`: evaluate a run's checkpoint (or any saved model folder) into eval.json."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..checkpoint import latest_checkpoint, load_checkpoint
from ..components import build_components, device_of
from ..config import build_config, load_config
from ..errors import DDRLError
from .evaluate import evaluate_components, save_prompt_grid


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
    run: Path, step: int | None = None, overrides: list[str] = (), out: Path | None = None
) -> dict:
    """Evaluate RUN (a run folder: its latest or ``step`` checkpoint, EMA weights if kept;
    or a model folder with backbone.json). Overrides may set eval.* and reward.* keys."""
    run = Path(run)
    if (run / "config.json").is_file():
        cfg = load_config(
            run / "config.json",
            list(overrides),
            ("eval.", "reward.", "sampler.eval_steps"),
            "ddrl eval of a run",
        )
        c = build_components(cfg)
        ckpt = _checkpoint(run, step)
        model, ema = copy.deepcopy(c.base), copy.deepcopy(c.base)
        has_ema = (ckpt / "ema.safetensors").is_file()
        state = load_checkpoint(ckpt, model, ema if has_ema else None)
        model = ema if has_ema else model
        source = {"checkpoint": str(ckpt), "iteration": state["iteration"], "ema": has_ema}
    elif (run / "backbone.json").is_file():
        if step is not None:
            raise DDRLError(f"{run} is a model folder, not a run; --step does not apply")
        # The model folder is the base: nothing else is loaded or pretrained.
        cfg = build_config(overrides=[*overrides, f"model.base={run}"])
        c = build_components(cfg)
        model = c.base
        source = {"model": str(run)}
    else:
        raise DDRLError(f"{run} is neither a run folder (config.json) nor a model (backbone.json)")
    dev = device_of(cfg)
    metrics, raw, _ = evaluate_components(model.to(dev), c, cfg, dev)
    result = {
        **metrics,
        **source,
        "task": cfg.task,
        "reward": cfg.reward.name,
        "eval_seed": cfg.eval.seed,
        "samples_per_prompt": cfg.eval.samples_per_prompt,
    }
    out = out or run / "eval.json"
    out.write_text(json.dumps(result, indent=1, sort_keys=True))
    save_prompt_grid(raw, len(c.data.prompts), out.with_name(out.stem + "_samples.png"))
    return result

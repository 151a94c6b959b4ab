"""`ddrl eval` (a run's checkpoint, or any saved model folder, into eval.json) and `ddrl report`
(the comparison report of run folders)."""

from __future__ import annotations

import json
from pathlib import Path

from ddrl.config import PRESET_NAMES, RunConfig, build_config, load_config
from ddrl.data.published import require_data
from ddrl.errors import DDRLError
from ddrl.training.runlog import finite_or_null


def eval_config(
    run: Path, step: int | None, overrides: list[str], preset: str, files: list[str]
) -> RunConfig:
    """The config ``ddrl eval`` evaluates ``run`` with: a run's own config.json (only eval.*,
    reward.*, gold.* and sampler.eval_steps may change), or for a saved model folder its
    family's preset (or the one given) with the folder as the base."""
    if (run / "config.json").is_file():
        if preset or files:
            raise DDRLError(
                f"{run} is a run: it is evaluated with its own config.json; --preset and "
                "--config apply to model folders only (override eval.*, reward.*, gold.* instead)"
            )
        return load_config(
            run / "config.json",
            list(overrides),
            ("eval.", "reward.", "gold.", "sampler.eval_steps"),
            "ddrl eval of a run",
        )
    if not (run / "generator.json").is_file():
        raise DDRLError(f"{run} is neither a run folder (config.json) nor a model (generator.json)")
    if step is not None:
        raise DDRLError(f"{run} is a model folder, not a run; --step does not apply")
    # The model folder is the base: nothing else is loaded or pretrained. A built-in family's
    # folder brings its own preset (data, reward, gold) unless one is given.
    family = json.loads((run / "generator.json").read_text()).get("type", "")
    own = [f"preset={family}"] if family in PRESET_NAMES and not preset else []
    chosen = [f"preset={preset}"] if preset else []
    cfg = build_config(files, [*own, *chosen, *overrides, f"model.base={run}"])
    if family and cfg.model.name != family:
        raise DDRLError(
            f"{run} holds a {family!r} model but the preset's model is {cfg.model.name!r}; "
            f"pass --preset {family} or model.name={family}"
        )
    return cfg


def evaluate_run(
    run: Path,
    step: int | None = None,
    overrides: list[str] = (),
    out: Path | None = None,
    preset: str = "",
    files: list[str] = (),
) -> dict:
    """Evaluate RUN (a run folder: its latest or ``step`` checkpoint, EMA weights if kept;
    or a model folder with generator.json) into ``out`` (default RUN/eval.json) and a
    picture of the samples beside it; returns the metrics with where they came from."""
    run = Path(run)
    if out is not None and (out.is_dir() or not out.parent.is_dir()):  # before minutes of work
        why = "is a folder" if out.is_dir() else f"is in a missing folder ({out.parent})"
        raise DDRLError(f"--out {out} {why}; allowed: a file path in an existing folder")
    cfg = eval_config(run, step, list(overrides), preset, list(files))
    require_data(cfg.data)  # the prompt files, before the model loads
    # Imported once the config is checked: torch and the families.
    from ddrl.dist.checkpoint import find_checkpoint, load_trained
    from ddrl.evaluation.evaluate import evaluate_components
    from ddrl.evaluation.pictures import save_prompt_grid
    from ddrl.training.components import build_components, device_of

    c = build_components(cfg, training=False)
    if (run / "config.json").is_file():
        ckpt = find_checkpoint(run, step)
        meta = load_trained(c.gen.denoiser, ckpt)  # all weights, or the LoRA adapters
        has_ema = "ema" in meta["skeletons"]
        source = {"checkpoint": str(ckpt), "iteration": meta["iteration"], "ema": has_ema}
    else:
        source = {"model_dir": str(run)}
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


def cmd_eval(args) -> None:
    result = evaluate_run(
        Path(args.run),
        step=args.step,
        overrides=args.overrides,
        out=Path(args.out) if args.out else None,
        preset=args.preset,
        files=args.config,
    )
    print(json.dumps(finite_or_null(result), indent=1))


def cmd_report(args) -> None:
    from ddrl.experiments.runs_report import report_runs  # plotting: only for this command

    votes = Path(args.votes) if args.votes else None
    print(report_runs([Path(r) for r in args.runs], Path(args.out), votes=votes))

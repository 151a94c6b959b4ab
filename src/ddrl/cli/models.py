"""`ddrl pretrain` (the embedded base, trained once and cached) and `ddrl synth` (the synthetic
data set generated once from the base)."""

from __future__ import annotations

from pathlib import Path

from ddrl.cli.args import resolve_args
from ddrl.data.published import require_data
from ddrl.errors import DDRLError


def cmd_pretrain(args) -> None:
    cfg = resolve_args(args)
    from ddrl.training.pretrain import ensure_base  # after the config is checked: torch

    _, path = ensure_base(cfg.model.name, cfg.data.name, cfg.pretrain, cfg.model.cache_dir)
    print(path)


def cmd_synth(args) -> None:
    extra = [f"data.synthetic_per_prompt={args.per_prompt}"] if args.per_prompt else []
    cfg = resolve_args(args, extra)
    require_data(cfg.data)  # the prompt files, before the base model loads
    if args.out and Path(args.out).is_dir():  # checked before the base is sampled
        raise DDRLError(f"--out {args.out} is a folder; allowed: a .safetensors file path")
    from ddrl.data.pools import load_data  # after the checks: torch and the families
    from ddrl.training.components import load_base, synthesize_for, synthetic_path

    gen, base_path = load_base(cfg)
    data = load_data(cfg.data)
    path = Path(args.out) if args.out else synthetic_path(cfg, base_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pool = synthesize_for(cfg, gen, data, path)
    print(f"wrote {len(pool)} synthetic samples to {path}")

"""`ddrl sample`: N samples per prompt from a run or a saved model, drawn as evaluation draws
them (``ddrl.sampling.sample_ode``: the Euler ODE over ``sampler.eval_steps`` steps of the
``eval.grid`` grid, ``sampler.shift``, the evaluation's guidance) and written whole or not at
all: one PNG per image (its own size), one mp4 per video (an animated GIF without
imageio-ffmpeg), one scatter picture per prompt for 2-D points.

RUN is a run folder (``final/``, or ``--step N``'s checkpoint) sampled with its own config, or a
model folder (``generator.json``, or a diffusers pipeline folder with ``model_index.json``)
sampled with the default sampler settings (its family's preset for digits and toy2d). Only
``sampler.eval_steps``, ``sampler.cfg_scale`` and ``eval.cfg_scale`` may be overridden. Loading
and drawing are ``ddrl.training.saved``'s (``ddrl vote`` renders its samples with them too).
"""

from __future__ import annotations

from pathlib import Path

from ddrl.config.resolve import parse_overrides
from ddrl.errors import DDRLError, check_range, first_line
from ddrl.evaluation.config import SAMPLE_KEYS


def check_sample_args(
    run: Path,
    prompts: list[str],
    n: int,
    seed: int,
    out: Path,
    step: int | None,
    overrides,
    images: list[str] = (),
) -> None:
    """The one-line refusals ``ddrl sample`` gives before any work."""
    if not prompts:
        raise DDRLError("no prompt given; allowed: --prompt TEXT, once per prompt")
    if images and len(images) != len(prompts):
        raise DDRLError(
            f"{len(images)} --image for {len(prompts)} --prompt; allowed: one image per prompt, "
            "in the same order (or none for text-only models)"
        )
    for img in images:
        if not Path(img).is_file():
            raise DDRLError(f"--image {img!r} does not exist")
    if len(set(prompts)) != len(prompts) and images:
        raise DDRLError("with --image every --prompt must differ (each names its own image)")
    check_range("--n", n, 1)
    check_range("--seed", seed, 0, 2**63 - 1)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DDRLError(f"--out {out} is not an empty folder; allowed: a new or empty folder")
    bad = [k for k in parse_overrides(list(overrides)) if k not in SAMPLE_KEYS]
    if bad:
        raise DDRLError(f"ddrl sample may only change {', '.join(SAMPLE_KEYS)}; got {bad}")
    if (run / "config.json").is_file():
        return
    if not ((run / "generator.json").is_file() or (run / "model_index.json").is_file()):
        raise DDRLError(
            f"{run} is not a run folder (config.json) or a saved model folder (generator.json, "
            "or a diffusers pipeline's model_index.json)"
        )
    if step is not None:
        raise DDRLError(f"{run} is a model folder, not a run; --step does not apply")


def sample(
    run: Path,
    prompts: list[str],
    out: Path,
    n: int = 1,
    seed: int = 0,
    step: int | None = None,
    overrides=(),
    images: list[str] = (),
) -> list[Path]:
    """Render ``n`` samples per prompt of RUN into the new folder ``out`` (see the module
    docstring); returns the files written, prompt-major. ``images``: one condition image per
    prompt (edit and image-to-video models)."""
    run, out = Path(run), Path(out)
    check_sample_args(run, prompts, n, seed, out, step, overrides, images)
    # Imported once the arguments are checked: torch and the families.
    from ddrl.dist.checkpoint import find_checkpoint
    from ddrl.evaluation.pictures import save_scatter
    from ddrl.io import atomic_dir
    from ddrl.training.components import device_of
    from ddrl.training.saved import draw, load_for_sampling, sample_config, save_sample

    cfg = sample_config(run, overrides)
    if step is not None:  # a missing checkpoint is named before the model loads
        find_checkpoint(run, step)
    dev = device_of(cfg)
    gen = load_for_sampling(run, step).to(dev)
    given_images(gen, prompts, images)
    x = draw(gen, cfg, prompts, n, seed, dev)
    wp, ws = len(str(len(prompts) - 1)), len(str(n - 1))
    names = []
    with atomic_dir(out, race_ok=False) as tmp:
        tmp.mkdir(parents=True)
        for i in range(len(prompts)):
            rows = x[i * n : (i + 1) * n]
            if x.dim() == 2:  # 2-D points: one scatter picture of the prompt's n samples
                names.append(save_scatter(rows, tmp / f"p{i:0{wp}d}.png").name)
                continue
            for j, s in enumerate(rows):
                names.append(save_sample(s, tmp / f"p{i:0{wp}d}_s{j:0{ws}d}").name)
    return [out / name for name in names]


def given_images(gen, prompts: list[str], images: list[str]) -> None:
    """Hand the ``--image`` files to the conditioner (read at the model's size), or refuse:
    images for a text-only model, none for an edit model."""
    setter = getattr(gen.conditioner, "set_images", None)
    if images and not callable(setter):
        raise DDRLError("--image given, but this model takes no condition image")
    if not images:
        if getattr(gen, "needs_condition_images", False):
            raise DDRLError("this model edits an image per prompt: give --image FILE per --prompt")
        return
    from PIL import Image

    from ddrl.data.media import to_tensor

    size, read = (gen.height, gen.width), {}
    for p, f in zip(prompts, images, strict=True):
        try:
            read[p] = to_tensor(Image.open(f), size)
        except OSError as e:
            raise DDRLError(f"--image {f!r} is not a readable image: {first_line(e)}") from None
    setter(read)


def cmd_sample(args) -> None:
    for path in sample(
        Path(args.run),
        list(args.prompt),
        Path(args.out),
        n=args.n,
        seed=args.seed,
        step=args.step,
        overrides=args.overrides,
        images=list(args.image),
    ):
        print(path)

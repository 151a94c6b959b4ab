"""The model card ``ddrl export`` writes: ``README.md`` in the Hugging Face Hub's format with what
was trained (family, base, algorithm, rewards, iterations, LoRA or full, merged or not), the
last logged metrics, and a usage snippet at the sizes the model was trained at (plain diffusers
reads no ``ddrl_defaults.json``) with the packages its pipeline needs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ddrl.config import RunConfig
from ddrl.config.core import SamplerConfig

CARD = "README.md"
FPS = 16  # the snippet's video rate: evaluation.pictures.VIDEO_FPS, repeated so no torch loads
PROMPTS = {"digits": "3", "toy2d": ""}  # the card's example prompt; others: EXAMPLE_PROMPT
EXAMPLE_PROMPT = "a red apple on a wooden table"
# Packages the plain pipeline needs beyond diffusers, transformers and torch.
NEEDS = {
    "cosmos": ["cosmos_guardrail", "torchvision"],  # its safety checker; its frame resizing
}


def _is_hub_id_or_path(base: str) -> bool:
    """A hub id ("org/name") or an existing path: what ``base_model`` may name."""
    if not base or base == "tiny" or base.startswith("tiny:"):
        return False
    if Path(os.path.expanduser(base)).exists():
        return True
    return not base.startswith((".", "/", "~")) and base.count("/") == 1


def _rows(path: Path, step: int | None) -> list[dict]:
    from ddrl.training.runlog import read_jsonl

    return [r for r in read_jsonl(path) if step is None or r.get("iteration", 0) <= step]


def _value(v) -> str:
    if v is None:
        return "absent (not finite)"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def metrics_section(run: Path, step: int | None) -> tuple[list[str], int | None]:
    """The card's metrics (the last eval.jsonl row, else the last training reward_mean; what is
    missing is said to be missing) and the last logged iteration."""
    evals, train = _rows(run / "eval.jsonl", step), _rows(run / "metrics.jsonl", step)
    last = train[-1]["iteration"] if train else (evals[-1]["iteration"] if evals else None)
    if evals:
        row = evals[-1]
        lines = [
            f"Evaluation after iteration {row['iteration']} (the last row of `eval.jsonl`):",
            "",
            "| metric | value |",
            "|---|---|",
            *(f"| {k} | {_value(v)} |" for k, v in row.items() if k != "iteration"),
        ]
        return lines, last
    lines = ["No evaluation was logged (`eval.jsonl` has no rows).", ""]
    if train and "reward_mean" in train[-1]:
        lines.append(
            f"Training reward of the last iteration ({train[-1]['iteration']}, `metrics.jsonl`): "
            f"reward_mean = {_value(train[-1]['reward_mean'])}."
        )
    else:
        lines.append("No training metrics either (`metrics.jsonl` absent or empty).")
    return lines, last


def _sampler_of(cfg: RunConfig | None) -> tuple[SamplerConfig, str]:
    """The sampler evaluation used (a model folder: the defaults) and its grid (eval.grid)."""
    if cfg is None:
        return SamplerConfig(), "scheduler"
    return cfg.eval.sampler(cfg.sampler), cfg.eval.grid


def _scheduler_line(gen, shift: float) -> str:
    """The line giving the plain pipeline's scheduler ``sampler.shift`` (as
    ``ddrl.flow.scheduler_grid`` does: ``shift``, or ``flow_shift`` for UniPC, static)."""
    conf = gen.scheduler.config
    args = [f"{'flow_shift' if 'flow_shift' in conf else 'shift'}={shift!r}"]
    if conf.get("use_dynamic_shifting"):
        args.append("use_dynamic_shifting=False")
    return (
        "pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, "
        f"{', '.join(args)})  # sampler.shift"
    )


def diffusers_usage(gen, folder: Path, merged: bool, sampler: SamplerConfig) -> tuple[str, str]:
    """(pip line, Python snippet) that render one sample of the export with the plain
    pipeline at the trained size, the evaluation's steps and guidance."""
    family, pipeline = gen.family, gen.pipeline_class
    dtype = f"torch.{gen.cfg.dtype}"
    video = bool(gen.frames)
    imports = [pipeline]
    load: list[str]
    if merged:
        load = [f"pipe = {pipeline}.from_pretrained(folder, dtype={dtype})"]
    elif gen.lora:
        load = [
            f"pipe = {pipeline}.from_pretrained({json.dumps(gen.source)}, dtype={dtype})",
            "pipe.load_lora_weights(folder)",
        ]
    else:  # save_pretrained wrote the full transformer into folder/transformer
        tr = type(gen.denoiser.transformer).__name__
        imports.append(tr)
        load = [
            f'transformer = {tr}.from_pretrained(folder, subfolder="transformer", dtype={dtype})',
            f"pipe = {pipeline}.from_pretrained(",
            f"    {json.dumps(gen.source)}, transformer=transformer, dtype={dtype}",
            ")",
        ]
    if sampler.shift > 0 and family != "cosmos":
        load.append(_scheduler_line(gen, sampler.shift))
    w = sampler.cfg_scale
    call = [f"height={gen.height}", f"width={gen.width}"]
    if video:
        call.append(f"num_frames={gen.frames}")
    call.append(f"num_inference_steps={sampler.eval_steps}")
    call += gen.guidance_args(w)  # each family's pipeline argument for ddrl's cfg_scale
    imports_pil = getattr(gen, "needs_condition_images", False)
    if imports_pil:  # an edit model: the picture to edit
        call.append('image=Image.open("input.png").convert("RGB")')
    if gen.cfg.max_sequence_length:
        call.append(f"max_sequence_length={gen.cfg.max_sequence_length}")
    call.append("generator=torch.Generator().manual_seed(0)")
    save = (
        f'export_to_video(out.frames[0], "sample.mp4", fps={FPS})'
        if video
        else 'out.images[0].save("sample.png")'
    )
    code = [
        "import torch",
        *(["from PIL import Image"] if imports_pil else []),
        f"from diffusers import {', '.join(imports)}",
        *(["from diffusers.utils import export_to_video"] if video else []),
        "",
        f"folder = {json.dumps(str(folder))}  # this export (or its Hub repo id once uploaded)",
        *load,
        'pipe.to("cuda" if torch.cuda.is_available() else "cpu")',
        "out = pipe(",
        f"    {json.dumps(EXAMPLE_PROMPT)},",
        *(f"    {c}," for c in call),
        ")",
        save,
    ]
    pip = ['"diffusers>=0.42"', '"transformers>=5.0"', "torch"]
    pip += ["peft"] if gen.lora and not merged else []
    pip += ["imageio", "imageio-ffmpeg"] if video else []
    pip += NEEDS.get(family, [])
    return "pip install " + " ".join(pip), "\n".join(code)


def embedded_usage(gen, family: str, folder: Path, sampler: SamplerConfig, grid: str) -> str:
    """The Python snippet for an embedded family (not a diffusers pipeline): ddrl loads it."""
    points = gen.sample_shape == (2,)
    n = 200 if points else 8
    save = (
        'save_scatter(x, "samples.png")'
        if points
        else 'save_image_grid(decode_images(gen.codec, x), "samples.png")'
    )
    settings = (
        f"eval_steps={sampler.eval_steps}, cfg_scale={sampler.cfg_scale!r}, "
        f"shift={sampler.shift!r}, grid={grid!r}"
    )
    return "\n".join(
        [
            "import torch",
            "",
            "from ddrl.config.core import SamplerConfig",
            f"from ddrl.evaluation.pictures import {save.split('(')[0]}",
            "from ddrl.models import load_generator",
            *([] if points else ["from ddrl.models.base import decode_images"]),
            "from ddrl.sampling import sample_ode",
            "",
            f"folder = {json.dumps(str(folder))}  # this export",
            "gen = load_generator(folder)",
            f"sampler = SamplerConfig({settings})",
            f"x = sample_ode(gen, [{json.dumps(PROMPTS[family])}] * {n}, sampler, "
            "torch.Generator().manual_seed(0))",
            save,
        ]
    )


def _front_matter(base: str, library: str, tag: str, tags: list[str]) -> list[str]:
    lines = ["---"]
    if _is_hub_id_or_path(base):
        lines.append(f"base_model: {json.dumps(base)}")
    if library:
        lines.append(f"library_name: {library}")
    if tag:
        lines.append(f"pipeline_tag: {tag}")
    lines.append("tags:")
    lines += [f"- {json.dumps(t)}" for t in dict.fromkeys(tags)]
    return [*lines, "---", ""]


def model_card(
    gen, out: Path, merged: bool, run: Path, cfg: RunConfig | None, step: int | None
) -> str:
    """The README.md of an export: Hub front matter, what it is, the last metrics, usage."""
    diffusers = hasattr(gen, "pipeline_class")
    folder = out.absolute()
    if cfg is not None:
        family, base = cfg.model.name, cfg.model.base
    else:  # a model folder: its generator.json names the family and (diffusers) the base
        meta = json.loads((run / "generator.json").read_text())
        family, base = meta["type"], meta.get("base", "")
    algorithm = cfg.algorithm if cfg is not None else ""
    sampler, grid = _sampler_of(cfg)
    shape = tuple(gen.sample_shape)
    tag = "text-to-video" if len(shape) == 4 else "text-to-image" if len(shape) == 3 else ""
    lines = _front_matter(
        base if cfg is not None else getattr(gen, "source", ""),
        "diffusers" if diffusers else "",
        tag,
        ["ddrl", *([algorithm] if algorithm else []), "reinforcement-learning"],
    )
    title = f"{family}, fine-tuned with {algorithm}" if algorithm else f"{family} (ddrl export)"
    lines += [f"# {out.name}: {title}", ""]
    if diffusers:
        what = "a LoRA adapter" if gen.lora else "a fully fine-tuned transformer"
        if gen.lora:
            what += f" (rank {gen.cfg.lora.rank})"
        form = (
            "merged into a self-contained pipeline folder"
            if merged
            else "the trained part only, loaded onto the base pipeline"
        )
        tiny = base == "tiny" or base.startswith("tiny:")
        base_text = gen.source if not base or tiny else base
        if tiny:
            base_text = f"the tiny {family} pipeline ddrl builds from config ({gen.source})"
        size = f"{gen.height} × {gen.width} px" + (f" × {gen.frames} frames" if gen.frames else "")
    else:
        what, form = "every weight of the embedded model (ddrl's own, not a diffusers pipeline)", ""
        base_text = base or f"ddrl's cached pretrained {family} base"
        size = "2-D points" if shape == (2,) else " × ".join(map(str, shape[-2:])) + " px"
    metrics, last = metrics_section(run, step) if cfg is not None else ([], None)
    if step is not None:
        trained = f"{step} (checkpoint step-{step:06d})"
    else:
        trained = str(last) if last is not None else "absent (no metrics.jsonl)"
    facts = [
        ("Family", f"{family}" + (f" (`{gen.pipeline_class}`)" if diffusers else "")),
        ("Base", base_text),
        ("Algorithm", algorithm or "absent (a model folder: no run config)"),
        ("Reward(s)", cfg.reward.name if cfg is not None else "absent"),
        ("Iterations trained", trained if cfg is not None else "absent"),
        ("Weights", f"{what}, {form}" if form else what),
        ("Sample size", size),
        (
            "Sampler (evaluation)",
            f"{sampler.eval_steps} Euler ODE steps on the {grid} grid, cfg_scale "
            f"{sampler.cfg_scale!r}" + (f", shift {sampler.shift!r}" if sampler.shift else ""),
        ),
    ]
    lines += [f"- **{k}:** {v}" for k, v in facts]
    if diffusers and (Path(os.path.expanduser(gen.source)) / "RANDOM_WEIGHTS.txt").is_file():
        lines += ["- **RANDOM WEIGHTS:** real shapes, random weights (model.base=random): noise"]
    lines += ["", "## Metrics", ""]
    lines += metrics or ["Absent: exported from a model folder (no run logs)."]
    lines += ["", "## Usage", ""]
    if diffusers:
        pip, code = diffusers_usage(gen, folder, merged, sampler)
        lines += ["```bash", pip, "```", "", "```python", code, "```", ""]
        if family == "cosmos":
            lines += [
                "`from_pretrained` builds the pipeline's safety checker from `cosmos_guardrail` "
                "(an ImportError without it; the checker fetches its guardrail models from the "
                "Hub), and its transformer resizes the padding mask with torchvision (without it "
                "the first denoising step fails).",
                "",
            ]
        if sampler.shift and family == "cosmos":
            lines += ["(sampler.shift does not apply to Cosmos' Karras sigmas.)", ""]
        if family in ("wan", "cosmos"):
            lines += [
                "The pipeline's UniPC scheduler takes multistep updates; ddrl sampled this model "
                "with Euler steps on the same sigmas, so its samples are close to, not equal "
                "to, the pipeline's.",
                "",
            ]
    else:
        code = embedded_usage(gen, family, folder, sampler, grid)
        lines += ["```python", code, "```", ""]
    prompt = PROMPTS.get(family, EXAMPLE_PROMPT)
    n, each = (200, "one scatter picture per prompt") if shape == (2,) else (4, "a file per sample")
    lines += [
        f"With ddrl installed, `ddrl sample` draws as evaluation did, {each}:",
        "",
        "```bash",
        f"ddrl sample {json.dumps(str(folder))} --prompt {json.dumps(prompt)} --n {n} "
        f"--out samples sampler.eval_steps={sampler.eval_steps} "
        f"eval.cfg_scale={sampler.cfg_scale!r}",
        "```",
        "",
    ]
    return "\n".join(lines)

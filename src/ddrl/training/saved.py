"""A finished run or a saved model, loaded for sampling, and its samples drawn as evaluation
draws them: what ``ddrl sample``, ``ddrl export`` and ``ddrl vote`` share.

A run folder is sampled with its own config.json (``final/``, or a checkpoint), a model folder
(``generator.json``, or a diffusers pipeline's ``model_index.json``) with the default settings
(its family's preset for the embedded families). Only ``SAMPLE_KEYS`` may be overridden.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ddrl.config import PRESET_NAMES, RunConfig, build_config, load_config
from ddrl.dist.checkpoint import find_checkpoint, load_trained
from ddrl.errors import DDRLError
from ddrl.evaluation import pictures
from ddrl.evaluation.config import SAMPLE_KEYS
from ddrl.models import family_of, load_generator
from ddrl.models.base import Generator, decode_images
from ddrl.models.config import LoraConfig, ModelConfig
from ddrl.sampling import sample_ode
from ddrl.training.components import load_base


def saved_model_config(folder: Path) -> ModelConfig | None:
    """The ModelConfig a saved model folder loads with: None (its family's defaults), or for a
    LoRA adapter one with its rank, alpha and target modules, read from the adapter's own
    metadata (as diffusers' ``save_lora_weights`` wrote it)."""
    try:
        meta = json.loads((folder / "generator.json").read_text())
    except json.JSONDecodeError as e:
        raise DDRLError(f"corrupt {folder / 'generator.json'}: {e}") from e
    if meta.get("finetune") != "lora":
        return None
    path = folder / "pytorch_lora_weights.safetensors"
    try:
        with safe_open(path, "pt") as f:
            lora = json.loads((f.metadata() or {})["lora_adapter_metadata"])
        lora = LoraConfig(
            rank=int(lora["transformer.r"]),
            alpha=float(lora["transformer.lora_alpha"]),
            target_modules=",".join(sorted(lora["transformer.target_modules"])),
        )
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DDRLError(f"cannot read the LoRA adapter's settings in {path}: {e}") from e
    return ModelConfig(name=meta["type"], base=meta["base"], finetune="lora", lora=lora)


def load_run_generator(run: Path, step: int | None = None) -> Generator:
    """RUN/final, or the ``step`` checkpoint (its EMA weights when kept) on the run's base; or
    a saved model folder (generator.json)."""
    run = Path(run)
    if not (run / "config.json").is_file():
        if (run / "generator.json").is_file() and step is None:
            return load_generator(run, config=saved_model_config(run))
        raise DDRLError(f"{run} is not a run folder (no config.json) or a saved model folder")
    cfg = load_config(run / "config.json")
    if step is None and (run / "final" / "generator.json").is_file():
        return load_generator(run / "final", config=cfg.model)
    ckpt = find_checkpoint(run, step)
    gen, _ = load_base(cfg)
    load_trained(gen.denoiser, ckpt)
    return gen


def sample_config(run: Path, overrides=(), command: str = "ddrl sample") -> RunConfig:
    """A run's own config.json, or for a model folder the defaults (a built-in family's preset),
    with only the ``SAMPLE_KEYS`` overridden (``command`` names the refusal)."""
    if (run / "config.json").is_file():
        return load_config(run / "config.json", list(overrides), SAMPLE_KEYS, command)
    family = family_of(run)  # a one-line error for a corrupt generator.json / model_index.json
    own = [f"preset={family}"] if family in PRESET_NAMES else []
    return build_config(overrides=[*own, *overrides])


def load_for_sampling(run: Path, step: int | None) -> Generator:
    """The generator of RUN: a run's final/ (or ``step``) weights, or a model folder."""
    if (run / "config.json").is_file() or (run / "generator.json").is_file():
        return load_run_generator(run, step)
    return load_generator(run)  # a diffusers pipeline folder (model_index.json)


@torch.no_grad()
def draw(
    gen: Generator, cfg: RunConfig, prompts: list[str], n: int, seed: int, device="cpu"
) -> Tensor:
    """``n`` samples per prompt, prompt-major [len(prompts)·n, *sample], decoded and clamped on
    the CPU: the evaluation's Euler ODE (``cfg.eval.sampler``) from the noise of ``seed``, so
    sample j of a prompt starts from the same noise in every model of the same sample shape."""
    gen.denoiser.eval()
    every = [p for p in prompts for _ in range(n)]
    noise = torch.Generator().manual_seed(seed)
    z = sample_ode(gen, every, cfg.eval.sampler(cfg.sampler), noise, device)
    return decode_images(gen.codec, z.to(device)).cpu()


def save_sample(sample: Tensor, stem: Path) -> Path:
    """One decoded sample as ``stem``.png (an image [C, H, W]) or ``stem``.mp4 / .gif (a video
    [3, F, H, W]); returns the path written."""
    if sample.dim() == 4:
        return pictures.save_video(sample, stem)
    return pictures.save_image(sample, f"{stem}.png")

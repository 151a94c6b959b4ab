"""Real generators through diffusers: what every family (sd3, flux, cosmos, wan) shares.

A family module subclasses ``DiffusersGenerator`` and says only what differs: how its
transformer is called and what it predicts (``HFDenoiser.forward_velocity``, converted to the
loop's rectified-flow velocity v = ε − x0 on t ∈ [0, 1]), how prompts become embeddings
(``TextConditioner.encode_batch``), how the VAE's latents are normalised (``VAECodec``), the
latent shape, and how to build a tiny pipeline from config. This module loads the pipeline the
way a user does (``Pipeline.from_pretrained(hub id or folder, torch_dtype=...)``), applies LoRA
(peft, through diffusers' ``add_adapter``) or full fine-tuning, precision and gradient
checkpointing, and saves a run's weights in formats the plain diffusers pipeline reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from ddrl.errors import DDRLError, first_line
from ddrl.flow import scheduler_grid
from ddrl.io import atomic_dir
from ddrl.models.config import LoraConfig, ModelConfig
from ddrl.models.hf_parts import TORCH_DTYPES

DEFAULTS_FILE = "ddrl_defaults.json"  # optional {"height", "width", "frames"} in a pipeline
# folder: replaces the family's native size (the tiny video pipelines are 16×16 × 5 frames)
TINY_VERSION = 2  # bump when a tiny builder changes: the cache folder name includes it


def _not_the_torchvision_fallback(record: logging.LogRecord) -> bool:
    return "requires torchvision (not installed); falling back" not in record.getMessage()


# diffusers' pipeline modules import CLIP / SigLIP image processors (for IP-adapters, which ddrl
# never uses); without torchvision transformers falls back to their PIL versions and says so on
# every command. A CPU torchvision is not on the package index here (PyPI's build needs CUDA
# torch: docs/DECISIONS.md), so that one notice is dropped; the fallback itself is unchanged.
logging.getLogger("transformers.utils.import_utils").addFilter(_not_the_torchvision_fallback)


@contextlib.contextmanager
def quiet_loading():
    """No per-component progress bars or deprecation chatter while a pipeline loads (diffusers
    ≥ 0.36 prefers ``dtype=``; ``torch_dtype=`` is what every supported version reads)."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()


def load_pipeline(family: type[DiffusersGenerator], source: str, cfg: ModelConfig, **parts):
    """``Pipeline.from_pretrained(source)`` as a user would call it, with one-line errors for a
    missing folder, a folder holding another pipeline class, or unreadable weights."""
    import diffusers

    local = Path(os.path.expanduser(source))
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise DDRLError(
                f"model.base={source!r} has no model_index.json (not a pipeline folder)"
            )
        found = json.loads(index.read_text()).get("_class_name")
        if found != family.pipeline_class:
            raise DDRLError(
                f"model.base={source!r} holds a {found}; model.name={family.family!r} loads "
                f"{family.pipeline_class}"
            )
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise DDRLError(
            f"model.base={source!r} does not exist (allowed: a pipeline folder, a hub id "
            "'org/name', or 'tiny')"
        )
    dtype = TORCH_DTYPES[cfg.dtype]
    # Full fine-tuning keeps float32 master weights for the trained transformer(s).
    tdtype = torch.float32 if cfg.finetune == "full" else dtype
    dtypes = {name: tdtype for name in family.trained_names(cfg)}
    cls = getattr(diffusers, family.pipeline_class)
    try:
        with quiet_loading():
            pipe = cls.from_pretrained(
                str(local) if local.exists() else source,
                torch_dtype={**dtypes, "default": dtype},
                **({"revision": cfg.revision} if cfg.revision and not local.exists() else {}),
                **family.load_kwargs(),
                **parts,
            )
    except DDRLError:
        raise
    except Exception as e:  # missing/corrupt weights, no network for a hub id
        raise DDRLError(
            f"cannot load {family.pipeline_class} from {source!r}: {first_line(e)}"
        ) from e
    return pipe


def dynamic_mu(scheduler_config, image_seq_len: int, max_shift: float) -> float:
    """μ of the resolution-dependent shift, as SD3's and FLUX's pipelines compute it
    (``calculate_shift``) from the scheduler's config; ``max_shift``: the pipeline's own default
    when the config has none (SD3 1.16, FLUX 1.15)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sc = scheduler_config
    return calculate_shift(
        image_seq_len,
        sc.get("base_image_seq_len", 256),
        sc.get("max_image_seq_len", 4096),
        sc.get("base_shift", 0.5),
        sc.get("max_shift", max_shift),
    )


def transformer_class(source: str, component: str = "transformer") -> type:
    """The diffusers class of a pipeline's transformer (or another ``component``, e.g. Wan2.2's
    "transformer_2"), read from its model_index.json (hub id or folder) without loading any
    weights."""
    import diffusers

    local = Path(os.path.expanduser(source))
    try:
        index = diffusers.DiffusionPipeline.load_config(str(local) if local.exists() else source)
        return getattr(diffusers, index[component][1])
    except Exception as e:  # no model_index.json, no network for a hub id, no transformer
        raise DDRLError(f"cannot read the transformer class of {source!r}: {first_line(e)}") from e


def lora_targets(transformer: nn.Module, cfg: LoraConfig, default: tuple[str, ...]) -> list[str]:
    """The configured target module names, each checked to name at least one module."""
    names = [s.strip() for s in cfg.target_modules.split(",") if s.strip()] or list(default)
    have = [n for n, _ in transformer.named_modules()]
    for t in names:
        if not any(n == t or n.endswith("." + t) for n in have):
            leaves = sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in transformer.named_modules()
                    if isinstance(m, nn.Linear)
                }
            )
            raise DDRLError(
                f"model.lora.target_modules: {t!r} matches no module of the transformer; "
                f"its linear layers include {', '.join(leaves[:12])}"
            )
    return names


class DiffusersGenerator(nn.Module):
    """A diffusers pipeline behind the model protocol (denoiser / conditioner / codec).

    Subclasses set ``family``, ``pipeline_class``, ``lora_default_targets`` and implement
    ``build_parts`` and ``build_tiny``."""

    family: ClassVar[str] = ""
    pipeline_class: ClassVar[str] = ""
    lora_default_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    tiny_variants: ClassVar[tuple[str, ...]] = ("",)  # model.base "tiny" / "tiny:<variant>"

    def __init__(self, pipe, cfg: ModelConfig, source: str):
        super().__init__()
        self.pipe, self.cfg, self.source = pipe, cfg, source
        self.scheduler = pipe.scheduler
        self.build_parts(pipe, cfg)  # sets denoiser, conditioner, codec, sample_shape
        (self.height, self.width), self.frames = self.pixel_size(pipe)
        self.resolution = (self.height, self.width)  # what data reading resizes to
        for tr in self.trained_transformers():  # each with the same LoRA init (fixed seed)
            if cfg.finetune == "lora":
                from peft import LoraConfig as PeftLora

                targets = lora_targets(tr, cfg.lora, self.lora_default_targets)
                tr.requires_grad_(False)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cfg.lora.init_seed)
                    tr.add_adapter(
                        PeftLora(
                            r=cfg.lora.rank,
                            lora_alpha=cfg.lora.alpha or cfg.lora.rank,
                            lora_dropout=cfg.lora.dropout,
                            target_modules=targets,
                            init_lora_weights=True,
                        )
                    )
                for n, p in tr.named_parameters():  # adapters train in float32
                    p.requires_grad_("lora_" in n)
                    if "lora_" in n:
                        p.data = p.data.float()
            else:
                tr.requires_grad_(True)
            if cfg.gradient_checkpointing:
                tr.enable_gradient_checkpointing()
        for part in (self.conditioner, self.codec, *self.frozen_transformers()):
            part.requires_grad_(False)

    # -- what a family provides -------------------------------------------------------------
    def build_parts(self, pipe, cfg: ModelConfig) -> None:
        raise NotImplementedError

    @classmethod
    def build_tiny(cls, path: Path) -> None:
        """Write a tiny randomly initialised pipeline of this family to ``path``
        (``save_pretrained``), small enough to run on a CPU in seconds."""
        raise NotImplementedError

    @classmethod
    def trained_names(cls, cfg: ModelConfig) -> tuple[str, ...]:
        """The pipeline components that train (LoRA or full), by their pipeline attribute name;
        a family with several transformers (Wan2.2 A14B) names the configured ones."""
        return ("transformer",)

    def trained_components(self) -> dict[str, nn.Module]:
        """Pipeline component name → the trained module (``trained_names``), as the denoiser
        holds it."""
        return {"transformer": self.denoiser.transformer}

    def trained_transformers(self) -> list[nn.Module]:
        """The modules that train (LoRA adapters or every weight)."""
        return list(self.trained_components().values())

    def frozen_transformers(self) -> list[nn.Module]:
        """Denoising modules the denoiser uses but never trains (Wan2.2's other expert)."""
        return []

    def guidance_args(self, w: float) -> list[str]:
        """The pipeline ``__call__`` arguments (as source text) that guide as ddrl's
        ``sampler.cfg_scale`` = w does (the exported model card's snippet): the pipelines whose
        CFG is v_u + g·(v_c − v_u) take g = w."""
        return [f"guidance_scale={w!r}"]

    @classmethod
    def load_kwargs(cls) -> dict:
        """Extra ``from_pretrained`` arguments the family needs (e.g. a disabled safety checker)."""
        return {}

    # -- shared ------------------------------------------------------------------------------
    def pixel_size(self, pipe) -> tuple[tuple[int, int], int]:
        """((height, width), frames) of a decoded sample (frames 0 for images), from the latent
        shape and the VAE's spatial and temporal factors."""
        spatial = getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_scale_factor
        hw = (self.sample_shape[-2] * spatial, self.sample_shape[-1] * spatial)
        if len(self.sample_shape) == 4:  # [C, T, h, w]
            temporal = getattr(pipe, "vae_scale_factor_temporal", 4)
            return hw, (self.sample_shape[1] - 1) * temporal + 1
        return hw, 0

    @property
    def lora(self) -> bool:
        return self.cfg.finetune == "lora"

    def timestep_grid(self, num_steps: int, shift: float = 0.0) -> Tensor:
        """The model's own scheduler's sigmas [N + 1] from 1 to 0 (``shift`` > 0 overrides the
        scheduler's shift)."""
        return scheduler_grid(num_steps, shift, scheduler=self.scheduler)

    def lora_state(self, transformer: nn.Module | None = None) -> dict[str, Tensor]:
        """The adapter weights of ``transformer`` (default: the first trained one) in the
        diffusers/peft key format ``load_lora_weights`` reads."""
        from peft.utils import get_peft_model_state_dict

        sd = get_peft_model_state_dict(transformer or self.trained_transformers()[0])
        return {k: v.detach().cpu().contiguous() for k, v in sd.items()}

    def save_pretrained(self, path: str | Path) -> None:
        """A run's weights, small: LoRA → pytorch_lora_weights.safetensors (diffusers'
        ``load_lora_weights`` format, alpha in its metadata); full → transformer/ (diffusers
        format). generator.json names the family and the base the rest comes from."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        trained = self.trained_components()
        for name, tr in trained.items():
            if self.lora:
                meta = tr.peft_config["default"].to_dict()
                type(self.pipe).save_lora_weights(
                    path,
                    transformer_lora_layers=self.lora_state(tr),
                    transformer_lora_adapter_metadata=meta,
                    weight_name=lora_file(name),
                )
            else:
                tr.save_pretrained(path / name, safe_serialization=True)
        info = {"type": self.family, "base": self.source, "finetune": self.cfg.finetune}
        if list(trained) != ["transformer"]:  # several or other components (Wan2.2 A14B)
            info["trained"] = list(trained)
        (path / "generator.json").write_text(json.dumps(info, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, config: ModelConfig | None = None):
        """Load a pipeline (hub id or folder), or a folder this class saved (generator.json:
        the base plus the trained adapter or transformer)."""
        cfg = config or ModelConfig(name=cls.family)
        source = str(path)
        meta_path = Path(os.path.expanduser(source)) / "generator.json"
        if not meta_path.is_file():
            return cls(load_pipeline(cls, source, cfg), cfg, source)
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DDRLError(f"corrupt {meta_path}: {e}") from e
        saved = meta_path.parent
        parts = {}
        if meta.get("finetune") == "full":  # the class from the base's model_index.json
            for name in meta.get("trained", ["transformer"]):
                tcls = transformer_class(meta["base"], name)
                parts[name] = tcls.from_pretrained(saved / name)
        gen = cls(load_pipeline(cls, meta["base"], cfg, **parts), cfg, meta["base"])
        if meta.get("finetune") == "lora":
            gen.load_adapter(saved)
        return gen

    def load_adapter(self, folder: Path) -> None:
        """Load a saved adapter into the trainable LoRA (this generator must be model.finetune
        = "lora" with the same targets and rank)."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        if not self.lora:
            raise DDRLError(f"{folder} holds a LoRA adapter; load it with model.finetune=lora")
        for name, tr in self.trained_components().items():
            file = Path(folder) / lora_file(name)
            if not file.is_file():
                raise DDRLError(
                    f"{folder} has no {file.name}: it holds no adapter for the {name} this "
                    "model.* trains"
                )
            sd = {k.removeprefix("transformer."): v for k, v in load_file(file).items()}
            res = set_peft_model_state_dict(tr, sd)
            missing = [k for k in getattr(res, "missing_keys", []) if "lora_" in k]
            if missing or getattr(res, "unexpected_keys", []):
                raise DDRLError(
                    f"adapter in {file} does not fit model.lora (missing {missing[:2]}, "
                    f"unexpected {list(getattr(res, 'unexpected_keys', []))[:2]})"
                )

    def export(self, out: str | Path) -> Path:
        """A merged, self-contained pipeline folder the plain diffusers pipeline loads: the
        base's every component (text encoders included) with the trained weights merged in."""
        out = Path(out)
        if out.exists():
            raise DDRLError(f"{out} exists; choose a new folder (nothing is overwritten)")
        trained = self.trained_components()
        parts = {} if self.lora else dict(trained)
        pipe = load_pipeline(type(self), self.source, self.cfg, **parts)
        if self.lora:
            from peft import LoraConfig as PeftLora
            from peft.utils import set_peft_model_state_dict

            for name, tr in trained.items():
                base_tr = getattr(pipe, name)
                base_tr.add_adapter(PeftLora(**_peft_kwargs(tr.peft_config["default"])))
                set_peft_model_state_dict(base_tr, self.lora_state(tr))
                base_tr.fuse_lora()
                base_tr.unload_lora()
        with atomic_dir(out, race_ok=False) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            defaults = Path(os.path.expanduser(self.source)) / DEFAULTS_FILE
            if defaults.is_file():  # a base folder's own native size travels with it
                shutil.copy(defaults, tmp / DEFAULTS_FILE)
            from ddrl.models.random_base import copy_marker

            copy_marker(Path(os.path.expanduser(self.source)), tmp)  # random weights: say so
        return out


def lora_file(component: str) -> str:
    """The adapter file of a trained pipeline component: "transformer" →
    pytorch_lora_weights.safetensors (what ``load_lora_weights(folder)`` reads); another, e.g.
    Wan2.2's "transformer_2" → pytorch_lora_weights_transformer_2.safetensors (read with
    ``load_lora_weights(folder, weight_name=..., load_into_transformer_2=True)``)."""
    if component == "transformer":
        return "pytorch_lora_weights.safetensors"
    return f"pytorch_lora_weights_{component}.safetensors"


def _peft_kwargs(pc) -> dict:
    return {
        "r": pc.r,
        "lora_alpha": pc.lora_alpha,
        "lora_dropout": pc.lora_dropout,
        "target_modules": sorted(pc.target_modules),
    }


def ensure_tiny(
    family: type[DiffusersGenerator], cache: Path, log=print, variant: str = ""
) -> Path:
    """The family's tiny pipeline folder in the cache, built from config on first use;
    ``variant``: another tiny checkpoint of the family (``build_tiny(path, variant)``, e.g.
    Wan's "a14b" and "ti2v")."""
    name = f"{family.family}-{variant}" if variant else family.family
    path = Path(cache) / "tiny" / f"{name}-v{TINY_VERSION}"
    if (path / "model_index.json").is_file():
        return path
    with atomic_dir(path) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with quiet_loading():
            family.build_tiny(tmp, variant) if variant else family.build_tiny(tmp)
    log(f"built the tiny {name} pipeline into {path}")
    return path

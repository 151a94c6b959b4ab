"""The model section of a run's config: which generator, from which weights, trained how."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from ddrl.errors import DDRLError, check_literals, check_range
from ddrl.models import DIFFUSERS_FAMILIES, EMBEDDED, MODELS, check_model_name


@dataclass
class LoraConfig:
    """peft LoRA adapters on the transformer (used when model.finetune = "lora")."""

    rank: int = field(default=16, metadata={"help": "adapter rank r (flow_grpo's SD3.5 LoRA: 32)"})
    alpha: float = field(
        default=0.0,
        metadata={
            "help": "peft lora_alpha; the update is scaled by alpha / rank; 0 = alpha = rank"
        },
    )
    target_modules: str = field(
        default="",
        metadata={"help": 'comma-separated module names (e.g. "to_q,to_v"); "" = family default'},
    )
    dropout: float = field(default=0.0, metadata={"help": "peft lora_dropout on the adapter input"})
    init_seed: int = field(
        default=0,
        metadata={"help": "seed of the adapters' random init (fixed: a resumed run matches)"},
    )

    def check(self) -> None:
        check_range("model.lora.rank", self.rank, 1, 4096)
        check_range("model.lora.alpha", self.alpha, 0.0)
        check_range("model.lora.dropout", self.dropout, 0.0, 0.999)
        check_range("model.lora.init_seed", self.init_seed, 0, 2**32 - 1)


@dataclass
class ModelConfig:
    """Which generator is trained, from which weights, and how."""

    name: str = field(
        default="digits",
        metadata={
            "help": "family: digits | toy2d | sd3 | flux | cosmos | wan | qwen_image | "
            'qwen_image_edit | flux2 | flux2_klein | z_image | "module:Class"'
        },
    )
    base: str = field(
        default="",
        metadata={
            "help": 'weights: a hub id or pipeline folder (diffusers families; "tiny" = a tiny '
            'pipeline built from config into the cache; "tiny:VARIANT" another of the family, '
            'e.g. wan\'s tiny:a14b; "random" / "random:CHECKPOINT" = the real shapes with '
            'RANDOM weights, for memory and speed only), a saved generator folder; "" = '
            "cached base"
        },
    )
    resolution: int = field(
        default=0,
        metadata={"help": "pixels per side of a square sample; 0 = the family's native size"},
    )
    height: int = field(
        default=0,
        metadata={"help": "non-square samples: height and width in pixels (both, or neither; they"},
    )
    width: int = field(
        default=0,
        metadata={
            "help": "take precedence over resolution), e.g. Cosmos 720 x 1280, Wan 480 x 832"
        },
    )
    revision: str = field(
        default="",
        metadata={"help": 'hub branch, tag or commit of model.base; "" = the default branch'},
    )
    frames: int = field(
        default=0,
        metadata={"help": "video frames per sample (cosmos, wan); 0 = the family's default"},
    )
    cond_frames: tuple[int, int] = field(
        default=(0, 0),
        metadata={
            "help": "[min, max] conditional latent frames per group, drawn uniformly each "
            "iteration, taken from the group's paired data item (cosmos; the release: [0, 1])"
        },
    )
    cache_dir: str = field(
        default="", metadata={"help": 'base and reward models; "" = $DDRL_CACHE or ~/.cache/ddrl'}
    )
    finetune: Literal["full", "lora"] = field(
        default="full",
        metadata={"help": '"full": every transformer weight; "lora": peft adapters only'},
    )
    lora: LoraConfig = field(default_factory=LoraConfig)
    experts: Literal["both", "high", "low"] = field(
        default="both",
        metadata={
            "help": 'Wan2.2 A14B: which expert trains: "high" (transformer, t ≥ boundary), "low" '
            "(transformer_2), or both; the other is frozen"
        },
    )
    cfg_scale_2: float = field(
        default=0.0,
        metadata={
            "help": "Wan2.2 A14B: CFG scale where the low-noise expert runs (WanPipeline's "
            "guidance_scale_2); 0 = sampler.cfg_scale"
        },
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={"help": "weights of the frozen parts (text encoders, VAE, LoRA's base)"},
    )
    autocast: Literal["none", "bfloat16", "float16"] = field(
        default="none",
        metadata={
            "help": "transformer forward under torch.autocast: none | bfloat16 | float16 "
            "(log-probs, advantages and the optimizer state stay float32)"
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute transformer activations in backward"}
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the transformer's forward in place (one graph per batch shape: "
            "the first iterations compile); not with parallel.strategy=fsdp"
        },
    )
    vae_batch: int = field(
        default=4, metadata={"help": "images or videos per VAE encode/decode call (memory)"}
    )
    guidance: float = field(
        default=0.0,
        metadata={
            "help": "FLUX's guidance embedding (FluxPipeline default 3.5); 0 = family default (3.5 "
            "where the transformer has a guidance embedding)"
        },
    )
    max_sequence_length: int = field(
        default=0, metadata={"help": "text tokens per prompt; 0 = the pipeline's default"}
    )
    release_text_encoders: bool = field(
        default=True, metadata={"help": "free the text encoders once every prompt is encoded"}
    )

    def size(self, native: tuple[int, int]) -> tuple[int, int]:
        """(height, width) in pixels: model.height × model.width, else a square
        model.resolution, else ``native``."""
        if self.height:
            return self.height, self.width
        return (self.resolution, self.resolution) if self.resolution else native

    def check(self) -> None:
        check_literals(self, "model.")
        check_model_name(self.name)
        check_range("model.resolution", self.resolution, 0)
        check_range("model.frames", self.frames, 0)
        check_range("model.height", self.height, 0)
        check_range("model.width", self.width, 0)
        if bool(self.height) != bool(self.width):
            raise DDRLError(
                f"model.height={self.height}, model.width={self.width}: set both (or neither; "
                "model.resolution is the square size)"
            )
        check_range("model.vae_batch", self.vae_batch, 1)
        lo, hi = self.cond_frames
        for k in (lo, hi):
            check_range("model.cond_frames", k, 0, 1024)
        if lo > hi:
            raise DDRLError(
                f"model.cond_frames={list(self.cond_frames)}: allowed [min, max], min <= max"
            )
        check_range("model.guidance", self.guidance, 0.0, 100.0)
        check_range("model.cfg_scale_2", self.cfg_scale_2, 0.0, 100.0)
        for key, default in (("experts", "both"), ("cfg_scale_2", 0.0)):
            if getattr(self, key) != default and self.name != "wan":
                raise DDRLError(
                    f"model.{key}={getattr(self, key)!r} applies to Wan2.2's two experts "
                    f"(model.name='wan'), not model.name={self.name!r}; allowed: {default!r}"
                )
        check_range("model.max_sequence_length", self.max_sequence_length, 0)
        self.lora.check()
        if self.name in EMBEDDED:
            default = ModelConfig()
            odd = [
                f.name
                for f in fields(self)
                if f.name not in ("name", "base", "resolution", "cache_dir", "compile")
                and getattr(self, f.name) != getattr(default, f.name)
            ]
            if odd:
                raise DDRLError(
                    f"model.{odd[0]} applies to the diffusers families "
                    f"({', '.join(DIFFUSERS_FAMILIES)}), not model.name={self.name!r}"
                )
        if self.name not in MODELS and not self.base:
            raise DDRLError(
                f"model.name={self.name!r} is a plugin: set model.base to its weights folder "
                f"(only {', '.join(MODELS)} are built in)"
            )
        if self.name in DIFFUSERS_FAMILIES and not self.base:
            raise DDRLError(
                f"model.name={self.name!r} needs model.base: a hub id, a pipeline folder, or "
                "'tiny' (a tiny pipeline built from config)"
            )

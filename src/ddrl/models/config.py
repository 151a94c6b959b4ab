"""The model section of a run's config: which generator, from which weights, trained how."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ddrl.errors import DDRLError, check_choice, check_range

DTYPES = ("float32", "bfloat16", "float16")
AUTOCAST = ("none", "bfloat16", "float16")


@dataclass
class LoraConfig:
    """peft LoRA adapters on the transformer (used when model.finetune = "lora")."""

    rank: int = 16  # adapter rank r (flow_grpo's SD3.5 LoRA: 32)
    alpha: float = 0.0  # peft lora_alpha; the update is scaled by alpha / rank; 0 = alpha = rank
    target_modules: str = ""  # comma-separated module names (e.g. "to_q,to_v"); "" = family default
    dropout: float = 0.0  # peft lora_dropout on the adapter input
    init_seed: int = 0  # seed of the adapters' random init (fixed: a resumed run matches)

    def check(self) -> None:
        check_range("model.lora.rank", self.rank, 1, 4096)
        check_range("model.lora.alpha", self.alpha, 0.0)
        check_range("model.lora.dropout", self.dropout, 0.0, 0.999)
        check_range("model.lora.init_seed", self.init_seed, 0, 2**32 - 1)


@dataclass
class ModelConfig:
    """Which generator is trained, from which weights, and how."""

    name: str = "digits"  # family: digits | toy2d | sd3 | flux | cosmos | wan | "module:Class"
    base: str = ""  # weights: a hub id or pipeline folder (diffusers families; "tiny" = a tiny
    # pipeline built from config into the cache), a saved generator folder; "" = cached base
    resolution: int = 0  # pixels per side of a square sample; 0 = the family's native size
    height: int = 0  # non-square samples: height and width in pixels (both, or neither; they
    width: int = 0  # take precedence over resolution), e.g. Cosmos 720 x 1280, Wan 480 x 832
    revision: str = ""  # hub branch, tag or commit of model.base; "" = the default branch
    frames: int = 0  # video frames per sample (cosmos, wan); 0 = the family's default
    cache_dir: str = ""  # base and reward models; "" = $DDRL_CACHE or ~/.cache/ddrl
    finetune: str = "full"  # "full": every transformer weight; "lora": peft adapters only
    lora: LoraConfig = field(default_factory=LoraConfig)
    dtype: str = "float32"  # weights of the frozen parts (text encoders, VAE, LoRA's base)
    autocast: str = "none"  # transformer forward under torch.autocast: none | bfloat16 | float16
    # (log-probs, advantages and the optimizer state stay float32)
    gradient_checkpointing: bool = False  # recompute transformer activations in backward
    compile: bool = False  # torch.compile the transformer's forward in place (one graph per
    # batch shape: the first iterations compile); not with parallel.strategy=fsdp
    vae_batch: int = 4  # images or videos per VAE encode/decode call (memory)
    guidance: float = 0.0  # FLUX's guidance embedding (FluxPipeline default 3.5); 0 = family
    # default (3.5 where the transformer has a guidance embedding)
    max_sequence_length: int = 0  # text tokens per prompt; 0 = the pipeline's default
    release_text_encoders: bool = True  # free the text encoders once every prompt is encoded

    def size(self, native: tuple[int, int]) -> tuple[int, int]:
        """(height, width) in pixels: model.height × model.width, else a square
        model.resolution, else ``native``."""
        if self.height:
            return self.height, self.width
        return (self.resolution, self.resolution) if self.resolution else native

    def check(self) -> None:
        from ddrl.models import DIFFUSERS_FAMILIES, MODELS, resolve

        resolve(self.name)
        check_range("model.resolution", self.resolution, 0)
        check_range("model.frames", self.frames, 0)
        check_range("model.height", self.height, 0)
        check_range("model.width", self.width, 0)
        if bool(self.height) != bool(self.width):
            raise DDRLError(
                f"model.height={self.height}, model.width={self.width}: set both (or neither; "
                "model.resolution is the square size)"
            )
        check_choice("model.finetune", self.finetune, ("full", "lora"))
        check_choice("model.dtype", self.dtype, DTYPES)
        check_choice("model.autocast", self.autocast, AUTOCAST)
        check_range("model.vae_batch", self.vae_batch, 1)
        check_range("model.guidance", self.guidance, 0.0, 100.0)
        check_range("model.max_sequence_length", self.max_sequence_length, 0)
        self.lora.check()
        if self.name in MODELS and self.name not in DIFFUSERS_FAMILIES:
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

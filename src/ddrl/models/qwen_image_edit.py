"""Qwen-Image-Edit-2509 (diffusers ``QwenImageEditPlusPipeline``): Qwen-Image conditioned on one
source image per prompt (``Conditioner.set_images``, before ``prepare``).

Each prompt's cached row holds what the pipeline derives from its image, so rollout, policy
term, data term and evaluation all see the image through the same ``Cond``:

- the prompt embeddings computed WITH the image: the edit template with "Picture 1:
  <|vision_start|><|image_pad|><|vision_end|>" before the instruction, the Qwen2.5-VL processor
  given the image resized to ``CONDITION_IMAGE_SIZE`` pixels of area (384², read from the
  pipeline module), the template's first 64 tokens dropped; and their mask;
- "image_latents": the image's normalised VAE latents [C, h, w] at the SAMPLE size (the
  pipeline encodes it at ``VAE_IMAGE_SIZE`` = 1024² of area instead; flow_grpo's
  train_qwenimage_edit_plus.py encodes the condition at the training resolution, as here; at
  the native 1024² the two agree). The denoiser appends their tokens after the noisy ones
  (``img_shapes`` lists both) and returns the noisy tokens' velocity only.

The CFG null of prompt p (``null_for``) is the negative prompt encoded with p's image, with the
same image latents, as the pipeline's true CFG. ``null(n)`` has no image and is refused.
Condition images arrive as tensors [3, H, W] in [-1, 1] (``ddrl.data.conditions``, already at the
sample size); the VL path sees them as 8-bit PIL images, as the pipeline's users pass them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ddrl.errors import DDRLError
from ddrl.models.base import Cond, to_pil
from ddrl.models.config import ModelConfig
from ddrl.models.hf import DEFAULTS_FILE
from ddrl.models.qwen_image import QwenImageConditioner, QwenImageGenerator, pad_tokens
from ddrl.models.qwen_image_tiny import tiny_parts, tiny_text_encoder

NEGATIVE = "\x00negative\x00"  # cache key prefix of a prompt's negative row
VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
TINY_VISION = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}  # 8 px per token


def _processor_without_torchvision() -> None:
    """transformers 5 builds, saves and loads ``Qwen2VLProcessor`` with a video processor, which
    needs torchvision (not installable here: docs/DECISIONS.md); without torchvision the
    processor here has no video part (edit prompts carry images only). With torchvision present
    nothing changes."""
    import importlib.util

    from transformers import Qwen2VLProcessor

    if importlib.util.find_spec("torchvision") or getattr(Qwen2VLProcessor, "_ddrl_no_video", 0):
        return
    attributes = Qwen2VLProcessor.get_attributes.__func__

    def get_attributes(cls):
        return [a for a in attributes(cls) if a != "video_processor"]

    Qwen2VLProcessor.get_attributes = classmethod(get_attributes)
    Qwen2VLProcessor._ddrl_no_video = True


_processor_without_torchvision()


class QwenImageEditConditioner(QwenImageConditioner):
    """Rows per prompt: VL embeddings with the prompt's image, their mask, the image latents."""

    def __init__(self, pipe, cfg: ModelConfig, encoder_names: tuple[str, ...]):
        super().__init__(pipe, cfg, encoder_names)
        self.images: Mapping[str, Tensor] | None = None
        self.size: tuple[int, int] = (0, 0)  # the sample's pixel size (set by the generator)
        self.vae_encode = None  # the generator's codec.encode (set by the generator)

    def set_images(self, images: Mapping[str, Tensor]) -> None:
        """prompt → condition image [3, H, W] in [-1, 1]; read when a prompt is first encoded."""
        self.images = images

    def image(self, prompt: str) -> Tensor:
        if self.images is None or prompt not in self.images:
            raise DDRLError(
                f"prompt {prompt[:80]!r} has no condition image; qwen_image_edit needs one per "
                "prompt (data.condition_images)"
            )
        return self.images[prompt]

    def condition_inputs(self, image: Tensor):
        """(the VL processor's image: PIL at ``CONDITION_IMAGE_SIZE`` area, the VAE's input
        [1, 3, H, W] at the sample size)."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit

        pil = to_pil(image)
        w, h = pil.size
        cw, ch = edit.calculate_dimensions(edit.CONDITION_IMAGE_SIZE, w / h)
        vl = self.pipe.image_processor.resize(pil, ch, cw)
        x = image[None].float()
        if tuple(x.shape[-2:]) != self.size:
            x = torch.nn.functional.interpolate(
                x, size=self.size, mode="bilinear", antialias=True, align_corners=False
            )
        return vl, x

    def encode_batch(self, keys: list[str]) -> Cond:
        """Keys [B] (a prompt, or ``NEGATIVE`` + prompt for its negative row) → Cond."""
        embeds, masks, latents = [], [], []
        for key in keys:
            negative = key.startswith(NEGATIVE)
            prompt = key.removeprefix(NEGATIVE)
            vl, x = self.condition_inputs(self.image(prompt))
            e, m = self.text_rows([self.null_prompt if negative else prompt], image=[vl])
            embeds.append(e)
            masks.append(m)
            latents.append(self.vae_encode(x))
        n = max(e.shape[1] for e in embeds)
        return Cond(
            {
                "prompt_embeds": torch.cat([pad_tokens(e, n) for e in embeds]),
                "prompt_mask": torch.cat([pad_tokens(m, n) for m in masks]),
                "image_latents": torch.cat(latents).to(embeds[0].dtype),
            }
        )

    def null_for(self, prompts: list[str]) -> Cond:
        """The negative prompt encoded with each prompt's image (batch len(prompts))."""
        return self.encode([NEGATIVE + p for p in prompts])

    def null(self, n: int) -> Cond:
        raise DDRLError(
            "qwen_image_edit has no image-free null condition: its negative prompt is encoded "
            "with each prompt's image (null_for(prompts))"
        )

    def prepare_keys(self, prompts: list[str]) -> list[str]:
        unique = list(dict.fromkeys(prompts))
        return [*unique, *(NEGATIVE + p for p in unique)]


class QwenImageEditGenerator(QwenImageGenerator):
    """Qwen-Image-Edit-2509 (``QwenImageEditPlusPipeline``), one condition image per prompt."""

    family = "qwen_image_edit"
    pipeline_class = "QwenImageEditPlusPipeline"
    conditioner_class = QwenImageEditConditioner
    needs_condition_images = True  # a run without data.condition_images fails before any work

    def build_parts(self, pipe, cfg: ModelConfig) -> None:
        super().build_parts(pipe, cfg)
        f = pipe.vae_scale_factor
        self.conditioner.size = (self.sample_shape[1] * f, self.sample_shape[2] * f)
        self.conditioner.vae_encode = self.codec.encode

    @classmethod
    def build_tiny(cls, path: Path) -> None:
        """The tiny Qwen-Image parts shrunk from Qwen-Image-Edit-2509's published configs, with a
        tiny Qwen2.5-VL that sees images (vision patch 4, 2×2 merge) and its processor (the
        byte-level tokenizer plus the vision special tokens, a Qwen2-VL image processor capped
        at 32×32 px); native size 32×32 px."""
        from diffusers import QwenImageEditPlusPipeline

        pipe = QwenImageEditPlusPipeline(**tiny_edit_parts())
        pipe.save_pretrained(path, safe_serialization=True)
        (Path(path) / DEFAULTS_FILE).write_text(json.dumps({"height": 32, "width": 32}))


def tiny_processor():
    """A Qwen2VLProcessor built offline: the tiny byte-level Qwen tokenizer with the vision
    specials, a Qwen2-VL image processor for ``TINY_VISION`` patches (8..32×32 px)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    from ddrl.models.tiny_qwen import CHAT_TEMPLATE, qwen_tokenizer

    tok = qwen_tokenizer()
    tok.add_tokens(list(VISION_TOKENS), special_tokens=True)
    images = Qwen2VLImageProcessor(
        min_pixels=8 * 8, max_pixels=32 * 32, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        **TINY_VISION,
    )  # fmt: skip
    return Qwen2VLProcessor(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE)


def tiny_edit_parts() -> dict:
    proc = tiny_processor()
    tok = proc.tokenizer
    parts = tiny_parts("qwen-image-edit-2509", tokenizer=tok)
    ids = dict(zip(("vision_start", "image", "vision_end", "video"), VISION_TOKENS, strict=True))
    vision = {f"{k}_token_id": tok.convert_tokens_to_ids(v) for k, v in ids.items()}
    vision.update(patch_size=TINY_VISION["patch_size"], window_size=16)
    return {
        **parts,
        "text_encoder": tiny_text_encoder(tok, vision),
        "processor": proc,
    }

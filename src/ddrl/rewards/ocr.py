"""The text-rendering (OCR) reward of Flow-GRPO's SD3.5 experiments, computed as flow_grpo does.

Reference: yifan123/flow_grpo @ ac4c86e, ``flow_grpo/ocr.py`` (``OcrScorer.__call__``) and
``flow_grpo/rewards.py:95-107`` (``ocr_score``: [0, 1] tensors → uint8 NHWC arrays).

For each image and prompt:

- the target is the text after the prompt's first double quote, up to the next one
  (``prompt.split('"')[1]``, ocr.py:31); a prompt without a ``"`` has no target, which flow_grpo
  fails on (IndexError) and this reward reports as a DDRLError;
- the recognised text is every line the OCR reports with confidence > 0, concatenated in the
  OCR's order (ocr.py:44);
- both have their spaces (" " only) removed and are lower-cased (ocr.py:46-47);
- d = 0 if the target occurs anywhere in the recognised text (ocr.py:48-49), else the
  Levenshtein distance between them (unit costs, python-Levenshtein's ``distance``, ocr.py:51),
  then clamped to len(target) (ocr.py:53-54): unrelated extra text costs no more than nothing;
- if the OCR itself fails, d = len(target) (ocr.py:56-59);
- r = 1 - d / len(target) ∈ [0, 1] (ocr.py:60). No recognised text ⇒ d = len(target) ⇒ r = 0.

flow_grpo runs PaddleOCR 2.9 (``lang="en"``, no angle classifier, on the CPU). Here the OCR is
RapidOCR (``rapidocr-onnxruntime``): the same PP-OCR family (PP-OCRv4 detection and
recognition, exported to ONNX and shipped inside the wheel, so nothing is downloaded), also
without the angle classifier and on the CPU. Its recogniser is PP-OCRv4's Chinese+English
model rather than PaddleOCR's English-only one, and it drops lines scored below 0.5 (as
PaddleOCR's default ``drop_score`` does), so scores match flow_grpo's in kind, not bit for bit.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from ddrl.errors import DDRLError, first_line
from ddrl.rewards.base import RewardContext

INSTALL_HINT = "pip install 'ddrl[ocr]'"


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit-cost insertions, deletions and substitutions."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _short(prompt: str, n: int = 80) -> str:
    return repr(prompt if len(prompt) <= n else prompt[: n - 3] + "...")


def target_text(prompt: str) -> str:
    """The text a prompt asks to render, normalised: between its first pair of double quotes
    (flow_grpo: ``prompt.split('"')[1]``), spaces removed, lower-cased."""
    parts = prompt.split('"')
    if len(parts) < 2:
        raise DDRLError(
            f"ocr reward: prompt {_short(prompt)} has no quoted text; allowed: prompts that "
            'put the text to render in double quotes, e.g. a sign that says "hello"'
        )
    target = parts[1].replace(" ", "").lower()
    if not target:
        raise DDRLError(
            f"ocr reward: prompt {_short(prompt)} quotes no text (empty after removing spaces); "
            'allowed: a non-empty quoted text, e.g. a sign that says "hello"'
        )
    return target


def ocr_score(recognised: str, target: str) -> float:
    """flow_grpo's reward for OCR output ``recognised`` against the normalised ``target``."""
    text = recognised.replace(" ", "").lower()
    dist = 0 if target in text else min(levenshtein(text, target), len(target))
    return 1.0 - dist / len(target)


def to_uint8_bgr(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] → uint8 [B, H, W, 3] in BGR order (OpenCV's, which RapidOCR
    and PaddleOCR assume for arrays). Rounding as flow_grpo/rewards.py:102."""
    x = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()[..., ::-1])


class OCRReward:
    """r = 1 - clamped normalised edit distance between the quoted prompt text and the text
    OCR reads in the image (see the module docstring); images [B, 3, H, W] in [-1, 1] → [B]."""

    def __init__(self, ctx: RewardContext | None = None):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:  # the package, or a library it loads (onnxruntime, cv2)
            msg = first_line(e)
            raise DDRLError(
                f"reward 'ocr' needs rapidocr-onnxruntime, which cannot be imported ({msg}); "
                f"install it: {INSTALL_HINT}"
            ) from None
        # On the CPU like flow_grpo (OcrScorer(use_gpu=False)); one ONNX thread per torch thread.
        self.engine = RapidOCR(use_cls=False, intra_op_num_threads=max(1, torch.get_num_threads()))
        self._warned = False

    def recognise(self, image: np.ndarray) -> str:
        """All text lines read in one uint8 HWC BGR image, concatenated (confidence > 0)."""
        result, _ = self.engine(image)
        return "".join(text for _, text, conf in (result or []) if float(conf) > 0)

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DDRLError(
                f"ocr reward: images of shape {tuple(images.shape)}; allowed: [B, 3, H, W] "
                "(videos are scored frame by frame through reward.frames)"
            )
        if len(prompts) != images.shape[0]:
            raise DDRLError(
                f"ocr reward: {images.shape[0]} images but {len(prompts)} prompts; "
                "allowed: one prompt per image"
            )
        targets = [target_text(p) for p in prompts]  # every prompt checked before any OCR
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        arrays = to_uint8_bgr(images)
        scores = []
        for arr, target in zip(arrays, targets, strict=True):
            try:
                text = self.recognise(arr)
            except Exception as e:  # flow_grpo: an OCR failure scores 0 (ocr.py:56-59)
                if not self._warned:
                    warnings.warn(f"ocr reward: OCR failed, scoring 0: {e}", stacklevel=2)
                    self._warned = True
                scores.append(0.0)
                continue
            scores.append(ocr_score(text, target))
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

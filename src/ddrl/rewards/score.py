"""The library side of ``ddrl score``: a reward applied to image files on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ddrl.errors import DDRLError, first_line
from ddrl.rewards.base import Reward, checked_reward


def load_image(path: Path) -> Tensor:
    """An image file → [1, 3, H, W] float32 in [-1, 1] (RGB, its own size, no resizing)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DDRLError(f"image {str(path)!r} is not a file; allowed: an image file pillow reads")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32)  # [H, W, 3] in 0..255
    except (OSError, UnidentifiedImageError, ValueError) as e:
        msg = first_line(e)
        raise DDRLError(f"cannot read image {str(path)!r}: {msg}") from None
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous() / 127.5 - 1.0


def score_files(
    reward: Reward,
    images: list[Path],
    prompts: list[str],
    batch: int = 16,
    name: str = "reward",
) -> list[float]:
    """``reward`` on each image file with its prompt, in order: up to ``batch`` consecutive
    images of the same size per call (images of different sizes go in separate calls)."""
    if len(prompts) != len(images):
        raise DDRLError(
            f"{len(images)} images but {len(prompts)} prompts; allowed: one prompt per image"
        )
    if batch < 1:
        raise DDRLError(f"batch={batch!r} is out of range; allowed: [1, inf]")
    out: list[float] = []
    pending: list[Tensor] = []
    pending_prompts: list[str] = []

    def flush() -> None:
        if pending:
            x = torch.cat(pending)
            r = checked_reward(reward, name, x, list(pending_prompts))
            out.extend(float(v) for v in r.cpu().tolist())
            pending.clear()
            pending_prompts.clear()

    for path, prompt in zip(images, prompts, strict=True):
        x = load_image(path)
        if pending and (len(pending) >= batch or x.shape != pending[0].shape):
            flush()
        pending.append(x)
        pending_prompts.append(prompt)
    flush()
    return out


def read_prompt_args(prompt: str | None, prompts_file: Path | None, n_images: int) -> list[str]:
    """The prompts for ``n_images`` images: ``--prompt TEXT`` for all of them, or ``--prompts
    FILE`` with exactly one line per image (in the images' order); neither gives "" each (for
    rewards that ignore the prompt)."""
    if prompt is not None and prompts_file is not None:
        raise DDRLError("both --prompt and --prompts given; allowed: one of them")
    if prompts_file is None:
        return [prompt if prompt is not None else ""] * n_images
    path = Path(prompts_file)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        msg = first_line(e)
        raise DDRLError(
            f"cannot read --prompts {str(path)!r}: {msg}; allowed: a UTF-8 text file"
        ) from None
    lines = text.splitlines()
    if len(lines) != n_images:
        raise DDRLError(
            f"--prompts {str(path)!r} has {len(lines)} lines for {n_images} images; allowed: "
            "exactly one prompt per line, one line per image"
        )
    return lines

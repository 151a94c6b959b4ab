"""Pictures of samples, drawn with pillow (no plotting library in the core): image grids, the
2-D toy's scatter plot, and single images and videos at their own size (``ddrl sample``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ddrl.data.toy2d import CENTRES
from ddrl.errors import DDRLError

MIN_SIDE = 48  # tiny images (8×8 digits) are enlarged, nearest-neighbour, to at least this
TITLE_PX = 14  # height of the title strip
VIDEO_FPS = 16  # frames per second of written videos (Wan's and Cosmos' own)


def _titled(img: Image.Image, title: str | None) -> Image.Image:
    if not title:
        return img
    out = Image.new("RGB", (img.width, img.height + TITLE_PX), "white")
    out.paste(img, (0, TITLE_PX))
    # pillow's scalable default font: the bitmap one drops the space after an underscore
    ImageDraw.Draw(out).text((2, 1), title, fill="black", font=ImageFont.load_default(size=11))
    return out


def _save(img: Image.Image, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def grid_image(images: Tensor, nrow: int = 10) -> Image.Image:
    """Images [N, 1 or 3, H, W] in [-1, 1] as one RGB grid, ``nrow`` images per row, 1-pixel
    white gutters, enlarged (nearest-neighbour) so a cell is at least ``MIN_SIDE`` pixels."""
    x = images.detach().cpu().float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise DDRLError(f"an image grid needs [N, 1 or 3, H, W] images, got {tuple(x.shape)}")
    n, c, h, w = x.shape
    x = to_uint8(x.transpose(0, 1))  # [N, H, W, C]
    cols = max(1, min(nrow, n))
    rows = -(-n // cols)
    pad = 1
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[top : top + h, left : left + w] = x[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid).convert("RGB")
    scale = max(1, -(-MIN_SIDE // max(h, w)))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_image_grid(images: Tensor, path, nrow: int = 10, title: str | None = None) -> Path:
    """Save images [N, 1 or 3, H, W] in [-1, 1] as one PNG grid (``grid_image``), a title strip
    above when ``title`` is given."""
    return _save(_titled(grid_image(images, nrow), title), path)


def save_scatter(points: Tensor, path, title: str | None = None) -> Path:
    """Scatter plot of 2-D samples [N, 2] (blue dots) over the toy mixture's modes (black
    crosses), on a square canvas covering both."""
    centres = CENTRES
    side, margin = 400, 20
    p = points.detach().float().cpu()
    allp = np.concatenate([p.numpy(), centres.numpy()])
    finite = allp[np.isfinite(allp).all(1)]
    lo, hi = finite.min(0) - 0.5, finite.max(0) + 0.5
    span = float(max(hi - lo))

    def to_px(x: float, y: float) -> tuple[float, float]:
        u = margin + (x - lo[0]) / span * (side - 2 * margin)
        v = side - margin - (y - lo[1]) / span * (side - 2 * margin)
        return u, v

    img = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(img)
    for x, y in p[np.isfinite(p.numpy()).all(1)].tolist():
        u, v = to_px(x, y)
        draw.ellipse((u - 1.5, v - 1.5, u + 1.5, v + 1.5), fill=(70, 110, 200))
    for x, y in centres.tolist():
        u, v = to_px(x, y)
        draw.line((u - 5, v - 5, u + 5, v + 5), fill="black", width=2)
        draw.line((u - 5, v + 5, u + 5, v - 5), fill="black", width=2)
    return _save(_titled(img, title), path)


def save_prompt_grid(raw: Tensor, n_prompts: int, path, title: str | None = None):
    """Picture of evaluation samples: for images [P·n, C, H, W] (prompt-major, as ``evaluate``
    returns them) a grid of up to 10 per prompt, one prompt per column; for 2-D points a
    scatter plot. Anything else writes nothing and returns None."""
    if raw.dim() == 2 and raw.shape[1] == 2:
        return save_scatter(raw, path, title)
    if raw.dim() != 4:
        return None
    per = raw.shape[0] // n_prompts
    show = raw.view(n_prompts, per, *raw.shape[1:])[:, : min(per, 10)].transpose(0, 1)
    return save_image_grid(show.reshape(-1, *raw.shape[1:]), path, nrow=n_prompts, title=title)


def to_uint8(x: Tensor) -> np.ndarray:
    """Values in [-1, 1] (clamped) → uint8 [0, 255], channels last: [C, ...] → [..., C]."""
    x = ((x.detach().cpu().float().clamp(-1, 1) + 1) / 2 * 255).round().to(dtype=torch.uint8)
    return x.movedim(0, -1).numpy()


def save_image(image: Tensor, path) -> Path:
    """One image [1 or 3, H, W] in [-1, 1] as a PNG of exactly H × W pixels (grey or RGB)."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise DDRLError(f"save_image expects a [1 or 3, H, W] image, got {tuple(image.shape)}")
    pixels = to_uint8(image)
    return _save(Image.fromarray(pixels[..., 0] if image.shape[0] == 1 else pixels), path)


def save_video(video: Tensor, path, fps: int = VIDEO_FPS) -> Path:
    """One video [3, F, H, W] in [-1, 1] as ``path`` with suffix .mp4 (H.264 through imageio and
    imageio-ffmpeg, the ``data`` extra) or, without them, an animated .gif (pillow). Returns the
    path written."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise DDRLError(f"save_video expects a [3, F, H, W] video, got {tuple(video.shape)}")
    frames = to_uint8(video)  # [F, H, W, 3]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (imageio's mp4 writer needs its ffmpeg binary)
    except ImportError:
        out = path.with_suffix(".gif")
        write_gif([Image.fromarray(f) for f in frames], out, fps)
        return out
    out = path.with_suffix(".mp4")
    # macro_block_size=1: the exact size (never rescaled to multiples of 16)
    imageio.mimwrite(
        out, list(frames), format="FFMPEG", fps=fps, macro_block_size=1, ffmpeg_log_level="error"
    )
    return out


def write_gif(frames: list[Image.Image], out, fps: float) -> None:
    """Frames as an endlessly looping animated GIF (pillow) into ``out``, a path or a binary
    file object."""
    duration = round(1000 / fps)  # milliseconds per frame
    frames[0].save(
        out, format="GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0
    )

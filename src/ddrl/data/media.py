"""Reading a user's media into tensors: images [3, H, W] and videos [3, F, H, W] in [-1, 1]
(shorter side resized, center-cropped; video frames at the centres of F equal segments)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from ddrl.data.config import DataConfig
from ddrl.data.files import Item, frame_files, list_items
from ddrl.errors import DDRLError, first_line


def _size(resolution) -> tuple[int, int]:
    h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if h < 1 or w < 1:
        raise DDRLError(f"resolution {resolution!r} must be positive")
    return int(h), int(w)


def to_tensor(img, resolution) -> Tensor:
    """A PIL image → [3, H, W] in [-1, 1]: shorter side resized to the target, center crop."""
    from PIL import Image

    h, w = _size(resolution)
    img = img.convert("RGB")
    s = max(h / img.height, w / img.width)
    size = (max(w, round(img.width * s)), max(h, round(img.height * s)))
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - w) // 2, (size[1] - h) // 2
    img = img.crop((left, top, left + w, top + h))
    arr = np.asarray(img, dtype=np.float32)  # [H, W, 3] in 0..255
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def frame_indices(n: int, frames: int, where: str) -> list[int]:
    """``frames`` indices among ``n``: the centres of ``frames`` equal segments."""
    if n < frames:
        raise DDRLError(f"{where} has {n} frames; the model needs {frames} (its frames setting)")
    return [int((i + 0.5) * n / frames) for i in range(frames)]


def _open_image(item: Item):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(item.blob) if item.blob is not None else item.path)
        img.load()
        return img
    except (OSError, UnidentifiedImageError) as e:
        raise DDRLError(f"cannot read image {item.name}: {first_line(e)}") from None


def _video_frames(item: Item, resolution, frames: int) -> list[Tensor]:
    if item.kind == "frames":
        files = frame_files(item.path)
        idx = frame_indices(len(files), frames, item.name)
        return [
            to_tensor(_open_image(Item(files[i], "", "image", str(files[i]))), resolution)
            for i in idx
        ]
    if item.blob is not None or item.path.suffix.lower() == ".gif":  # pillow reads GIFs
        img = _open_image(item)
        idx = frame_indices(getattr(img, "n_frames", 1), frames, item.name)
        out = []
        for i in idx:
            img.seek(i)
            out.append(to_tensor(img, resolution))
        return out
    try:
        import imageio.v2 as iio
    except ImportError:
        raise DDRLError(
            f"reading {item.name} needs imageio and imageio-ffmpeg: pip install 'ddrl[data]'"
        ) from None
    from PIL import Image

    try:
        reader = iio.get_reader(item.path, format="FFMPEG")
        try:
            idx = frame_indices(reader.count_frames(), frames, item.name)
            want, out = set(idx), {}
            for i, arr in enumerate(reader):
                if i in want:
                    out[i] = to_tensor(Image.fromarray(np.asarray(arr)), resolution)
                if i >= idx[-1]:
                    break
        finally:
            reader.close()
    except DDRLError:
        raise
    except Exception as e:  # imageio/ffmpeg raise many kinds (OSError, RuntimeError, ...)
        raise DDRLError(f"cannot read video {item.name}: {first_line(e)}") from None
    if len(out) < len(set(idx)):
        raise DDRLError(f"cannot read video {item.name}: it ended after {len(out)} frames")
    return [out[i] for i in idx]


def load_media(item: Item, resolution, frames: int = 0) -> Tensor:
    """One item as [3, H, W] (``frames`` = 0: an image model) or [3, F, H, W] (``frames`` ≥ 1),
    in [-1, 1]. An image is a one-frame video when ``frames`` = 1."""
    if frames < 0:
        raise DDRLError(f"frames={frames} must be >= 0 (0: images)")
    if frames == 0:
        if item.kind != "image":
            raise DDRLError(f"{item.name} is a video; the model takes images (frames = 0)")
        return to_tensor(_open_image(item), resolution)
    if item.kind == "image":
        if frames != 1:
            raise DDRLError(f"{item.name} is an image; the model needs videos of {frames} frames")
        return to_tensor(_open_image(item), resolution).unsqueeze(1)
    return torch.stack(_video_frames(item, resolution, frames), dim=1)


def read_items(cfg: DataConfig, resolution, frames: int = 0) -> Iterator[tuple[Tensor, str]]:
    """(media, caption) for every item of ``cfg.images``: [3, H, W] images (``frames`` = 0) or
    [3, F, H, W] videos, in [-1, 1]; ``resolution``: an int (square) or (height, width)."""
    for item in list_items(cfg.images):
        yield load_media(item, resolution, frames), item.caption

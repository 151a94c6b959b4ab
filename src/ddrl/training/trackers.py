"""Experiment trackers beside a run's JSON-lines logs, each optional: TensorBoard (<run>/tb) and
Weights & Biases (<run>/wandb). Both receive the scalars, the watch's firings and a picture of
each evaluation's samples (``RunLogger`` drives them; docs/DECISIONS.md "Trackers")."""

from __future__ import annotations

import io
import math
import secrets
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ddrl.config import RunConfig, to_dict
from ddrl.errors import DDRLError, first_line
from ddrl.evaluation.pictures import VIDEO_FPS, grid_image, write_gif

COLUMNS = 8  # samples shown per prompt (one row per prompt)
CELL_PX = 256  # a sample's longest side in a tracker's picture (larger ones are shrunk)
GIF_FRAMES = 32  # a video's GIF: at most this many frames, strided evenly over the clip
WANDB_ID = "wandb_id.txt"  # in the run folder: the wandb run a resumed run continues


def _shrink(x: Tensor) -> Tensor:
    """Images [N, C, H, W] with the longest side at most CELL_PX (antialiased bilinear)."""
    h, w = x.shape[-2:]
    if max(h, w) <= CELL_PX:
        return x
    s = CELL_PX / max(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    return torch.nn.functional.interpolate(x, size, mode="bilinear", antialias=True)


def sample_pictures(images: Tensor, n_prompts: int) -> tuple[Image.Image, bytes | None]:
    """The trackers' picture of evaluation samples, prompt-major [P·n, C, H, W] images or
    [P·n, C, F, H, W] videos in [-1, 1]: a grid with one row per prompt, its first COLUMNS
    samples (videos: their first frames), and for videos an animated GIF of each prompt's
    first sample side by side (at most GIF_FRAMES frames over the whole clip), else None."""
    x = images.detach()  # converted to float only once cut down to what is shown
    per = x.shape[0] // n_prompts
    shown = x.view(n_prompts, per, *x.shape[1:])[:, :COLUMNS]
    cols = shown.shape[1]
    if x.dim() == 4:
        return grid_image(_shrink(shown.flatten(0, 1).float()).cpu(), cols), None
    grid = grid_image(_shrink(shown[:, :, :, 0].flatten(0, 1).float()).cpu(), cols)
    clip = x[::per].transpose(1, 2).float()  # [P, F, C, H, W]: each prompt's first sample
    stride = math.ceil(clip.shape[1] / GIF_FRAMES)
    clip = clip[:, ::stride]
    p, f = clip.shape[:2]
    small = _shrink(clip.flatten(0, 1)).cpu()
    small = small.view(p, f, *small.shape[1:]).transpose(0, 1)  # [F, P, C, h, w]
    frames = [grid_image(frame, min(p, COLUMNS)) for frame in small]
    buf = io.BytesIO()
    write_gif(frames, buf, VIDEO_FPS / stride)  # the clip's own speed
    return grid, buf.getvalue()


def _scalars(row: dict, prefix: str) -> dict[str, float]:
    return {
        prefix + k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "iteration"
    }


def firing_text(row: dict) -> str:
    """One line for a person: which rule fired, on what value, and what the run does."""
    return f"iteration {row['iteration']}: {row['reason']} (rule `{row['rule']}`: {row['action']})"


class TensorBoardTracker:
    """``<run>/tb``, through torch's SummaryWriter."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # the optional tensorboard package

        self.writer = SummaryWriter(str(run_dir / "tb"))

    def scalars(self, row: dict, prefix: str) -> None:
        for k, v in _scalars(row, prefix).items():
            self.writer.add_scalar(k, v, row["iteration"])

    def firing(self, row: dict) -> None:
        it = row["iteration"]
        self.writer.add_text("watch", firing_text(row), it)
        self.writer.add_scalar(f"watch/{row['signal']}", row["value"], it)

    def samples(self, it: int, grid: Image.Image, gif: bytes | None) -> None:
        self.writer.add_image("eval/samples", np.asarray(grid), it, dataformats="HWC")
        if gif is not None:
            # add_video would encode the GIF again through moviepy; TensorBoard shows an image
            # summary holding GIF bytes as the animation (what add_video writes too).
            from tensorboard.compat.proto.summary_pb2 import Summary

            w, h = Image.open(io.BytesIO(gif)).size
            image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif)
            summary = Summary(value=[Summary.Value(tag="eval/video", image=image)])
            self.writer.file_writer.add_summary(summary, it)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run in ``<run>/wandb``, its id kept in ``<run>/wandb_id.txt`` so a resumed run
    continues it; the resolved config is the run's config. Logged with step = iteration."""

    def __init__(self, run_dir: Path, cfg: RunConfig):
        import wandb  # the optional wandb package (TrainConfig.require_trackers checked it)

        self.wandb, tc = wandb, cfg.train
        self.online = tc.wandb == "online"
        id_file = run_dir / WANDB_ID
        if not id_file.is_file():
            id_file.write_text(secrets.token_hex(6) + "\n")  # wandb ids: [a-z0-9], unique
        try:
            self.run = wandb.init(
                project=tc.wandb_project or None,
                entity=tc.wandb_entity or None,
                name=tc.wandb_name or run_dir.resolve().name,
                id=id_file.read_text().strip(),
                resume="allow",
                dir=str(run_dir),
                mode=tc.wandb,
                config=to_dict(cfg),
                reinit="create_new",  # never hand back another run left open in this process
            )
        except wandb.errors.Error as e:
            hint = " (train.wandb=offline needs no login or network)" if self.online else ""
            raise DDRLError(
                f"train.wandb={tc.wandb}: wandb.init failed: {first_line(e)}{hint}"
            ) from e

    def scalars(self, row: dict, prefix: str) -> None:
        self.run.log(_scalars(row, prefix), step=row["iteration"])

    def firing(self, row: dict) -> None:
        it, signal = row["iteration"], row["signal"]
        self.run.log({f"watch/{signal}": row["value"], "watch/fired": row["rule"]}, step=it)
        if self.online:  # an alert's use is now: one synced from an offline run comes late
            level = "ERROR" if row["action"] == "stop" else "WARN"
            title = f"ddrl watch: {signal} ({row['action']})"[:63]  # wandb: under 64 chars
            self.run.alert(title=title, text=f"{self.run.name}, {firing_text(row)}", level=level)

    def samples(self, it: int, grid: Image.Image, gif: bytes | None) -> None:
        caption = f"iteration {it}: a row per prompt"
        media = {"eval/samples": self.wandb.Image(grid, caption=caption)}
        if gif is not None:
            clip = io.BytesIO(gif)
            media["eval/video"] = self.wandb.Video(clip, caption=caption, format="gif")
        self.run.log(media, step=it)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers a run turned on, driven together: each evaluation's samples are pictured
    once for all of them."""

    def __init__(self, items: list):
        self.items = items

    def scalars(self, row: dict, prefix: str) -> None:
        for t in self.items:
            t.scalars(row, prefix)

    def firing(self, row: dict) -> None:
        for t in self.items:
            t.firing(row)

    def samples(self, it: int, images: Tensor, n_prompts: int) -> None:
        """Images or videos (``sample_pictures``); with no tracker on, nothing at all (not even
        a look at the tensor); other shapes (the 2-D toy's points) are not pictured here."""
        if not self.items or images.dim() not in (4, 5):
            return
        grid, gif = sample_pictures(images, n_prompts)
        for t in self.items:
            t.samples(it, grid, gif)

    def close(self) -> None:
        for t in self.items:
            t.close()


def open_trackers(run_dir: Path, cfg: RunConfig) -> Trackers:
    """The trackers ``cfg.train`` turns on (perhaps none)."""
    tc = cfg.train
    tc.require_trackers()
    # wandb first: its start can fail (login, network), and then nothing is left open
    items: list = [WandbTracker(run_dir, cfg)] if tc.wandb != "off" else []
    if tc.tensorboard:
        items.append(TensorBoardTracker(run_dir))
    return Trackers(items)

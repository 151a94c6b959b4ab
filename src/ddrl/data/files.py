"""A user's own prompts and image/video-caption data (``data.name = "files"``).

Prompt files (``data.prompts``, ``data.eval_prompts``):

- ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped;
- ``.jsonl`` (one object per line), ``.json`` (a list of objects or strings), ``.csv`` and
  ``.parquet``: a ``prompt`` (or ``caption`` / ``text``) column; every other column is kept as
  the prompt's metadata.

Real data (``data.images``), read with pillow (images, GIFs, folders of frames) and, for video
files, imageio + imageio-ffmpeg (``pip install 'ddrl[data]'``):

- a folder of images/videos, each with a same-stem ``.txt`` caption beside it (searched
  recursively; a sub-folder with a same-name ``.txt`` beside it is one video given as frames);
- a folder with a ``metadata.jsonl`` / ``metadata.csv`` / ``metadata.parquet`` (as HF
  ``imagefolder`` does): a ``file_name`` column and a ``text`` / ``caption`` / ``prompt`` one;
- a table ``.jsonl`` / ``.csv`` / ``.parquet`` with a file column (``file_name``, ``image``,
  ``video`` or ``path``; relative to the table's folder) and a caption column. A parquet column
  of HF image structs ({"bytes", "path"}) is read from the embedded bytes.

Images become [3, H, W] in [-1, 1]: the shorter side resized (bicubic) to the target, then
center-cropped. Videos become [3, F, H, W]: F frames at the centres of F equal segments of the
clip (so the whole clip is spanned; trim clips to the wanted duration beforehand).
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ddrl.data.config import PROMPT_EXT, TABLE_EXT, DataConfig
from ddrl.data.pools import TaskData
from ddrl.errors import DDRLError, first_line

PROMPT_KEYS = ("prompt", "caption", "text")  # prompt files: the first present column wins
CAPTION_KEYS = ("text", "caption", "prompt")  # data tables (HF imagefolder's order)
FILE_KEYS = ("file_name", "image", "video", "path")  # data tables: the media column
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_EXT = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")  # .gif via pillow
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


# ----------------------------------------------------------------------------- tables, prompts


def _path(path: str | Path, what: str) -> Path:
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise DDRLError(f"{what} {str(path)!r} does not exist")
    return p


def read_table(path: Path) -> list[dict]:
    """Rows of a .jsonl / .json / .csv / .parquet file as dicts (one-line DDRLError if bad)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DDRLError(f"{path} line {n} is not JSON: {e}") from None
                rows.append(row)
            return rows
        if suffix == ".json":
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DDRLError(f"{path} is not JSON: {e}") from None
            if not isinstance(rows, list):
                raise DDRLError(f"{path} must hold a JSON list of objects or strings")
            return rows
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DDRLError(
                    f"reading {path} needs pyarrow; install it: pip install 'ddrl[data]'"
                ) from None
            return pq.read_table(path).to_pylist()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DDRLError(f"cannot read {path}: {first_line(e)}") from None
    except Exception as e:  # pyarrow's own errors (ArrowInvalid, ...)
        if type(e).__module__.startswith("pyarrow"):
            raise DDRLError(f"cannot read {path}: {first_line(e)}") from None
        raise
    raise DDRLError(f"{path}: unsupported table {suffix!r}; allowed: .jsonl, .json, .csv, .parquet")


def _column(rows: list[dict], keys: tuple[str, ...], what: str, path: Path) -> str:
    """The first of ``keys`` (case-insensitive) that the table has."""
    cols = list(dict.fromkeys(k for r in rows[:1000] if isinstance(r, dict) for k in r))
    lower = {str(c).lower(): c for c in cols}
    for k in keys:
        if k in lower:
            return lower[k]
    raise DDRLError(f"{path} has no {what} column; found {cols[:8]}; allowed: {', '.join(keys)}")


def _text(value, where: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DDRLError(f"{where}: {what} must be non-empty text; got {value!r}"[:300])
    return value.strip()


def load_prompts(path: str | Path) -> list[dict]:
    """Prompts of a .txt / .jsonl / .json / .csv / .parquet file, in file order (duplicates
    kept): each ``{"prompt": text, **the row's other columns}``."""
    p = _path(path, "prompt file")
    suffix = p.suffix.lower()
    if p.is_dir() or suffix not in PROMPT_EXT:
        raise DDRLError(f"prompt file {str(path)!r}: allowed formats: {', '.join(PROMPT_EXT)}")
    if suffix == ".txt":
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DDRLError(f"cannot read {p}: {first_line(e)}") from None
        out = [{"prompt": s.strip()} for s in lines if s.strip() and not s.lstrip().startswith("#")]
    else:
        rows = read_table(p)
        if rows and all(isinstance(r, str) for r in rows):  # a .json list of strings
            rows = [{"prompt": r} for r in rows]
        if any(not isinstance(r, dict) for r in rows):
            raise DDRLError(f"{p}: every row must be an object with a prompt column")
        key = _column(rows, PROMPT_KEYS, "prompt", p) if rows else "prompt"
        out = []
        for n, r in enumerate(rows, 1):
            meta = {k: v for k, v in r.items() if k != key}
            out.append({"prompt": _text(r.get(key), f"{p} row {n}", repr(key)), **meta})
    if not out:
        raise DDRLError(f"prompt file {p} has no prompts")
    return out


# ----------------------------------------------------------------------------- listing media


@dataclass(frozen=True)
class Item:
    """One image or video of the real data set, not yet read."""

    path: Path  # the media file, the folder of frames, or (embedded bytes) the table file
    caption: str  # its text prompt
    kind: str  # "image" | "video" (a video file, incl. .gif) | "frames" (a folder of frames)
    name: str  # its path relative to the data set's root (for manifests and messages)
    row: int = -1  # embedded bytes: the row of the table; -1 otherwise
    blob: bytes | None = field(default=None, repr=False, compare=False)  # embedded image bytes


def _kind(path: Path) -> str | None:
    if path.is_dir():
        return "frames"
    s = path.suffix.lower()
    return "image" if s in IMAGE_EXT else "video" if s in VIDEO_EXT else None


def _natural(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[Path]:
    """The frames of a frames-folder video, in natural name order (frame2 before frame10)."""
    return sorted(
        (
            f
            for f in folder.iterdir()
            if not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXT
        ),
        key=lambda f: _natural(f.name),
    )


def _caption_file(path: Path) -> str:
    """The caption in a ``.txt`` beside a file: non-empty text (an empty one is refused, as an
    empty caption in a table is)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DDRLError(f"cannot read caption {path}: {first_line(e)}") from None
    return _text(text, str(path), "caption")


def _list_folder(root: Path) -> list[Item]:
    items: list[Item] = []

    def walk(folder: Path) -> None:
        entries = sorted(
            (e for e in folder.iterdir() if not e.name.startswith(".")),
            key=lambda e: _natural(e.name),
        )
        for e in entries:
            cap = e.with_name(e.name + ".txt") if e.is_dir() else e.with_suffix(".txt")
            if e.is_dir():
                if cap.is_file():  # a video as a folder of frames, captioned beside it
                    items.append(Item(e, _caption_file(cap), "frames", str(e.relative_to(root))))
                else:
                    walk(e)
                continue
            kind = _kind(e)
            if kind is None:
                continue
            if not cap.is_file():
                raise DDRLError(
                    f"{e} has no caption: expected {cap.name} beside it, or a metadata.jsonl/"
                    f"metadata.csv in {root} with file_name and text columns"
                )
            items.append(Item(e, _caption_file(cap), kind, str(e.relative_to(root))))

    walk(root)
    return items


def _list_table(table: Path, base: Path) -> list[Item]:
    rows = read_table(table)
    if not rows:
        return []
    if any(not isinstance(r, dict) for r in rows):
        raise DDRLError(f"{table}: every row must be an object with file and caption columns")
    fcol = _column(rows, FILE_KEYS, "file", table)
    ccol = _column(rows, CAPTION_KEYS, "caption", table)
    items = []
    for n, r in enumerate(rows, 1):
        where = f"{table} row {n}"
        cap = _text(r.get(ccol), where, repr(ccol))
        ref = r.get(fcol)
        if isinstance(ref, dict) and ref.get("bytes"):  # an HF image struct with its bytes
            name = f"{table.name}#{n - 1}"
            label = str(ref.get("path") or name)
            kind = "video" if label.lower().endswith(".gif") else "image"
            items.append(Item(table, cap, kind, name, n - 1, bytes(ref["bytes"])))
            continue
        if isinstance(ref, dict):
            ref = ref.get("path")
        rel = _text(ref, where, repr(fcol))
        path = Path(os.path.expanduser(rel))
        path = path if path.is_absolute() else base / path
        if not path.exists():
            raise DDRLError(f"{where}: {fcol} {rel!r} does not exist (looked for {path})")
        kind = _kind(path)
        if kind is None:
            raise DDRLError(
                f"{where}: {path.name} is not an image or video; allowed: "
                f"{', '.join(IMAGE_EXT + VIDEO_EXT)} or a folder of frames"
            )
        items.append(Item(path, cap, kind, rel))
    return items


def data_root(images: str | Path) -> Path:
    """The folder an image set's relative paths are taken from."""
    p = Path(os.path.expanduser(str(images)))
    return p if p.is_dir() else p.parent


def list_items(images: str | Path) -> list[Item]:
    """The items of ``data.images`` (captions read, media not opened), in a stable order."""
    if not str(images):
        raise DDRLError(
            "data.images is empty; allowed: an image/video-caption folder or a "
            ".jsonl/.csv/.parquet table"
        )
    p = _path(images, "data.images")
    if p.is_dir():
        found = [p / m for m in METADATA_FILES if (p / m).is_file()]
        if len(found) > 1:
            raise DDRLError(f"{p} has {', '.join(f.name for f in found)}; keep only one")
        items = _list_table(found[0], p) if found else _list_folder(p)
    elif p.suffix.lower() in TABLE_EXT:
        items = _list_table(p, p.parent)
    else:
        raise DDRLError(
            f"data.images={str(images)!r} is neither a folder nor a table; allowed: a folder "
            f"or {', '.join(TABLE_EXT)}"
        )
    if not items:
        raise DDRLError(f"no captioned images or videos in data.images={str(images)!r}")
    return items


# ----------------------------------------------------------------------------- the task


def files_data(cfg: DataConfig) -> TaskData:
    """The prompt sets of ``data.name = "files"``: ``data.prompts`` (or, when empty, the
    captions of ``data.images``, else of ``data.condition_images``: an edit set's instructions)
    for training, ``data.eval_prompts`` (or the training prompts) for evaluation. No
    image-space pools: real data is encoded by ``latent_pool``."""
    if cfg.prompts:
        records = load_prompts(cfg.file("prompts"))  # data:<set>/<file> resolved
    elif cfg.images or cfg.condition_images:
        items = list_items(cfg.images or cfg.condition_images)
        records = [{"prompt": it.caption, "file_name": it.name} for it in items]
    else:
        raise DDRLError(
            "data.name='files' needs data.prompts (a prompt file), data.images or "
            "data.condition_images"
        )
    evals = load_prompts(cfg.file("eval_prompts")) if cfg.eval_prompts else records
    return TaskData(
        [r["prompt"] for r in records],
        None,
        None,
        eval_prompts=[r["prompt"] for r in evals],
        records=records,
        eval_records=evals,
    )

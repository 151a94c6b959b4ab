"""data.name = "files": prompt files, image/video-caption sets and the cached VAE latents."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error
from PIL import Image

from ddrl.data import files, media
from ddrl.data.config import DataConfig
from ddrl.data.files import files_data, list_items, load_prompts
from ddrl.data.latents import latent_pool
from ddrl.data.media import frame_indices, read_items
from ddrl.data.pool_io import load_pool
from ddrl.data.pools import load_data


def png(path: Path, w: int = 8, h: int = 8, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------- prompt files


def test_prompt_files_in_every_format(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\na cat\n\n  a dog on a mat  \n   # indented comment\na cat\n")
    assert load_prompts(txt) == [
        {"prompt": "a cat"},
        {"prompt": "a dog on a mat"},
        {"prompt": "a cat"},
    ]

    jl = tmp_path / "p.jsonl"
    jl.write_text(
        json.dumps({"prompt": "red cube", "tag": "color", "n": 1})
        + "\n\n"
        + json.dumps({"prompt": "two dogs", "tag": "count", "n": 2})
        + "\n"
    )
    assert load_prompts(jl) == [
        {"prompt": "red cube", "tag": "color", "n": 1},
        {"prompt": "two dogs", "tag": "count", "n": 2},
    ]
    cap = tmp_path / "c.jsonl"
    cap.write_text(json.dumps({"Caption": "a boat", "id": 7}) + "\n")  # case-insensitive column
    assert load_prompts(cap) == [{"prompt": "a boat", "id": 7}]

    js = tmp_path / "p.json"
    js.write_text(json.dumps(["one", "two"]))
    assert [r["prompt"] for r in load_prompts(js)] == ["one", "two"]

    csv_ = tmp_path / "p.csv"
    csv_.write_text('text,seed\n"a cat, on a mat",3\nünïcødé,4\n', encoding="utf-8")
    assert load_prompts(csv_) == [
        {"prompt": "a cat, on a mat", "seed": "3"},
        {"prompt": "ünïcødé", "seed": "4"},
    ]


def test_parquet_prompts(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["x", "y"], "level": [1, 2]}), path)
    assert load_prompts(path) == [{"prompt": "x", "level": 1}, {"prompt": "y", "level": 2}]


def test_bad_prompt_files_are_one_line_errors(tmp_path):
    one_line_error(load_prompts, tmp_path / "none.txt", match="does not exist")
    (tmp_path / "p.yaml").write_text("- a\n")
    one_line_error(load_prompts, tmp_path / "p.yaml", match="allowed formats")
    (tmp_path / "nocol.jsonl").write_text(json.dumps({"label": "x"}) + "\n")
    msg = one_line_error(load_prompts, tmp_path / "nocol.jsonl", match="no prompt column")
    assert "prompt, caption, text" in msg and "label" in msg
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    one_line_error(load_prompts, tmp_path / "bad.jsonl", match="line 2 is not JSON")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    one_line_error(load_prompts, tmp_path / "empty.txt", match="no prompts")
    (tmp_path / "blank.csv").write_text("prompt\nok\n\n")
    assert [r["prompt"] for r in load_prompts(tmp_path / "blank.csv")] == ["ok"]  # blank line
    (tmp_path / "space.csv").write_text("prompt\nok\n  \n")
    one_line_error(load_prompts, tmp_path / "space.csv", match="row 2")  # an empty prompt
    (tmp_path / "null.jsonl").write_text('{"prompt": "a"}\n{"prompt": null}\n')
    one_line_error(load_prompts, tmp_path / "null.jsonl", match="row 2")
    (tmp_path / "obj.json").write_text('{"prompt": "a"}')
    one_line_error(load_prompts, tmp_path / "obj.json", match="JSON list")


# ----------------------------------------------------------------------------- config


def test_data_config_checks_files_settings(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    DataConfig(name="files", prompts=str(prompts), source="synthetic").check()
    DataConfig(name="files", prompts=str(prompts)).check()  # real data is needed only later
    one_line_error(DataConfig(name="digits", prompts=str(prompts)).check, match="data.name='files'")
    one_line_error(DataConfig(name="files").check, match="needs data.prompts")
    one_line_error(
        DataConfig(name="files", prompts=str(tmp_path / "p.yaml")).check, match="allowed formats"
    )
    # Whether the files exist is asked by the commands that read them (train, synth, eval:
    # DataConfig.require), not by the config check (`ddrl config` works without them).
    gone = DataConfig(name="files", prompts=str(tmp_path / "q.txt"))
    gone.check()
    one_line_error(gone.require, match="does not exist")
    gone = DataConfig(name="files", prompts=str(prompts), images=str(tmp_path / "no"))
    gone.check()
    one_line_error(gone.require, match="data.images")
    one_line_error(DataConfig(name="web").check, match="files")


def test_files_data_prompt_sets(tmp_path):
    (tmp_path / "train.txt").write_text("a\nb\n")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "c", "k": 1}) + "\n")
    cfg = DataConfig(name="files", prompts=str(tmp_path / "train.txt"), source="synthetic")
    d = load_data(cfg)
    assert d.prompts == ["a", "b"] and d.eval_prompts == ["a", "b"]
    assert d.train is None and d.heldout is None
    cfg.eval_prompts = str(tmp_path / "eval.jsonl")
    d = files_data(cfg)
    assert d.eval_prompts == ["c"] and d.eval_records == [{"prompt": "c", "k": 1}]
    assert d.sample_prompts(5, torch.Generator().manual_seed(0))[0] in ("a", "b")
    # No prompt file: the captions of the real data are the prompts.
    png(tmp_path / "img" / "x.png")
    (tmp_path / "img" / "x.txt").write_text("a photo\n")
    d = files_data(DataConfig(name="files", images=str(tmp_path / "img")))
    assert d.prompts == ["a photo"] and d.records == [{"prompt": "a photo", "file_name": "x.png"}]
    one_line_error(load_data, "files", match="data.prompts")


# ----------------------------------------------------------------------------- images


def test_image_folder_resize_and_center_crop(tmp_path):
    root = tmp_path / "imgs"
    # 12 wide × 6 high: left third black, middle white, right third black.
    arr = np.zeros((6, 12, 3), np.uint8)
    arr[:, 3:9] = 255
    root.mkdir()
    Image.fromarray(arr).save(root / "b_wide.png")
    (root / "b_wide.txt").write_text("wide\n")
    png(root / "sub" / "a.jpg", 5, 9, value=0)
    (root / "sub" / "a.txt").write_text("nested")
    (root / "notes.md").write_text("ignored")
    (root / ".hidden.png").write_bytes(b"x")
    items = list(read_items(DataConfig(name="files", images=str(root)), 6))
    assert [c for _, c in items] == ["wide", "nested"]  # natural order: b_wide < sub
    x, _ = items[0]
    assert x.shape == (3, 6, 6) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))  # the centre 6×6 is the white middle
    y, _ = items[1]
    assert y.shape == (3, 6, 6) and float(y.max()) == -1.0
    z = next(read_items(DataConfig(name="files", images=str(root)), (4, 8)))[0]
    assert z.shape == (3, 4, 8)  # (height, width) works too


def test_metadata_tables_and_errors(tmp_path):
    root = tmp_path / "hf"
    png(root / "train" / "0.png")
    png(root / "train" / "1.png", value=255)
    rows = [
        {"file_name": "train/0.png", "text": "zero"},
        {"file_name": "train/1.png", "text": "one"},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    got = list(read_items(DataConfig(images=str(root)), 4))
    assert [c for _, c in got] == ["zero", "one"] and float(got[1][0].min()) == 1.0

    table = tmp_path / "tables" / "data.csv"
    table.parent.mkdir()
    table.write_text(f"image,caption\n../hf/train/1.png,rel\n{root / 'train' / '0.png'},abs\n")
    assert [c for _, c in read_items(DataConfig(images=str(table)), 4)] == ["rel", "abs"]

    table.write_text("image,caption\nmissing.png,x\n")
    one_line_error(list_items, str(table), match="does not exist")
    table.write_text("what,caption\na.png,x\n")
    one_line_error(list_items, str(table), match="no file column")
    (root / "metadata.csv").write_text("file_name,text\n")
    one_line_error(list_items, str(root), match="keep only one")
    bare = tmp_path / "bare"
    png(bare / "a.png")
    one_line_error(list_items, str(bare), match="no caption")
    one_line_error(list_items, "", match="data.images is empty")
    one_line_error(list_items, str(tmp_path / "nothing"), match="does not exist")
    (tmp_path / "x.txt").write_text("")
    one_line_error(list_items, str(tmp_path / "x.txt"), match="neither a folder nor a table")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(list_items, str(empty), match="no captioned")
    (bare / "a.txt").write_text("a")
    (bare / "b.png").write_bytes(b"not a png")
    (bare / "b.txt").write_text("b")
    one_line_error(lambda: list(read_items(DataConfig(images=str(bare)), 4)), match="b.png")


def test_parquet_table_with_paths_and_embedded_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import io

    import pyarrow.parquet as pq

    png(tmp_path / "a.png", value=0)
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(buf, format="PNG")
    pq.write_table(pa.table({"file_name": ["a.png"], "prompt": ["path"]}), tmp_path / "t.parquet")
    assert [c for _, c in read_items(DataConfig(images=str(tmp_path / "t.parquet")), 4)] == ["path"]
    hf = pa.table(
        {"image": [{"bytes": buf.getvalue(), "path": "w.png"}], "text": ["embedded"]}
    )  # the layout of an HF image column
    pq.write_table(hf, tmp_path / "hf.parquet")
    ((x, cap),) = read_items(DataConfig(images=str(tmp_path / "hf.parquet")), 4)
    assert cap == "embedded" and float(x.min()) == 1.0


# ----------------------------------------------------------------------------- videos


def frames_of(n: int, size: int = 8) -> list[np.ndarray]:
    return [np.full((size, size, 3), 20 * i, np.uint8) for i in range(n)]


def test_frame_indices_span_the_clip():
    assert frame_indices(10, 5, "v") == [1, 3, 5, 7, 9]
    assert frame_indices(4, 4, "v") == [0, 1, 2, 3]
    assert frame_indices(9, 1, "v") == [4]
    one_line_error(frame_indices, 3, 4, "clip.mp4", match="clip.mp4 has 3 frames")


def test_video_items_frames_folder_gif_and_image(tmp_path):
    root = tmp_path / "vids"
    for i, f in enumerate(frames_of(10)):  # frame2 sorts before frame10 (natural order)
        Image.fromarray(f).save(png(root / "clip" / f"frame{i}.png"))
    (root / "clip.txt").write_text("a frames clip")
    gif = [Image.fromarray(f) for f in frames_of(6)]
    gif[0].save(root / "g.gif", save_all=True, append_images=gif[1:], duration=50, loop=0)
    (root / "g.txt").write_text("a gif")
    cfg = DataConfig(images=str(root))
    (v, cap), (g, gcap) = read_items(cfg, 4, frames=3)
    assert (cap, gcap) == ("a frames clip", "a gif")
    assert v.shape == (3, 3, 4, 4) and g.shape == (3, 3, 4, 4)
    expect = [20 * i / 127.5 - 1 for i in frame_indices(10, 3, "")]
    assert torch.allclose(v[0, :, 0, 0], torch.tensor(expect))
    one_line_error(lambda: list(read_items(cfg, 4, frames=0)), match="the model takes images")
    one_line_error(lambda: list(read_items(cfg, 4, frames=20)), match="has 10 frames")
    img = files.Item(png(tmp_path / "i.png"), "c", "image", "i.png")
    assert media.load_media(img, 4, frames=1).shape == (3, 1, 4, 4)
    one_line_error(media.load_media, img, 4, frames=2, match="is an image")


def test_mp4_video(tmp_path):
    iio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")
    iio.mimwrite(tmp_path / "m.mp4", frames_of(10, 16), fps=5, macro_block_size=1)
    (tmp_path / "m.txt").write_text("an mp4")
    ((v, cap),) = read_items(DataConfig(images=str(tmp_path)), 8, frames=5)
    assert cap == "an mp4" and v.shape == (3, 5, 8, 8)
    means = ((v.mean(dim=(0, 2, 3)) + 1) * 127.5).tolist()  # frames 1, 3, 5, 7, 9 (lossy codec)
    assert all(abs(m - 20 * i) < 4 for m, i in zip(means, [1, 3, 5, 7, 9], strict=True)), means
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    (tmp_path / "bad.txt").write_text("bad")
    one_line_error(lambda: list(read_items(DataConfig(images=str(tmp_path)), 8, 5)), match="bad")


# ----------------------------------------------------------------------------- latent cache


class PoolCodec:
    """A fake VAE: 4× average pooling as "latents"; counts the images it encodes."""

    value_range = (-1.0, 1.0)

    def __init__(self):
        self.encoded = 0

    def encode(self, images):
        self.encoded += images.shape[0]
        if images.dim() == 5:  # videos: pool each frame
            b, c, f, h, w = images.shape
            flat = images.transpose(1, 2).reshape(b * f, c, h, w)
            z = torch.nn.functional.avg_pool2d(flat, 4)
            return z.reshape(b, f, c, h // 4, w // 4).transpose(1, 2)
        return torch.nn.functional.avg_pool2d(images, 4)


def image_set(root: Path, n: int = 5) -> Path:
    for i in range(n):
        png(root / f"{i}.png", value=40 * i)
        (root / f"{i}.txt").write_text(f"caption {i % 2}")
    return root


def test_latent_pool_encodes_once_and_reads_the_cache(tmp_path, monkeypatch):
    cfg = DataConfig(name="files", images=str(image_set(tmp_path / "imgs")))
    codec, cache, logs = PoolCodec(), tmp_path / "cache", []
    pool = latent_pool(cfg, codec, "fake-vae", 8, 0, cache, log=logs.append, batch=2)
    assert codec.encoded == 5 and pool.x.shape == (5, 3, 2, 2)
    assert pool.prompts == [f"caption {i % 2}" for i in range(5)]
    assert torch.allclose(pool.x[3], torch.full((3, 2, 2), 120 / 127.5 - 1))
    (folder,) = (cache / "latents").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["codec_id"] == "fake-vae" and manifest["resolution"] == 8
    assert manifest["shape"] == [5, 3, 2, 2] and manifest["frames"] == 0
    assert [f["path"] for f in manifest["files"]] == [f"{i}.png" for i in range(5)]
    assert {"size", "mtime_ns"} <= set(manifest["files"][0]) and manifest["created"]
    assert torch.equal(load_pool(folder / "latents.safetensors").x, pool.x)

    def no_reading(*a, **k):
        raise AssertionError("the cache must not open any image")

    monkeypatch.setattr(media, "load_media", no_reading)
    monkeypatch.setattr(media, "_open_image", no_reading)
    again = latent_pool(cfg, codec, "fake-vae", 8, 0, cache, log=logs.append)
    assert codec.encoded == 5 and torch.equal(again.x, pool.x) and again.prompts == pool.prompts
    assert any("from the cache" in m for m in logs)
    monkeypatch.undo()

    # Another codec id, resolution or frame count: a new cache entry.
    latent_pool(cfg, codec, "other-vae", 8, 0, cache, log=logs.append)
    latent_pool(cfg, codec, "fake-vae", 4, 0, cache, log=logs.append)
    assert codec.encoded == 15 and len(list((cache / "latents").iterdir())) == 3


def test_latent_pool_invalidated_by_a_changed_file(tmp_path):
    root = image_set(tmp_path / "imgs", 3)
    cfg, codec, cache = DataConfig(images=str(root)), PoolCodec(), tmp_path / "cache"
    first = latent_pool(cfg, codec, "v", 8, 0, cache, log=lambda m: None)
    png(root / "1.png", value=250)  # rewritten: new mtime (set explicitly) and content
    st = (root / "1.png").stat()
    os.utime(root / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = latent_pool(cfg, codec, "v", 8, 0, cache, log=lambda m: None)
    assert codec.encoded == 6 and not torch.equal(first.x[1], second.x[1])
    assert torch.equal(first.x[0], second.x[0])
    (root / "2.txt").write_text("a new caption")  # a caption edit changes the pool too
    third = latent_pool(cfg, codec, "v", 8, 0, cache, log=lambda m: None)
    assert codec.encoded == 9 and third.prompts[2] == "a new caption"


def test_latent_pool_killed_run_leaves_no_cache(tmp_path, monkeypatch):
    cfg, cache = DataConfig(images=str(image_set(tmp_path / "imgs", 4))), tmp_path / "cache"

    class Dies(PoolCodec):
        def encode(self, images):
            if self.encoded >= 2:
                raise KeyboardInterrupt
            return super().encode(images)

    with pytest.raises(KeyboardInterrupt):
        latent_pool(cfg, Dies(), "v", 8, 0, cache, log=lambda m: None, batch=2)
    assert not (cache / "latents").exists() or not any((cache / "latents").iterdir())

    import ddrl.data.latents as latents

    real_save = latents.save_pool

    def killed(pool, path):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(latents, "save_pool", killed)
    with pytest.raises(KeyboardInterrupt):
        latent_pool(cfg, PoolCodec(), "v", 8, 0, cache, log=lambda m: None)
    assert [p.name[:5] for p in (cache / "latents").iterdir()] == [".tmp-"]  # never a key folder
    monkeypatch.setattr(latents, "save_pool", real_save)
    codec = PoolCodec()
    pool = latent_pool(cfg, codec, "v", 8, 0, cache, log=lambda m: None)
    assert codec.encoded == 4 and len(pool) == 4
    assert all(not p.name.startswith(".") for p in (cache / "latents").iterdir())
    # A corrupted cache file is detected (checksum) and encoded again.
    (folder,) = [p for p in (cache / "latents").iterdir() if not p.name.startswith(".")]
    (folder / "latents.safetensors").write_bytes(b"garbage")
    latent_pool(cfg, codec, "v", 8, 0, cache, log=lambda m: None)
    assert codec.encoded == 8


def test_latent_pool_videos_and_errors(tmp_path):
    root = tmp_path / "vids"
    for i, f in enumerate(frames_of(6)):
        Image.fromarray(f).save(png(root / "clip" / f"{i:03d}.png"))
    (root / "clip.txt").write_text("clip")
    codec = PoolCodec()
    pool = latent_pool(
        DataConfig(images=str(root)), codec, "v", 8, 4, tmp_path / "c", lambda m: None
    )
    assert pool.x.shape == (1, 3, 4, 2, 2) and pool.prompts == ["clip"]
    one_line_error(latent_pool, DataConfig(), codec, "v", 8, 0, tmp_path, match="data.images")

"""``ddrl data get``: published prompt sets downloaded (resumed, verified, atomic) from a local
HTTP server on 127.0.0.1 (never a real host); ``data:<set>/<file>`` references in presets;
``ddrl config`` without the data and ``ddrl train`` refusing at once without it."""

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import one_line_error

from ddrl.cli import main
from ddrl.config import build_config
from ddrl.data import published
from ddrl.data.config import DataConfig, data_ref
from ddrl.data.download import digests, get_file, get_set
from ddrl.data.files import files_data
from ddrl.errors import DDRLError

REPO, COMMIT = "someone/prompts", "0123456789abcdef0123456789abcdef01234567"
TRAIN = b"".join(f"a sign that says 'word {i}'\n".encode() for i in range(400))
ROWS = [{"tag": "counting", "include": [{"class": "cat", "count": i}], "prompt": f"{i} cats"}
        for i in range(1, 4)]  # fmt: skip
META = b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)


def spec(path: str, content: bytes) -> dict:
    blob = hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()
    sha = hashlib.sha256(content).hexdigest()
    return {"path": path, "blob": blob, "sha256": sha, "size": len(content)}


class Server:
    """Serves ``files`` (URL path → bytes) with Range support; ``drop`` (URL paths) sends the
    full Content-Length but half the body and closes, once per path."""

    def __init__(self, files: dict[str, bytes], drop: set[str] = ()):
        self.files, self.drop, self.requests = files, set(drop), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Range")))
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng := self.headers.get("Range"):
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                rest = body[start:]
                if self.path in outer.drop:
                    outer.drop.discard(self.path)
                    self.wfile.write(rest[: len(rest) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(rest)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def test_set(monkeypatch):
    """A registry entry "test-set" (two sources) with checksums of TRAIN and META."""
    entry = {
        "about": "test",
        "licence": "none",
        "sources": ((REPO, COMMIT), ("mirror/prompts", COMMIT)),
        "files": {
            "train.txt": spec("dataset/train.txt", TRAIN),
            "meta.jsonl": spec("dataset/meta.jsonl", META),
        },
    }
    monkeypatch.setitem(published.SETS, "test-set", entry)
    return entry


def url_of(path: str, repo: str = REPO) -> str:
    return f"/{repo}/{COMMIT}/{path}"


@pytest.fixture
def server():
    s = Server({url_of("dataset/train.txt"): TRAIN, url_of("dataset/meta.jsonl"): META})
    yield s
    s.close()


def test_complete_download_is_verified_and_not_repeated(tmp_path, test_set, server):
    folder = get_set("test-set", str(tmp_path), server.url, log=lambda *a: None)
    assert folder == tmp_path / "data" / "test-set"
    assert (folder / "train.txt").read_bytes() == TRAIN
    assert (folder / "meta.jsonl").read_bytes() == META
    assert sorted(p.name for p in folder.iterdir()) == ["meta.jsonl", "train.txt"]  # no .part
    n = len(server.requests)
    get_set("test-set", str(tmp_path), server.url, log=lambda *a: None)  # both already there
    assert len(server.requests) == n
    (folder / "train.txt").write_bytes(b"stale\n")  # a wrong file is fetched again
    get_file("test-set", "train.txt", str(tmp_path), server.url, log=lambda *a: None)
    assert (folder / "train.txt").read_bytes() == TRAIN and len(server.requests) == n + 1


def test_interrupted_download_resumes_from_the_partial_file(tmp_path, test_set, server):
    path = url_of("dataset/train.txt")
    server.drop.add(path)
    msg = one_line_error(
        get_file, "test-set", "train.txt", str(tmp_path), server.url, retries=0,
        log=lambda *a: None, match=("interrupted", "run the same command again"),
    )  # fmt: skip
    part = tmp_path / "data" / "test-set" / "train.txt.part"
    half = len(TRAIN) // 2
    assert part.read_bytes() == TRAIN[:half], msg
    assert not (tmp_path / "data" / "test-set" / "train.txt").exists()
    got = get_file("test-set", "train.txt", str(tmp_path), server.url, log=lambda *a: None)
    assert got.read_bytes() == TRAIN and not part.exists()
    assert server.requests[-1] == (path, f"bytes={half}-")  # continued, not restarted

    # Within one command: the drop is retried at once from where it stopped.
    got.unlink()
    server.drop.add(path)
    get_file("test-set", "train.txt", str(tmp_path), server.url, log=lambda *a: None)
    assert got.read_bytes() == TRAIN and server.requests[-2:] == [
        (path, None),
        (path, f"bytes={half}-"),
    ]


def test_checksum_mismatch_is_one_line_and_leaves_no_file(tmp_path, test_set, server):
    server.files[url_of("dataset/train.txt")] = TRAIN.replace(b"word 7", b"w0rd 7")
    one_line_error(
        get_file, "test-set", "train.txt", str(tmp_path), server.url, log=lambda *a: None,
        match=("checksum mismatch", "sha256", "deleted", url_of("dataset/train.txt")),
    )  # fmt: skip
    assert list((tmp_path / "data" / "test-set").iterdir()) == []


def test_unreachable_server_is_one_line_naming_the_url(tmp_path, test_set):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    one_line_error(
        get_file, "test-set", "train.txt", str(tmp_path), base, log=lambda *a: None,
        match=("cannot reach", f"{base}{url_of('dataset/train.txt')}", "by hand",
               str(tmp_path / "data" / "test-set" / "train.txt")),
    )  # fmt: skip


def test_a_missing_source_falls_back_to_the_next(tmp_path, test_set):
    s = Server({url_of("dataset/meta.jsonl", "mirror/prompts"): META})
    try:
        get_file("test-set", "meta.jsonl", str(tmp_path), s.url, log=lambda *a: None)
    finally:
        s.close()
    assert (tmp_path / "data" / "test-set" / "meta.jsonl").read_bytes() == META
    assert [r[0].split("/")[1] for r in s.requests] == ["someone", "mirror"]


def test_data_refs_resolve_in_the_cache_and_keep_jsonl_metadata(tmp_path, test_set, server):
    cfg = DataConfig(name="files", prompts="data:test-set/meta.jsonl")
    cfg._cache_dir = str(tmp_path)
    cfg.check()  # the file need not exist to check the config
    assert "ddrl data get test-set --cache" in cfg.missing()[0]
    one_line_error(files_data, cfg, match=("data:test-set/meta.jsonl", "ddrl data get test-set"))
    get_set("test-set", str(tmp_path), server.url, log=lambda *a: None)
    assert cfg.missing() == []
    data = files_data(cfg)  # a GenEval-style table: the prompt and its metadata columns
    assert data.prompts == ["1 cats", "2 cats", "3 cats"]
    assert data.records[1] == {"prompt": "2 cats", "tag": "counting", "include": [
        {"class": "cat", "count": 2}]}  # fmt: skip
    for bad, words in (
        ("data:nope/train.txt", ("unknown data set 'nope'", "flow_grpo-ocr")),
        ("data:test-set/other.txt", ("no file 'other.txt'", "train.txt")),
    ):
        DataConfig(name="files", prompts=bad).check()  # the form only: the config layer
        one_line_error(published.check_refs, DataConfig(name="files", prompts=bad), match=words)
    for bad in ("data:test-set", "data:/a.txt", "data:test-set/a/b.txt"):
        one_line_error(DataConfig(name="files", prompts=bad).check, match="data:<set>/<file>")
    one_line_error(
        DataConfig(name="files", prompts="p.txt", images="data:test-set/meta.jsonl").check,
        match="allowed for data.prompts",
    )


def test_data_get_command(tmp_path, test_set, server, capsys, monkeypatch):
    monkeypatch.setenv("DDRL_DATA_URL", server.url)
    assert main(["data", "get", "test-set", "--cache", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "data" / "test-set") and "sha256 verified" in err
    assert main(["data", "list", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test-set  (train.txt, meta.jsonl; in the cache)" in out
    assert "flow_grpo-ocr  (train.txt, test.txt; not fetched)" in out
    assert main(["data", "get", "nope"]) == 2
    assert "unknown data set 'nope'" in capsys.readouterr().err


def test_config_works_without_the_data_and_names_the_get(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DDRL_CACHE", str(tmp_path / "empty"))
    assert main(["config", "--preset", "sd35-medium-ocr-ddrl"]) == 0
    out, err = capsys.readouterr()
    assert 'data.prompts: str = "data:flow_grpo-ocr/train.txt"' in out
    notes = [line for line in err.splitlines() if line.startswith("ddrl: note:")]
    assert len(notes) == 2 and all("ddrl data get flow_grpo-ocr" in n for n in notes), err
    assert str(tmp_path / "empty" / "data" / "flow_grpo-ocr" / "train.txt") in notes[0]


def test_train_without_the_data_fails_at_once_naming_the_set(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DDRL_CACHE", str(tmp_path / "empty"))
    run = tmp_path / "run"
    assert main(["train", "--preset", "sd35-medium-ocr-ddrl", "--out", str(run)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "ddrl data get flow_grpo-ocr" in err[0], err
    assert "data.prompts='data:flow_grpo-ocr/train.txt'" in err[0] and not run.exists()


def test_model_cache_dir_is_where_data_refs_are_looked_up(tmp_path):
    cache = tmp_path / "c"
    cfg = build_config(overrides=["preset=sd35-medium-ocr-flow-grpo", f"model.cache_dir={cache}"])
    assert f"ddrl data get flow_grpo-ocr --cache {cache}" in cfg.data.missing()[0]
    folder = cache / "data" / "flow_grpo-ocr"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text("a\n")
    (folder / "test.txt").write_text("b\n")
    cfg.data.require()
    assert cfg.data.file("prompts") == folder / "train.txt"


def test_registry_pins_commits_and_checksums():
    unverified = set()  # files whose bytes the mirrors lacked: verified by git blob id alone
    for name, entry in published.SETS.items():
        assert re.fullmatch(r"[A-Za-z0-9_]+-[A-Za-z0-9_]+", name), name
        assert entry["about"] and entry["sources"] and entry["files"]
        for repo, commit in entry["sources"]:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+", repo) and re.fullmatch(r"[0-9a-f]{40}", commit)
        for file, f in entry["files"].items():
            assert f["path"].rsplit("/", 1)[-1] == file, (name, file)
            assert re.fullmatch(r"[0-9a-f]{40}", f["blob"]), (name, file)
            if f["sha256"] is None:
                assert f["size"] is None
                unverified.add(f"{name}/{file}")
            else:
                assert re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) and f["size"] > 0, (name, file)
    assert unverified == {
        "flow_grpo-ocr/train.txt",
        "flow_grpo-geneval/train_metadata.jsonl",
        "DanceGRPO-prompts/prompts.txt",
    }
    # Every data:<set>/<file> a preset names is in the registry.
    for preset in ("sd35-medium-ocr-ddrl", "sd35-medium-pickscore-nft"):
        cfg = build_config(overrides=[f"preset={preset}"])
        for key in ("prompts", "eval_prompts"):
            assert data_ref(getattr(cfg.data, key)) is not None
        published.check_refs(cfg.data)


def test_digests_match_git():
    """The git blob id is git's: SHA-1 of "blob <size>\\0" + content (git hash-object)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f"
        p.write_bytes(b"hello\n")
        assert digests(p)["blob"] == "ce013625030ba8dba906f756967f9e9ca394464a"
    with pytest.raises(DDRLError):
        published.check_set("nope")

"""Loopback load test of ``ddrl reward-server``: the batching Starlette server against the
http.server one it replaced, with the trainer's own client.

``--clients`` threads (trainer ranks), each a real ``RemoteReward``, send ``--requests``
requests of ``--images`` images (3 x ``--size`` x ``--size``) each, all at once after one
untimed warm-up request each. Every server runs in its own process (this script with
``--serve``), so that it does not share the clients' interpreter lock. Cases, per reward:

  old          the http.server implementation of commit 91c68d8, read with ``git show`` into a
               temporary file and imported (one reward call per request, serial, under a lock)
  new/1:1      the new server with ``max_batch`` = one request: no merging (the stack alone)
  new          the new server, ``--max-batch`` (default clients x images), ``--max-wait-ms``
  new/2 rep    the same with two replicas on the CPU (``devices=cpu,cpu``)

Rewards (``--rewards``):

  sleep   a model of a GPU reward: ``per_call + per_image x n`` seconds of ``time.sleep`` (the
          CPU idles while a GPU would compute; 20 ms + 1 ms per image by default: the fixed part
          is the launch / transfer / synchronise cost that batching amortises)
  conv    a real CPU reward: a small random-weight torch conv net (3 layers, 64 to 128
          channels) on the images; per-image compute dominates, little fixed cost per call

Threads: the client process runs torch single-threaded (see below); the server process gets
torch's default (one OpenMP thread per core) unless ``--server-threads N``.

Prints throughput (images/s over the timed phase), p50 / p99 request latency and the mean
images per reward call, and checks that the new server's answers to one fixed request and one
malformed request are byte-identical to the old one's. ``--json FILE`` writes the rows.

    python benchmarks/reward_load.py --json /tmp/reward_load.json
    python benchmarks/reward_load.py --rewards conv --server-threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

if "--serve" not in sys.argv:
    # The clients stand for trainer ranks (processes with cores of their own); here eight
    # share one process, so their torch ops (quantize) run on one thread each rather than
    # eight OpenMP teams oversubscribing the cores the server needs. Set before torch loads.
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "91c68d8"  # the last commit whose reward server is the http.server one
OLD_PATH = "src/ddrl/rewards/remote/server.py"


class SleepReward:
    """A GPU reward's timing without a GPU: sleeps per_call + per_image x n seconds."""

    def __init__(self, per_call: float, per_image: float):
        self.per_call, self.per_image = per_call, per_image

    def __call__(self, images, prompts):
        time.sleep(self.per_call + self.per_image * images.shape[0])
        return images.flatten(1).mean(1)


class ConvReward:
    """A small random conv net on the CPU: images [B, 3, H, W] → a score [B]."""

    def __init__(self):
        torch.manual_seed(0)
        nn = torch.nn
        self.net = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 128, 3, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128, 1),
        ).eval()

    def __call__(self, images, prompts):
        return self.net(images).squeeze(1)


def make_reward(args):
    if args.reward == "sleep":
        return SleepReward(args.per_call_ms / 1000, args.per_image_ms / 1000)
    return ConvReward()


def load_old_server():
    """The http.server implementation from git history, imported from a temporary file."""
    text = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:{OLD_PATH}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_reward_server.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_reward_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_server(args) -> None:
    """--serve: one server until killed; prints its URL first."""
    if args.serve == "old":
        old = load_old_server()
        server = old.make_server(make_reward(args), "127.0.0.1", 0, name=args.reward)
        print(old.server_url(server), flush=True)
        server.serve_forever()
        return
    from ddrl.rewards.remote.server import serve

    rewards = [make_reward(args) for _ in range(args.replicas)]
    serve(
        rewards,
        ready=lambda url: print(url, flush=True),
        name=args.reward,
        devices=["cpu"] * args.replicas,
        max_batch=args.max_batch,
        max_wait=args.max_wait_ms / 1000,
    )


def _post(url: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url + "/score", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def probe(url: str, size: int) -> dict:
    """The raw answers to one fixed request and one malformed one (the byte comparison)."""
    from ddrl.rewards.remote.wire import encode_request, quantize

    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(7)) * 2 - 1
    return {"ok": _post(url, encode_request(quantize(x), ["a", "b"])), "bad": _post(url, b"xx")}


def load(url: str, args, new: bool) -> dict:
    """The timed phase: every client sends its requests; throughput, latencies and (new
    server) the mean images per reward call in the timed phase."""
    from ddrl.rewards.remote.client import RemoteReward

    n, size = args.images, args.size
    start: list[float] = []
    calls: list[tuple[float, float]] = []

    def begin() -> None:  # once every client is warm
        if new:
            calls.append(batch_totals(url))
        start.append(time.perf_counter())

    barrier = threading.Barrier(args.clients, action=begin)
    latencies: list[float] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        prompts = [f"client {i}"] * n
        remote = RemoteReward(url, timeout=300, retries=0, batch=n)
        remote(x, prompts)  # warm-up, untimed
        barrier.wait()
        mine = []
        for _ in range(args.requests):
            t = time.perf_counter()
            remote(x, prompts)
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start[0]
    latencies.sort()
    images = args.clients * args.requests * n
    if new:
        (sum0, count0), (sum1, count1) = calls[0], batch_totals(url)
        per_call = (sum1 - sum0) / (count1 - count0)
    else:  # one reward call per request, by construction
        per_call = float(n)
    return {
        "images_per_s": images / wall,
        "images_per_call": per_call,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "wall_s": wall,
    }


def batch_totals(url: str) -> tuple[float, float]:
    """(images, reward calls) so far, from the new server's /metrics (every replica)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    total = {
        k: sum(s.value for s in samples if s.name == f"ddrl_reward_batch_images_{k}")
        for k in ("sum", "count")
    }
    return total["sum"], total["count"]


def case(args, reward: str, server: str, replicas: int, max_batch: int) -> dict:
    """Start one server process, probe it, load it, stop it."""
    cmd = [sys.executable, __file__, "--serve", server, "--reward", reward]
    cmd += ["--replicas", str(replicas), "--max-batch", str(max_batch)]
    cmd += ["--max-wait-ms", str(args.max_wait_ms), "--per-call-ms", str(args.per_call_ms)]
    cmd += ["--per-image-ms", str(args.per_image_ms)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise SystemExit(f"server {server} did not start: {url!r}")
        answers = probe(url, args.size)
        row = load(url, args, new=server == "new")
    finally:
        proc.terminate()
        proc.wait(30)
    name = "old http.server" if server == "old" else f"new max_batch={max_batch}"
    name += f", {replicas} replicas" if replicas > 1 else ""
    row = {"reward": reward, "server": name, "replicas": replicas, "max_batch": max_batch, **row}
    return {**row, "answers": answers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    p.add_argument("--requests", type=int, default=20, help="timed requests per client")
    p.add_argument("--images", type=int, default=16, help="images per request")
    p.add_argument("--size", type=int, default=64, help="image height and width")
    p.add_argument("--rewards", default="sleep,conv", help="sleep, conv (comma-separated)")
    p.add_argument("--max-batch", type=int, default=0, help="0 = clients x images")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the new server's max_wait")
    p.add_argument("--per-call-ms", type=float, default=20.0, help="sleep reward: per call")
    p.add_argument("--per-image-ms", type=float, default=1.0, help="sleep reward: per image")
    p.add_argument(
        "--server-threads", type=int, default=0, help="the server's OMP_NUM_THREADS (0 = unset)"
    )
    p.add_argument("--json", default="", help="write the rows to this file")
    p.add_argument("--serve", choices=("old", "new"), help=argparse.SUPPRESS)
    p.add_argument("--reward", default="sleep", help=argparse.SUPPRESS)
    p.add_argument("--replicas", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return run_server(args)
    max_batch = args.max_batch or args.clients * args.images
    load_before = os.getloadavg()[0]  # other work on the machine skews every figure
    rows = []
    for reward in args.rewards.split(","):
        for server, replicas, mb in [
            ("old", 1, args.images),
            ("new", 1, args.images),
            ("new", 1, max_batch),
            ("new", 2, max_batch),
        ]:
            rows.append(case(args, reward, server, replicas, mb))
            r = rows[-1]
            print(
                f"{reward:6} {r['server']:32} {r['images_per_s']:8.1f} img/s  "
                f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                f"{r['images_per_call']:6.1f} img/call",
                flush=True,
            )
        old = rows[-4].pop("answers")
        for r in rows[-3:]:
            r["answers_as_old"] = r.pop("answers") == old
        same = all(r["answers_as_old"] for r in rows[-3:])
        print(
            f"{reward}: the new server's 200 and 400 answers are byte-identical to the old: {same}"
        )
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        **{k: getattr(args, k) for k in ("clients", "requests", "images", "size", "max_wait_ms")},
        **{k: getattr(args, k) for k in ("per_call_ms", "per_image_ms", "server_threads")},
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Speed figures for the embedded digits default (`make bench`).

Prints, per algorithm, the mean seconds of rollout, reward and update per iteration at the
default batch (10 prompts × 8 samples, 10 sampling steps), plus the flow-matching pretraining
step and the evaluation pass. Uses a tiny randomly initialised base so it needs no cache.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ddrl.config import build_config
from ddrl.models.digits import DigitsGenerator
from ddrl.runlog import read_jsonl
from ddrl.train import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    try:
        torch.manual_seed(0)
        DigitsGenerator().save_pretrained(tmp / "base")
        print(f"threads={args.threads} torch={torch.__version__} device=cpu")
        print(f"{'algorithm':12}{'rollout s':>12}{'reward s':>12}{'update s':>12}{'iter s':>12}")
        for algo in ("ddrl", "flow_grpo", "dance_grpo", "grpo", "sft"):
            cfg = build_config(
                overrides=[
                    f"algorithm={algo}",
                    f"model.base={tmp / 'base'}",
                    f"model.cache_dir={tmp}",
                    f"train.iterations={args.iterations}",
                    "train.progress=false",
                ]
            )
            out = tmp / algo
            out.mkdir()
            train(cfg, out, log=lambda *a: None)
            rows = read_jsonl(out / "metrics.jsonl")[1:]  # first iteration includes warm-up

            def mean(k: str, rows=rows) -> float:
                return sum(r[k] for r in rows) / len(rows)

            print(
                f"{algo:12}{mean('time_rollout'):>12.3f}{mean('time_reward'):>12.4f}"
                f"{mean('time_train'):>12.3f}{mean('time_iteration'):>12.3f}"
            )
        gen = DigitsGenerator()
        opt = torch.optim.AdamW(gen.parameters(), lr=1e-3)
        x, t = torch.randn(128, 1, 8, 8), torch.rand(128)
        prompts = [str(i % 10) for i in range(128)]
        for i in range(6):
            if i == 1:
                t0 = time.perf_counter()
            loss = gen.denoiser.velocity(x, t, gen.conditioner.encode(prompts)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"pretrain step (batch 128): {(time.perf_counter() - t0) / 5:.3f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Experiment: the SD3.5 + OCR setting in miniature, with a real learned reward (issue 9 item 5).

Renders 3-digit numbers "000"-"999" in Pillow's default font (black on white, random size and
position jitter) at a small size, pretrains a tiny SD3 transformer on them with flow matching
for a fixed wall-clock budget, samples held-out numbers with the 20-step Euler ODE and scores
them with the real OCR reward (``ddrl.rewards.ocr.OCRReward``, RapidOCR PP-OCRv4) after
upscaling. Not part of the package: a measurement to decide whether such a task is worth
embedding.

    .venv/bin/python benchmarks/textrender_experiment.py --seconds 300

Prints the OCR score of real rendered images of the held-out numbers, the pretraining
steps/time/loss, and the OCR score of the model's samples (per CFG scale); saves a PNG grid of
samples (top: real, then one row block per CFG scale) to ``--grid``.
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import numpy as np
import torch
from diffusers import SD3Transformer2DModel
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from ddrl.flow import flow_matching_loss, interpolate, sample_training_t, timestep_grid
from ddrl.rewards.ocr import OCRReward
from ddrl.training.ema import ema_update

DIGITS = 3
NULL = DIGITS * 10  # token id of the null (CFG) condition


# ----------------------------------------------------------------------------------- data
_FONTS: dict[float, ImageFont.FreeTypeFont] = {}


def _font(size: float):
    size = round(size * 4) / 4
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def render(text: str, h: int, w: int, rng: random.Random) -> np.ndarray:
    """Grayscale uint8 [h, w]: ``text`` in black on white, font size 55-75 % of h, position
    jittered uniformly within the free margin."""
    font = _font(rng.uniform(0.55, 0.75) * h)
    img = Image.new("L", (w, h), 255)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left, bottom - top
    x = (w - tw) / 2 - left + rng.uniform(-1, 1) * max(0.0, (w - tw) / 2 - 1)
    y = (h - th) / 2 - top + rng.uniform(-1, 1) * max(0.0, (h - th) / 2 - 1)
    draw.text((x, y), text, fill=0, font=font)
    return np.asarray(img)


def to_model(arrays: list[np.ndarray]) -> Tensor:
    """uint8 [h, w] images → float [B, 1, h, w] in [-1, 1] (white = 1)."""
    return torch.from_numpy(np.stack(arrays)).float().div(127.5).sub(1).unsqueeze(1)


def upscale(x: Tensor, factor: int) -> Tensor:
    """[B, 1, h, w] in [-1, 1] → [B, 1, h·f, w·f] bicubic (Pillow), as fed to the OCR."""
    out = []
    for img in ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).numpy():
        im = Image.fromarray(img).resize((img.shape[1] * factor, img.shape[0] * factor), 3)
        out.append(np.asarray(im))
    return to_model(out)


def prompt(number: str) -> str:
    return f'the number "{number}"'


# ---------------------------------------------------------------------------------- model
class NumberConditioner(nn.Module):
    """Per-position digit tokens (digits.py's pattern): token i = embedding of (i, digit i),
    pooled = sum of per-(position, digit) pooled embeddings; id NULL for the CFG null."""

    def __init__(self, width: int):
        super().__init__()
        self.tokens = nn.Embedding(NULL + 1, width)
        self.pooled = nn.Embedding(NULL + 1, width)
        nn.init.normal_(self.tokens.weight, std=0.5)
        nn.init.normal_(self.pooled.weight, std=0.5)

    def ids(self, numbers: list[str]) -> Tensor:
        return torch.tensor([[10 * i + int(c) for i, c in enumerate(n)] for n in numbers])

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.tokens(ids), self.pooled(ids).sum(1) / DIGITS**0.5


class Model(nn.Module):
    def __init__(self, h: int, w: int, patch: int, layers: int, heads: int, head_dim: int):
        super().__init__()
        width = heads * head_dim
        self.transformer = SD3Transformer2DModel(
            sample_size=max(h, w),
            patch_size=patch,
            in_channels=1,
            out_channels=1,
            num_layers=layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=width,
            caption_projection_dim=width,
            pooled_projection_dim=width,
            pos_embed_max_size=max(h, w) // patch,
        )
        self.cond = NumberConditioner(width)

    def forward(self, x_t: Tensor, t: Tensor, ids: Tensor) -> Tensor:
        tokens, pooled = self.cond(ids)
        return self.transformer(
            hidden_states=x_t,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            timestep=t * 1000,
            return_dict=False,
        )[0]


@torch.no_grad()
def sample(model: Model, ids: Tensor, shape, steps: int, cfg: float, seed: int) -> Tensor:
    """Deterministic Euler ODE from fixed noise on the flow_grpo/diffusers grid (shift 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((ids.shape[0], *shape), generator=g)
    ts = timestep_grid(steps, 1.0, "scheduler")
    null = torch.full_like(ids, NULL)
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        v = model(x, t, ids)
        if cfg != 1.0:
            v = model(x, t, null) + cfg * (v - model(x, t, null))
        x = x + (ts[i + 1] - ts[i]) * v
    return x


def grid_png(rows: list[Tensor], path: str, factor: int) -> None:
    """Rows of [n, 1, h, w] images in [-1, 1] → one PNG, each image upscaled ×factor."""
    ups = [upscale(r, factor) for r in rows]
    tiles = torch.cat([torch.cat(list(u.squeeze(1)), dim=1) for u in ups], dim=0)
    Image.fromarray(((tiles + 1) * 127.5).round().clamp(0, 255).byte().numpy()).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=16)
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--seconds", type=float, default=300.0, help="pretraining wall-clock budget")
    p.add_argument("--max-steps", type=int, default=0, help="also stop after this many steps")
    p.add_argument("--n-data", type=int, default=20000)
    p.add_argument("--held-out", type=int, default=100, help="numbers never seen in training")
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--steps", type=int, default=20, help="ODE steps")
    p.add_argument("--cfg", default="1,3", help="CFG scales to evaluate, comma-separated")
    p.add_argument("--upscale", type=int, default=4, help="bicubic factor before the OCR")
    p.add_argument("--grid", default="/tmp/textrender_samples.png")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    h, w = a.height, a.width
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    print(f"torch threads {torch.get_num_threads()}; images {h}x{w}, OCR after x{a.upscale}")

    numbers = [f"{i:03d}" for i in range(1000)]
    rng.shuffle(numbers)
    held, train = numbers[: a.held_out], numbers[a.held_out :]
    t0 = time.time()
    train_nums = [rng.choice(train) for _ in range(a.n_data)]
    x_all = to_model([render(n, h, w, rng) for n in train_nums])
    print(f"rendered {a.n_data} training images of {len(train)} numbers ({time.time() - t0:.1f}s)")

    ocr = OCRReward()
    eval_nums = [held[i % len(held)] for i in range(a.eval_n)]
    eval_prompts = [prompt(n) for n in eval_nums]
    real = to_model([render(n, h, w, rng) for n in eval_nums])
    t0 = time.time()
    r_real = ocr(upscale(real, a.upscale), eval_prompts)
    print(
        f"DATA   OCR reward of real held-out renders: mean {r_real.mean():.3f}, exact "
        f"{(r_real == 1).float().mean():.2f} ({(time.time() - t0) / a.eval_n * 1e3:.0f} ms/img)"
    )

    model = Model(h, w, a.patch, a.layers, a.heads, a.head_dim)
    n_par = sum(q.numel() for q in model.parameters())
    print(
        f"model: {a.layers} SD3 blocks, width {a.heads * a.head_dim}, patch {a.patch} "
        f"({(h // a.patch) * (w // a.patch)} tokens), {n_par / 1e6:.2f} M parameters"
    )
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup))
    ids_all = model.cond.ids(train_nums)
    g = torch.Generator().manual_seed(a.seed)
    t0, step, losses = time.time(), 0, []
    while time.time() - t0 < a.seconds and not (a.max_steps and step >= a.max_steps):
        idx = torch.randint(a.n_data, (a.batch,), generator=g)
        x0, ids = x_all[idx], ids_all[idx].clone()
        ids[torch.rand(a.batch, generator=g) < a.cfg_dropout] = NULL
        noise = torch.randn(x0.shape, generator=g)
        t = sample_training_t(a.batch, g)
        loss = flow_matching_loss(model(interpolate(x0, noise, t), t, ids), x0, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, model, min(a.ema, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"  step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        step += 1
    took = time.time() - t0
    tail = float(np.mean(losses[-50:]))
    print(
        f"PRETRAIN {step} steps in {took:.0f}s ({took / step * 1e3:.0f} ms/step, batch "
        f"{a.batch}, {step * a.batch / a.n_data:.1f} epochs), loss (mean of last 50) {tail:.4f}"
    )

    ema.eval()
    ids_eval = ema.cond.ids(eval_nums)
    rows = [real[:12]]
    for cfg in (float(c) for c in a.cfg.split(",")):
        t0 = time.time()
        xs = sample(ema, ids_eval, (1, h, w), a.steps, cfg, a.seed + 1).clamp(-1, 1)
        ts = time.time() - t0
        r = ocr(upscale(xs, a.upscale), eval_prompts)
        print(
            f"SAMPLE cfg {cfg:g}: OCR reward mean {r.mean():.3f}, exact "
            f"{(r == 1).float().mean():.2f}, zero {(r == 0).float().mean():.2f} "
            f"({a.eval_n} held-out, {a.steps}-step ODE in {ts:.1f}s)"
        )
        rows.append(xs[:12])
    # Seen numbers too, at the first CFG scale: generalisation vs. memorisation.
    seen = train_nums[: a.eval_n]
    cfg0 = float(a.cfg.split(",")[0])
    xs = sample(ema, ema.cond.ids(seen), (1, h, w), a.steps, cfg0, a.seed + 2).clamp(-1, 1)
    r = ocr(upscale(xs, a.upscale), [prompt(n) for n in seen])
    print(f"SAMPLE cfg {cfg0:g} on training numbers: OCR reward mean {r.mean():.3f}")
    grid_png(rows, a.grid, a.upscale)
    print(f"grid (row 1 real, then one row per CFG scale; numbers {eval_nums[:12]}): {a.grid}")


if __name__ == "__main__":
    main()

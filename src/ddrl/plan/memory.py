"""Per-GPU memory by part and phase, FLOPs by phase, and what to change when a run does not
fit: the model behind ``ddrl plan`` (docs/MODELS.md §3 states the formula).

Parts are live in some of four phases: ``startup`` (weights loaded, prompts encoded, before the
first optimizer step), ``rollout`` (sampling without gradient), ``decode`` (VAE decode for the
reward) and ``training`` (forward + backward of one micro-batch). The total per GPU is the
largest phase. Weights, gradients, optimizer states, EMA and reference/lagging copies are
divided by the GPU count under FSDP (``parallel.strategy`` fsdp, or auto on several GPUs).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from ddrl.losses import TRANSITIONS
from ddrl.plan.activations import activation_bytes, fit_of, forward_flops
from ddrl.plan.model import ModelNumbers, model_numbers

GIB = 2**30
PEAK_TFLOPS = 989.0  # H100 SXM dense bf16 (NVIDIA H100 datasheet; 1,979 with sparsity)
MFU = 0.40  # assumed model-FLOPs utilisation for the time estimates
PHASES = ("startup", "rollout", "decode", "training")
ALL, LATER = PHASES, PHASES[1:]
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Part:
    name: str
    bytes: float
    phases: tuple[str, ...]
    note: str = ""


def trained_steps(cfg) -> int:
    """Trained steps per trajectory, as ``training.iteration.select_timesteps`` draws them."""
    tc, n = cfg.train, cfg.sampler.num_steps
    if tc.timestep_selection == "stratified":
        return tc.timestep_count
    if tc.timestep_selection == "window":
        return min(tc.window_size, max(n - 2, 1))
    pool = n - 1 if tc.skip_last_step and n > 1 else n
    return max(1, math.floor(tc.timestep_fraction * pool + 1e-9))


def _sharding(cfg, gpus: int) -> int:
    return gpus if gpus > 1 and cfg.parallel.strategy in ("auto", "fsdp") else 1


def parts(cfg, gpus: int, mn: ModelNumbers) -> list[Part]:
    """Every part's bytes per GPU and the phases it is live in."""
    m, n = cfg.model, _sharding(cfg, gpus)
    full, wd = m.finetune == "full", BYTES[m.dtype]
    regs = set(cfg.regularisers.split(",")) if cfg.regularisers else set()
    train_p = mn.trained if full else mn.lora
    wbytes = 4 if full else wd
    out = [
        Part(
            "transformer weights",
            wbytes * (mn.trained + mn.trained_buffers) / n,
            ALL,
            "float32 master weights" if full else f"{m.dtype}, frozen",
        )
    ]
    if mn.frozen:
        out.append(Part("frozen transformer", wd * mn.frozen, ALL, "the expert not trained"))
    if not full:
        out.append(Part("LoRA adapters", 4 * mn.lora / n, ALL, f"r{m.lora.rank}, float32"))
    out.append(Part("gradients", 4 * train_p / n, ("training",), "float32"))
    out.append(Part("AdamW m, v", 8 * train_p / n, LATER, "float32, from the first step"))
    if cfg.optim.ema_decay > 0:
        out.append(Part("EMA", 4 * train_p / n, ALL, "optim.ema_decay > 0"))
    if "reverse_kl" in regs and full:
        out.append(
            Part(
                "reference copy",
                4 * (mn.trained + mn.trained_buffers) / n,
                ALL,
                "frozen copy (LoRA: adapters disabled, no copy)",
            )
        )
    lagging = cfg.objective == "nft" or "lagging_kl" in regs
    if lagging:
        out.append(Part("lagging weights", 4 * train_p / n, ALL, "old policy / KL-EMA copy"))
        swap = ("rollout", "training") if cfg.objective == "nft" else ("training",)
        out.append(Part("lagging swap backup", 4 * train_p / n, swap, "while swapped in"))
    text_phases = ("startup",) if m.release_text_encoders else ALL
    out.append(Part("text encoders", wd * mn.text, text_phases, mn.text_what))
    out.append(Part("VAE", wd * mn.vae, ALL))
    b_rank = math.ceil(cfg.train.prompts_per_iter * cfg.train.group_size / gpus)
    steps = cfg.sampler.num_steps
    states = steps + 1 if cfg.objective in TRANSITIONS else 2
    means = steps if getattr(cfg.loss, "ratio_norm", False) else 0
    out.append(
        Part(
            "rollout buffer",
            (states + means) * b_rank * mn.latent * 4,
            LATER,
            f"({states}{' + ' + str(means) if means else ''}) states × {b_rank} × "
            f"{mn.latent:,} × 4 B",
        )
    )
    cfg_seqs = 2 if cfg.sampler.cfg_scale != 1.0 else 1
    act = 2 if m.autocast != "none" else wbytes
    chunk = min(cfg.sampler.batch or b_rank, b_rank) * cfg_seqs
    one = activation_bytes(
        mn.family,
        mn.tokens,
        act_bytes=act,
        layers=mn.layers,
        hidden=mn.hidden,
        grad=False,
        finetune=m.finetune,
    )
    out.append(Part("rollout activations", chunk * one, ("rollout",), f"{chunk} sequences"))
    out.append(Part("decoded samples", b_rank * 3 * mn.pixels * 4, ("decode",), "float32"))
    live = min(mn.frames, 4) if mn.video_vae else 1
    vae_ws = m.vae_batch * mn.height * mn.width * live * mn.vae_width * wd * 4
    out.append(Part("VAE decode", vae_ws, ("decode",), f"model.vae_batch={m.vae_batch}"))
    seqs = cfg_seqs + (1 if "data" in regs else 0)
    micro = min(cfg.train.micro_batch, b_rank)
    per = activation_bytes(
        mn.family,
        mn.tokens,
        act_bytes=act,
        layers=mn.layers,
        hidden=mn.hidden,
        checkpointing=m.gradient_checkpointing,
        finetune=m.finetune,
    )
    ck = "checkpointing" if m.gradient_checkpointing else "no checkpointing"
    out.append(
        Part(
            "training activations",
            micro * seqs * per,
            ("training",),
            f"{micro} × {seqs} sequences × {mn.tokens:,} tokens, {ck}",
        )
    )
    if full and m.autocast != "none" and n == 1:
        out.append(
            Part(
                "autocast weight casts",
                2 * mn.trained,
                ("rollout", "training"),
                "autocast cache: bf16 copies of the float32 weights",
            )
        )
    if n > 1:
        out.append(
            Part(
                "FSDP gathered blocks",
                2 * 2 * mn.forward_params / max(mn.layers, 1),
                ("rollout", "training"),
                "two blocks' bf16 weights",
            )
        )
    if gpus > 1 and cfg.parallel.strategy == "ddp":
        out.append(Part("DDP gradient buckets", 4 * train_p, ("training",)))
    return out


def flops(cfg, mn: ModelNumbers) -> dict[str, float]:
    """FLOPs per iteration (all GPUs) by phase: forwards × ``forward_flops``; a pass with
    gradient is 3 forward-equivalents (4 with gradient checkpointing: the recomputation)."""
    fwd = forward_flops(mn.forward_params, mn.tokens, mn.layers, mn.hidden, mn.cross_tokens)
    b, steps = cfg.train.prompts_per_iter * cfg.train.group_size, cfg.sampler.num_steps
    c = 2 if cfg.sampler.cfg_scale != 1.0 else 1
    grad = 4 if cfg.model.gradient_checkpointing else 3
    n, inner = trained_steps(cfg), cfg.train.inner_updates
    regs = set(cfg.regularisers.split(",")) if cfg.regularisers else set()
    out = {"rollout": b * steps * c * fwd}
    out["policy"] = inner * b * n * c * grad * fwd if cfg.objective != "none" else 0.0
    data = 0.0
    if "data" in regs:
        k = 1 if cfg.loss.data_on_first_only else n * cfg.loss.data_steps
        data = inner * b * k * grad * fwd
    out["data"] = data
    ref = (c if "reverse_kl" in regs else 0) + (1 if cfg.objective == "nft" else 0)
    out["reference"] = inner * b * n * (ref + (1 if "lagging_kl" in regs else 0)) * fwd
    return out


def estimate(cfg, gpus: int = 1, mn: ModelNumbers | None = None) -> dict:
    """Parts, phase totals and the per-GPU total (bytes), and FLOPs by phase, of ``cfg``."""
    mn = mn or model_numbers(cfg.model)
    ps = parts(cfg, gpus, mn)
    totals = {ph: sum(p.bytes for p in ps if ph in p.phases) for ph in PHASES}
    fl = flops(cfg, mn)
    return {
        "parts": ps,
        "phases": totals,
        "total": max(totals.values()),
        "peak_phase": max(totals, key=totals.get),
        "flops": fl,
        "seconds_at_mfu": {k: v / gpus / (PEAK_TFLOPS * 1e12 * MFU) for k, v in fl.items()},
        "model": mn,
        "activation_source": fit_of(mn.family, cfg.model.finetune).source,
    }


def _with(cfg, **changes):
    """A copy of ``cfg`` with dotted keys changed ("model__finetune" → model.finetune)."""
    out = copy.deepcopy(cfg)
    for key, value in changes.items():
        *path, leaf = key.split("__")
        obj = out
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
    return out


def suggestions(cfg, gpus: int, budget: float) -> list[dict]:
    """What to change, cheapest first, each alone, with the per-GPU total it gives: the
    smallest halving of ``train.micro_batch`` that fits (else 1), gradient checkpointing,
    ``sampler.batch``, ``model.vae_batch=1``, FSDP over the fewest GPUs that fit, LoRA."""
    out = []

    def add(change: str, c, g: int = gpus):
        total = estimate(c, g)["total"]
        out.append({"change": change, "total": total, "fits": total <= budget})

    def halving(key: str, value: int, name: str):
        v = value
        while v > 1:
            v //= 2
            c = _with(cfg, **{key: v})
            if estimate(c, gpus)["total"] <= budget or v == 1:
                return add(f"{name}={v}", c)

    halving("train__micro_batch", cfg.train.micro_batch, "train.micro_batch")
    if not cfg.model.gradient_checkpointing:
        add("model.gradient_checkpointing=true", _with(cfg, model__gradient_checkpointing=True))
    b = cfg.sampler.batch or cfg.train.prompts_per_iter * cfg.train.group_size
    halving("sampler__batch", b, "sampler.batch")
    if cfg.model.vae_batch > 1:
        add("model.vae_batch=1", _with(cfg, model__vae_batch=1))
    c = _with(cfg, parallel__strategy="fsdp")
    for g in (2, 4, 8, 16, 32, 64):
        if g > gpus and (estimate(c, g)["total"] <= budget or g == 64):
            add(f"parallel.strategy=fsdp on {g} GPUs (torchrun --nproc-per-node {g})", c, g)
            break
    if cfg.model.finetune == "full" and cfg.model.name not in ("digits", "toy2d"):
        add("model.finetune=lora", _with(cfg, model__finetune="lora"))
    return out

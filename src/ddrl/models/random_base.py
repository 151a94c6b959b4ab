"""``model.base = "random"`` / ``"random:<checkpoint>"``: a family's REAL-shape pipeline with
random weights, for memory and speed measurements without any download.

The transformer(s) and the VAE are the published configs (``shapes/<checkpoint>.json``) with
random weights (seeded; PyTorch's default-init statistics, N(0, 1/(3·fan_in)) for matrices, norms
1, biases 0, filled in place from the meta device without the slow per-layer init, ``_fill``);
the scheduler is the published one. The text encoders and tokenizers come from the family's
tiny pipeline (``ensure_tiny``, the matching variant) with their OUTPUT widths set to what the
real transformer reads (``text_widths``) and 1–2 small layers (Cosmos and FLUX.2: as many layers
as the pipeline concatenates or reads). The pipeline is saved once into
``<cache>/random/<checkpoint>-v<RANDOM_VERSION>/`` (bfloat16) with ``RANDOM_WEIGHTS.txt``, and
loads through the same ``Pipeline.from_pretrained`` as a downloaded base. Samples are noise.
"""

from __future__ import annotations

import fcntl
import importlib
import inspect
import shutil
from pathlib import Path

import torch
from torch import nn

from ddrl.errors import DDRLError
from ddrl.io import atomic_dir
from ddrl.models.shapes import (
    DEFAULT_CHECKPOINT,
    INDEX_KEYS,
    checkpoints,
    real_config,
    scaled_indices,
    shrink,
)

RANDOM_VERSION = 1  # bump when the builder changes: the cache folder name includes it
MARKER = "RANDOM_WEIGHTS.txt"  # in the pipeline folder, the run folder and an export
CLIP_L = 768  # CLIP ViT-L/14's text width (SD3's CLIP-G is the rest of pooled_projection_dim)
COSMOS_TEXT_HIDDEN = 448  # Cosmos reads every Qwen2.5-VL layer: 100352 = 224 layers × 448
# TEST-ONLY: checkpoint → size overrides (``build_random_pipeline``'s ``sizes``) that
# ``ensure_random`` applies, so that tests run the whole path on a shallow model. Empty in use.
TEST_SIZES: dict[str, dict] = {}


def is_random(base: str) -> bool:
    return base == "random" or base.startswith("random:")


def random_checkpoint(family, base: str) -> str:
    """The checkpoint ``model.base`` ("random" or "random:<checkpoint>") names for ``family``
    (a DiffusersGenerator class); a checkpoint of another pipeline class is a one-line error."""
    name = base.partition(":")[2] or DEFAULT_CHECKPOINT.get(family.family, "")
    mine = [c for c in checkpoints() if real_config(c)["pipeline"] == family.pipeline_class]
    if name not in mine:
        have = ", ".join(["random", *(f"random:{c}" for c in mine)])
        raise DDRLError(f"model.base={base!r} for {family.family}; allowed: {have}")
    return name


def text_widths(family: str, checkpoint: str) -> dict[str, tuple[int, int | None]]:
    """Text-encoder component → (output hidden width, number of layers or None = the tiny's):
    what the real transformer's text inputs expect, read off the family's encode path."""
    real = real_config(checkpoint)
    tr = real["transformer"]
    if family == "sd3":  # CLIP-L + CLIP-G pooled = pooled_projection_dim; T5 = joint dim
        return {
            "text_encoder": (CLIP_L, None),
            "text_encoder_2": (tr["pooled_projection_dim"] - CLIP_L, None),
            "text_encoder_3": (tr["joint_attention_dim"], None),
        }
    if family == "flux":  # CLIP pooled = pooled_projection_dim; T5 = joint dim
        return {
            "text_encoder": (tr["pooled_projection_dim"], None),
            "text_encoder_2": (tr["joint_attention_dim"], None),
        }
    if family == "wan":
        return {"text_encoder": (tr["text_dim"], None)}
    if family == "cosmos":  # hidden_states[1:] normalised and concatenated
        total = tr["crossattn_proj_in_channels"]
        if total % COSMOS_TEXT_HIDDEN:
            raise DDRLError(f"random cosmos: {total} is not a multiple of {COSMOS_TEXT_HIDDEN}")
        return {"text_encoder": (COSMOS_TEXT_HIDDEN, total // COSMOS_TEXT_HIDDEN)}
    if family in ("qwen_image", "qwen_image_edit"):
        return {"text_encoder": (tr["joint_attention_dim"], None)}
    if family in ("flux2", "flux2_klein"):
        # the pipeline stacks its text_encoder_out_layers: joint dim = 3 × hidden
        layers = len(real.get("pipeline_config", {}).get("text_encoder_out_layers", [0] * 3))
        return {"text_encoder": (tr["joint_attention_dim"] // layers, None)}
    if family == "z_image":  # hidden_states[-2] = cap_feat_dim
        return {"text_encoder": (tr["cap_feat_dim"], None)}
    raise DDRLError(f"model.base=random: no text widths for family {family!r}")


POOL, WINDOW = 1 << 24, 1 << 20  # N(0, 1) values drawn once; windows copied out of them


def _fill(t: torch.Tensor, name: str, gen: torch.Generator, pool: torch.Tensor) -> None:
    """PyTorch's default-init statistics, fast: a matrix gets N(0, 1/(3·fan_in)) (the variance
    of kaiming_uniform(a=√5)) as windows of ``pool`` (seeded N(0, 1) values) at random offsets,
    scaled (a memory copy, ~30× faster than drawing every value: tensors are not independent
    of each other, which memory and speed do not see); 1-D weights (norm scales) 1, biases and
    other vectors 0."""
    if t.ndim < 2:
        t.fill_(1.0 if name == "weight" else 0.0)
        return
    std, flat = (3 * (t.numel() // t.shape[0])) ** -0.5, t.view(-1)
    for i in range(0, flat.numel(), WINDOW):
        n = min(WINDOW, flat.numel() - i)
        at = int(torch.randint(0, POOL - n + 1, (1,), generator=gen))
        flat[i : i + n].copy_(pool[at : at + n]).mul_(std)


def random_module(
    build, seed: int, dtype: torch.dtype = torch.bfloat16, meta: bool = False
) -> nn.Module:
    """``build()`` with its parameters on the meta device (buffers real), then materialised in
    ``dtype`` and filled by ``_fill`` from a generator seeded with ``seed`` (deterministic);
    ``meta``: left on the meta device (shapes and counts only, no memory)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=meta):
        model = build()
    if meta:
        return model
    gen, done = torch.Generator().manual_seed(seed), {}
    pool = torch.randn(POOL, generator=gen).to(dtype)
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:  # tied weights stay tied
                t = torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype)
                _fill(t, name, gen, pool)
                done[id(p)] = nn.Parameter(t, requires_grad=p.requires_grad)
            mod._parameters[name] = done[id(p)]
    if callable(getattr(model, "tie_weights", None)):  # transformers: T5's shared embedding
        model.tie_weights()
    return model


def widened_text_config(config, width: int, layers: int | None):
    """A tiny text encoder's config with its output hidden width ``width`` (heads re-split
    so they divide it; FFN, vocabulary and head sizes stay tiny) and ``layers`` if given."""
    d = config.to_dict()
    sub = d.get("text_config", d)
    kind = sub.get("model_type", d.get("model_type", ""))
    sub["d_model" if "d_model" in sub else "hidden_size"] = width
    if layers:
        sub["num_layers" if "d_model" in sub else "num_hidden_layers"] = layers
        if sub.get("layer_types"):  # one entry per layer, as the tiny's first
            sub["layer_types"] = [sub["layer_types"][0]] * layers
    if kind.startswith("clip"):
        sub.update(projection_dim=width, num_attention_heads=width // 64)
    if kind.startswith("qwen2_5_vl"):  # head dim = hidden / heads: 64, RoPE split like 128's
        sub.update(num_attention_heads=width // 64, num_key_value_heads=1)
        sub["rope_parameters"] = {**sub["rope_parameters"], "mrope_section": [8, 12, 12]}
        d["vision_config"]["out_hidden_size"] = width
    return type(config).from_dict(d)


def build_random_pipeline(
    family, checkpoint: str, cache: Path, sizes: dict | None = None, meta: bool = False
):
    """The random real-shape pipeline of ``checkpoint`` in memory (bfloat16). ``sizes``:
    TEST-ONLY size overrides per part ({"transformer": {"num_layers": 1}, "vae": {...}},
    ``shapes.shrink``: sizes only, every structural key stays the published one); ``meta``:
    every part on the meta device (configs and parameter counts of any size, no memory)."""
    import diffusers

    from ddrl.models.hf import ensure_tiny, quiet_loading

    real, sizes = real_config(checkpoint), sizes or {}
    variant = _tiny_variant(family, checkpoint)
    tiny_path = ensure_tiny(family, cache, lambda *a: None, variant)
    cls = getattr(diffusers, family.pipeline_class)
    with quiet_loading():
        tiny = cls.from_pretrained(str(tiny_path), **family.load_kwargs())
    parts = dict(tiny.components)
    parts["scheduler"] = type(tiny.scheduler).from_config(real["scheduler"])  # as published
    for seed, part in enumerate(("transformer", "transformer_2", "vae")):
        if part not in real:
            continue
        conf = _sized(real[part], sizes.get(part, {}))
        mcls = type(parts[part] if parts.get(part) is not None else parts["transformer"])
        parts[part] = random_module(lambda c=conf, m=mcls: m.from_config(c), seed, meta=meta)
    for i, (name, (width, layers)) in enumerate(text_widths(family.family, checkpoint).items()):
        enc = parts[name]
        conf = widened_text_config(enc.config, width, layers)
        parts[name] = random_module(lambda c=conf, e=enc: type(e)(c), 100 + i, meta=meta).eval()
    accepted = inspect.signature(cls.__init__).parameters
    extra = {k: v for k, v in tiny.config.items() if k in accepted and k not in parts}
    config = real.get("pipeline_config", {})  # constructor flags (is_distilled, boundary_ratio)
    extra.update({k: v for k, v in config.items() if k in accepted and k not in parts})
    return cls(**parts, **extra)


def _sized(config: dict, sizes: dict) -> dict:
    sizes = dict(sizes)
    for key in INDEX_KEYS & set(config):  # SD3.5's dual-attention layers follow the depth
        if "num_layers" in sizes and "num_layers" in config and config[key]:
            sizes[key] = scaled_indices(config[key], config["num_layers"], sizes["num_layers"])
    return shrink(config, **sizes) if sizes else dict(config)


def _tiny_variant(family, checkpoint: str) -> str:
    """The family's tiny variant with the same parts (Wan: "a14b" two experts, "ti2v")."""
    table = getattr(importlib.import_module(family.__module__), "TINY_VARIANTS", None)
    if table:
        for variant, (name, _) in table.items():
            if name == checkpoint:
                return variant
        real = real_config(checkpoint)
        for variant, (name, _) in table.items():
            other = real_config(name)
            if ("transformer_2" in other) == ("transformer_2" in real) and (
                other["vae"].get("z_dim") == real["vae"].get("z_dim")
            ):
                return variant
    return ""


def ensure_random(family, base: str, cache: Path, log=print) -> Path:
    """The random real-shape pipeline folder of ``base`` ("random" / "random:<checkpoint>") in
    the cache, built on first use; says loudly (``log``) that its weights are random."""
    import time

    from ddrl.models.hf import quiet_loading

    name = random_checkpoint(family, base)
    path = Path(cache) / "random" / f"{name}-v{RANDOM_VERSION}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "w") as lock:  # one builder per machine
        fcntl.flock(lock, fcntl.LOCK_EX)  # (the other ranks wait, then load what it wrote)
        if not (path / "model_index.json").is_file():
            t0 = time.perf_counter()
            pipe = build_random_pipeline(family, name, Path(cache), TEST_SIZES.get(name))
            with atomic_dir(path) as tmp, quiet_loading():  # built in bfloat16
                pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
                (tmp / MARKER).write_text(marker_text(name))
            del pipe
            took = time.perf_counter() - t0
            log(f"built the random {name} pipeline into {path} ({took:.0f} s)")
    log(
        f"model.base=random: RANDOM weights with the real shapes of {name} — for memory and "
        "speed only; samples are noise"
    )
    return path


def marker_text(checkpoint: str) -> str:
    return (
        f"RANDOM WEIGHTS: this model has the real shapes of {checkpoint} (published configs, "
        "ddrl's shapes/ facts) but random weights and tiny text encoders (model.base=random). "
        "It is for memory and speed measurements only; its samples are noise.\n"
    )


def copy_marker(base_path: Path | str, out: Path | str) -> None:
    """Copy ``RANDOM_WEIGHTS.txt`` of a random base folder into ``out`` (a run folder, an
    export); nothing for any other base."""
    src = Path(base_path) / MARKER
    if src.is_file():
        shutil.copy(src, Path(out) / MARKER)

"""HPSv2.1 (Human Preference Score v2, Wu et al. 2023, arXiv:2306.09341) on transformers' CLIP.

HPS = <e_img, e_txt>, the cosine of the unit image and text embeddings of an OpenCLIP
ViT-H-14 (laion2B-s32B-b79K) fine-tuned on human preferences: tgxs002/HPSv2
``hpsv2/img_score.py`` (``image_features @ text_features.T``, both normalised by
``CLIP.forward``), as flow_grpo's ``flow_grpo/hpsv2_scorer.py`` calls it (v2.1 weights). The
image goes through HPSv2's ``preprocess_val`` (``light_augmentation=True`` →
``ResizeMaxSize``: the longer side to 224, bicubic, padded to 224 × 224 with black, then the
OpenAI mean/std), which for square images is the usual resize.

The weights (``HPS_v2.1_compressed.pt`` in hub repo ``xswu/HPSv2``, an OpenCLIP state dict
under ``"state_dict"``) are converted on load into a transformers ``CLIPModel`` built from
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s config, whose tokenizer and image settings are
used too: the same architecture (GELU, pre-LN, class-token pooling, text pooled at the
end-of-text token, q/k/v split from OpenCLIP's fused ``in_proj``) in plain PyTorch, so neither
open_clip nor torchvision is needed. Differences from the reference: float32 here (HPSv2 runs
under CUDA autocast, fp16); transformers' CLIP tokenizer instead of OpenCLIP's (the same BPE
vocabulary and the same ids for ordinary text; Unicode clean-up may differ for unusual input).

reward.model:

- "" → ``xswu/HPSv2`` (weights) + ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (config, processor);
- a folder with ``HPS_v2.1_compressed.pt`` (or ``HPS_v2_compressed.pt``): converted; the CLIP
  config / tokenizer / image processor come from the folder when it has them (config.json,
  tokenizer files, processor_config.json), else from the laion id;
- a folder without them but with config.json: an already converted ``CLIPModel`` (what
  ``save_pretrained`` writes), loaded as it is;
- another hub id: a repo holding one of those .pt files.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ddrl.errors import DDRLError
from ddrl.rewards.base import RewardContext
from ddrl.rewards.clip_rewards import (
    LAION_H14,
    ClipReward,
    ClipScorer,
    Preprocess,
    has_processor,
    hub_file,
    load,
    load_clip,
    load_processor,
    read_state,
    source_of,
)

HPS_HUB = "xswu/HPSv2"
HPS_FILES = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")

_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "logit_scale": "logit_scale",
}
_NORMS = {
    "visual.ln_pre": "vision_model.pre_layrnorm",
    "visual.ln_post": "vision_model.post_layernorm",
    "ln_final": "text_model.final_layer_norm",
}
_RESBLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)")


def convert_open_clip(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """An OpenCLIP ViT CLIP state dict → transformers CLIPModel keys (float32), and the keys it
    could not place (a tower this conversion does not cover)."""
    out, unknown = {}, []
    for key, v in state.items():
        if not isinstance(v, Tensor):
            unknown.append(key)
            continue
        v = v.float() if v.is_floating_point() else v
        if key == "attn_mask" or key.endswith(".attn_mask"):
            continue  # OpenCLIP's causal-mask buffer; CLIP builds its own
        if key in _TOP:
            out[_TOP[key]] = v
        elif key in ("visual.proj", "text_projection"):  # x @ proj → Linear weight proj.T
            name = "visual_projection" if key == "visual.proj" else "text_projection"
            out[f"{name}.weight"] = v.t().contiguous()
        elif key.rsplit(".", 1)[0] in _NORMS:
            out[f"{_NORMS[key.rsplit('.', 1)[0]]}.{key.rsplit('.', 1)[1]}"] = v
        elif m := _RESBLOCK.fullmatch(key):
            tower = "vision_model" if m[1] else "text_model"
            pre = f"{tower}.encoder.layers.{m[2]}"
            if m[3] == "attn.in_proj":  # fused [q; k; v]
                for name, part in zip("qkv", v.chunk(3, dim=0), strict=True):
                    out[f"{pre}.self_attn.{name}_proj.{m[4]}"] = part.contiguous()
            elif m[3] in _BLOCK:
                out[f"{pre}.{_BLOCK[m[3]]}.{m[4]}"] = v
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    return out, unknown


def clip_from_open_clip(path: str, arch: str):
    """A CLIPModel: ``arch``'s config (a folder or hub id), the OpenCLIP weights at ``path``."""
    from transformers import CLIPConfig, CLIPModel

    from ddrl.models.hf import quiet_loading

    config = load("hpsv2", "CLIP config", arch, CLIPConfig.from_pretrained)
    state, unknown = convert_open_clip(load("hpsv2", "weights", path, read_state))
    with torch.device("meta"):
        want = {k: v.shape for k, v in CLIPModel(config).state_dict().items()}
    missing = sorted(set(want) - set(state))
    bad = sorted(k for k in set(want) & set(state) if tuple(state[k].shape) != tuple(want[k]))
    if unknown or missing or bad:
        what = f"unknown keys {unknown[:3]}" if unknown else f"missing {missing[:3]}"
        if bad and not (unknown or missing):
            what = f"{bad[0]} is {tuple(state[bad[0]].shape)}, not {tuple(want[bad[0]])}"
        raise DDRLError(
            f"hpsv2 reward: {path} is not an OpenCLIP ViT checkpoint for the CLIP config of "
            f"{arch!r} ({what}; {len(unknown) + len(missing) + len(bad)} problems)"
        )
    with quiet_loading():
        return load(
            "hpsv2",
            "weights",
            path,
            lambda _: CLIPModel.from_pretrained(
                None, config=config, state_dict=state, dtype=torch.float32
            ),
        ).eval()


def hpsv2_reward(ctx: RewardContext) -> ClipReward:
    """HPSv2.1 = cos(image, prompt) of the HPS-tuned ViT-H-14 (see the module docstring)."""
    src, local = source_of("hpsv2", ctx.config.model, HPS_HUB)
    if local:
        folder = Path(src)
        ckpts = [folder / f for f in HPS_FILES if (folder / f).is_file()]
        proc = src if has_processor(src) else LAION_H14
        if ckpts:
            arch = src if (folder / "config.json").is_file() else LAION_H14
            model = clip_from_open_clip(str(ckpts[0]), arch)
        elif (folder / "config.json").is_file():
            model = load_clip("hpsv2", src)
        else:
            raise DDRLError(
                f"hpsv2 reward: reward.model={src!r} has none of {', '.join(HPS_FILES)} (the "
                f"HPSv2 weights from hub repo {HPS_HUB}) and no config.json (a converted CLIPModel)"
            )
    else:
        path = load("hpsv2", "weights", src, lambda repo: hub_file(repo, HPS_FILES))
        model, proc = clip_from_open_clip(path, LAION_H14), LAION_H14
    tok, ip = load_processor("hpsv2", proc)
    pre = Preprocess.from_processor(ip, pad_square=True)
    pre.size = model.config.vision_config.image_size  # ResizeMaxSize(model.visual.image_size)
    return ClipReward(ClipScorer(model, tok, pre, ctx.device, ctx.config.batch), "hpsv2")

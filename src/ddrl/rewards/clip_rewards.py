"""CLIP-based rewards: CLIPScore and PickScore; the LAION aesthetic predictor (aesthetic.py) and
HPSv2.1 (hpsv2.py) share this loading and preprocessing. FACTORIES holds all four.

Models load with ``from_pretrained(reward.model or the default hub id)`` (a ``save_pretrained``
folder or a hub id). Images [B, 3, H, W] in [-1, 1] are quantised to 8 bits as the references'
uint8/PIL inputs are, then preprocessed in torch as the model's CLIP image processor does
(shorter side to ``size``, bicubic; centre crop ``crop_size``; its ``image_mean``/``image_std``),
``reward.batch`` images at a time on ``reward.device`` without gradients → float32 [B] (CPU).

With c = <e_img, e_txt>, the cosine of the projected CLIP image and text embeddings:

- ``clipscore`` = 2.5 * max(c, 0): CLIPScore, Hessel et al. 2021 (arXiv:2104.08718, Eq. 1;
  jmhessel/clipscore ``clipscore.py:get_clip_score``, w=2.5). Default backbone
  ``openai/clip-vit-large-patch14``, the one Flow-GRPO's ``flow_grpo/clip_scorer.py`` loads
  (imported by yifan123/flow_grpo @ 94e23ee ``rewards.py:clip_score``; read in the fork
  zhtmike/flow_grpo @ 19d5169); Hessel et al. used ViT-B/32. The prompt is encoded as given:
  Hessel et al. prepend "A photo depicts" to *captions*; Flow-GRPO's scorer does not (and
  returns exp(logit_scale) * c / 30, unclipped).
- ``pickscore`` = exp(logit_scale) * c / 26: yifan123/flow_grpo @ ac4c86e
  ``flow_grpo/pickscore_scorer.py`` (``scores = scores/26``, "norm to 0-1"; PickScore's own
  README score lacks the /26). Model ``yuvalkirstain/PickScore_v1``, processor (tokenizer and
  image settings) ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ddrl.errors import DDRLError
from ddrl.rewards.base import RewardContext

CLIP_L14 = "openai/clip-vit-large-patch14"
PICKSCORE = "yuvalkirstain/PickScore_v1"
LAION_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIPSCORE_W = 2.5  # Hessel et al. 2021
PICKSCORE_DIV = 26.0  # flow_grpo's pickscore_scorer.py
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def source_of(reward: str, model: str, default: str) -> tuple[str, bool]:
    """(``model or default``, is it a local folder); one-line DDRLError for a missing folder."""
    src = model or default
    path = Path(src).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists() or not _HUB_ID.fullmatch(src):
        raise DDRLError(
            f"{reward} reward: reward.model={src!r}: no such folder (allowed: a local folder "
            "written by save_pretrained, a hub id 'org/name', or '' for the default)"
        )
    return src, False


def load(reward: str, what: str, src: str, fn: Callable):
    """``fn(src)``, any loading failure (missing files, no network for a hub id, bad weights)
    turned into one line naming the source and ``reward.model``."""
    try:
        return fn(src)
    except DDRLError:
        raise
    except Exception as e:  # transformers / huggingface_hub / safetensors / torch.load errors
        p = Path(src).expanduser()
        where = "folder" if p.is_dir() else "file" if p.is_file() else "hub id (no such folder)"
        line = (str(e).strip().splitlines() or [""])[0][:240]
        raise DDRLError(
            f"{reward} reward: cannot load its {what} from {where} {src!r} (set reward.model to "
            f"a local folder or a reachable hub id): {type(e).__name__}: {line}"
        ) from None


def load_clip(reward: str, src: str):
    from transformers import CLIPModel

    from ddrl.models.hf import quiet_loading

    with quiet_loading():
        model = load(
            reward, "CLIP model", src, lambda s: CLIPModel.from_pretrained(s, dtype=torch.float32)
        )
    return model.eval()


def load_processor(reward: str, src: str):  # (tokenizer, image processor)
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = load(reward, "tokenizer", src, AutoTokenizer.from_pretrained)
    return tok, load(reward, "image processor", src, AutoImageProcessor.from_pretrained)


def read_state(path: str) -> dict[str, Tensor]:
    """A .safetensors or torch .pt/.pth state dict ("state_dict" unwrapped, "module." dropped)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def hub_file(repo: str, names: tuple[str, ...]) -> str:
    """The first of ``names`` that hub repo ``repo`` has, downloaded (the HF cache)."""
    from huggingface_hub import errors, hf_hub_download

    absent = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
    for name in names:
        try:
            return hf_hub_download(repo, name)
        except absent as e:  # the repo answered: no such file; anything else is raised
            if isinstance(e, FileNotFoundError):  # LocalEntryNotFoundError: offline
                raise
    raise FileNotFoundError(f"hub repo {repo!r} has none of {', '.join(names)}")


def _pad_to(x: Tensor, h: int, w: int) -> Tensor:
    """Zero-pad [..., H, W] (centred) to at least h × w."""
    ph, pw = max(h - x.shape[-2], 0), max(w - x.shape[-1], 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)) if ph or pw else x


def has_processor(folder: str) -> bool:
    return any(
        (Path(folder) / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")
    )


@dataclass
class Preprocess:
    """The CLIP image processor's geometry and normalisation, done in torch."""

    size: int | tuple[int, int]  # shortest edge, or (height, width)
    crop: tuple[int, int] | None  # (height, width) of the centre crop, None = no crop
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mode: str = "bicubic"
    pad_square: bool = False  # HPSv2: longest side → size, pad to size × size with black

    @classmethod
    def from_processor(cls, ip, pad_square: bool = False) -> Preprocess:
        def _field(d, key: str):  # a dict, or transformers 5's SizeDict
            return d.get(key) if isinstance(d, dict) else getattr(d, key, None)

        size, crop = getattr(ip, "size", None) or {}, getattr(ip, "crop_size", None) or {}
        short = _field(size, "shortest_edge")
        hw = short if short else (_field(size, "height"), _field(size, "width"))
        c = (_field(crop, "height"), _field(crop, "width"))
        c = c if getattr(ip, "do_center_crop", True) else None
        resample = int(getattr(ip, "resample", 3) or 3)
        return cls(
            size=hw,
            crop=c if c and all(c) else None,
            mean=tuple(float(v) for v in ip.image_mean),
            std=tuple(float(v) for v in ip.image_std),
            mode={2: "bilinear"}.get(resample, "bicubic"),
            pad_square=pad_square,
        )

    def _resize(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        if tuple(x.shape[-2:]) == hw:
            return x
        x = F.interpolate(x, size=hw, mode=self.mode, align_corners=False, antialias=True)
        return (x.clamp(0, 1) * 255).round() / 255  # PIL resizes uint8 images

    def __call__(self, images: Tensor) -> Tensor:
        x = ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 255  # the uint8 image
        h, w = x.shape[-2:]
        if self.pad_square:  # open_clip ResizeMaxSize (HPSv2's preprocess_val)
            s = self.size if isinstance(self.size, int) else max(self.size)
            nh, nw = round(h * s / max(h, w)), round(w * s / max(h, w))
            x = _pad_to(self._resize(x, (nh, nw)), s, s)
        else:
            if isinstance(self.size, int):  # transformers: shorter side → size, longer truncated
                short, long = (h, w) if h <= w else (w, h)
                new = (self.size, int(self.size * long / short))
                hw = new if h <= w else new[::-1]
            else:
                hw = tuple(self.size)
            x = self._resize(x, hw)
            if self.crop is not None:
                ch, cw = self.crop
                x = _pad_to(x, ch, cw)  # transformers pads a too-small image with zeros
                h, w = x.shape[-2:]
                top, left = (h - ch) // 2, (w - cw) // 2
                x = x[..., top : top + ch, left : left + cw]
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


class ClipScorer:
    """A transformers CLIPModel with its tokenizer and preprocessing: unit image and text
    embeddings, ``batch`` images per forward, on ``device``."""

    def __init__(self, model, tokenizer, preprocess: Preprocess, device: str, batch: int):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer, self.preprocess = tokenizer, preprocess
        self.device, self.batch = device, max(int(batch), 1)
        self.dtype = next(self.model.parameters()).dtype
        limit = self.model.config.text_config.max_position_embeddings
        limit = min(int(getattr(tokenizer, "model_max_length", limit) or limit), limit)
        self.tok_args = {"padding": True, "truncation": True, "max_length": limit}

    @torch.no_grad()
    def image_embeds(self, images: Tensor) -> Tensor:
        """[B, D] unit vectors (float32, on the device)."""
        out = []
        for chunk in images.split(self.batch):
            px = self.preprocess(chunk.to(self.device)).to(self.dtype)
            pooled = self.model.vision_model(pixel_values=px).pooler_output
            out.append(self.model.visual_projection(pooled).float())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> Tensor:
        """[B, D] unit vectors; each distinct prompt is encoded once."""
        uniq = list(dict.fromkeys(prompts))
        out = []
        for i in range(0, len(uniq), self.batch):
            enc = self.tokenizer(uniq[i : i + self.batch], return_tensors="pt", **self.tok_args)
            pooled = self.model.text_model(
                input_ids=enc["input_ids"].to(self.device),
                attention_mask=enc["attention_mask"].to(self.device),
            ).pooler_output
            out.append(self.model.text_projection(pooled).float())
        emb = F.normalize(torch.cat(out), dim=-1)
        index = {p: i for i, p in enumerate(uniq)}
        return emb[torch.tensor([index[p] for p in prompts], device=emb.device)]

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise DDRLError(f"{images.shape[0]} images but {len(prompts)} prompts")
        return (self.image_embeds(images) * self.text_embeds(list(prompts))).sum(-1)


class ClipReward:
    """r = f(c), c = cos(image, prompt): clipscore 2.5 * max(c, 0) (Hessel et al. 2021),
    pickscore exp(logit_scale) * c / 26 (flow_grpo), hpsv2 c (HPSv2)."""

    def __init__(self, scorer: ClipScorer, kind: str):
        self.scorer, self.kind = scorer, kind

    def features(self, images: Tensor) -> Tensor:
        """Unit CLIP image embeddings [B, D] (evaluation's feature space, ``eval.features``)."""
        return self.scorer.image_embeds(images).cpu()

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        c = self.scorer.cosine(images, prompts)
        if self.kind == "clipscore":
            c = CLIPSCORE_W * c.clamp(min=0)
        elif self.kind == "pickscore":
            c = float(self.scorer.model.logit_scale.detach().float().exp()) * c / PICKSCORE_DIV
        return c.float().cpu()


def clip_scorer(name: str, src: str, processor_src: str, ctx: RewardContext) -> ClipScorer:
    model = load_clip(name, src)
    tok, ip = load_processor(name, processor_src)
    return ClipScorer(model, tok, Preprocess.from_processor(ip), ctx.device, ctx.config.batch)


def clipscore_reward(ctx: RewardContext) -> ClipReward:
    """reward.model: a CLIP folder or hub id ('' = openai/clip-vit-large-patch14)."""
    src, _ = source_of("clipscore", ctx.config.model, CLIP_L14)
    return ClipReward(clip_scorer("clipscore", src, src, ctx), "clipscore")


def pickscore_reward(ctx: RewardContext) -> ClipReward:
    """reward.model: a PickScore folder or hub id ('' = yuvalkirstain/PickScore_v1). The
    processor comes from the folder when it has one, else from laion/CLIP-ViT-H-14."""
    src, local = source_of("pickscore", ctx.config.model, PICKSCORE)
    proc = src if local and has_processor(src) else LAION_H14
    return ClipReward(clip_scorer("pickscore", src, proc, ctx), "pickscore")

"""The LAION aesthetic predictor v2 (improved-aesthetic-predictor) as a reward.

aesthetic = MLP(e_img), e_img the L2-normalised projected CLIP ViT-L/14 image embedding, as
yifan123/flow_grpo @ ac4c86e ``flow_grpo/aesthetic_scorer.py`` computes it (after
christophschuhmann/improved-aesthetic-predictor ``simple_inference.py``): Linear(768, 1024) →
Linear(1024, 128) → Linear(128, 64) → Linear(64, 16) → Linear(16, 1), dropout between and no
activation (the ReLUs are commented out there), weights ``sac+logos+ava1-l14-linearMSE.pth``.
Scores are on the 1-10 scale of the ratings it was trained on. The prompt is ignored.

reward.model (the head has no transformers ``from_pretrained`` form):

- "" → hub repo ``trl-lib/ddpo-aesthetic-predictor`` (``aesthetic-model.pth``, TRL's copy of
  the linearMSE head) with CLIP ``openai/clip-vit-large-patch14``;
- a folder holding the head as ``aesthetic_head.safetensors`` (keys layers.0/2/4/6/7.weight
  and .bias), ``sac+logos+ava1-l14-linearMSE.pth`` or ``aesthetic-model.pth`` (first found
  wins), and optionally the CLIP model it belongs to (a ``save_pretrained`` folder:
  config.json, weights, tokenizer, processor config); without config.json the CLIP is
  ``openai/clip-vit-large-patch14``;
- another hub id: a repo holding one of those files (CLIP: ``openai/clip-vit-large-patch14``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ddrl.errors import DDRLError
from ddrl.rewards.base import RewardContext
from ddrl.rewards.clip_rewards import (
    CLIP_L14,
    ClipScorer,
    clip_scorer,
    hub_file,
    load,
    read_state,
    source_of,
)

AESTHETIC_HUB = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_FILES = (
    "aesthetic_head.safetensors",
    "sac+logos+ava1-l14-linearMSE.pth",
    "aesthetic-model.pth",
)


class AestheticMLP(nn.Module):
    """improved-aesthetic-predictor's MLP (state-dict keys layers.0/2/4/6/7; no activations)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: Tensor) -> Tensor:
        return self.layers(embed)


class AestheticReward:
    """LAION aesthetic predictor v2: MLP(unit CLIP image embedding); the prompt is ignored."""

    def __init__(self, scorer: ClipScorer, head: nn.Module):
        self.scorer = scorer
        self.head = head.to(scorer.device).float().eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.head(self.scorer.image_embeds(images)).squeeze(-1).float().cpu()


def load_aesthetic_head(src: str, local: bool) -> nn.Module:
    """The head from the first of AESTHETIC_FILES in folder ``src`` (or hub repo ``src``)."""
    if local:
        found = [Path(src) / f for f in AESTHETIC_FILES if (Path(src) / f).is_file()]
        if not found:
            raise DDRLError(
                f"aesthetic reward: reward.model={src!r} has none of "
                f"{', '.join(AESTHETIC_FILES)} (the LAION aesthetic predictor head, e.g. "
                "sac+logos+ava1-l14-linearMSE.pth from improved-aesthetic-predictor)"
            )
        path = str(found[0])
    else:
        path = load("aesthetic", "head", src, lambda repo: hub_file(repo, AESTHETIC_FILES))
    state = load("aesthetic", "head", path, read_state)
    first = state.get("layers.0.weight")
    head = AestheticMLP(first.shape[1] if isinstance(first, Tensor) and first.ndim == 2 else 768)
    try:
        missing, unexpected = head.load_state_dict(state, strict=False)
        problem = f"missing {missing[:3]}, unexpected {unexpected[:3]}"
    except RuntimeError as e:  # a shape mismatch
        missing, unexpected, problem = ["?"], [], " ".join(str(e).split())[-200:]
    if missing or unexpected:
        raise DDRLError(
            f"aesthetic reward: {path} is not an aesthetic MLP head (Linear layers.0/2/4/6/7 "
            f"of D-1024-128-64-16-1): {problem}"
        )
    return head


def aesthetic_reward(ctx: RewardContext) -> AestheticReward:
    """reward.model: a folder holding the head (one of AESTHETIC_FILES) and, optionally, the
    CLIP ViT-L/14 it was trained on (config.json etc.; else openai/clip-vit-large-patch14
    is loaded), or a hub repo holding the head ('' = trl-lib/ddpo-aesthetic-predictor)."""
    src, local = source_of("aesthetic", ctx.config.model, AESTHETIC_HUB)
    head = load_aesthetic_head(src, local)  # first: a missing head fails before CLIP loads
    clip = src if local and (Path(src) / "config.json").is_file() else CLIP_L14
    scorer = clip_scorer("aesthetic", clip, clip, ctx)
    dim = scorer.model.config.projection_dim
    if (n := head.layers[0].in_features) != dim:
        raise DDRLError(
            f"aesthetic reward: the head in {src!r} takes {n}-dim embeddings "
            f"but the CLIP model {clip!r} gives {dim}"
        )
    return AestheticReward(scorer, head)

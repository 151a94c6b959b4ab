"""Rewards for the digits task.

- ``ink``: mean brightness, an "aesthetic" reward that is trivially hacked (white squares).
- ``classifier``: P(prompted class) from a small CNN trained on half A of the training split:
  a learned, non-verifiable reward that can be fooled adversarially.
- the gold evaluator: PCA + RBF-SVC trained on the disjoint half B; the loop never sees it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ddrl.data.digits import classifier_halves
from ddrl.io import save_file_atomic
from ddrl.rewards.base import RewardContext, flat_numpy


class InkReward:
    """r = mean pixel brightness mapped to [0, 1]: (x + 1)/2 averaged over the image."""

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return ((images.clamp(-1, 1) + 1) / 2).flatten(1).mean(1)


def ink_reward(ctx: RewardContext) -> InkReward:
    return InkReward()


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


def train_digit_cnn(seed: int = 0, epochs: int = 30) -> nn.Module:
    """Train the proxy CNN on half A (≈2 s on 2 cores), deterministic given the seed."""
    (xa, ya), _ = classifier_halves()
    torch.manual_seed(seed)
    net = _cnn()
    x = torch.tensor(xa).view(-1, 1, 8, 8)
    y = torch.tensor(ya)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


class ClassifierReward:
    """r = P_cnn(prompted class | x), the CNN cached under ``cache_dir``."""

    def __init__(self, ctx: RewardContext):
        path = Path(ctx.cache_dir) / "digits" / f"proxy_cnn_seed{ctx.config.seed}.safetensors"
        self.net = _cnn()
        if path.is_file():
            self.net.load_state_dict(load_file(path))
        else:
            self.net = train_digit_cnn(ctx.config.seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file_atomic({k: v.contiguous() for k, v in self.net.state_dict().items()}, path)
        self.net.eval().requires_grad_(False)

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        with torch.no_grad():
            p = torch.softmax(self.net(images.clamp(-1, 1).float().cpu()), dim=1)
        y = torch.tensor([int(c) for c in prompts])
        return p[torch.arange(len(y)), y].to(images.device)


class DigitsGold:
    """Gold evaluator: PCA(20) → RBF-SVC on half B. Features are its PCA coordinates."""

    def __init__(self, seed: int = 0):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.decomposition import PCA
        from sklearn.svm import SVC

        _, (xb, yb) = classifier_halves()
        self.pca = PCA(n_components=20, random_state=seed).fit(xb)
        feats = self.pca.transform(xb)
        self.svc = SVC(C=10.0, gamma="scale").fit(feats, yb)
        # Platt-calibrated probabilities for the gold reward; argmax decisions use the plain SVC.
        self.calibrated = CalibratedClassifierCV(
            SVC(C=10.0, gamma="scale", random_state=seed), ensemble=False, cv=3
        ).fit(feats, yb)

    def _proba(self, images: Tensor) -> np.ndarray:
        return self.calibrated.predict_proba(self.pca.transform(flat_numpy(images.clamp(-1, 1))))

    def reward(self, images: Tensor, prompts: list[str]) -> Tensor:
        y = np.array([int(p) for p in prompts])
        return torch.tensor(self._proba(images)[np.arange(len(y)), y], dtype=torch.float32)

    def correct(self, images: Tensor, prompts: list[str]) -> Tensor:
        pred = self.svc.predict(self.pca.transform(flat_numpy(images.clamp(-1, 1))))
        return torch.tensor(pred == np.array([int(p) for p in prompts]))

    def features(self, images: Tensor) -> Tensor:
        return torch.tensor(
            self.pca.transform(flat_numpy(images.clamp(-1, 1))), dtype=torch.float32
        )

"""sklearn's digits (1,797 8×8 images): the one image dataset that ships inside a package."""

from __future__ import annotations

import numpy as np
import torch

from ddrl.data.config import DataConfig
from ddrl.data.pools import PairedPool, TaskData

SPLIT_SEED = 0  # the split never changes with the run's seed: evaluations stay comparable
N_HELDOUT = 297  # held-out images: diffusion loss and Fréchet distance references


def digits_arrays() -> tuple[torch.Tensor, list[str], np.ndarray]:
    """All digits as x [1797, 1, 8, 8] in [-1, 1], prompts "0".."9" and a fixed permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # 0..16 → [-1, 1]
    prompts = [str(int(y)) for y in d.target]
    perm = np.random.RandomState(SPLIT_SEED).permutation(len(prompts))
    return x, prompts, perm


def digits_data(cfg: DataConfig | None = None) -> TaskData:
    """Train pool (1,500: base model and DDRL's data term) and held-out pool (297)."""
    x, prompts, perm = digits_arrays()
    held, train = perm[:N_HELDOUT], perm[N_HELDOUT:]
    pool = lambda ix: PairedPool(x[torch.as_tensor(ix)], [prompts[i] for i in ix])  # noqa: E731
    return TaskData([str(i) for i in range(10)], pool(train), pool(held))


def classifier_halves() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Two disjoint halves of the training split: (A) proxy reward model, (B) gold evaluator.

    Returns ((x_A [750, 64], y_A), (x_B [750, 64], y_B)) with x in [-1, 1].
    """
    x, prompts, perm = digits_arrays()
    train = perm[N_HELDOUT:]
    half = len(train) // 2
    y = np.array([int(p) for p in prompts])
    flat = x.reshape(len(y), -1).numpy()
    return (flat[train[:half]], y[train[:half]]), (flat[train[half:]], y[train[half:]])

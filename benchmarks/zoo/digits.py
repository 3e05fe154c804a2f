"""digits-cnn: a small LeNet-style CNN on scikit-learn's bundled ``load_digits`` (8x8 grayscale).

79,370 parameters (conv 1->16->32, fc 512->128->64->10). The reference weights are trained here,
deterministically (same seed, data split and recipe as the project's reference definition:
Adam lr 2e-3, weight decay 1e-4, cosine schedule, 60 epochs of batch 64 with random 1-pixel shifts;
about 10 s on one core). The metric is top-1 accuracy on 500 fixed test images (reference 0.992).

    build_module()              -> torch module (load a state_dict into it)
    reference_state_dict(cache) -> the trained weights (cached at ``cache`` or $TQ_ZOO_CACHE/digits-cnn.pt)
    calibration_inputs(n)       -> float32 [n,1,8,8] training images (disjoint from the test images)
    test_data()                 -> (x [500,1,8,8] float32, y [500] int64)
    evaluate(sd, ref_sd)        -> {"value": top1, "reference": top1 of ref_sd, "argmax_agreement",
                                    "logit_sqnr_db", ...}
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .shared import Classifier, accuracy_report, deterministic_torch, fit, train_and_save

NAME = "digits-cnn"
METRIC = "top1"
TRANSPARENT = 0.990  # top-1 at or above this: transparent

SEED = 0
N_TEST = 500
EPOCHS = 60
BATCH = 64
LR = 2e-3


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.pool(self.act(self.conv2(x)))
        x = x.flatten(1)
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.fc3(x)


def build_module() -> nn.Module:
    return DigitsCNN()


_SPLIT = None


def _split():
    global _SPLIT
    if _SPLIT is None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        d = load_digits()
        x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
        y = d.target.astype(np.int64)
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=N_TEST, random_state=SEED, stratify=y)
        _SPLIT = tuple(torch.from_numpy(a) for a in (xtr, ytr, xte, yte))
    return _SPLIT


def train_data() -> tuple[torch.Tensor, torch.Tensor]:
    xtr, ytr, _, _ = _split()
    return xtr.clone(), ytr.clone()


def test_data() -> tuple[torch.Tensor, torch.Tensor]:
    _, _, xte, yte = _split()
    return xte.clone(), yte.clone()


def calibration_inputs(n: int = 256) -> torch.Tensor:
    """The first ``n`` images of the fixed training split, [n,1,8,8], values in [0, 1]."""
    xtr, _ = train_data()
    return xtr[:n].clone()


def train(verbose: bool = False) -> dict[str, torch.Tensor]:
    """Train the reference weights from scratch (deterministic)."""
    with deterministic_torch():
        torch.manual_seed(SEED)
        m = build_module()
        xtr, ytr = train_data()
        return fit(m, xtr, ytr, lambda out, xb, yb: F.cross_entropy(out, yb), epochs=EPOCHS, batch=BATCH,
                   lr=LR, weight_decay=1e-4, seed=SEED, shift=True,
                   report=accuracy_report(m, *test_data()) if verbose else None)


_CLASSIFIER = Classifier(NAME, METRIC, build_module, test_data, train)
reference_state_dict = _CLASSIFIER.reference_state_dict
logits = _CLASSIFIER.logits
top1 = _CLASSIFIER.top1
evaluate = _CLASSIFIER.evaluate


def is_transparent(result: Mapping) -> bool:
    return result["value"] >= TRANSPARENT


if __name__ == "__main__":  # python -m benchmarks.zoo.digits [OUT.pt]: train and save the reference
    train_and_save(train, lambda sd: f"top1 {top1(sd)}")

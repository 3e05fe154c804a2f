"""seqrnn-lstm: a 2-layer LSTM reading each ``load_digits`` image as a sequence of 8 rows of 8 pixels.

52,874 parameters: ``nn.LSTM(8, 64, num_layers=2, batch_first=True)`` (per layer ``weight_ih_l{k}``
[256, in], ``weight_hh_l{k}`` [256, 64], ``bias_ih_l{k}`` and ``bias_hh_l{k}`` [256], the four gates
i, f, g, o stacked along dim 0; 52,224 values) and a linear head 64->10 on the top layer's output
at the last step (650). What a codec meets here: stacked gate matrices whose rows belong to four
differently-behaved gates, a recurrent matrix whose error compounds over the 8 steps, and two
bias vectors of which only the sum matters.

The reference weights are trained here, deterministically, on the same data split as digits.py
(1,297 training images, 500 fixed test images): Adam lr 1e-2, weight decay 1e-4, gradient norm
clipped at 1, cosine schedule, 60 epochs of batch 64, no augmentation (about 11 s on one core).
The metric is top-1 accuracy on the 500 test images; reference 0.992.

Transparent: top-1 >= 0.990, as for digits-cnn: at most one test image (0.2 points) below the
reference's 0.992.

    build_module()              -> torch module, called as module(x) with x [N,8,8] (batch, row, pixel);
                                   [N,1,8,8] images are accepted too
    reference_state_dict(cache) -> the trained weights (cached at ``cache`` or $TQ_ZOO_CACHE/seqrnn-lstm.pt)
    calibration_inputs(n)       -> float32 [n,8,8] training images (disjoint from the test images)
    test_data()                 -> (x [500,8,8] float32, y [500] int64)
    evaluate(sd, ref_sd)        -> {"value": top1, "reference": top1 of ref_sd, "argmax_agreement",
                                    "logit_sqnr_db", ...}
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import digits
from .shared import Classifier, accuracy_report, deterministic_torch, fit, train_and_save

NAME = "seqrnn-lstm"
METRIC = "top1"
TRANSPARENT = 0.990  # top-1 at or above this: transparent (reference 0.992; one test image is 0.002)

SEED = 0
EPOCHS = 60
BATCH = 64
LR = 1e-2
HIDDEN = 64
LAYERS = 2


class SeqLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, HIDDEN, num_layers=LAYERS, batch_first=True)
        self.head = nn.Linear(HIDDEN, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.reshape(x.shape[0], 8, 8))  # 8 steps (rows) of 8 features (pixels)
        return self.head(out[:, -1])


def build_module() -> nn.Module:
    return SeqLSTM()


def train_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The training split of digits.py as sequences: x [1297,8,8], y [1297]."""
    x, y = digits.train_data()
    return x[:, 0].contiguous(), y


def test_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The 500 fixed test images of digits.py as sequences: x [500,8,8], y [500]."""
    x, y = digits.test_data()
    return x[:, 0].contiguous(), y


def calibration_inputs(n: int = 256) -> torch.Tensor:
    """The first ``n`` images of the fixed training split as sequences, [n,8,8], values in [0, 1]."""
    xtr, _ = train_data()
    return xtr[:n].clone()


def train(verbose: bool = False) -> dict[str, torch.Tensor]:
    """Train the reference weights from scratch (deterministic)."""
    with deterministic_torch():
        torch.manual_seed(SEED)
        m = build_module()
        xtr, ytr = train_data()
        return fit(m, xtr, ytr, lambda out, xb, yb: F.cross_entropy(out, yb), epochs=EPOCHS, batch=BATCH,
                   lr=LR, weight_decay=1e-4, seed=SEED, clip=1.0,
                   report=accuracy_report(m, *test_data()) if verbose else None)


_CLASSIFIER = Classifier(NAME, METRIC, build_module, test_data, train)
reference_state_dict = _CLASSIFIER.reference_state_dict
logits = _CLASSIFIER.logits
top1 = _CLASSIFIER.top1
evaluate = _CLASSIFIER.evaluate


def is_transparent(result: Mapping) -> bool:
    return result["value"] >= TRANSPARENT


if __name__ == "__main__":  # python -m benchmarks.zoo.seqrnn [OUT.pt]: train and save the reference
    train_and_save(train, lambda sd: f"top1 {top1(sd)}")

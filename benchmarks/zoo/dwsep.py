"""dwsep-cnn: a depthwise-separable CNN with BatchNorm (MobileNet-style) on ``load_digits`` (8x8).

32,529 values in the state_dict (what rd.py counts as parameters): 31,370 learnable parameters,
1,152 BatchNorm running_mean/running_var values and 7 int64 num_batches_tracked counters, all kept
as in any trained BN model. Seven BN layers:

    stem    conv 3x3 1->32 (no bias)            -> BN -> ReLU                                          8x8
    block1  depthwise 3x3 (groups=32)           -> BN -> ReLU -> pointwise 1x1 32->64   -> BN -> ReLU  8x8
    block2  depthwise 3x3 stride 2 (groups=64)  -> BN -> ReLU -> pointwise 1x1 64->128  -> BN -> ReLU  4x4
    block3  depthwise 3x3 (groups=128)          -> BN -> ReLU -> pointwise 1x1 128->128 -> BN -> ReLU  4x4
    head    global average pool -> linear 128->10

What a codec meets here that digits-cnn lacks: depthwise kernels [C,1,3,3] (9 weights per output
channel), 1x1 pointwise kernels [O,I,1,1], convolutions without bias followed by BN affine
parameters, and the BN running statistics (running_var must stay positive).

The reference weights are trained here, deterministically, on the same data split as digits.py
(1,297 training images, 500 fixed test images): Adam lr 3e-3, weight decay 1e-4, cosine
schedule, 40 epochs of batch 64 with random 1-pixel shifts (13-19 s on one core). The metric
is top-1 accuracy on the 500 test images, with the BN layers in eval mode (running statistics);
reference 0.992.

Transparent: top-1 >= 0.990, as for digits-cnn: at most one test image (0.2 points) below the
reference's 0.992.

    build_module()              -> torch module (load a state_dict into it)
    reference_state_dict(cache) -> the trained weights (cached at ``cache`` or $TQ_ZOO_CACHE/dwsep-cnn.pt)
    calibration_inputs(n)       -> float32 [n,1,8,8] training images (disjoint from the test images)
    test_data()                 -> (x [500,1,8,8] float32, y [500] int64)
    evaluate(sd, ref_sd)        -> {"value": top1, "reference": top1 of ref_sd, "argmax_agreement",
                                    "logit_sqnr_db", ...}
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .digits import calibration_inputs, test_data, train_data  # noqa: F401 (calibration_inputs: the zoo API)
from .shared import Classifier, accuracy_report, deterministic_torch, fit, train_and_save

NAME = "dwsep-cnn"
METRIC = "top1"
TRANSPARENT = 0.990  # top-1 at or above this: transparent (reference 0.992; one test image is 0.002)

SEED = 0
EPOCHS = 40
BATCH = 64
LR = 3e-3
WIDTHS = (32, 64, 128, 128)  # stem, block1, block2, block3 output channels
STRIDES = (1, 2, 1)  # of the three depthwise convolutions


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class DWSepCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        w = WIDTHS
        layers = _conv_bn_relu(1, w[0], 3)
        for i, s in enumerate(STRIDES):
            layers += _conv_bn_relu(w[i], w[i], 3, s, groups=w[i])  # depthwise
            layers += _conv_bn_relu(w[i], w[i + 1], 1)  # pointwise
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(w[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def build_module() -> nn.Module:
    return DWSepCNN()


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


if __name__ == "__main__":  # python -m benchmarks.zoo.dwsep [OUT.pt]: train and save the reference
    train_and_save(train, lambda sd: f"top1 {top1(sd)}")

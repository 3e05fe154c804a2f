"""conv-autoencoder: a convolutional autoencoder with a transposed-convolution decoder on ``load_digits``.

26,793 parameters. Encoder 8x8 -> 2x2x8 (a 32-value code for the 64 pixels), decoder back to 8x8:

    encoder  conv 3x3 1->16 -> ReLU -> conv 3x3 stride 2 16->32 -> ReLU                   8x8 -> 4x4
             conv 3x3 stride 2 32->32 -> ReLU -> conv 1x1 32->8                          4x4 -> 2x2x8
    decoder  ConvTranspose2d 4x4 stride 2 8->32 -> ReLU                                  2x2 -> 4x4
             ConvTranspose2d 4x4 stride 2 32->16 -> ReLU -> conv 3x3 16->1 -> sigmoid    4x4 -> 8x8

What a codec meets here: ConvTranspose2d weights are laid out [in, out, kH, kW], so the output
channel is dim 1, not dim 0 as for Conv2d/Linear; and the output is an image, not logits.

The reference weights are trained here, deterministically, on the training split of digits.py
(1,297 images; the 500 fixed test images are never seen): Adam lr 3e-3, cosine schedule, 60
epochs of batch 64, MSE loss, no augmentation (about 11 s on one core). Reference reconstruction
MSE on the test images 0.00684 (pixels in [0, 1]), PSNR 21.65 dB.

The metric (``value``) is the reconstruction-quality ratio

    mse_ratio = MSE(reference's reconstructions, test images) / MSE(candidate's reconstructions, test images)

on the 500 test images: 1.0 for the reference, higher is better (a candidate may even do slightly
better than the reference). It measures what the model is for, reconstructing unseen images,
relative to the reference, so the threshold does not depend on how well this particular reference
happens to train; it is a smooth function of the weights (no granularity of one test image), and
higher-is-better like the other zoo metrics, so ``is_transparent`` is ``value >= TRANSPARENT``.

Transparent: mse_ratio >= 0.98, i.e. the candidate's reconstruction MSE at most ~2% above the
reference's (PSNR at most 0.088 dB lower). That is where the candidate's reconstructions are about
30 dB SQNR from the reference's: Gaussian noise of 1% of each parameter tensor's std gives
mse_ratio 0.991-0.995 (35-37 dB), 2% gives 0.965-0.978 (29-31 dB). Under the same noise the
classifier models here first fall below their one-test-image thresholds at logit SQNRs of about
24 dB (dwsep-cnn) and 36 dB (seqrnn-lstm). The secondary numbers are the MSE and PSNR
of both models and the SQNR of the candidate's reconstructions to the reference's.

    build_module()              -> torch module: module(x [N,1,8,8]) -> reconstructions [N,1,8,8]
    reference_state_dict(cache) -> the trained weights (cached at ``cache`` or $TQ_ZOO_CACHE/conv-autoencoder.pt)
    calibration_inputs(n)       -> float32 [n,1,8,8] training images (disjoint from the test images)
    test_data()                 -> (x [500,1,8,8] float32, y [500] int64)
    evaluate(sd, ref_sd)        -> {"value": mse_ratio, "reference": 1.0, "mse", "reference_mse",
                                    "psnr_db", "reference_psnr_db", "recon_sqnr_db", ...}
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .digits import calibration_inputs, test_data, train_data  # noqa: F401 (calibration_inputs: the zoo API)
from .shared import check_candidate, default_cache_path, deterministic_torch, fit, load_or_train, outputs, sqnr_db, train_and_save

NAME = "conv-autoencoder"
METRIC = "mse_ratio"  # reference's test reconstruction MSE / the candidate's (1.0 for the reference)
TRANSPARENT = 0.98  # mse_ratio at or above this (candidate's MSE <= ~1.02 x the reference's): transparent

SEED = 0
EPOCHS = 60
BATCH = 64
LR = 3e-3
CODE_CHANNELS = 8  # the code is CODE_CHANNELS x 2 x 2


class ConvAutoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(32, CODE_CHANNELS, 1))
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(CODE_CHANNELS, 32, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(16, 1, 3, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def build_module() -> nn.Module:
    return ConvAutoencoder()


def train(verbose: bool = False) -> dict[str, torch.Tensor]:
    """Train the reference weights from scratch (deterministic)."""
    with deterministic_torch():
        torch.manual_seed(SEED)
        m = build_module()
        xtr, _ = train_data()
        xte, _ = test_data()
        report = (lambda ep, loss: print(f"epoch {ep} loss {loss:.5f} test_mse {F.mse_loss(m(xte), xte).item():.5f}"))
        return fit(m, xtr, None, lambda out, xb, yb: F.mse_loss(out, xb), epochs=EPOCHS, batch=BATCH, lr=LR,
                   seed=SEED, report=report if verbose else None)


def reference_state_dict(cache: Union[str, os.PathLike, None] = None, *,
                         verbose: bool = False) -> dict[str, torch.Tensor]:
    """The reference weights: loaded from ``cache`` (default ``$TQ_ZOO_CACHE/conv-autoencoder.pt``)
    if that file exists, else trained and, when a cache path is known, saved there."""
    path = Path(cache) if cache is not None else default_cache_path(NAME)
    return load_or_train(path, lambda: train(verbose=verbose))


def reconstruct(sd: Mapping[str, torch.Tensor], x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The model's float32 reconstructions of ``x`` (default: the 500 test images)."""
    return outputs(build_module, sd, test_data()[0] if x is None else x)


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


def _psnr_db(mse: float) -> float:  # peak 1.0 (pixels in [0, 1])
    if not math.isfinite(mse):
        return float("-inf")
    return float("inf") if mse == 0.0 else -10.0 * math.log10(mse)


def test_mse(sd: Mapping[str, torch.Tensor]) -> float:
    x, _ = test_data()
    return _mse(reconstruct(sd, x), x)


def evaluate(sd: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict:
    """``value``: the reference's reconstruction MSE on the 500 test images over ``sd``'s (0.0 if
    ``sd``'s is not finite); ``reference``: the same for the reference itself (1.0); and both
    MSEs and PSNRs, and the SQNR in dB of ``sd``'s reconstructions to the reference's."""
    nonfinite = check_candidate(sd, reference)
    x, _ = test_data()
    ref_rec = reconstruct(reference, x)
    rec = reconstruct(sd, x)
    ref_mse, mse = _mse(ref_rec, x), _mse(rec, x)
    if not math.isfinite(mse):
        ratio = 0.0
    else:
        ratio = ref_mse / mse if mse > 0.0 else float("inf")
    return {"model": NAME, "metric": METRIC, "value": ratio, "reference": 1.0,
            "mse": mse, "reference_mse": ref_mse, "psnr_db": _psnr_db(mse), "reference_psnr_db": _psnr_db(ref_mse),
            "recon_sqnr_db": sqnr_db(ref_rec, rec), "n": int(len(x)), "nonfinite_tensors": nonfinite}


def is_transparent(result: Mapping) -> bool:
    return result["value"] >= TRANSPARENT


if __name__ == "__main__":  # python -m benchmarks.zoo.autoenc [OUT.pt]: train and save the reference
    train_and_save(train, lambda sd: f"test_mse {round(test_mse(sd), 6)} psnr_db {round(_psnr_db(test_mse(sd)), 3)}")

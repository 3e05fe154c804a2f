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

import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import digits
from .shared import check_candidate, default_cache_path, deterministic_torch, load_or_train, sqnr_db

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
        xte, yte = test_data()
        opt = torch.optim.Adam(m.parameters(), lr=LR, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
        g = torch.Generator().manual_seed(SEED)
        for ep in range(EPOCHS):
            m.train()
            perm = torch.randperm(len(xtr), generator=g)
            for i in range(0, len(xtr), BATCH):
                idx = perm[i:i + BATCH]
                loss = F.cross_entropy(m(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opt.step()
            sched.step()
            if verbose and (ep % 10 == 9 or ep == EPOCHS - 1):
                m.eval()
                with torch.no_grad():
                    acc = (m(xte).argmax(1) == yte).float().mean().item()
                print(f"epoch {ep + 1} loss {loss.item():.4f} test_acc {acc:.4f}")
    return {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}


def reference_state_dict(cache: Union[str, os.PathLike, None] = None, *,
                         verbose: bool = False) -> dict[str, torch.Tensor]:
    """The reference weights: loaded from ``cache`` (default ``$TQ_ZOO_CACHE/seqrnn-lstm.pt``) if
    that file exists, else trained and, when a cache path is known, saved there."""
    path = Path(cache) if cache is not None else default_cache_path(NAME)
    return load_or_train(path, lambda: train(verbose=verbose))


@torch.no_grad()
def logits(sd: Mapping[str, torch.Tensor], x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The model's float32 logits on ``x`` (default: the 500 test images)."""
    m = build_module()
    m.load_state_dict(dict(sd), strict=True)
    m.eval()
    if x is None:
        x, _ = test_data()
    return m(x).float()


def top1(sd: Mapping[str, torch.Tensor]) -> float:
    _, y = test_data()
    return (logits(sd).argmax(1) == y).float().mean().item()


def evaluate(sd: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict:
    """Top-1 of ``sd`` on the 500 test images (``value``), and against ``reference``: its top-1,
    the fraction of images where both predict the same class, and the logit SQNR in dB."""
    nonfinite = check_candidate(sd, reference)
    _, y = test_data()
    ref_logits = logits(reference)
    out = logits(sd)
    return {"model": NAME, "metric": METRIC, "value": (out.argmax(1) == y).float().mean().item(),
            "reference": (ref_logits.argmax(1) == y).float().mean().item(),
            "argmax_agreement": (out.argmax(1) == ref_logits.argmax(1)).float().mean().item(),
            "logit_sqnr_db": sqnr_db(ref_logits, out), "n": int(len(y)), "nonfinite_tensors": nonfinite}


def is_transparent(result: Mapping) -> bool:
    return result["value"] >= TRANSPARENT


if __name__ == "__main__":  # python -m benchmarks.zoo.seqrnn [OUT.pt]: train and save the reference
    import sys
    sd = train(verbose=True)
    if len(sys.argv) > 1:
        torch.save(sd, sys.argv[1])
    print("params", sum(v.numel() for v in sd.values()), "top1", top1(sd))

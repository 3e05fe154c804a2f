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

import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .shared import check_candidate, sqnr_db

NAME = "digits-cnn"
METRIC = "top1"
TRANSPARENT = 0.990  # top-1 at or above this: transparent
CACHE_ENV = "TQ_ZOO_CACHE"  # a directory; the reference weights are cached there as digits-cnn.pt

SEED = 0
N_TEST = 500
EPOCHS = 60
BATCH = 64


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


@contextlib.contextmanager
def _deterministic_torch() -> Iterator[None]:
    """One thread and deterministic algorithms while training; the caller's settings restored after."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
        torch.set_rng_state(rng)


def train(verbose: bool = False) -> dict[str, torch.Tensor]:
    """Train the reference weights from scratch (deterministic)."""
    with _deterministic_torch():
        torch.manual_seed(SEED)
        m = build_module()
        xtr, ytr = train_data()
        xte, yte = test_data()
        opt = torch.optim.Adam(m.parameters(), lr=2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
        g = torch.Generator().manual_seed(SEED)
        for ep in range(EPOCHS):
            m.train()
            perm = torch.randperm(len(xtr), generator=g)
            for i in range(0, len(xtr), BATCH):
                idx = perm[i:i + BATCH]
                xb = xtr[idx]
                sh = torch.randint(-1, 2, (2,), generator=g).tolist()  # random 1-pixel shifts
                xb = torch.roll(xb, shifts=sh, dims=(2, 3))
                loss = F.cross_entropy(m(xb), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
            if verbose and (ep % 10 == 9 or ep == EPOCHS - 1):
                m.eval()
                with torch.no_grad():
                    acc = (m(xte).argmax(1) == yte).float().mean().item()
                print(f"epoch {ep + 1} loss {loss.item():.4f} test_acc {acc:.4f}")
    return {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}


def default_cache_path() -> Optional[Path]:
    root = os.environ.get(CACHE_ENV)
    return Path(root) / f"{NAME}.pt" if root else None


def reference_state_dict(cache: Union[str, os.PathLike, None] = None, *,
                         verbose: bool = False) -> dict[str, torch.Tensor]:
    """The reference weights: loaded from ``cache`` (default ``$TQ_ZOO_CACHE/digits-cnn.pt``) if
    that file exists, else trained and, when a cache path is known, saved there."""
    path = Path(cache) if cache is not None else default_cache_path()
    if path is not None and path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    sd = train(verbose=verbose)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(sd, tmp)
        os.replace(tmp, path)
    return sd


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


if __name__ == "__main__":  # python -m benchmarks.zoo.digits [OUT.pt]: train and save the reference
    import sys
    sd = train(verbose=True)
    if len(sys.argv) > 1:
        torch.save(sd, sys.argv[1])
    print("params", sum(v.numel() for v in sd.values()), "top1", top1(sd))

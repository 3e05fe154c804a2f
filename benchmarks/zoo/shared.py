"""What the zoo modules share: logit SQNR, a content fingerprint for caching, candidate checks."""
from __future__ import annotations

import hashlib
import math
from typing import Mapping

import torch

SQNR_CAP_DB = 200.0  # reported when the candidate's output is identical to the reference's


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2), clamped to +-200 dB."""
    ref = torch.as_tensor(ref, dtype=torch.float64)
    test = torch.as_tensor(test, dtype=torch.float64)
    sig = float((ref ** 2).sum())
    err = float(((ref - test) ** 2).sum())
    if not math.isfinite(err):
        return -SQNR_CAP_DB
    if err == 0.0:
        return SQNR_CAP_DB
    return max(-SQNR_CAP_DB, min(SQNR_CAP_DB, 10.0 * math.log10(sig / err)))


def fingerprint(sd: Mapping[str, torch.Tensor]) -> str:
    """SHA-1 over names, dtypes, shapes and bytes: identifies a state_dict's content."""
    h = hashlib.sha1()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_candidate(cand: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> int:
    """Raise ValueError unless ``cand`` has exactly the keys and shapes of ``ref``;
    return the number of floating tensors with NaN or infinite values."""
    missing = [k for k in ref if k not in cand]
    extra = [k for k in cand if k not in ref]
    bad = [k for k in ref if k in cand and tuple(cand[k].shape) != tuple(ref[k].shape)]
    if missing or extra or bad:
        raise ValueError(f"state_dict mismatch: missing={missing[:5]} (n={len(missing)}) "
                         f"unexpected={extra[:5]} (n={len(extra)}) shape_mismatch={bad[:5]} (n={len(bad)})")
    return sum(1 for v in cand.values() if v.is_floating_point() and not torch.isfinite(v).all())

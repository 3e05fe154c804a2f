"""What the zoo modules share: logit SQNR, a content fingerprint for caching, candidate checks,
and (for the models trained here) deterministic training and the reference-weights cache."""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

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


# --- training the small reference models (dwsep, seqrnn, autoenc) -----------------------------

CACHE_ENV = "TQ_ZOO_CACHE"  # a directory; trained reference weights are cached there as NAME.pt


@contextlib.contextmanager
def deterministic_torch() -> Iterator[None]:
    """One thread and deterministic algorithms while training; the caller's settings (and the
    global RNG state) restored after. The same as digits.py's ``_deterministic_torch``."""
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


def default_cache_path(name: str) -> Optional[Path]:
    """``$TQ_ZOO_CACHE/<name>.pt``, or None when the variable is not set."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) / f"{name}.pt" if root else None


def load_or_train(path: Optional[Path], train: Callable[[], dict]) -> dict[str, torch.Tensor]:
    """The state_dict at ``path`` if that file exists, else ``train()``, saved (atomically) at
    ``path`` when one is given."""
    if path is not None and path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    sd = train()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(sd, tmp)
        os.replace(tmp, path)
    return sd

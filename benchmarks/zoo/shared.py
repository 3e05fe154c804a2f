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


def fit(m: torch.nn.Module, x: torch.Tensor, y: Optional[torch.Tensor], loss: Callable, *, epochs: int, batch: int,
        lr: float, seed: int, weight_decay: float = 0.0, shift: bool = False, clip: Optional[float] = None,
        report: Optional[Callable[[int, float], None]] = None) -> dict[str, torch.Tensor]:
    """Train ``m`` (its weights already drawn from the seeded global RNG) with Adam and a cosine
    schedule on minibatches in a seeded random order: ``loss(m(xb), xb, yb)`` (``yb`` None when ``y``
    is), random 1-pixel shifts of each batch when ``shift``, gradient norm clipped at ``clip``.
    ``report(epoch, last_loss)`` after every tenth epoch and the last. Returns the trained weights."""
    opt = torch.optim.Adam(m.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        m.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            xb = x[idx]
            if shift:
                sh = torch.randint(-1, 2, (2,), generator=g).tolist()
                xb = torch.roll(xb, shifts=sh, dims=(2, 3))
            value = loss(m(xb), xb, None if y is None else y[idx])
            opt.zero_grad()
            value.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            opt.step()
        sched.step()
        if report is not None and (ep % 10 == 9 or ep == epochs - 1):
            m.eval()
            with torch.no_grad():
                report(ep + 1, value.item())
    return {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}


@torch.no_grad()
def outputs(build_module: Callable[[], torch.nn.Module], sd: Mapping[str, torch.Tensor],
            x: torch.Tensor) -> torch.Tensor:
    """The float32 outputs on ``x`` of the module ``build_module()`` holding ``sd``, in eval mode."""
    m = build_module()
    m.load_state_dict(dict(sd), strict=True)
    m.eval()
    return m(x).float()


def classifier_result(name: str, metric: str, out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor,
                      nonfinite: int) -> dict:
    """A classifier's evaluation: top-1 of the logits ``out`` against labels ``y`` (``value``), the
    reference logits' top-1, their argmax agreement and the logit SQNR in dB."""
    return {"model": name, "metric": metric, "value": (out.argmax(1) == y).float().mean().item(),
            "reference": (ref.argmax(1) == y).float().mean().item(),
            "argmax_agreement": (out.argmax(1) == ref.argmax(1)).float().mean().item(),
            "logit_sqnr_db": sqnr_db(ref, out), "n": int(len(y)), "nonfinite_tensors": nonfinite}


def accuracy_report(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[int, float], None]:
    """A :func:`fit` ``report`` that prints the last loss and ``m``'s top-1 on ``(x, y)``."""
    return lambda ep, loss: print(f"epoch {ep} loss {loss:.4f} test_acc {(m(x).argmax(1) == y).float().mean().item():.4f}")


class Classifier:
    """The evaluation side shared by the zoo's digit classifiers: ``reference_state_dict``,
    ``logits``, ``top1`` and ``evaluate`` of a model ``name`` (built by ``build_module``, its
    reference weights from ``train``, its test images and labels from ``test_data``)."""

    def __init__(self, name: str, metric: str, build_module: Callable[[], torch.nn.Module],
                 test_data: Callable[[], tuple], train: Callable[..., dict]):
        self.name, self.metric = name, metric
        self.build_module, self.test_data, self.train = build_module, test_data, train

    def reference_state_dict(self, cache=None, *, verbose: bool = False) -> dict[str, torch.Tensor]:
        """The reference weights: loaded from ``cache`` (default ``$TQ_ZOO_CACHE/<name>.pt``) if that
        file exists, else trained and, when a cache path is known, saved there."""
        path = Path(cache) if cache is not None else default_cache_path(self.name)
        return load_or_train(path, lambda: self.train(verbose=verbose))

    def logits(self, sd: Mapping[str, torch.Tensor], x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model's float32 logits on ``x`` (default: the 500 test images), in eval mode."""
        return outputs(self.build_module, sd, self.test_data()[0] if x is None else x)

    def top1(self, sd: Mapping[str, torch.Tensor]) -> float:
        return (self.logits(sd).argmax(1) == self.test_data()[1]).float().mean().item()

    def evaluate(self, sd: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict:
        """Top-1 of ``sd`` on the 500 test images (``value``), and against ``reference``: its top-1,
        the fraction of images where both predict the same class, and the logit SQNR in dB."""
        nonfinite = check_candidate(sd, reference)
        return classifier_result(self.name, self.metric, self.logits(sd), self.logits(reference),
                                 self.test_data()[1], nonfinite)


def train_and_save(train: Callable[..., dict], summary: Callable[[dict], str]) -> None:
    """``python -m benchmarks.zoo.<model> [OUT.pt]``: train verbosely, save to OUT.pt if given,
    print the parameter count and ``summary(sd)``."""
    import sys
    sd = train(verbose=True)
    if len(sys.argv) > 1:
        torch.save(sd, sys.argv[1])
    print("params", sum(v.numel() for v in sd.values()), summary(sd))

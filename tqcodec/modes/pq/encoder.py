"""Product quantization (Gong et al. 2014) with Hessian-weighted k-means, for mode ``pq``
(spec §7.8).

Each row of the [n, m] view is cut into sub-vectors of ``d`` consecutive weights (the last one
padded with zero-importance zeros); one codebook of K codewords serves the tensor. k-means runs in
the importance metric ``sum_c h_c (x_c - y_c)^2`` (h per weight, so per component): assignment by
that distance, codewords as per-component h-weighted means. Initialisation: k-means++ with a
seeded generator on a deterministic subsample of at most ``TRAIN`` sub-vectors; the final
assignment covers every sub-vector. ``d`` (from ``DIMS``) and K are chosen by a bits target or a
Lagrange multiplier over the measured (D, R) of each candidate.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ...format.dtypes import round_binary32, storage_to_float64
from ..base import row_view
from ..importance import full_importance
from ..rd import (Point, Result, best_variant, counts_bits, entropy_bits, least_distortion, measured,
                  search_monotone, weighted_distortion)
from ..streams import PRECISIONS
from .format import MAX_DIM, reconstruct, write

DIMS = (2, 4, 8)
K_GRID = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # half-octave steps: finer rates
TRAIN = 4096  # sub-vectors k-means trains on (a deterministic strided subsample)
EVAL = 16384  # sub-vectors a candidate (d, K) is measured on (another strided subsample)
ITERS = 10
BLOCK = 2048
F16_MAX = 65504.0


def _assign(x: np.ndarray, hx: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Nearest codeword of each sub-vector in the importance metric; (indices, total distance)."""
    out = np.empty(len(x), dtype=np.int64)
    total = 0.0
    y32 = y.astype(np.float32)
    yy = (y32 * y32).T  # [d, K]
    for s in range(0, len(x), BLOCK):
        xb, hb = x[s:s + BLOCK], hx[s:s + BLOCK]
        hxb = (hb * xb).astype(np.float32)
        # float32 and cache-sized blocks: the [block, K] distance matrix is the cost (encoder-only)
        dist = hb.astype(np.float32) @ yy
        dist -= 2.0 * (hxb @ y32.T)
        j = np.argmin(dist, axis=1)
        out[s:s + BLOCK] = j
        e = xb - y[j]
        total += float((hb * e * e).sum())  # the exact float64 distance of the choice
    return out, total


def _update(x: np.ndarray, hx: np.ndarray, idx: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-component h-weighted means of each cluster (a cluster or component without weight
    keeps its codeword)."""
    k, d = y.shape
    sw = np.zeros((k, d))
    swx = np.zeros((k, d))
    np.add.at(sw, idx, hx)
    np.add.at(swx, idx, hx * x)
    out = y.copy()
    ok = sw > 0
    out[ok] = swx[ok] / sw[ok]
    return out


def _kmeans(x: np.ndarray, hx: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Weighted k-means++ then Lloyd (``ITERS`` passes) on ``x`` [N, d]: codewords [k', d]."""
    rng = np.random.default_rng(seed)
    n = len(x)
    wsum = hx.sum(axis=1)
    first = int(rng.choice(n, p=wsum / wsum.sum())) if wsum.sum() > 0 else int(rng.integers(n))
    y = [x[first]]
    best = (hx * (x - x[first]) ** 2).sum(axis=1)
    for _ in range(1, k):
        tot = best.sum()
        if tot <= 0:
            break
        j = int(rng.choice(n, p=best / tot))
        y.append(x[j])
        best = np.minimum(best, (hx * (x - x[j]) ** 2).sum(axis=1))
    y = np.array(y)
    for _ in range(ITERS):
        idx, _ = _assign(x, hx, y)
        new = _update(x, hx, idx, y)
        if np.array_equal(new, y):
            break
        y = new
    return y


class _Split:
    """The tensor cut into sub-vectors of ``d`` (zero-padded rows, padding weighs 0)."""

    def __init__(self, w2: np.ndarray, h2: np.ndarray, d: int):
        n, m = w2.shape
        self.d, self.s = d, -(-m // d)
        pad = self.s * d - m
        self.x = np.pad(w2, ((0, 0), (0, pad))).reshape(-1, d)
        self.hx = np.pad(h2, ((0, 0), (0, pad))).reshape(-1, d)
        stride = max(1, -(-len(self.x) // TRAIN))
        self.tx, self.th = self.x[::stride], self.hx[::stride]
        stride = max(1, -(-len(self.x) // EVAL))  # curve points are measured on this subsample, scaled
        self.ex, self.eh = self.x[stride // 2::stride], self.hx[stride // 2::stride]
        self.scale = len(self.x) / len(self.ex)

    def point(self, k: int, seed: int) -> Point:
        y = _kmeans(self.tx, self.th, min(k, len(self.tx)), seed)
        idx, dist = _assign(self.ex, self.eh, y)
        counts = np.bincount(idx, minlength=len(y)) * self.scale
        r = entropy_bits(counts) + counts_bits(np.rint(counts[counts > 0])) + 16.0 * y.size + 8 * 48
        return Point((self.d, k), dist * self.scale, r, y)


def _finish(split: _Split, y: np.ndarray, n: int, m: int, dtype: str, precision: str, h2: np.ndarray,
            w2: np.ndarray) -> Result:
    stored = y.astype(PRECISIONS[precision]).astype(np.float64)
    dec = storage_to_float64(dtype, round_binary32(dtype, stored.astype(np.float32)))  # values the decoder gives
    idx, _ = _assign(split.x, split.hx, dec)
    used = np.bincount(idx, minlength=len(stored)) > 0
    stored, idx = stored[used], (np.cumsum(used) - 1)[idx]
    encoded = write(idx.reshape(n, split.s), stored, precision=precision)
    rec = reconstruct(idx, stored.astype(np.float32), n, m)
    recon = storage_to_float64(dtype, round_binary32(dtype, rec))
    return measured(encoded, weighted_distortion(recon, w2, h2),
                  recon, {"dim": split.d, "codewords": len(stored), "precision": precision})


def encode(values: np.ndarray, dtype: str, imp: np.ndarray, *, bits: Optional[float] = None,
           lam: Optional[float] = None, dims: Sequence[int] = DIMS, precision: str = "auto",
           seed: int = 0) -> Result:
    """Mode ``pq`` for float64 ``values`` (>= 1 dimension) of dtype ``dtype`` with importance
    ``imp`` (broadcastable to the [n, m] row view). ``bits``: target bits per weight; else
    ``lam``. ``dims``: sub-vector lengths tried (those <= min(m, 256)); ``seed``: k-means++."""
    w2 = np.asarray(values, dtype=np.float64).reshape(row_view(np.shape(values)))
    n, m = w2.shape
    h2 = full_importance(imp, n, m)
    target = None if bits is None else bits * w2.size
    chosen: list[tuple[Point, _Split]] = []
    for d in [d for d in dims if 1 <= d <= min(m, MAX_DIM)] or [1]:
        split = _Split(w2, h2, d)
        ks = [k for k in K_GRID if k <= max(2, len(split.tx) // 4)][::-1]  # coarse rate last
        start = None
        if lam is not None:  # a start near where the marginal gain of a codeword meets lam
            start = len(ks) // 2
        p, _ = search_monotone(ks, lambda k, split=split: split.point(k, seed), bits=target, lam=lam, start=start)
        chosen.append((p, split))
    p, split = best_variant(chosen, lam=lam, target=target)
    precs = ["float16", "float32"] if precision == "auto" else [precision]
    best = least_distortion(
        None if prec == "float16" and np.abs(p.state).max() > F16_MAX and len(precs) > 1
        else _finish(split, p.state, n, m, dtype, prec, h2, w2) for prec in precs)
    best.recon = best.recon.reshape(np.shape(values))
    return best

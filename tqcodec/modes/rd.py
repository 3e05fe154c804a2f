"""Rate-distortion helpers the encoders of modes ``ecsq``, ``kmeans``, ``pq`` and ``dither``
share (and mode ``auto``'s comparison): the result an encoder returns, rate measurement and
estimates, and the choice of an operating point by a rate target or a Lagrange multiplier.
Arrays only (no files)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from ..format.chunks import CHUNK_HEADER_SIZE
from ..format.leb128 import packed_counts_bytes
from ..format.manifest import pack_canonical
from ..format.steps import STEP_CODE_MAX, STEP_CODE_MIN, code_at_most
from .base import Chunks, Encoded

SUBSAMPLE = 1 << 16  # curve points of bigger tensors are estimated on about this many weights
RECORD_BITS = 8 * 48  # name, dtype, shape and mode of a manifest record, plus its index entry


@dataclass
class Result:
    """One encoded tensor (``encoded``), its measured rate (bits of its manifest params, chunk
    headers and payloads), the weighted distortion ``sum(h * (recon - w)^2)`` of what the decoder
    rebuilds, and that reconstruction (float64, the tensor's values after rounding to its dtype,
    shaped like the input)."""

    encoded: Encoded
    rate_bits: float
    distortion: float
    recon: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.encoded.mode

    @property
    def bits_per_weight(self) -> float:
        return self.rate_bits / max(self.recon.size, 1)


def measured(encoded: Encoded, distortion: float, recon: np.ndarray, info: dict) -> Result:
    """A :class:`Result` with the rate measured on ``encoded``'s bytes."""
    return Result(encoded, measured_bits(encoded.params, encoded.streams), distortion, recon, info)


def measured_bits(params: dict, streams: Sequence[Chunks]) -> float:
    """The tensor's own bytes in a file, in bits: its params in the manifest, every chunk's
    header and payload (the name, shape and index entry are the same for every mode)."""
    n = len(pack_canonical(params))
    n += sum(CHUNK_HEADER_SIZE + len(p) for chunks in streams for _, p in chunks)
    return 8.0 * n


def entropy_bits(counts: np.ndarray) -> float:
    """``N * H`` of a histogram, in bits (the range coder's payload, to within a few words)."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    total = c.sum()
    if len(c) < 2:
        return 0.0
    return float(-(c * np.log2(c / total)).sum())


def counts_bits(counts: np.ndarray) -> float:
    """Bits of a counts table (spec §7.S.2) with its msgpack key and header."""
    return 8.0 * (packed_counts_bytes(counts) + 3)


def stream_bits(counts: np.ndarray) -> float:
    """Estimated stored bits of one symbol stream and its table (entropy + table + a chunk)."""
    c = np.asarray(counts)
    if np.count_nonzero(c) < 2:
        return counts_bits(c)
    return entropy_bits(c) + counts_bits(c) + 8 * (CHUNK_HEADER_SIZE + 4)


def weighted_distortion(recon: np.ndarray, w: np.ndarray, imp: np.ndarray) -> float:
    """``sum(h * (recon - w)^2)``, ``imp`` broadcastable to ``w``."""
    e = np.asarray(recon, dtype=np.float64) - w
    return float(np.sum(np.broadcast_to(imp, w.shape) * e * e))


def lam_for_snr(w: np.ndarray, imp: np.ndarray, snr_db: float) -> float:
    """A Lagrange multiplier for a weighted SNR target: at high rate D(R) falls as 2^-2R per
    weight, so dD/dR = -2 ln2 D; with D the target total distortion over N weights that is
    ``lam = 2 ln2 * D / N``."""
    power = float(np.sum(np.broadcast_to(imp, w.shape) * w * w))
    target = power * 10.0 ** (-snr_db / 10.0)
    return max(2.0 * math.log(2.0) * target / max(w.size, 1), 1e-300)


def subsample(flat: np.ndarray, limit: int = SUBSAMPLE) -> tuple[np.ndarray, float]:
    """Deterministic strided subsample of at most about ``limit`` items and its scale factor."""
    if flat.shape[0] <= limit:
        return np.arange(flat.shape[0]), 1.0
    stride = -(-flat.shape[0] // limit)
    idx = np.arange(0, flat.shape[0], stride)
    return idx, flat.shape[0] / len(idx)


def step_codes(w: np.ndarray, octaves_below: int = 12) -> list[int]:
    """Step codes from about rms*2^-octaves_below up to where every weight rounds to zero."""
    rms = float(np.sqrt(np.mean(w * w))) if w.size else 0.0
    peak = float(np.max(np.abs(w))) if w.size else 0.0
    if rms <= 0:
        return [STEP_CODE_MAX]
    lo = max(STEP_CODE_MIN, code_at_most(rms) - 4 * octaves_below,
             code_at_most(max(peak / ((1 << 20) - 2), 2 * peak / 60000, 2.0 ** -40)) + 1)
    hi = min(STEP_CODE_MAX, int(math.ceil(4 * math.log2(4 * peak))) + 1)
    return list(range(lo, max(lo, hi) + 1))


@dataclass
class Point:
    """A candidate operating point: its key (a step code, a codebook size, ...), estimated
    distortion and rate (bits), and whatever the encoder needs to finish it."""

    key: Any
    d: float
    r: float
    state: Any = None


def best_for_lambda(points: Sequence[Point], lam: float) -> Point:
    """argmin D + lam R (ties: the smaller rate)."""
    return min(points, key=lambda p: (p.d + lam * p.r, p.r))


def best_for_rate(points: Sequence[Point], bits: float) -> Point:
    """The least distortion with rate <= ``bits`` (else the smallest rate)."""
    ok = [p for p in points if p.r <= bits]
    if not ok:
        return min(points, key=lambda p: (p.r, p.d))
    return min(ok, key=lambda p: (p.d, p.r))


PRECISION_MARGIN = 0.005  # a costlier stored precision must lower the distortion by this share


def least_distortion(results: Iterable[Optional[Result]]) -> Result:
    """The first of ``results`` (the cheapest stored precision first), replaced by a later one
    only where that lowers the distortion by more than ``PRECISION_MARGIN``; ``None`` entries (a
    precision that cannot hold the values) are skipped."""
    best: Optional[Result] = None
    for res in results:
        if res is not None and (best is None or res.distortion < best.distortion * (1 - PRECISION_MARGIN)):
            best = res
    if best is None:
        raise ValueError("no stored precision can hold these values")
    return best


def best_variant(chosen: Sequence[tuple[Point, Any]], *, lam: Optional[float] = None,
                 target: Optional[float] = None) -> tuple[Point, Any]:
    """Among ``(point, variant)`` pairs (one per variant of a method: a lattice, a sub-vector
    length, a reconstruction rule): the least ``D + lam R``; or, for a rate ``target``, the least
    distortion within it (the least rate when none fits)."""
    if lam is not None:
        return min(chosen, key=lambda t: t[0].d + lam * t[0].r)
    fits = [t for t in chosen if t[0].r <= target]
    return min(fits or chosen, key=lambda t: (t[0].d, t[0].r) if fits else (t[0].r, t[0].d))


def search_monotone(keys: Sequence[Any], evaluate: Callable[[Any], Point], *, bits: Optional[float] = None,
                    lam: Optional[float] = None, start: Optional[int] = None) -> tuple[Point, list[Point]]:
    """Pick among ``keys`` (ordered so that the rate falls along them: finer first) evaluating as
    few as it can. ``bits``: binary search for the first key whose rate fits, then its
    neighbours; ``lam``: local descent on D + lam R from ``start`` (an index). Returns the choice
    and every point evaluated."""
    cache: dict[int, Point] = {}

    def at(i: int) -> Point:
        if i not in cache:
            cache[i] = evaluate(keys[i])
        return cache[i]

    n = len(keys)
    if bits is not None:
        lo, hi = 0, n - 1
        if at(hi).r > bits:
            return at(hi), list(cache.values())
        while lo < hi:  # first index with rate <= bits
            mid = (lo + hi) // 2
            if at(mid).r <= bits:
                hi = mid
            else:
                lo = mid + 1
        for j in (lo - 1, lo + 1, lo + 2):
            if 0 <= j < n:
                at(j)
        return best_for_rate(list(cache.values()), bits), list(cache.values())
    if lam is None:
        raise ValueError("search_monotone needs bits or lam")
    i = min(max(0 if start is None else start, 0), n - 1)
    cost = lambda j: at(j).d + lam * at(j).r  # noqa: E731
    for j in (i - 1, i + 1):
        if 0 <= j < n:
            at(j)
    if not cache:  # one key only (a tensor of zeros has one step code): no neighbour to start from
        at(i)
    while True:
        best = min(cache, key=lambda j: (cost(j), at(j).r))
        moved = False
        for j in (best - 1, best + 1):
            if 0 <= j < n and j not in cache:
                at(j)
                moved = True
        if not moved:
            break
    best = min(cache, key=lambda j: (cost(j), at(j).r))
    return at(best), list(cache.values())


def allocate(curves: Sequence[Sequence[Point]], *, bits: Optional[float] = None,
             lam: Optional[float] = None) -> list[Point]:
    """One point per curve (e.g. per group of rows): ``lam``: each argmin D + lam R; ``bits``
    (total over the curves): the multiplier is bisected so the total rate fits (the choice
    with the most rate within ``bits``; the cheapest choice when none fits)."""
    if lam is not None:
        return [best_for_lambda(c, lam) for c in curves]
    if bits is None:
        raise ValueError("allocate needs bits or lam")
    lo, hi = -200.0, 200.0  # log2 lam
    best = None
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        pick = [best_for_lambda(c, 2.0 ** mid) for c in curves]
        r = sum(p.r for p in pick)
        if r <= bits:
            best = pick
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-3:
            break
    if best is None:
        best = [min(c, key=lambda p: (p.r, p.d)) for c in curves]
    return best

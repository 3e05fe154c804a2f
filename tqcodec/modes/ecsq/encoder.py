"""Entropy-constrained scalar quantization (Choi et al. 2017, ECSQ), for mode ``ecsq`` (spec §7.6).

Each weight w with importance h takes the cell j minimising ``h (w - c_j)^2 + mu (-log2 p_j)``
(the decision thresholds move with the rate term: a dead zone around frequent cells), ``p_j``
being the cells' shares from the previous pass. Two reconstructions:

- ``grid``: cells are the levels of a uniform grid, ``c_q = q * step`` (exact, nothing stored);
- ``codebook`` (the Lloyd-like iteration): after each assignment ``c_j`` becomes the h-weighted
  mean of its members and empty cells are dropped; the values are stored (float16 or float32,
  strictly increasing).

The step is chosen per tensor by a bits target (binary search over step codes, with the
high-rate multiplier ``mu = mean(h) step^2 ln2 / 6`` tying the rate term to the step) or by a
Lagrange multiplier ``lam`` (``mu = lam``, local search over step codes around the high-rate
optimum ``step^2 = 6 lam / (mean(h) ln2)``).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ...format.dtypes import round_binary32, storage_to_float64
from ...format.steps import code_at_most, steps_from_codes
from ..importance import full_importance
from ..streams import PRECISIONS
from .format import reconstruct, write
from ..rd import (Point, Result, best_variant, counts_bits, entropy_bits, least_distortion, measured,
                     search_monotone, step_codes, subsample, weighted_distortion)

PASSES = 6  # at most this many assignment / update passes
SETTLED = 1e-3  # stop when fewer than this share of the weights changed cells
CURVE_SAMPLE = 1 << 15  # step search on a subsample of about this many weights
WINDOW = 2  # cells on each side of the nearest one that the assignment considers (plus the most probable)
BLOCK = 1 << 16
F16_MAX = 65504.0


def _assign(x: np.ndarray, h: np.ndarray, vals: np.ndarray, ell: np.ndarray, mu: float) -> np.ndarray:
    """Index of the cell minimising ``h (x - vals_j)^2 + mu ell_j`` among the nearest cell, its
    ``WINDOW`` neighbours each side and the cell of least ``ell`` (``vals`` sorted)."""
    a = len(vals)
    if a == 1:
        return np.zeros(x.shape, dtype=np.int64)
    mids = 0.5 * (vals[1:] + vals[:-1])
    mode = int(np.argmin(ell))
    out = np.empty(x.shape, dtype=np.int64)
    offs = np.arange(-WINDOW, WINDOW + 1)
    for s in range(0, x.size, BLOCK):
        xb, hb = x[s:s + BLOCK], h[s:s + BLOCK]
        j0 = np.searchsorted(mids, xb)
        cand = np.concatenate([np.clip(j0[:, None] + offs[None, :], 0, a - 1),
                               np.full((len(xb), 1), mode)], axis=1)
        cost = hb[:, None] * (xb[:, None] - vals[cand]) ** 2 + mu * ell[cand]
        out[s:s + BLOCK] = cand[np.arange(len(xb)), np.argmin(cost, axis=1)]
    return out


def _ell(counts: np.ndarray) -> np.ndarray:
    """-log2 p of each cell (an empty cell: unreachable)."""
    c = counts.astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.where(c > 0, -np.log2(c / max(c.sum(), 1.0)), np.inf)


def _grid(x: np.ndarray, h: np.ndarray, delta: float, mu: float) -> tuple[np.ndarray, int]:
    """ECSQ with grid reconstruction: (levels, q_min)."""
    q = np.rint(x / delta).astype(np.int64)
    q_lo = int(q.min())
    vals = np.arange(q_lo, int(q.max()) + 1, dtype=np.float64) * delta
    for _ in range(PASSES):
        counts = np.bincount(q - q_lo, minlength=len(vals))
        new = _assign(x, h, vals, _ell(counts), mu) + q_lo
        moved = int(np.count_nonzero(new != q))
        q = new
        if moved <= SETTLED * q.size:
            break
    return q, q_lo


def _codebook(x: np.ndarray, h: np.ndarray, delta: float, mu: float) -> tuple[np.ndarray, np.ndarray]:
    """ECSQ, Lloyd-like (Choi'17 4.3(b)): (float64 values sorted, symbols), starting from the grid
    solution's used cells."""
    q, _ = _grid(x, h, delta, mu)
    levels, sym = np.unique(q, return_inverse=True)
    sym = sym.reshape(-1)
    vals = levels.astype(np.float64) * delta
    hh = np.maximum(h, 1e-12 * float(h.max()) if h.size and h.max() > 0 else 1.0)
    for _ in range(PASSES):
        counts = np.bincount(sym, minlength=len(vals))
        sw = np.bincount(sym, weights=hh, minlength=len(vals))
        swx = np.bincount(sym, weights=hh * x, minlength=len(vals))
        used = counts > 0
        vals, counts = swx[used] / sw[used], counts[used]
        order = np.argsort(vals, kind="stable")
        vals, counts = vals[order], counts[order]
        new = _assign(x, h, vals, _ell(counts), mu)
        moved = int(np.abs(np.bincount(new, minlength=len(vals)) - counts).sum())  # members that changed cells
        sym = new
        if moved <= SETTLED * sym.size:
            break
    counts = np.bincount(sym, minlength=len(vals))
    used = counts > 0
    return vals[used], (np.cumsum(used) - 1)[sym]


def _point(x: np.ndarray, h: np.ndarray, code: int, mu: float, variant: str, scale: float) -> Point:
    delta = float(steps_from_codes([code])[0])
    if variant == "grid":
        q, q_lo = _grid(x, h, delta, mu)
        rec = q * delta
        counts = np.bincount(q - q_lo)
        extra = 0.0
    else:
        vals, sym = _codebook(x, h, delta, mu)
        rec = vals[sym]
        counts = np.bincount(sym, minlength=len(vals))
        extra = 16.0 * len(vals)
    d = scale * float(np.sum(h * (rec - x) ** 2))
    r = scale * entropy_bits(counts) + counts_bits(counts) + extra + 8 * 40
    return Point(code, d, r, mu)


def _finish(x: np.ndarray, h: np.ndarray, shape: tuple, dtype: str, code: int, mu: float, variant: str,
            precision: str) -> Optional[Result]:
    """The full-size encoding at ``code``: params, streams, measured rate and distortion."""
    delta = float(steps_from_codes([code])[0])
    if variant == "grid":
        q, _ = _grid(x, h, delta, mu)
        q_lo = int(q.min())
        encoded = write(q - q_lo, recon="grid", step=code, q_min=q_lo)
        rec = reconstruct("grid", q - q_lo, step=code, q_min=q_lo)
    else:
        vals, sym = _codebook(x, h, delta, mu)
        if precision == "float16" and np.abs(vals).max() > F16_MAX:
            return None
        stored = vals.astype(PRECISIONS[precision]).astype(np.float64)
        recon_vals = storage_to_float64(dtype, round_binary32(dtype, stored.astype(np.float32)))
        recon_vals, first, inverse = np.unique(recon_vals, return_index=True, return_inverse=True)
        stored = stored[first]
        counts = np.bincount(inverse.reshape(-1)[sym], minlength=len(stored))  # the solution's cell shares
        sym = _assign(x, h, recon_vals, _ell(counts), mu)  # the rate rule once more, on the stored values
        used = np.bincount(sym, minlength=len(stored)) > 0
        stored, sym = stored[used], (np.cumsum(used) - 1)[sym]
        encoded = write(sym, recon="codebook", values=stored, precision=precision)
        rec = reconstruct("codebook", sym, values=stored.astype(np.float32))
    recon = storage_to_float64(dtype, round_binary32(dtype, rec)).reshape(shape)
    xs = x.reshape(shape)
    return measured(encoded,
                  weighted_distortion(recon, xs, h.reshape(shape)), recon,
                  {"recon": variant, "step": code, "mu": mu, "precision": precision if variant == "codebook" else None})


def _fine_tune(x: np.ndarray, h: np.ndarray, scale: float, codes: list[int], p: Point, target: float,
               hbar: float, variant: str) -> Point:
    """A bits target between two step codes: the next finer step with a larger rate term ``mu``
    (a wider dead zone), bisected on log2(mu) so the rate just fits; kept if its distortion is
    lower. The rate term is ECSQ's continuous control; steps alone move the rate in ~1/4-bit jumps."""
    i = codes.index(p.key)
    if i == 0:
        return p
    code = codes[i - 1]
    delta = float(steps_from_codes([code])[0])
    mu0 = hbar * delta * delta * math.log(2.0) / 6.0
    lo, hi = 0.0, 6.0
    fit = _point(x, h, code, mu0 * 2.0 ** hi, variant, scale)
    if fit.r > target:
        return p
    for _ in range(6):
        mid = 0.5 * (lo + hi)
        q = _point(x, h, code, mu0 * 2.0 ** mid, variant, scale)
        if q.r <= target:
            hi, fit = mid, q
        else:
            lo = mid
    return fit if fit.d < p.d else p


def encode(values: np.ndarray, dtype: str, imp: np.ndarray, *, bits: Optional[float] = None,
           lam: Optional[float] = None, variant: str = "auto", precision: str = "auto") -> Result:
    """Mode ``ecsq`` for float64 ``values`` of dtype ``dtype`` with importance ``imp``
    (broadcastable to the [n, m] row view, §7.S.1; any shape, 0-d included). ``bits``: target
    bits per weight (the tensor's bytes in the file); else ``lam``. ``variant``: ``grid``,
    ``codebook`` or ``auto`` (the better by the same criterion). ``precision`` of stored values:
    ``float16``, ``float32`` or ``auto``."""
    shape = np.shape(values)
    w = np.asarray(values, dtype=np.float64).reshape(-1)
    n = shape[0] if len(shape) else 1
    h = full_importance(imp, n, w.size // max(n, 1)).reshape(-1)
    hbar = float(np.mean(h)) if h.size else 1.0
    hbar = hbar if hbar > 0 else 1.0
    idx, scale = subsample(w, CURVE_SAMPLE)
    xs, hs = w[idx], h[idx]
    codes = step_codes(w)
    target = None if bits is None else bits * w.size
    variants = ["grid", "codebook"] if variant == "auto" else [variant]
    chosen: list[tuple[Point, str]] = []
    for var in variants:
        def evaluate(code: int, var: str = var) -> Point:
            delta = float(steps_from_codes([code])[0])
            mu = lam if lam is not None else hbar * delta * delta * math.log(2.0) / 6.0
            return _point(xs, hs, code, mu, var, scale)
        start = None
        if lam is not None:
            guess = code_at_most(math.sqrt(6.0 * lam / (hbar * math.log(2.0))))
            start = int(np.clip(np.searchsorted(codes, guess), 0, len(codes) - 1))
        p, _ = search_monotone(codes, evaluate, bits=target, lam=lam, start=start)
        if target is not None and p.r <= target:
            p = _fine_tune(xs, hs, scale, codes, p, target, hbar, var)
        chosen.append((p, var))
    p, var = best_variant(chosen, lam=lam, target=target)
    precs = (["float16", "float32"] if (precision == "auto" and var == "codebook") else
             [precision if precision != "auto" else "float16"])
    results = [_finish(w, h, shape, dtype, p.key, p.state, var, prec) for prec in precs]
    if all(r is None for r in results):  # float16 cannot hold the codebook: float32 can
        results.append(_finish(w, h, shape, dtype, p.key, p.state, var, "float32"))
    return least_distortion(results)

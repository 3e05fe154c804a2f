"""Hessian-weighted scalar k-means (Choi et al. 2017; Gong et al. 2014's scalar k-means), for
mode ``kmeans`` (spec §7.7): one codebook per group of consecutive rows, entropy-coded indices.

Weights ``w`` with importance ``h`` minimise ``sum h (w - c_a(w))^2``: assignment is to the
nearest centre (h is a per-weight scalar), centres are h-weighted means. In one dimension the
clusters are intervals of the sorted weights, so each Lloyd iteration costs O(K log N) on
cumulative sums. Initialisation: h-weighted quantiles (deterministic). The codebook size of each
group is chosen by rate (a bits target, bisecting one multiplier over the groups) or by a
Lagrange multiplier ``lam`` (min D + lam R).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ...format.dtypes import round_binary32, storage_to_float64
from ..base import row_view
from ..importance import full_importance
from ..rd import (Point, Result, allocate, counts_bits, entropy_bits, least_distortion, measured,
                  weighted_distortion)
from ..streams import PRECISIONS
from .format import MAX_GROUPS, write

K_GRID = sorted({1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128,
                 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 2048, 2560, 3072,
                 4096})
MAX_ITERS = 60
F16_MAX = 65504.0


class _Sorted:
    """One group's weights sorted, with cumulative sums of h, h*w, h*w^2 and counts."""

    def __init__(self, w: np.ndarray, h: np.ndarray):
        order = np.argsort(w, kind="stable")
        self.x = w[order]
        hh = h[order]
        if not np.any(hh > 0):
            hh = np.ones_like(hh)
        hh = np.maximum(hh, 1e-12 * float(hh.max()))  # dead inputs still pull a little (no 0/0)
        self.h = hh
        self.ch = np.concatenate([[0.0], np.cumsum(hh)])
        self.chx = np.concatenate([[0.0], np.cumsum(hh * self.x)])
        self.chx2 = np.concatenate([[0.0], np.cumsum(hh * self.x * self.x)])
        self.n = len(self.x)

    def edges(self, c: np.ndarray) -> np.ndarray:
        """Cluster boundaries (indices into the sorted weights) for sorted centres ``c``."""
        cut = np.searchsorted(self.x, 0.5 * (c[1:] + c[:-1]), side="right")
        return np.concatenate([[0], cut, [self.n]])

    def stats(self, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        sw = self.ch[e[1:]] - self.ch[e[:-1]]
        swx = self.chx[e[1:]] - self.chx[e[:-1]]
        swx2 = self.chx2[e[1:]] - self.chx2[e[:-1]]
        return sw, swx, swx2, np.diff(e)

    def lloyd(self, k: int) -> np.ndarray:
        """Weighted k-means centres (sorted, distinct) for ``k`` clusters."""
        targets = (np.arange(k) + 0.5) / k * self.ch[-1]
        idx = np.clip(np.searchsorted(self.ch[1:], targets), 0, self.n - 1)
        c = np.unique(self.x[idx])
        for _ in range(MAX_ITERS):
            sw, swx, _, cnt = self.stats(self.edges(c))
            keep = cnt > 0
            new = swx[keep] / sw[keep]
            new = np.unique(new)
            if len(new) == len(c) and np.allclose(new, c, rtol=0, atol=1e-12 * (abs(c).max() + 1e-30)):
                c = new
                break
            c = new
        return c

    def point(self, k: int) -> Point:
        """Curve point of codebook size ``k``: (D, estimated bits) with float64 centres."""
        c = self.lloyd(min(k, self.n))
        sw, swx, swx2, cnt = self.stats(self.edges(c))
        d = float(np.sum(swx2 - 2 * c * swx + c * c * sw))
        r = entropy_bits(cnt) + counts_bits(cnt) + 16 * len(c) + 8 * 32
        return Point(len(c), max(d, 0.0), r, c)


def _finish_codebook(c: np.ndarray, x: np.ndarray, h: np.ndarray, dtype: str, precision: str):
    """Centres stored in ``precision``, merged where the dtype rounds them together, the weights
    assigned to the nearest reconstruction, unused entries dropped. Returns (stored values,
    symbols, reconstruction of each weight, distortion)."""
    stored = c.astype(PRECISIONS[precision]).astype(np.float64)
    recon_vals = storage_to_float64(dtype, round_binary32(dtype, stored.astype(np.float32)))
    recon_vals, first = np.unique(recon_vals, return_index=True)
    stored = stored[first]
    sym = np.searchsorted(0.5 * (recon_vals[1:] + recon_vals[:-1]), x, side="right") if len(stored) > 1 \
        else np.zeros(x.shape, dtype=np.int64)
    used = np.bincount(sym.reshape(-1), minlength=len(stored)) > 0
    remap = np.cumsum(used) - 1
    stored, recon_vals = stored[used], recon_vals[used]
    sym = remap[sym]
    rec = recon_vals[sym]
    return stored, sym, rec, float(np.sum(h * (rec - x) ** 2))


def encode(values: np.ndarray, dtype: str, imp: np.ndarray, *, bits: Optional[float] = None,
           lam: Optional[float] = None, groups: int = 1, precision: str = "auto") -> Result:
    """Mode ``kmeans`` for float64 ``values`` (>= 1 dimension) of dtype ``dtype`` with
    importance ``imp`` (broadcastable to the [n, m] row view). ``bits``: target bits per weight
    (whole tensor, its bytes in the file); else ``lam``. ``groups``: codebooks over that many
    runs of consecutive rows. ``precision``: ``float16``, ``float32`` or ``auto`` (float16 unless
    it costs more than 0.5% of distortion)."""
    w2 = np.asarray(values, dtype=np.float64).reshape(row_view(np.shape(values)))
    n, m = w2.shape
    h2 = full_importance(imp, n, m)
    g = max(1, min(int(groups), n, MAX_GROUPS))
    bounds = [n * i // g for i in range(g + 1)]
    sorted_groups = [_Sorted(w2[a:b].reshape(-1), h2[a:b].reshape(-1)) for a, b in zip(bounds, bounds[1:])]
    curves = []
    for sg in sorted_groups:
        pts, seen = [], set()
        for k in K_GRID:
            if k > sg.n:
                break
            p = sg.point(k)
            if p.key not in seen:
                seen.add(p.key)
                pts.append(p)
        curves.append(pts)
    target = None if bits is None else bits * w2.size - 8 * 24  # params and their keys
    pick = allocate(curves, bits=target, lam=lam)

    def stored_as(prec: str) -> Optional[Result]:
        if prec == "float16" and any(np.abs(p.state).max() > F16_MAX for p in pick):
            return None
        books, syms, recon = [], [], np.empty_like(w2)
        for (a, b), p in zip(zip(bounds, bounds[1:]), pick):
            stored, sym, rec, _ = _finish_codebook(p.state, w2[a:b], h2[a:b], dtype, prec)
            books.append(stored)
            syms.append(sym)
            recon[a:b] = rec
        encoded = write(syms, books, precision=prec)
        return measured(encoded,
                      weighted_distortion(recon, w2, h2), recon.reshape(np.shape(values)),
                      {"codebook_sizes": [len(bk) for bk in books], "precision": prec})
    return least_distortion(stored_as(prec) for prec in (["float16", "float32"] if precision == "auto"
                                                          else [precision]))

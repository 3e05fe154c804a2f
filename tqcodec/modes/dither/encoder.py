"""Subtractive dithered uniform quantization (Choi et al. 2019, "universal" quantization), for
mode ``dither`` (spec §7.9), on the scalar lattice or the hexagonal lattice A2.

With the dither u of §7.9.3 (SplitMix64 seeded by a hash of the tensor's name), the encoder takes
the lattice point P nearest to ``x + u`` and the decoder outputs ``P - u``: the error is uniform
over the lattice's Voronoi cell and independent of the weights, whatever their distribution.
The nearest point is Euclidean (importance does not enter the rounding: the property needs it);
importance only weighs the distortion that picks the step. The step is chosen by a bits target
(binary search over step codes) or a Lagrange multiplier (local search).
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import numpy as np

from ... import limits as L
from ...format.dtypes import round_binary64, storage_to_float64
from ...format.steps import STEP_CODE_MIN, code_at_most, steps_from_codes
from ..importance import full_importance
from .format import H, numerators, splitmix64, write
from .format import values as lattice_values
from ..rd import (Point, Result, best_variant, counts_bits, entropy_bits, measured, search_monotone,
                     step_codes, weighted_distortion)


def seed_for(name: str) -> int:
    """The reference encoder's seed: the first 8 bytes (little-endian) of SHA-256 of the name."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def _scalar(x: np.ndarray, t1: np.ndarray, delta: float) -> tuple[list[np.ndarray], np.ndarray]:
    """Levels of ``x`` and their reconstruction (float64, exact as §7.9.3)."""
    u = t1 * (delta * 2.0 ** -22)
    q = np.clip(np.rint((x + u) / delta), -L.MAX_LEVEL, L.MAX_LEVEL).astype(np.int64)
    return [q], q * delta - u


def _hex(x: np.ndarray, t1: np.ndarray, t2: np.ndarray, delta: float) -> tuple[list[np.ndarray], np.ndarray]:
    """Coordinates (a, b) (spec §7.9.3: the point Δ(a + (b&1)/2, b√3/2)) of the A2 point nearest
    to each pair plus its dither, and the pairs' reconstruction (float64, C order, ``len(x)``)."""
    numel = len(x)
    pairs = np.zeros((len(t1), 2))
    pairs.reshape(-1)[:numel] = x  # an odd tail pairs its element with 0 (its y is discarded)
    alpha, beta = t1 * 2.0 ** -22, t2 * 2.0 ** -22
    hh = H
    px = pairs[:, 0] + (alpha + 0.5 * beta) * delta
    py = pairs[:, 1] + beta * hh * delta
    b0 = np.floor(py / (hh * delta))
    best_a = best_b = None
    best_d = None
    for b in (b0, b0 + 1):
        odd = np.mod(b, 2.0)  # spec §7.9.3: odd rows are shifted by half a step
        a = np.rint(px / delta - 0.5 * odd)
        dx = px - (a + 0.5 * odd) * delta
        dy = py - b * hh * delta
        dist = dx * dx + dy * dy
        if best_d is None:
            best_a, best_b, best_d = a, b, dist
        else:
            take = dist < best_d
            best_a = np.where(take, a, best_a)
            best_b = np.where(take, b, best_b)
            best_d = np.where(take, dist, best_d)
    a = np.clip(best_a, -L.MAX_LEVEL, L.MAX_LEVEL).astype(np.int64)
    b = np.clip(best_b, -L.MAX_LEVEL, L.MAX_LEVEL).astype(np.int64)
    rx = (a + 0.5 * (b & 1) - alpha - 0.5 * beta) * delta
    ry = (b - beta) * delta * hh
    rec = np.stack([rx, ry], axis=1).reshape(-1)[:numel]
    return [a, b], rec


def _rate(coords: list[np.ndarray]) -> float:
    bits = 0.0
    for c in coords:
        counts = np.bincount(c - c.min())
        bits += entropy_bits(counts) + counts_bits(counts) + (8 * 36 if len(counts) > 1 else 0)
    return bits + 8 * 40


def encode(values: np.ndarray, dtype: str, imp: np.ndarray, *, bits: Optional[float] = None,
           lam: Optional[float] = None, lattice: str = "auto", seed: Optional[int] = None,
           name: str = "") -> Result:
    """Mode ``dither`` for float64 ``values`` (any shape) of dtype ``dtype`` with importance
    ``imp`` (broadcastable to the [n, m] row view). ``bits``: target bits per weight; else
    ``lam``. ``lattice``: ``scalar``, ``hex`` or ``auto`` (the better); ``seed``: default
    :func:`seed_for` of ``name``."""
    shape = np.shape(values)
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    n = shape[0] if len(shape) else 1
    h = full_importance(imp, n, x.size // max(n, 1)).reshape(-1)
    seed = seed_for(name) if seed is None else int(seed) & ((1 << 64) - 1)
    t_el, _ = numerators(splitmix64(seed, 0, x.size))
    t_p1, t_p2 = numerators(splitmix64(seed, 0, (x.size + 1) // 2))
    # subtractive dither errs by up to half a step whatever the input: a tensor of zeros (one step
    # code, the coarsest, for the other modes) would come back as noise of ~1e7; the finest step
    # keeps it within 2^-41
    codes = step_codes(x) if np.any(x) else [STEP_CODE_MIN]
    hbar = float(np.mean(h)) if h.size and np.mean(h) > 0 else 1.0
    target = None if bits is None else bits * x.size
    chosen = []
    for lat in (["scalar", "hex"] if lattice == "auto" else [lattice]):
        def evaluate(code: int, lat: str = lat) -> Point:
            delta = float(steps_from_codes([code])[0])
            coords, rec = _scalar(x, t_el, delta) if lat == "scalar" else _hex(x, t_p1, t_p2, delta)
            return Point(code, float(np.sum(h * (rec - x) ** 2)), _rate(coords))
        start = None
        if lam is not None:
            guess = code_at_most(math.sqrt(6.0 * lam / (hbar * math.log(2.0))))
            start = int(np.clip(np.searchsorted(codes, guess), 0, len(codes) - 1))
        p, _ = search_monotone(codes, evaluate, bits=target, lam=lam, start=start)
        chosen.append((p, lat))
    p, lat = best_variant(chosen, lam=lam, target=target)
    delta = float(steps_from_codes([p.key])[0])
    if lat == "scalar":
        coords, _ = _scalar(x, t_el, delta)
    else:
        coords, _ = _hex(x, t_p1, t_p2, delta)
    encoded = write(coords, step=p.key, seed=seed, lattice=lat)
    r64 = lattice_values(lat, coords, p.key, seed, x.size)  # the decoder's exact arithmetic
    recon = storage_to_float64(dtype, round_binary64(dtype, r64)).reshape(shape)
    return measured(encoded,
                  weighted_distortion(recon, x.reshape(shape), h.reshape(shape)), recon,
                  {"lattice": lat, "step": p.key, "seed": seed})

"""The ``tq`` encoder for a whole model: statistics -> units -> one-lambda allocation -> mode
``tq`` params and streams (spec §7.5). Arrays in, encoded tensors out; the caller measures the
real container size through ``size_of`` so that a bits target holds for the whole file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import numpy as np

from ..modes import tq as tq_mode
from ..steps import steps_from_codes
from .allocation import Unit, bisect_lambda, build_curves, choose, fill, refine, totals

BAND_SHARE = 24  # a tensor holding more than 1/24 of the weights is cut into row bands (own step
MAX_BANDS = 8    # and table each), at most 8: finer rate control and per-band steps
EMBED_BANDS = 64  # embedding tables: up to 64 bands of rows, so rarely used tokens can get coarser steps
EMBED_FLOOR = 0.05  # unseen tokens weigh this fraction of the mean token frequency


@dataclass
class Item:
    """One tensor offered to the tq encoder: float64 ``values`` and its dtype name."""

    name: str
    dtype: str
    values: np.ndarray


def _h_fits(h: Optional[np.ndarray], n: int, m: int) -> bool:
    return h is not None and h.ndim == 3 and h.shape[1] == h.shape[2] == m and n % h.shape[0] == 0


def make_units(items: list[Item], stats) -> tuple[list[Unit], dict[str, str]]:
    """Units for the tensors tq codes, and each unit's layout. Tensors left out (1-D without a
    measured gain, small tensors without statistics, running variances) go to the data-free path."""
    units: list[Unit] = []
    layouts: dict[str, str] = {}
    known = [s.gain for s in stats.tensors.values()] if stats is not None else []
    total = sum(it.values.size for it in items)
    band_size = max(1, total // BAND_SHARE)
    default_gain = max(known) if known else 1.0
    for it in items:
        v = it.values
        st = stats.get(it.name) if stats is not None else None
        if "running_var" in it.name or "running_mean" in it.name or v.size == 0:
            continue
        if st is not None and st.kind == "plain":
            units.append(Unit(band_name(it.name, 0), v.reshape(v.shape[0] if v.ndim else 1, -1), None, None, st.gain))
            layouts[it.name] = "out_in"
            continue
        if v.ndim < 2:
            continue
        layout = st.layout if st is not None and v.ndim == 2 else "out_in"
        w2 = v.T if layout == "in_out" else v.reshape(v.shape[0], -1)
        w2 = np.ascontiguousarray(w2)
        h = rw = None
        gain = default_gain
        if st is not None:
            gain = st.gain
            if st.kind == "embedding" and st.counts is not None and len(st.counts) == w2.shape[0]:
                c = np.asarray(st.counts, dtype=np.float64)
                c = c + EMBED_FLOOR * max(float(c.mean()), 1e-12)
                rw = c / c.sum()
            elif _h_fits(st.h, *w2.shape):
                h = np.asarray(st.h, dtype=np.float64)
        cap, size = (EMBED_BANDS, band_size // 8) if rw is not None else (MAX_BANDS, band_size)
        nb = 1 if h is not None and h.shape[0] > 1 else max(1, min(cap, w2.shape[0], -(-w2.size // max(size, 1))))
        bounds = [w2.shape[0] * i // nb for i in range(nb + 1)]
        shared = {"w": w2} if nb > 1 and h is not None else None
        for b in range(nb):
            r0, r1 = bounds[b], bounds[b + 1]
            units.append(Unit(band_name(it.name, b), w2[r0:r1], h, None if rw is None else rw[r0:r1], gain,
                              shared=shared, r0=r0))
            units[-1].h_mean = st.mean if (h is not None and st.mean is not None) else None
        layouts[it.name] = layout
    return units, layouts


def band_name(name: str, b: int) -> str:
    return f"{name}\x00{b}"


def parent(unit_name: str) -> str:
    return unit_name.split("\x00", 1)[0]


def _levels(u: Unit, code: int) -> np.ndarray:
    lv = u.levels.get(code)
    return u.quantize(code, True) if lv is None else lv


def encode_tensor(bands: list[Unit], codes: list[int], layout: str) -> tuple[dict, list]:
    """Mode tq params/streams of one tensor from its row bands (no transform)."""
    return tq_mode.encode([_levels(u, c) for u, c in zip(bands, codes)], codes, layout=layout)


def reconstruction(u: Unit, code: int) -> np.ndarray:
    """What the decoder rebuilds for a band (float64, in the unit's [rows, m] view)."""
    return _levels(u, code) * float(steps_from_codes([code])[0])


def _bias_pairs(units: list[Unit], stats, layouts: Mapping[str, str]) -> list:
    """(weight bands, bias bands) of weights whose input mean is known and whose bias is a unit."""
    by_parent: dict[str, list[Unit]] = {}
    for u in units:
        by_parent.setdefault(parent(u.name), []).append(u)
    pairs = []
    if stats is None:
        return pairs
    for name, bands in by_parent.items():
        mu = bands[0].h_mean
        if not name.endswith("weight") or mu is None or layouts.get(name) != "out_in":
            continue
        bias = by_parent.get(name[:-len("weight")] + "bias")
        n = sum(b.w.shape[0] for b in bands)
        if bias and sum(b.w.size for b in bias) == n and mu.shape[1] == bands[0].w.shape[1] \
                and n % mu.shape[0] == 0:
            pairs.append((bands, bias))
    return pairs


def _correct_biases(pairs: list, originals: Mapping[int, np.ndarray], pick: Mapping[str, int]) -> None:
    """Bias correction: b' = b - (W_hat - W) E[x] removes the mean output error each quantized
    weight causes (encoder-only; the corrected bias is then quantized as usual)."""
    for bands, bias in pairs:
        st_mean = bands[0].h_mean
        err = np.concatenate([reconstruction(u, pick[u.name]) - u.w for u in bands])  # [n, m]
        g = st_mean.shape[0]
        shift = np.einsum("gij,gj->gi", err.reshape(g, -1, err.shape[1]), st_mean).reshape(-1)
        r0 = 0
        for b in bias:
            k = b.w.shape[0]
            b.w = originals[id(b)] - shift[r0:r0 + k].reshape(b.w.shape)
            b.levels.clear()
            r0 += k


def encode_model(items: list[Item], stats, *, bits: Optional[float] = None, quality: Optional[float] = None,
                 total_params: int, size_of: Callable[[dict], int], tolerance: float = 0.015,
                 progress: Optional[Callable[[str, int, int], None]] = None) -> dict[str, tuple[str, dict, list]]:
    """Encode ``items``: returns ``{name: ("tq", params, streams)}`` for the tensors tq codes.

    ``bits``: whole-file bits per parameter (``size_of(encoded)`` gives the real file bytes for a
    candidate result; the budget is corrected by the measured overhead until the file lands within
    ``tolerance``). ``quality``: predicted output SNR in dB (output power over the summed
    distortion estimate; without statistics, weight SNR). Neither: quality 40 dB.
    """
    units, layouts = make_units(items, stats)
    if not units:
        return {}
    feedback = stats is not None
    build_curves(units, feedback=False)

    def rate(pick: Mapping[str, int]) -> float:
        return totals(units, dict(pick))[1]

    def dist(pick: Mapping[str, int]) -> float:
        return totals(units, dict(pick))[0]

    corrections = _bias_pairs(units, stats, layouts)
    originals = {id(b): b.w for _, bands in corrections for b in bands}

    def result(pick: Mapping[str, int]) -> dict[str, tuple[str, dict, list]]:
        _correct_biases(corrections, originals, pick)
        out = {}
        by_parent: dict[str, list[Unit]] = {}
        for u in units:
            by_parent.setdefault(parent(u.name), []).append(u)
        for i, (name, bands) in enumerate(by_parent.items()):
            params, streams = encode_tensor(bands, [pick[u.name] for u in bands], layouts[name])
            out[name] = ("tq", params, streams)
            if progress:
                progress(name, i + 1, len(by_parent))
        return out

    if bits is None:
        q = 40.0 if quality is None else float(quality)
        power = stats.output_power if stats is not None and stats.output_power > 0 else None
        if power is None:
            power = sum(u.gain * float(np.sum(u.w * u.w)) for u in units)
        target = power * 10.0 ** (-q / 10.0)
        lam, pick = bisect_lambda(units, dist, target, increasing=True)
        if feedback:
            refine(units, pick, 3)
            lam, pick = bisect_lambda(units, dist, target, increasing=True)
            refine(units, pick, 0)
        return result(pick)

    target_bits = float(bits) * total_params
    overhead = 0.0  # measured bits outside the units' estimates (header, manifest, other tensors)
    best = None
    for attempt in range(5):
        budget = max(target_bits - overhead, 1.0)
        lam, pick = bisect_lambda(units, rate, budget, increasing=False)
        if feedback:
            refine(units, pick, 2)
            lam, pick = bisect_lambda(units, rate, budget, increasing=False)
            refine(units, pick, 0)  # the chosen points themselves are exact
            pick = choose(units, lam)
            refine(units, pick, 0)
        pick = fill(units, pick, budget)
        enc = result(pick)
        actual = 8.0 * size_of(enc)
        err = actual / target_bits - 1.0
        if best is None or abs(err) < abs(best[0]):
            best = (err, enc)
        if abs(err) <= tolerance:
            break
        overhead = actual - rate(pick)
    return best[1]

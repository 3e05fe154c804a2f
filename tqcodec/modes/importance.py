"""Per-weight importance for the encoders of modes ecsq, kmeans, pq and dither: the diagonal of the layer's input second
moment E[x x^T] (Choi et al. 2017's Hessian weighting, from ``tqcodec.Stats``) times the layer's
measured gain, so that ``sum(h * e^2)`` is in the units of the ``tq`` encoder's distortion
``gain * tr(E H E^T)`` (spec-free encoder choice). Without statistics every weight weighs 1.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .tq.encoder import usable_h
from .tq.tokens import floored_counts


def default_gain(stats: Any) -> float:
    """The gain of a tensor the statistics do not cover: the largest measured one (as ``tq``)."""
    if stats is None:
        return 1.0
    known = [s.gain for s in stats.tensors.values()]
    return max(known) if known else 1.0


def importance(name: str, shape: tuple[int, ...], stats: Any, values: Optional[np.ndarray] = None) -> np.ndarray:
    """Importance of each weight of tensor ``name`` in its row view [n, m] (spec §7.S.1: n =
    shape[0]), as an array broadcastable to [n, m] (float64, >= 0).

    - linear/conv weights whose H fits: ``gain * diag(H_g)[j]`` for column j of a row in group g
      (``out_in``); for an ``in_out`` 2-D weight (stored [in, out]) row j weighs ``gain * H[j, j]``;
    - embeddings with token counts: ``gain * frequency`` of each row (floored as ``tq`` does;
      ``values``, the tensor, lets unseen tokens near the seen ones weigh more);
    - anything else: the gain (1 without statistics).
    """
    n = int(shape[0]) if shape else 1
    numel = 1
    for d in shape:
        numel *= int(d)
    m = numel // n if n else 0
    st = stats.get(name) if stats is not None else None
    if st is None:
        return np.full((1, 1), default_gain(stats))
    gain = float(st.gain)
    if st.kind == "embedding" and st.counts is not None and len(st.counts) == n:
        c = floored_counts(st.counts, None if values is None else np.asarray(values).reshape(n, -1))
        return (gain * c / c.sum())[:, None]
    if st.kind == "rows" and getattr(st, "row_h", None) is not None and len(st.row_h) == n:
        rh = np.asarray(st.row_h, dtype=np.float64)
        return (gain * rh)[:, None] if np.isfinite(rh).all() and rh.sum() > 0 else np.full((1, 1), gain)
    h: Optional[np.ndarray] = None if st.h is None else np.asarray(st.h, dtype=np.float64)
    if h is None or h.ndim != 3 or h.shape[1] != h.shape[2]:
        return np.full((1, 1), gain)
    h = usable_h(h, st.rows)
    if h is None:
        return np.full((1, 1), gain)
    g, d, _ = h.shape
    diag = np.clip(np.stack([np.diag(h[i]) for i in range(g)]), 0.0, None)  # [g, d]
    if st.layout == "in_out" and len(shape) == 2 and g == 1 and d == n:
        return gain * diag[0][:, None]
    if d == m and n % g == 0:
        return gain * np.repeat(diag, n // g, axis=0)  # [n, m]
    return np.full((1, 1), gain)


def full_importance(imp: np.ndarray, n: int, m: int) -> np.ndarray:
    """``imp`` broadcast to [n, m] (a real array)."""
    return np.ascontiguousarray(np.broadcast_to(np.asarray(imp, dtype=np.float64), (n, m)))

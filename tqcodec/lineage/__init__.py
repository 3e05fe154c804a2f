"""Encoders (arrays only, no files) for the lineage coding modes of spec §7.6-§7.9
(``spec/mode-lineage.md``): ``ecsq`` (Choi'17 entropy-constrained scalar quantization),
``kmeans`` (Choi'17 Hessian-weighted k-means), ``pq`` (Gong'14 product quantization) and
``dither`` (Choi'19 subtractive dithered quantization, scalar or hexagonal lattice).

Each module's ``encode(values, dtype, imp, *, bits=None, lam=None, ...)`` takes float64 weights,
their importance (``importance.importance``: diagonal input second moments times the layer's
gain, 1 without statistics) and a rate target in bits per weight or a Lagrange multiplier, and
returns a :class:`common.Result`: params and streams for ``tqcodec.modes``, the measured rate and
weighted distortion, and the exact reconstruction. Deterministic: fixed seeds, stable sorts.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import dither, ecsq, kmeans, pq
from .common import Result, lam_for_snr
from .importance import importance

ENCODERS = {"ecsq": ecsq, "kmeans": kmeans, "pq": pq, "dither": dither}
ROW_MODES = ("kmeans", "pq")  # need at least one dimension (spec §7.7, §7.8)


def encode_tensor(mode: str, name: str, values: np.ndarray, dtype: str, stats: Any = None, *,
                  bits: Optional[float] = None, lam: Optional[float] = None, snr_db: float = 40.0,
                  imp: Optional[np.ndarray] = None) -> Result:
    """Encode one tensor in ``mode`` (one of :data:`ENCODERS`). Importance from ``stats`` (or
    ``imp``); ``bits`` per weight, else ``lam``, else the multiplier of a weighted SNR target
    ``snr_db`` (:func:`common.lam_for_snr`)."""
    if mode not in ENCODERS:
        raise ValueError(f"not a lineage mode: {mode!r}")
    v = np.asarray(values, dtype=np.float64)
    if mode in ROW_MODES and v.ndim == 0:
        v = v.reshape(1)
    h = importance(name, v.shape, stats) if imp is None else imp
    if bits is None and lam is None:
        n = v.shape[0] if v.ndim else 1
        lam = lam_for_snr(v.reshape(n, -1), h, snr_db)
    kw = {"name": name} if mode == "dither" else {}
    res = ENCODERS[mode].encode(v, dtype, h, bits=bits, lam=lam, **kw)
    res.recon = res.recon.reshape(np.shape(values))
    return res


__all__ = ["ENCODERS", "Result", "encode_tensor", "importance"]

"""The classic quantizers as coding modes: ``ecsq`` (Choi'17 entropy-constrained scalar
quantization), ``kmeans`` (Choi'17 Hessian-weighted k-means), ``pq`` (Gong'14 product
quantization) and ``dither`` (Choi'19 subtractive dithered quantization), spec §7.6-§7.9.

:func:`encode_classic` encodes one tensor in one of them: importance from the calibration
statistics (``tqcodec.modes.importance``), a rate target in bits per weight, a Lagrange
multiplier, or a weighted SNR target."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..modes.dither import encoder as dither
from ..modes.ecsq import encoder as ecsq
from ..modes.importance import importance
from ..modes.kmeans import encoder as kmeans
from ..modes.pq import encoder as pq
from ..modes.rd import Result, lam_for_snr

CLASSIC_MODES = ("ecsq", "kmeans", "pq", "dither")
ENCODERS = {"ecsq": ecsq, "kmeans": kmeans, "pq": pq, "dither": dither}
ROW_MODES = ("kmeans", "pq")  # need at least one dimension (spec §7.7, §7.8)
KMEANS_GROUP_ELEMENTS = 8192  # kmeans: a codebook per group of rows of about this many weights, at most 8:
KMEANS_MAX_GROUPS = 8         # the rate then moves in steps a few times finer than one codebook's sizes


def encode_classic(mode: str, name: str, values: np.ndarray, dtype: str, stats: Any = None, *,
                   bits: Optional[float] = None, lam: Optional[float] = None, snr_db: float = 40.0,
                   imp: Optional[np.ndarray] = None) -> Result:
    """Encode one tensor in ``mode`` (one of :data:`CLASSIC_MODES`). Importance from ``stats``
    (or ``imp``); ``bits`` per weight, else ``lam``, else the multiplier of a weighted SNR target
    ``snr_db`` (:func:`tqcodec.modes.rd.lam_for_snr`)."""
    if mode not in ENCODERS:
        raise ValueError(f"not one of the classic modes: {mode!r}")
    v = np.asarray(values, dtype=np.float64)
    if mode in ROW_MODES and v.ndim == 0:
        v = v.reshape(1)
    h = importance(name, v.shape, stats, v) if imp is None else imp
    if bits is None and lam is None:
        n = v.shape[0] if v.ndim else 1
        lam = lam_for_snr(v.reshape(n, -1), h, snr_db)
    kw = {"name": name} if mode == "dither" else {}
    if mode == "kmeans":
        kw["groups"] = max(1, min(KMEANS_MAX_GROUPS, v.size // KMEANS_GROUP_ELEMENTS, v.shape[0]))
    res = ENCODERS[mode].encode(v, dtype, h, bits=bits, lam=lam, **kw)
    res.recon = res.recon.reshape(np.shape(values))
    return res

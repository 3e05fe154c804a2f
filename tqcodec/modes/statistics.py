"""What the encoders need of calibration statistics, checked: the values no encoder can weigh
errors by are refused (``BAD_OPTION`` naming the tensor) before any work. Statistics are read by
duck typing (``tqcodec.model.stats.TensorStats`` and ``Stats`` are the usual ones): ``gain``, ``h``,
``mean``, ``counts``, ``row_h`` per tensor; ``output_power``, ``default_gain`` and ``tensors``
for the whole set.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import fail


def _non_negative_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(x) and x >= 0


def check_tensor_stats(name: str, s: Any) -> None:
    """Refuse (``TqzError`` ``BAD_OPTION`` naming the tensor) statistics no encoder can weigh
    errors by: NaN or infinity in ``h``, ``mean``, ``counts`` or ``row_h``, a gain that is not a
    finite number >= 0, negative token counts or channel powers (``row_h``), a negative diagonal
    entry of ``h`` (a second moment below 0; H slightly indefinite off its diagonal is fine). Degenerate but
    valid statistics (H = 0, rank-deficient, 1e12 between columns, a handful of samples) pass:
    the encoders handle them."""
    gain = s.gain
    if not _non_negative_number(gain):
        raise fail("BAD_OPTION", f"statistics of {name!r}: gain {gain!r} is not a finite number >= 0")
    for part in ("h", "mean", "counts", "row_h"):
        a = getattr(s, part, None)
        if a is None:
            continue
        a = np.asarray(a, dtype=np.float64)
        if not np.isfinite(a).all():
            raise fail("BAD_OPTION", f"statistics of {name!r}: {part} holds NaN or Inf")
        if part in ("counts", "row_h") and (a < 0).any():
            raise fail("BAD_OPTION", f"statistics of {name!r}: {part} holds a negative value")
        if part == "h" and a.ndim >= 2 and a.shape[-1] == a.shape[-2] and (np.diagonal(a, axis1=-2, axis2=-1) < 0).any():
            # E[x_j^2] < 0: no input makes it (an off-diagonal rounding below zero is fine)
            raise fail("BAD_OPTION", f"statistics of {name!r}: h has a negative diagonal entry")


def check_stats_scalars(stats: Any) -> None:
    """Refuse (``BAD_OPTION``) an output power or any tensor's gain that is not a finite number
    >= 0, naming the tensor (reads no arrays of a lazily opened file)."""
    power = getattr(stats, "output_power", 0.0)
    if not _non_negative_number(power):
        raise fail("BAD_OPTION", f"statistics: output power {power!r} is not a finite number >= 0")
    tensors = getattr(stats, "tensors", None)
    gain_items = getattr(tensors, "gain_items", None)  # a lazily opened file: gains from its header
    named = (gain_items() if gain_items is not None
             else ((n, t.gain) for n, t in tensors.items()) if isinstance(tensors, Mapping) else ())
    for name, gain in named:
        if not _non_negative_number(gain):
            raise fail("BAD_OPTION", f"statistics of {name!r}: gain {gain!r} is not a finite number >= 0")
    default = getattr(stats, "default_gain", None)
    if default is not None and not _non_negative_number(default):
        raise fail("BAD_OPTION", f"statistics: default gain {default!r} is not a finite number >= 0")

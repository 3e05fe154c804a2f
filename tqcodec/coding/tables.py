"""Frequency tables for the range coder (informative algorithm of spec §8.6).

Any table with every entry >= 1 summing to 2^24 is valid; this is the deterministic way the
encoder builds one from symbol counts (integer arithmetic only, so the same counts always give
the same table on every machine).
"""
from __future__ import annotations

import numpy as np

from .rangecoder import TOTAL


def frequencies_from_counts(counts: np.ndarray) -> np.ndarray:
    """A table (uint32, each >= 1, sum 2^24) close to ``counts`` (non-negative ints, len >= 2).

    Each symbol gets 1 plus its share of the remaining 2^24 - A, floored; the leftover goes one
    unit at a time to the symbols with the largest remainders (ties: smaller index first).
    """
    c = np.asarray(counts, dtype=np.int64)
    if c.ndim != 1 or len(c) < 2 or len(c) > TOTAL // 2 or c.min() < 0:
        raise ValueError("counts must be a 1-D array of >= 2 non-negative integers")
    total = int(c.sum())
    free = TOTAL - len(c)
    if total == 0:
        c = np.ones_like(c)
        total = len(c)
    # exact integer shares: c * free may exceed 2^63 only for totals far beyond any tensor
    if total > (1 << 62) // free:
        raise ValueError("counts too large")
    share = c * free
    base = share // total
    rem = share - base * total
    left = free - int(base.sum())
    freqs = base + 1
    if left:
        order = np.lexsort((np.arange(len(c)), -rem))
        freqs[order[:left]] += 1
    return freqs.astype(np.uint32)

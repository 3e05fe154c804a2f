"""Exact dyadic quantization step sizes (spec §7.1, "Step codes").

A step is signalled as an integer Step_Code ``s`` and is the exact binary number

    step(s) = (4 + (s & 3)) * 2^((s >> 2) - 2)

(``>>`` is an arithmetic shift, i.e. floor division by 4), the form of NNR's
quantization parameter with qp_density 2. Consecutive codes differ by a factor of
5/4, 6/5, 7/6 or 8/7; four codes make one octave. Every step is exactly
representable in float32 for codes in [STEP_CODE_MIN, STEP_CODE_MAX].
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import fail

# spec §12: allowed Step_Code range. step(-160) = 2^-40, step(103) ~ 1.1e8.
STEP_CODE_MIN = -160
STEP_CODE_MAX = 103
MAX_CODED_MAGNITUDE = math.ldexp(4 + (STEP_CODE_MAX & 3), (STEP_CODE_MAX >> 2) - 2) * 32000
"""Encoder-only: the largest magnitude the lossy modes code (about 1.9e12): beyond it even the
coarsest step would need more than 65536 levels."""


def step_from_code(code: int) -> float:
    """The exact step size of ``code`` (spec §7.1); BAD_STEP if out of range."""
    if not isinstance(code, (int, np.integer)) or isinstance(code, bool):
        raise fail("BAD_STEP", f"step code {code!r} is not an integer")
    code = int(code)
    if not STEP_CODE_MIN <= code <= STEP_CODE_MAX:
        raise fail("BAD_STEP", f"step code {code} outside [{STEP_CODE_MIN}, {STEP_CODE_MAX}]")
    return math.ldexp(4 + (code & 3), (code >> 2) - 2)


def steps_from_codes(codes: np.ndarray) -> np.ndarray:
    """Vectorised :func:`step_from_code` -> float64 array (exact)."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size and (codes.min() < STEP_CODE_MIN or codes.max() > STEP_CODE_MAX):
        raise fail("BAD_STEP", f"step codes outside [{STEP_CODE_MIN}, {STEP_CODE_MAX}]")
    return np.ldexp((4 + (codes & 3)).astype(np.float64), ((codes >> 2) - 2).astype(np.int64))


def code_at_most(step: float) -> int:
    """The largest code whose step is <= ``step`` (clamped to the allowed range)."""
    if not math.isfinite(step) or step <= 0:
        return STEP_CODE_MIN
    exponent = math.floor(math.log2(step))
    base = 4 * (exponent)  # code whose step is exactly 2^exponent
    best = STEP_CODE_MIN
    for code in range(base - 4, base + 5):
        if STEP_CODE_MIN <= code <= STEP_CODE_MAX and step_from_code(code) <= step:
            best = max(best, code)
    return max(STEP_CODE_MIN, min(STEP_CODE_MAX, best))

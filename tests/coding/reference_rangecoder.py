"""A plain-Python transcription of spec §8 (spec/range-coder.md), step by step.

Deliberately slow and literal: the tests hold tqcodec.coding (constriction) to it byte for byte.
"""
from __future__ import annotations

PRECISION = 24
MASK64 = (1 << 64) - 1
WORD = 32


def cumulative(freqs: list[int]) -> list[int]:
    """§8.2: c[0] = 0, c[s+1] = c[s] + f[s]; c[A] = 2^24."""
    c = [0]
    for f in freqs:
        c.append(c[-1] + f)
    return c


def encode(symbols: list[int], freqs: list[int]) -> list[int]:
    """§8.3: the encoder, its pending ("inverted") words and its seal."""
    c = cumulative(freqs)
    lower, rng = 0, MASK64
    out: list[int] = []
    pending = 0          # §8.3 N: words held back while the carry is undecided
    first_pending = 0    # §8.3 P: the first held-back word
    for s in symbols:
        scale = rng >> PRECISION
        rng = scale * freqs[s]
        new_lower = (lower + scale * c[s]) & MASK64
        if pending and new_lower + rng <= MASK64:           # interval no longer wraps: resolve
            if new_lower < lower:                             # a carry happened
                out.append((first_pending + 1) & 0xFFFFFFFF)
                out.extend([0] * (pending - 1))
            else:
                out.append(first_pending)
                out.extend([0xFFFFFFFF] * (pending - 1))
            pending = 0
        lower = new_lower
        if rng < (1 << 32):                                   # §8.3 renormalisation
            rng <<= WORD
            word = lower >> WORD
            lower = (lower << WORD) & MASK64
            if pending:
                pending += 1
            elif lower + rng <= MASK64:
                out.append(word)
            else:
                pending, first_pending = 1, word
    if rng == MASK64:                                         # nothing encoded: empty payload
        return out
    point = (lower + (1 << 32) - 1) & MASK64                  # §8.3 seal
    if pending:
        if point >= lower:
            out.append(first_pending)
            out.extend([0xFFFFFFFF] * (pending - 1))
        else:
            out.append((first_pending + 1) & 0xFFFFFFFF)
            out.extend([0] * (pending - 1))
    point_word = point >> WORD
    out.append(point_word)
    if ((lower + rng) & MASK64) >> WORD == point_word:
        out.append(0)
    return out


def decode(words: list[int], freqs: list[int], count: int) -> list[int]:
    """§8.4: the decoder; raises ValueError where §8.5 says a payload is rejected."""
    c = cumulative(freqs)
    pos = 0

    def read() -> int:
        nonlocal pos
        w = words[pos] if pos < len(words) else 0   # past the end: zero words
        pos += 1
        return w

    point = (read() << WORD) | read()
    lower, rng = 0, MASK64
    out = []
    for _ in range(count):
        scale = rng >> PRECISION
        q = ((point - lower) & MASK64) // scale
        if q >= (1 << PRECISION):
            raise ValueError("quantile outside the model")
        lo, hi = 0, len(freqs)            # largest s with c[s] <= q
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if c[mid] <= q:
                lo = mid
            else:
                hi = mid
        s = lo
        out.append(s)
        lower = (lower + scale * c[s]) & MASK64
        rng = scale * freqs[s]
        if rng < (1 << 32):
            lower = (lower << WORD) & MASK64
            rng <<= WORD
            point = ((point << WORD) & MASK64) | read()
    if encode(out, freqs) != list(words):
        raise ValueError("payload is not the canonical coding of its symbols")
    return out

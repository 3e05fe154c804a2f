"""How much an embedding's rows weigh, from the token counts of a calibration sample.

A sample of text sees a few hundred or thousand distinct tokens of a vocabulary of tens of
thousands; the text a model meets later uses many it missed. Every row therefore gets a floor,
and the mass the sample missed (Good-Turing: the share of tokens seen once) goes mostly to the
unseen tokens that lie near the seen ones in the embedding itself: text on a subject keeps to the
words of that subject, and an embedding puts those words near each other.

MiniLM (the benchmark's Python-docstring sentences), tq at 3.4 bits/param, mean cosine on 600
other sentences: from 128 sentences 0.99489 with a uniform floor, 0.99692 with this one at
``NEAR_SHARE`` 0.7 (the counts of 1024 sentences give 0.99698); from 32 sentences 0.99221 and
0.99449.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from threadpoolctl import threadpool_limits

EMBED_FLOOR = 0.05  # unseen tokens weigh at least this fraction of the mean token frequency
NEAR_SHARE = 0.7  # of the missed mass, the share given by likeness to the seen tokens (the rest: every token alike)
# MiniLM from 128 sentences at 3.0 bits/param, share: mean (min) cosine on the 600 evaluation
# sentences / 400 software-package descriptions / 365 licence sentences (other text than the
# calibration's): 0 (uniform): 0.99153 (0.971) / 0.98648 (0.946) / 0.98138 (0.910); 0.5: 0.99395
# (0.966) / 0.98974 (0.965) / 0.98466 (0.948); 0.7: 0.99441 (0.960) / 0.99036 (0.958) / 0.98518
# (0.935); 0.9: 0.99543 (0.976) / 0.99120 (0.867) / 0.98440 (0.572): at 0.9 the far tokens weigh so
# little that 5,094 rows are coded as zero (none at 0.7) and a licence sentence loses its meaning
NEIGHBOURS = 20  # a token's likeness: the mean cosine of its NEIGHBOURS nearest seen tokens ...
LIKENESS_POWER = 4  # ... to this power (clipped at 0). 128 sentences, 3.1 bits/param, NEAR_SHARE 0.7:
# power 2 0.99355, 4 0.99506, 6 0.99541; but 6 (at 0.9) left one of 600 sentences at cosine 0.72 from
# 1024 sentences at 2.9 (0.93 with 4): too sharp, tokens a little further away starve
MAX_SEEN = 4096  # likeness is measured to at most this many seen tokens (the most counted): a
# vocabulary of 151,936 x 896 with 6,000 seen takes 22 s on one core beside two busy ones
MAX_DIM = 1024  # rows of more columns are compared in a seeded random projection to this many
# (it blurs the cosines: MiniLM's 384 columns projected to 256 took 0.99695 to 0.99624 above)
BLOCK_ROWS = 4096  # rows compared at a time (memory: BLOCK_ROWS x MAX_SEEN floats)


def missed_share(counts: np.ndarray) -> float:
    """The probability that a token of new text was not in the sample (Good-Turing: the share of
    the sample's tokens seen exactly once)."""
    c = np.asarray(counts, dtype=np.float64)
    total = float(c.sum())
    return float(np.count_nonzero(c == 1)) / total if total > 0 else 0.0


def floored_counts(counts: np.ndarray, embedding: Optional[np.ndarray] = None) -> np.ndarray:
    """Token counts as the encoder weighs an embedding's rows: every token raised by
    ``max(EMBED_FLOOR, missed_share)`` of the mean count (an unseen token still weighs
    something). With the ``embedding`` rows [n, d], ``NEAR_SHARE`` of the unseen tokens' part of
    that floor goes to the unseen tokens by their :func:`likeness` to the seen ones instead of
    evenly; the seen tokens keep theirs.

    MiniLM at 3.6 bits/param, mean (min) cosine, without the embedding: from 32 sentences (579
    tokens, a third seen once) 0.9929 (0.964) with a fixed floor of 0.05, 0.9937 (0.982) with the
    Good-Turing one; from 128, 0.99505 (0.977) and 0.99507 (0.980); from 1024 the same."""
    c = np.asarray(counts, dtype=np.float64)
    floor = max(EMBED_FLOOR, missed_share(c)) * max(float(c.mean()), 1e-12)
    unseen = c == 0
    if embedding is None or not unseen.any() or unseen.all():
        return c + floor
    near = np.where(unseen, likeness(embedding, c), 0.0)
    if not near.sum() > 0:
        return c + floor
    spread = floor * float(np.count_nonzero(unseen)) * near / near.sum()
    return c + (1.0 - NEAR_SHARE) * floor + NEAR_SHARE * np.where(unseen, spread, floor)


def likeness(embedding: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """For each row of ``embedding`` [n, d]: the mean cosine similarity of its ``NEIGHBOURS``
    nearest rows among the seen ones (``counts > 0``; the ``MAX_SEEN`` most counted, ties by
    row), clipped at 0, to the power ``LIKENESS_POWER``; rows centred on their mean first (the
    direction all rows share says nothing of which are alike). Deterministic: one BLAS thread,
    a fixed projection seed, the cosines rounded to 6 decimals."""
    x = np.array(embedding, dtype=np.float32)  # a copy: centred and scaled in place
    n, d = x.shape
    c = np.asarray(counts, dtype=np.float64)
    seen = np.flatnonzero(c > 0)
    if len(seen) > MAX_SEEN:
        seen = np.sort(seen[np.argsort(-c[seen], kind="stable")[:MAX_SEEN]])
    k = min(NEIGHBOURS, len(seen))
    out = np.zeros(n, dtype=np.float64)
    if k == 0:
        return out
    with threadpool_limits(limits=1, user_api="blas"):
        x -= x.mean(axis=0, dtype=np.float64).astype(np.float32)
        if d > MAX_DIM:
            x = x @ np.random.default_rng(0).standard_normal((d, MAX_DIM)).astype(np.float32)
        norms = np.linalg.norm(x, axis=1)
        x /= np.where(norms > 0, norms, 1.0)[:, None]
        xs = np.ascontiguousarray(x[seen].T)
        for lo in range(0, n, BLOCK_ROWS):
            sim = x[lo:lo + BLOCK_ROWS] @ xs
            top = np.partition(sim, len(seen) - k, axis=1)[:, len(seen) - k:]
            out[lo:lo + BLOCK_ROWS] = np.clip(top.mean(axis=1, dtype=np.float64), 0.0, None)
    # rounded: a last-bit difference of another BLAS build moves no weight across a band's edge
    return np.round(out, 6) ** LIKENESS_POWER

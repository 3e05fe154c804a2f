"""Error-feedback rounding (GPTQ/OBQ family) of a weight matrix to a uniform grid.

Encoder-only: the decoder sees integer levels and a step, nothing of how they were chosen.
All arithmetic is float64 and deterministic (fixed column order, no randomness).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

PREPARED_KEEP = 4  # damped inverses kept by content (tensors reading one input share one H: Q, K and V)
PREPARED_MAX_BYTES = 32 << 20  # ... each of an H at most this big (d <= 2048)
BLOCK = 32  # columns rounded before their errors reach the later columns in one product
TRANSPOSE_COLUMNS = 256  # columns of w copied into the working transpose at a time
_PREPARED: "OrderedDict[tuple, Prepared]" = OrderedDict()
_PREPARED_LOCK = threading.Lock()


@dataclass(frozen=True)
class Prepared:
    """What :func:`gptq_round` needs of one H: the column order ``perm`` and the upper Cholesky
    factor U of the damped inverse H (in that order) as its row blocks ``rows[b]`` = U[i1:i2, i1:]
    (i1 = b * block): the loop reads no entry below the diagonal, so half of U is not kept. An
    encoder holds one per distinct H for the whole encode (a 600M-parameter Llama's: 3.7 GB as
    full matrices)."""

    perm: np.ndarray
    rows: tuple[np.ndarray, ...]
    block: int

    @property
    def nbytes(self) -> int:
        return self.perm.nbytes + sum(r.nbytes for r in self.rows)


def round_nearest(w: np.ndarray, step: float, q_min: int, q_max: int) -> np.ndarray:
    """Round-to-nearest levels (ties to even), clipped to [q_min, q_max]."""
    return np.clip(np.rint(np.asarray(w, dtype=np.float64) / step), q_min, q_max).astype(np.int64)


def _hinv_upper(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, as GPTQ uses it."""
    h = np.array(h, dtype=np.float64, copy=True)
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h)))
    h[np.diag_indices_from(h)] += damp * (mean if mean > 0 else 1.0)
    for extra in (0.0, 1e-6, 1e-4, 1e-2, 1.0):
        try:
            hh = h + extra * (mean if mean > 0 else 1.0) * np.eye(len(h))
            lo = np.linalg.cholesky(hh)
            inv = np.linalg.inv(lo)
            with np.errstate(over="ignore", invalid="ignore"):  # a far too small H overflows: try more damping
                hinv = inv.T @ inv
            if not np.isfinite(hinv).all():
                continue
            return np.linalg.cholesky(hinv).T
        except np.linalg.LinAlgError:
            continue
    return np.eye(len(h))  # pragma: no cover - degenerate H: plain rounding


def prepare(h: np.ndarray, *, damp: float = 0.01, act_order: bool = True, block: int = BLOCK) -> Prepared:
    """The column order and the upper Cholesky factor of the damped inverse H that
    :func:`gptq_round` uses (:class:`Prepared`, for rounding ``block`` columns at a time);
    compute once per H and reuse across step sizes. The last few are kept by H's content
    (read-only), so tensors with one input (Q, K and V) factor it once."""
    h = np.ascontiguousarray(h, dtype=np.float64)
    key = None
    if h.nbytes <= PREPARED_MAX_BYTES:
        key = (hashlib.blake2b(h.tobytes(), digest_size=20).digest(), h.shape, float(damp), bool(act_order),
               int(block))
        with _PREPARED_LOCK:
            hit = _PREPARED.get(key)
            if hit is not None:
                _PREPARED.move_to_end(key)
                return hit
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(len(h))
    u = _hinv_upper(h[np.ix_(perm, perm)], damp)
    rows = tuple(np.array(u[i1:i1 + block, i1:]) for i1 in range(0, len(u), block))
    del u
    perm.setflags(write=False)
    for r in rows:
        r.setflags(write=False)
    prepared = Prepared(perm, rows, int(block))
    if key is not None:
        with _PREPARED_LOCK:
            _PREPARED[key] = prepared
            while len(_PREPARED) > PREPARED_KEEP:
                _PREPARED.popitem(last=False)
    return prepared


def gptq_round(w: np.ndarray, h: np.ndarray | None, step: float | np.ndarray, q_min: int, q_max: int, *,
               damp: float = 0.01, block: int = BLOCK, act_order: bool = True,
               prepared: Prepared | None = None) -> np.ndarray:
    """Levels (int32, shaped like ``w`` [out, in]) minimising ``tr(E H E^T)`` greedily;
    ``q_min``, ``q_max`` within int32.

    Columns are quantized one at a time (largest ``diag H`` first when ``act_order``; ties by
    index); each column's rounding error is spread over the not-yet-quantized columns through
    the inverse of the damped H, so errors along cheap input directions absorb those along
    expensive ones. Same inputs give the same levels. ``step``: one for all rows, or one per row
    [out] (rows round independently of each other). ``prepared``: :func:`prepare`'s result (its
    ``block`` then sets the columns rounded at a time; ``h`` is then not read and may be None).
    """
    if prepared is None:
        prepared = prepare(h, damp=damp, act_order=act_order, block=block)
    perm, block = prepared.perm, prepared.block
    # work on the transpose: input column i is then a contiguous row (the loop is row-wise), made a
    # few columns at a time from w as given (float32 or float64): no float64 copy of w beside it
    w = np.asarray(w)
    n, m = w.shape
    wt = np.empty((m, n), dtype=np.float64)
    for a in range(0, m, TRANSPOSE_COLUMNS):
        wt[a:a + TRANSPOSE_COLUMNS] = w[:, perm[a:a + TRANSPOSE_COLUMNS]].T
    qt = np.zeros((m, n), dtype=np.int32)  # levels within ±2^31 (the encoder's: ±2^20)
    inv_step = 1.0 / step
    for b, i1 in enumerate(range(0, m, block)):
        i2 = min(i1 + block, m)
        w1 = wt[i1:i2]
        err1 = np.zeros_like(w1)
        u_rows = prepared.rows[b]  # U[i1:i2, i1:]
        u1 = u_rows[:, :i2 - i1]
        for i in range(i2 - i1):
            col = w1[i]
            qi = np.rint(col * inv_step)
            np.clip(qi, q_min, q_max, out=qi)
            qt[i1 + i] = qi
            e = (col - qi * step) / u1[i, i]
            if i + 1 < i2 - i1:
                w1[i + 1:] -= u1[i, i + 1:, None] * e[None, :]
            err1[i] = e
        if i2 < m:
            wt[i2:] -= u_rows[:, i2 - i1:].T @ err1
    q = np.empty((n, m), dtype=np.int32)
    q[:, perm] = qt.T
    return q

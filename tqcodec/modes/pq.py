"""Mode ``pq`` (spec §7.8, ``spec/mode-lineage.md``): product quantization.

Each row (§7.S.1) is cut into ``s = ceil(m / dim)`` sub-vectors of ``dim`` consecutive elements
(the last one short when ``dim`` does not divide ``m``); one codebook of ``K`` codewords of
``dim`` values (stream 0, float16 or float32, §7.S.3) serves the tensor, and each sub-vector's
codeword index is range-coded in stream 1 (§7.S.4).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import fail
from ..format.manifest import TensorRecord
from . import lineage_common as C

MAX_DIM = 256  # spec §7.8.1 / §12
_REQUIRED = {"dim": int, "counts": bytes}
_OPTIONAL = {"precision": str}


class _Parsed:
    __slots__ = ("precision", "n", "m", "d", "s", "counts", "freqs")


def _parse(record: TensorRecord) -> _Parsed:
    """Spec §7.8.1's checks, in order."""
    name = record.name
    p = C.check_keys(record, _REQUIRED, _OPTIONAL)  # rule 1
    C.check_float(record, rows=True)  # rule 2
    out = _Parsed()
    out.precision = C.check_precision(record, p.get("precision", "float16"))  # rule 3
    out.n, out.m = C.row_view(record.shape)  # rule 4
    out.d = p["dim"]
    if not 1 <= out.d <= min(out.m, MAX_DIM):
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: dim {out.d} outside 1..min(m={out.m}, {MAX_DIM})")
    out.s = -(-out.m // out.d)
    out.counts = C.parse_counts(p["counts"], out.n * out.s, name, "none")  # rule 5
    out.freqs = C.table(out.counts)
    return out


def stream_items(index: int, record: TensorRecord, records: Sequence[TensorRecord]) -> tuple[int, ...]:
    """Spec §7.8.2: stream 0 the codebook's bytes, stream 1 the sub-vectors' symbols."""
    p = _parse(record)
    return (len(p.counts) * p.d * C.PRECISIONS[p.precision].itemsize,
            p.n * p.s if p.freqs is not None else 0)


def reconstruct(symbols: np.ndarray, codebook: np.ndarray, n: int, m: int) -> np.ndarray:
    """Spec §7.8.3 before rounding: [n, m] float32 from [n, s] indices and a [K, d] codebook."""
    d = codebook.shape[1]
    s = -(-m // d)
    rows = codebook[np.asarray(symbols).reshape(n, s)].reshape(n, s * d)  # [n, s*d]
    return np.ascontiguousarray(rows[:, :m])


def decode(record: TensorRecord, streams: list[list[tuple[int, bytes]]]) -> np.ndarray:
    """Spec §7.8.3: each sub-vector is its codeword (cut to the row), rounded to the dtype."""
    p = _parse(record)
    k = len(p.counts)
    book = C.read_values(streams[0], k * p.d, p.precision, record.name).reshape(k, p.d)
    sym = C.read_symbols(streams[1], p.freqs, p.n * p.s, record.name)
    return C.round_binary32(record.dtype, reconstruct(sym, book, p.n, p.m)).reshape(record.shape)


# --- encoder (bitstream only; the numerics are tqcodec.lineage.pq) --------------------------------

def encode(symbols: np.ndarray, codebook: np.ndarray, *, precision: str = "float16") -> tuple[dict, list]:
    """Params and streams of a ``pq`` tensor: ``symbols`` [n, s] codeword indices, ``codebook``
    [K, d] (representable in ``precision``, every codeword used)."""
    book = np.asarray(codebook, dtype=np.float64)
    sym = np.asarray(symbols, dtype=np.int64).reshape(-1)
    counts = np.bincount(sym, minlength=book.shape[0])
    params = {"dim": int(book.shape[1]), "counts": C.pack_counts(counts)}
    if precision != "float16":
        params["precision"] = precision
    return params, [C.value_chunks(book.reshape(-1), precision), C.symbol_chunks(sym, counts)]

"""Mode ``pq`` (spec §7.8, ``spec/mode-lineage.md``): product quantization.

Each row (§7.S.1) is cut into ``s = ceil(m / dim)`` sub-vectors of ``dim`` consecutive elements
(the last one short when ``dim`` does not divide ``m``); one codebook of ``K`` codewords of
``dim`` values (stream 0, float16 or float32, §7.S.3) serves the tensor, and each sub-vector's
codeword index is range-coded in stream 1 (§7.S.4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ...errors import fail
from ...format.chunks import PayloadKind, StreamSpec
from ...format.dtypes import round_binary32
from ...format.leb128 import pack_counts, unpack_counts
from ...format.manifest import TensorRecord
from ..base import Chunks, Encoded, check_float, check_keys, row_view
from ..streams import PRECISIONS, check_precision, read_symbols, read_values, symbol_chunks, table, value_chunks

MAX_DIM = 256  # spec §7.8.1 / §12
_REQUIRED = {"dim": int, "counts": bytes}
_OPTIONAL = {"precision": str}


@dataclass(frozen=True)
class Params:
    precision: str
    n: int
    m: int
    d: int  # sub-vector length
    s: int  # sub-vectors per row
    counts: np.ndarray
    freqs: Optional[np.ndarray]


def parse(record: TensorRecord) -> Params:
    """Spec §7.8.1's checks, in order."""
    name = record.name
    p = check_keys(record, _REQUIRED, _OPTIONAL)  # rule 1
    check_float(record, rows=True)  # rule 2
    precision = check_precision(record, p.get("precision", "float16"))  # rule 3
    n, m = row_view(record.shape)  # rule 4
    d = p["dim"]
    if not 1 <= d <= min(m, MAX_DIM):
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: dim {d} outside 1..min(m={m}, {MAX_DIM})")
    s = -(-m // d)
    counts = unpack_counts(p["counts"], n * s, name, "none")  # rule 5
    return Params(precision, n, m, d, s, counts, table(counts))


def stream_items(p: Params, index: int, records: Sequence[TensorRecord]) -> tuple[StreamSpec, ...]:
    """Spec §7.8.2: stream 0 the codebook's bytes, stream 1 the sub-vectors' symbols."""
    return (StreamSpec(len(p.counts) * p.d * PRECISIONS[p.precision].itemsize, PayloadKind.BYTES),
            StreamSpec(p.n * p.s if p.freqs is not None else 0, PayloadKind.SYMBOLS))


def symbol_tables(p: Params) -> tuple[Optional[np.ndarray], ...]:
    """The range-coder table of each stream (None: not range-coded): stream 1's."""
    return None, p.freqs


def reconstruct(symbols: np.ndarray, codebook: np.ndarray, n: int, m: int) -> np.ndarray:
    """Spec §7.8.3 before rounding: [n, m] float32 from [n, s] indices and a [K, d] codebook."""
    d = codebook.shape[1]
    s = -(-m // d)
    rows = codebook[np.asarray(symbols).reshape(n, s)].reshape(n, s * d)  # [n, s*d]
    return np.ascontiguousarray(rows[:, :m])


def parts(p: Params, record: TensorRecord, streams: list[Chunks]) -> dict:
    """``codebook`` (float32 [K, dim]), ``symbols`` (int64 [n, s]), ``precision``."""
    k = len(p.counts)
    book = read_values(streams[0], k * p.d, p.precision, record.name).reshape(k, p.d)
    sym = read_symbols(streams[1], p.freqs, p.n * p.s, record.name).reshape(p.n, p.s)
    return {"codebook": book, "symbols": sym, "precision": p.precision}


def decode(p: Params, record: TensorRecord, streams: list[Chunks]) -> np.ndarray:
    """Spec §7.8.3: each sub-vector is its codeword (cut to the row), rounded to the dtype."""
    q = parts(p, record, streams)
    return round_binary32(record.dtype, reconstruct(q["symbols"], q["codebook"], p.n, p.m)).reshape(record.shape)


def write(symbols: np.ndarray, codebook: np.ndarray, *, precision: str = "float16") -> Encoded:
    """A ``pq`` tensor: ``symbols`` [n, s] codeword indices, ``codebook`` [K, d]
    (representable in ``precision``, every codeword used)."""
    book = np.asarray(codebook, dtype=np.float64)
    sym = np.asarray(symbols, dtype=np.int64).reshape(-1)
    counts = np.bincount(sym, minlength=book.shape[0])
    params = {"dim": int(book.shape[1]), "counts": pack_counts(counts)}
    if precision != "float16":
        params["precision"] = precision
    return Encoded("pq", params, [value_chunks(book.reshape(-1), precision), symbol_chunks(sym, counts)])

"""Mode ``kmeans`` (spec §7.7, ``spec/mode-lineage.md``): scalar codebooks, one per group of
consecutive rows (§7.S.1), each element a range-coded index into its group's codebook.

Stream 0 holds every group's codebook (strictly increasing float16 or float32 values, §7.S.3);
stream ``1 + g`` holds group ``g``'s indices (§7.S.4), coded with the group's counts table.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import fail
from ..format.manifest import TensorRecord
from . import lineage_common as C

MAX_GROUPS = 4096  # spec §7.7.1 / §12
_REQUIRED = {"group_rows": list, "counts": list}
_OPTIONAL = {"precision": str}


class _Parsed:
    __slots__ = ("precision", "n", "m", "rows", "counts", "freqs")


def _parse(record: TensorRecord) -> _Parsed:
    """Spec §7.7.1's checks, in order."""
    name = record.name
    p = C.check_keys(record, _REQUIRED, _OPTIONAL, {"group_rows": int, "counts": bytes})  # rule 1
    C.check_float(record, rows=True)  # rule 2
    out = _Parsed()
    out.precision = C.check_precision(record, p.get("precision", "float16"))  # rule 3
    out.n, out.m = C.row_view(record.shape)  # rule 4
    rows = p["group_rows"]
    if not 1 <= len(rows) <= MAX_GROUPS or len(p["counts"]) != len(rows):
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: group_rows and counts must have the same length, "
                                        f"1..{MAX_GROUPS}")
    if min(rows) < 1 or sum(rows) != out.n:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: groups of {rows[:8]}... rows must each be >= 1 and "
                                        f"cover the {out.n} rows")
    out.rows = rows
    out.counts = [C.parse_counts(blob, r * out.m, name, "none") for blob, r in zip(p["counts"], rows)]  # 5
    out.freqs = [C.table(c) for c in out.counts]
    return out


def stream_items(index: int, record: TensorRecord, records: Sequence[TensorRecord]) -> tuple[int, ...]:
    """Spec §7.7.2: stream 0 the codebooks' bytes, stream 1+g group g's symbols."""
    p = _parse(record)
    width = C.PRECISIONS[p.precision].itemsize
    first = width * sum(len(c) for c in p.counts)
    return (first,) + tuple(r * p.m if f is not None else 0 for r, f in zip(p.rows, p.freqs))


def decode(record: TensorRecord, streams: list[list[tuple[int, bytes]]]) -> np.ndarray:
    """Spec §7.7.3: each element is its group's codebook entry, rounded to the dtype (§7.S.5)."""
    p = _parse(record)
    values = C.read_values(streams[0], sum(len(c) for c in p.counts), p.precision, record.name)
    out = np.empty(record.numel, dtype=np.float32)
    v0 = e0 = 0
    for g, (rows, counts, freqs) in enumerate(zip(p.rows, p.counts, p.freqs)):
        book = values[v0:v0 + len(counts)]
        C.check_increasing(book, record.name, f"group {g}'s codebook")
        n = rows * p.m
        sym = C.read_symbols(streams[1 + g], freqs, n, record.name)
        out[e0:e0 + n] = book[sym]
        v0 += len(counts)
        e0 += n
    return C.round_binary32(record.dtype, out).reshape(record.shape)


# --- encoder (bitstream only; the numerics are tqcodec.lineage.kmeans) ----------------------------

def encode(group_symbols: Sequence[np.ndarray], codebooks: Sequence[np.ndarray], *,
           precision: str = "float16") -> tuple[dict, list]:
    """Params and streams of a ``kmeans`` tensor. ``group_symbols[g]``: int indices
    [rows_g, m] of group g; ``codebooks[g]``: its strictly increasing values (representable in
    ``precision``), every one used."""
    rows, blobs, streams = [], [], [[]]
    books = []
    for sym, book in zip(group_symbols, codebooks):
        sym = np.asarray(sym, dtype=np.int64)
        counts = np.bincount(sym.reshape(-1), minlength=len(book))
        rows.append(int(sym.shape[0]))
        blobs.append(C.pack_counts(counts))
        streams.append(C.symbol_chunks(sym, counts))
        books.append(np.asarray(book, dtype=np.float64))
    streams[0] = C.value_chunks(np.concatenate(books), precision)
    params = {"group_rows": rows, "counts": blobs}
    if precision != "float16":
        params["precision"] = precision
    return params, streams

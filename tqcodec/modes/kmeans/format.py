"""Mode ``kmeans`` (spec §7.7, ``spec/mode-lineage.md``): scalar codebooks, one per group of
consecutive rows (§7.S.1), each element a range-coded index into its group's codebook.

Stream 0 holds every group's codebook (strictly increasing float16 or float32 values, §7.S.3);
stream ``1 + g`` holds group ``g``'s indices (§7.S.4), coded with the group's counts table.
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
from ..streams import PRECISIONS, check_increasing, check_precision, read_symbols, read_values, symbol_chunks, table, \
    value_chunks

MAX_GROUPS = 4096  # spec §7.7.1 / §12
_REQUIRED = {"group_rows": list, "counts": list}
_OPTIONAL = {"precision": str}


@dataclass(frozen=True)
class Params:
    precision: str
    n: int
    m: int
    rows: tuple[int, ...]
    counts: tuple[np.ndarray, ...]
    freqs: tuple[Optional[np.ndarray], ...]


def parse(record: TensorRecord) -> Params:
    """Spec §7.7.1's checks, in order."""
    name = record.name
    p = check_keys(record, _REQUIRED, _OPTIONAL, {"group_rows": int, "counts": bytes})  # rule 1
    check_float(record, rows=True)  # rule 2
    precision = check_precision(record, p.get("precision", "float16"))  # rule 3
    n, m = row_view(record.shape)  # rule 4
    rows = p["group_rows"]
    if not 1 <= len(rows) <= MAX_GROUPS or len(p["counts"]) != len(rows):
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: group_rows and counts must have the same length, "
                                        f"1..{MAX_GROUPS}")
    if min(rows) < 1 or sum(rows) != n:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: groups of {rows[:8]}... rows must each be >= 1 and "
                                        f"cover the {n} rows")
    counts = tuple(unpack_counts(blob, r * m, name, "none") for blob, r in zip(p["counts"], rows))  # rule 5
    return Params(precision, n, m, tuple(rows), counts, tuple(table(c) for c in counts))


def stream_items(p: Params, index: int, records: Sequence[TensorRecord]) -> tuple[StreamSpec, ...]:
    """Spec §7.7.2: stream 0 the codebooks' bytes, stream 1+g group g's symbols."""
    first = StreamSpec(PRECISIONS[p.precision].itemsize * sum(len(c) for c in p.counts), PayloadKind.BYTES)
    return (first,) + tuple(StreamSpec(r * p.m if f is not None else 0, PayloadKind.SYMBOLS)
                            for r, f in zip(p.rows, p.freqs))


def symbol_tables(p: Params) -> tuple[Optional[np.ndarray], ...]:
    """The range-coder table of each stream (None: not range-coded): group g's is stream 1+g's."""
    return (None,) + p.freqs


def parts(p: Params, record: TensorRecord, streams: list[Chunks]) -> dict:
    """``codebooks`` (float32, one per group), ``symbols`` (int64 [rows_g, m] per group),
    ``group_rows``, ``precision``."""
    values = read_values(streams[0], sum(len(c) for c in p.counts), p.precision, record.name)
    books, symbols, v0 = [], [], 0
    for g, (rows, counts, freqs) in enumerate(zip(p.rows, p.counts, p.freqs)):
        book = values[v0:v0 + len(counts)]
        check_increasing(book, record.name, f"group {g}'s codebook")
        books.append(book)
        symbols.append(read_symbols(streams[1 + g], freqs, rows * p.m, record.name).reshape(rows, p.m))
        v0 += len(counts)
    return {"codebooks": books, "symbols": symbols, "group_rows": list(p.rows), "precision": p.precision}


def decode(p: Params, record: TensorRecord, streams: list[Chunks]) -> np.ndarray:
    """Spec §7.7.3: each element is its group's codebook entry, rounded to the dtype (§7.S.5)."""
    q = parts(p, record, streams)
    out = np.concatenate([book[sym] for book, sym in zip(q["codebooks"], q["symbols"])], axis=0)
    return round_binary32(record.dtype, out).reshape(record.shape)


def write(group_symbols: Sequence[np.ndarray], codebooks: Sequence[np.ndarray], *,
          precision: str = "float16") -> Encoded:
    """A ``kmeans`` tensor. ``group_symbols[g]``: int indices [rows_g, m] of group g;
    ``codebooks[g]``: its strictly increasing values (representable in ``precision``), every
    one used."""
    rows, blobs, streams = [], [], [[]]
    books = []
    for sym, book in zip(group_symbols, codebooks):
        sym = np.asarray(sym, dtype=np.int64)
        counts = np.bincount(sym.reshape(-1), minlength=len(book))
        rows.append(int(sym.shape[0]))
        blobs.append(pack_counts(counts))
        streams.append(symbol_chunks(sym, counts))
        books.append(np.asarray(book, dtype=np.float64))
    streams[0] = value_chunks(np.concatenate(books), precision)
    params = {"group_rows": rows, "counts": blobs}
    if precision != "float16":
        params["precision"] = precision
    return Encoded("kmeans", params, streams)

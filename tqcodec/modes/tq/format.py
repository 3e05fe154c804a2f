"""Mode ``tq`` (spec §7.5, ``spec/mode-tq.md``): transform quantization.

A weight is viewed as a matrix R [n, m] (n output channels); its integer coefficient matrix is
cut into bands of rows (consecutive runs, or any sets of rows named by ``row_band``, 1.4), each
band with its own exact dyadic step (§7.1) and its own frequency table (§7.3.1), range-coded (§8)
in its own stream. Optionally a synthesis transform S [m, k]
stored as float16 rebuilds R = (S · C)^T from k coefficient rows (dimensionality reduction:
the rows not kept are zero).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from ... import limits as L
from ...errors import fail
from ...format.chunks import PayloadKind, StreamSpec
from ...format.dtypes import FLOAT_NAMES, round_binary32
from ...format.leb128 import pack_counts, unpack_counts
from ...format.manifest import TensorRecord
from ...format.steps import STEP_CODE_MAX, STEP_CODE_MIN, steps_from_codes
from ..base import Chunks, Encoded, check_keys
from ..streams import Predecoded, iter_symbols, read_symbols, symbol_chunks, table

LAYOUTS = ("out_in", "in_out")
TRANSFORMS = ("none", "float16")
MAX_BANDS = 4096  # spec §7.5.1
MAX_MAPPED_BANDS = 256  # spec §7.5.1 rule 5: with row_band, one byte names a row's band

_REQUIRED = {"band_rows": list, "steps": list, "q_min": list, "counts": list}
_OPTIONAL = {"layout": str, "transform": str, "row_band": bytes}  # spec §7.5.1: absent = "out_in", "none", runs
_ELEMENTS = {"band_rows": int, "steps": int, "q_min": int, "counts": bytes}


@dataclass(frozen=True)
class Params:
    """A ``tq`` record's parameters, checked (spec §7.5.1): the matrix R is [n, m]; the
    coefficient matrix C has ``k`` rows of ``cols`` values (cols = m without a transform, n
    with one) in bands of ``rows[b]`` rows, each with a step code, q_min and range-coder table
    (None for a one-entry table). ``order``: with ``row_band`` (1.4), the rows of C band after
    band (each band's rows increasing), as an index array; None when the bands are consecutive."""

    layout: str
    transform: str
    n: int
    m: int
    k: int
    cols: int
    rows: tuple[int, ...]
    steps: tuple[int, ...]
    q_min: tuple[int, ...]
    freqs: tuple[Optional[np.ndarray], ...]
    order: Optional[np.ndarray] = None


def parse(record: TensorRecord) -> Params:
    """Spec §7.5.1's parameter rules, in order."""
    name = record.name
    p = check_keys(record, _REQUIRED, _OPTIONAL, _ELEMENTS)  # rule 1: keys and types before any value
    rows, steps, qmins = p["band_rows"], p["steps"], p["q_min"]
    if record.dtype not in FLOAT_NAMES:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: tq mode needs a float dtype, not {record.dtype}")
    if len(record.shape) < 1 or record.numel < 1:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: tq mode needs at least one dimension and element")
    layout, transform = p.get("layout", "out_in"), p.get("transform", "none")
    if layout not in LAYOUTS:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: layout {layout!r} not in {LAYOUTS}")
    if layout == "in_out" and len(record.shape) != 2:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: layout in_out needs a 2-D tensor")
    if transform not in TRANSFORMS:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: transform {transform!r} not in {TRANSFORMS}")
    n = record.shape[0] if layout == "out_in" else record.shape[1]
    m = record.numel // n
    nb = len(rows)
    if nb < 1 or nb > MAX_BANDS or len(steps) != nb or len(qmins) != nb or len(p["counts"]) != nb:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: band_rows, steps, q_min and counts must have the "
                                        f"same length, 1..{MAX_BANDS}")
    if min(rows) < 1:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: a band has no rows")
    k = sum(rows)
    if transform == "none" and k != n:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: bands cover {k} rows, not {n}")
    if transform == "float16" and k > min(m, n):
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: {k} coefficient rows for a {n}x{m} matrix "
                                        "(at most min(n, m))")
    order = _row_order(p.get("row_band"), rows, k, name)
    if min(steps) < STEP_CODE_MIN or max(steps) > STEP_CODE_MAX:
        raise fail("BAD_STEP", f"tensor {name!r}: step code outside [{STEP_CODE_MIN}, {STEP_CODE_MAX}]")
    cols = m if transform == "none" else n
    freqs = []
    for b, (blob, q0, r) in enumerate(zip(p["counts"], qmins, rows)):
        c = unpack_counts(blob, r * cols, name)  # rule 7
        if q0 < -L.MAX_LEVEL or q0 + len(c) - 1 > L.MAX_LEVEL:
            raise fail("LIMIT_EXCEEDED", f"tensor {name!r}: band {b} levels outside -2^20..2^20")
        freqs.append(table(c))  # spec §8.6, normative here
    return Params(layout, transform, n, m, k, cols, tuple(rows), tuple(steps), tuple(qmins), tuple(freqs), order)


def _row_order(row_band: Optional[bytes], rows: Sequence[int], k: int, name: str) -> Optional[np.ndarray]:
    """Spec §7.5.1 rule 5, ``row_band`` (1.4): k bytes, at most 256 bands, each byte a band, band b
    named by exactly ``rows[b]`` bytes. Returns the rows of C band after band (None when that is
    0..k-1, the order of consecutive bands)."""
    if row_band is None:
        return None
    if len(row_band) != k:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: row_band has {len(row_band)} bytes for {k} coefficient rows")
    if len(rows) > MAX_MAPPED_BANDS:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: row_band with {len(rows)} bands (at most {MAX_MAPPED_BANDS})")
    band = np.frombuffer(row_band, dtype=np.uint8)
    if int(band.max()) >= len(rows):
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: row_band names band {int(band.max())} of {len(rows)}")
    if not np.array_equal(np.bincount(band, minlength=len(rows)), np.asarray(rows)):
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: row_band's rows per band differ from band_rows")
    order = np.argsort(band, kind="stable")
    return None if bool((order == np.arange(k)).all()) else order


def in_row_order(p: Params, flat: np.ndarray) -> np.ndarray:
    """Spec §7.5.1: values of C [k * cols] laid out band after band, put in C's row order."""
    if p.order is None:
        return flat
    out = np.empty_like(flat).reshape(p.k, p.cols)
    out[p.order] = flat.reshape(p.k, p.cols)
    return out.reshape(-1)


def stream_items(p: Params, index: int, records: Sequence[TensorRecord]) -> tuple[StreamSpec, ...]:
    """Spec §7.5.2: stream 0 the transform's bytes (2*m*k, or 0); stream 1+b band b's symbols (0
    when its table has one entry)."""
    first = StreamSpec(2 * p.m * p.k if p.transform == "float16" else 0, PayloadKind.BYTES)
    return (first,) + tuple(StreamSpec(r * p.cols if f is not None else 0, PayloadKind.SYMBOLS)
                            for r, f in zip(p.rows, p.freqs))


def _band_levels(p: Params, b: int, chunks: Chunks, count: int, name: str) -> np.ndarray:
    """Band ``b``'s levels: its symbols (§7.5.2, read as every counts-table mode reads them) + q_min."""
    return read_symbols(chunks, p.freqs[b], count, name) + p.q_min[b]


def _transform(p: Params, chunks: Chunks, name: str) -> np.ndarray:
    """Spec §7.5.2 stream 0: the synthesis transform S [m, k] as float16 (finite, §7.5.3)."""
    for count, payload in chunks:  # the reader checked the lengths from the headers; kept for direct callers
        if len(payload) != count:
            raise fail("BAD_CHUNK", f"tensor {name!r}: a transform chunk of {len(payload)} bytes declares "
                                    f"{count} items (they must be equal)")
    data = b"".join(payload for _, payload in chunks)
    if len(data) != 2 * p.m * p.k:
        raise fail("BAD_CHUNK", f"tensor {name!r}: transform stream of {len(data)} bytes, expected {2 * p.m * p.k}")
    s = np.frombuffer(data, dtype="<f2").reshape(p.m, p.k)
    if not np.isfinite(s).all():
        raise fail("BAD_PAYLOAD", f"tensor {name!r}: transform holds NaN or infinity")
    return s


def symbol_tables(p: Params) -> tuple[Optional[np.ndarray], ...]:
    """The range-coder table of each stream (None: not range-coded): band b's is stream 1+b's."""
    return (None,) + p.freqs


def decode(p: Params, record: TensorRecord, streams: list[Chunks]) -> np.ndarray:
    """Spec §7.5.3: levels -> coefficients -> (transform) -> dtype."""
    if p.transform == "none":
        return _decode_direct(p, record, streams)
    coeff = _coefficients(p, streams, record.name, lambda values: values).reshape(p.k, p.cols)
    s = _transform(p, streams[0], record.name).astype(np.float64)
    with _blas_threads(streams), np.errstate(over="ignore", invalid="ignore"):
        # §7.5.3 step 3 (tolerance stated there): R^T = S · C [m, n], computed in the order the
        # output is stored in (out_in: R = C^T · S^T [n, m]), so the float32 result needs no
        # transposing copy. Both are one dgemm whose sums run in the same order, so the same
        # bits; a matrix of one row or column keeps S · C (numpy computes it by gemv there).
        if p.layout == "out_in" and p.n > 1 and p.m > 1:
            mat = np.matmul(coeff.T, s.T).astype(np.float32)  # [n, m]
        else:
            mat = (s @ coeff).astype(np.float32)  # [m, n]
            if p.layout == "out_in":
                mat = mat.T
    return round_binary32(record.dtype, np.ascontiguousarray(mat)).reshape(record.shape)


def _blas_threads(streams: list[Chunks]):
    """One BLAS thread while worker threads decode the next tensors' symbols (BLAS threads
    spinning against them for the same cores made the product 2.5x slower); else BLAS's own
    choice. Any number of threads gives the same bits: each element's sum runs in the same order."""
    tasks = [t for c in streams if isinstance(c, Predecoded) for t in c.tasks if t is not None]
    if tasks and tasks[0].pool.busy:
        return threadpool_limits(limits=1, user_api="blas")
    return contextlib.nullcontext()


def _decode_direct(p: Params, record: TensorRecord, streams: list[Chunks]) -> np.ndarray:
    """Spec §7.5.3 without a transform: each element is its coefficient rounded to binary32, then
    to the dtype (a function of its band's symbol alone, so done once per symbol of the band's
    alphabet: the same bits as element by element)."""
    out = _coefficients(p, streams, record.name, lambda values: round_binary32(record.dtype, values.astype(np.float32)))
    mat = out.reshape(p.k, p.cols)  # [n, m]
    if p.layout == "in_out":
        mat = np.ascontiguousarray(mat.T)
    return mat.reshape(record.shape)


def _coefficients(p: Params, streams: list[Chunks], name: str, store) -> np.ndarray:
    """Spec §7.5.3 steps 1-2, band by band (flat, [k * cols]): ``store(level * step)`` of each
    symbol (the float64 products are exact), looked up in a table of the band's alphabet, so a
    band costs one pass over its symbols whatever ``store`` does."""
    steps = steps_from_codes(np.array(p.steps, dtype=np.int64))
    out = None
    start = 0
    for b, rows in enumerate(p.rows):
        freqs, count = p.freqs[b], rows * p.cols
        levels = np.arange(p.q_min[b], p.q_min[b] + (1 if freqs is None else len(freqs)), dtype=np.int64)
        values = store(levels * steps[b])
        if out is None:
            out = np.empty(p.k * p.cols, dtype=values.dtype)
        band = out[start:start + count]
        if freqs is None:
            band.fill(values[0])
        else:
            for pos, items, sym in iter_symbols(streams[1 + b], freqs, name):
                np.take(values, sym, out=band[pos:pos + items], mode="clip")  # symbols < alphabet
        start += count
    return in_row_order(p, out)


def parts(p: Params, record: TensorRecord, streams: list[Chunks]) -> dict:
    """Spec §7.5.3 steps 1-2 only (the integer stage, for transform-domain layers and training):
    ``levels`` (band b's [band_rows[b], c] levels, narrowest of int8/int16/int32), ``steps``
    (float64 step of each band), ``band_rows``, ``transform`` (S [m, k] float16, or None),
    ``layout``, ``n``, ``m``, ``k``, ``row_band`` (uint8 [k], the band of each row of C; None when
    the bands are consecutive runs). Same checks as :func:`decode`."""
    steps = steps_from_codes(np.array(p.steps, dtype=np.int64)).astype(np.float64)
    levels = []
    for b, rows in enumerate(p.rows):
        lv = _band_levels(p, b, streams[1 + b], rows * p.cols, record.name).reshape(rows, p.cols)
        lo, hi = int(lv.min()), int(lv.max())
        dt = next(t for t in (np.int8, np.int16, np.int32) if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max)
        levels.append(lv.astype(dt))
    s = None
    if p.transform == "float16":
        s = _transform(p, streams[0], record.name)
    band = None
    if p.order is not None:
        band = np.repeat(np.arange(len(p.rows), dtype=np.uint8), p.rows)[np.argsort(p.order, kind="stable")]
    return {"levels": levels, "steps": steps, "band_rows": list(p.rows), "transform": s, "layout": p.layout,
            "n": p.n, "m": p.m, "k": p.k, "row_band": band}


def consecutive_bands(parts: dict) -> dict:
    """:func:`parts` with bands that are runs of consecutive rows of C: a ``row_band`` tensor's
    rows regrouped into its runs of one band (each run a band with that band's step), for users
    of the integer stage that walk C by row ranges. The same C."""
    band = parts.get("row_band")
    if band is None:
        return parts
    within = np.zeros(len(band), dtype=np.int64)  # each row's index within its band
    for b in range(len(parts["band_rows"])):
        idx = np.flatnonzero(band == b)
        within[idx] = np.arange(len(idx))
    starts = np.flatnonzero(np.r_[True, band[1:] != band[:-1]])
    ends = np.r_[starts[1:], len(band)]
    levels, steps, rows = [], [], []
    for a, e in zip(starts, ends):
        b = int(band[a])
        levels.append(parts["levels"][b][within[a]:within[a] + (e - a)])
        steps.append(parts["steps"][b])
        rows.append(int(e - a))
    return {**parts, "levels": levels, "steps": np.asarray(steps, dtype=np.float64), "band_rows": rows,
            "row_band": None}


# --- writer -------------------------------------------------------------------------------

COUNT_BLOCK = 1 << 22  # symbols counted at a time (np.bincount widens its input to int64)


def band_symbols(levels: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(q_min, symbols, symbol counts) of one band's levels (spec §7.5.2: symbol = level - q_min),
    the symbols as a flat int32 array: no int64 copy of a band the size of an embedding."""
    flat = np.asarray(levels).reshape(-1)
    if flat.dtype.kind not in "iu":
        flat = flat.astype(np.int64)
    q_min, q_max = int(flat.min()), int(flat.max())
    if q_max - q_min + 1 > L.MAX_ALPHABET or q_min < -L.MAX_LEVEL or q_max > L.MAX_LEVEL:
        raise fail("BAD_OPTION", "levels span more than the format allows (65536 symbols within ±2^20)")
    symbols = np.subtract(flat, q_min, dtype=np.int32)  # exact: |level| <= 2^20
    counts = np.zeros(q_max - q_min + 1, dtype=np.int64)
    for start in range(0, symbols.size, COUNT_BLOCK):
        counts += np.bincount(symbols[start:start + COUNT_BLOCK], minlength=len(counts))
    return q_min, symbols, counts


def write(band_levels: Iterable[np.ndarray], band_steps: Sequence[int], *, layout: str = "out_in",
          transform: Optional[np.ndarray] = None, row_band: Optional[np.ndarray] = None) -> Encoded:
    """A ``tq`` tensor from its bands.

    ``band_levels[b]``: int levels [rows_b, cols] (cols = m without transform, n with one), in
    band order; read once, so a generator lets each band's levels go once they are coded;
    ``band_steps[b]``: its step code; ``transform``: synthesis S [m, k] (stored as float16, so
    pass values already rounded to float16 if the encoder's reconstruction must match);
    ``row_band``: the band of each row of C (1.4; band b's levels are then its rows in increasing
    order). Left out when the bands are consecutive runs, band 0 first.
    """
    streams: list[Chunks] = []
    if transform is None:
        streams.append([])
    else:
        data = np.ascontiguousarray(transform, dtype="<f2").tobytes()
        streams.append([(len(data), data)])
    rows, qmins, blobs = [], [], []
    for lv in band_levels:
        q_min, symbols, counts = band_symbols(lv)
        rows.append(int(np.shape(lv)[0]))
        qmins.append(q_min)
        blobs.append(pack_counts(counts))
        streams.append(symbol_chunks(symbols, counts))
        del lv, symbols  # before the next band's levels are made
    params = {"band_rows": rows, "steps": [int(c) for c in band_steps], "q_min": qmins, "counts": blobs}
    if layout != "out_in":
        params["layout"] = layout
    if transform is not None:
        params["transform"] = "float16"
    if row_band is not None:
        band = np.asarray(row_band)
        if len(rows) > MAX_MAPPED_BANDS or band.shape != (sum(rows),) or \
                not np.array_equal(np.bincount(band, minlength=len(rows)), rows):
            raise ValueError("row_band must name one of at most 256 bands for each row, band b for rows[b] rows")
        if (np.diff(band.astype(np.int64)) < 0).any():
            params["row_band"] = band.astype(np.uint8).tobytes()
    return Encoded("tq", params, streams)

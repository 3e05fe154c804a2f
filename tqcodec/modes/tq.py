"""Mode ``tq`` (spec §7.5, ``spec/mode-tq.md``): transform quantization.

A weight is viewed as a matrix R [n, m] (n output channels); its integer coefficient matrix is
cut into bands of rows, each band with its own exact dyadic step (§7.1) and its own frequency
table (§7.3.1), range-coded (§8) in its own stream. Optionally a synthesis transform S [m, k]
stored as float16 rebuilds R = (S · C)^T from k coefficient rows (dimensionality reduction:
the rows not kept are zero).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .. import limits as L
from ..coding.rangecoder import encode_symbols
from ..coding.tables import frequencies_from_counts
from ..dtypes import FLOAT_NAMES, round_exact_float32
from ..errors import fail
from ..format.manifest import TensorRecord, check_record_value_types
from ..format.freqtable import pack_leb128, unpack_leb128
from ..steps import STEP_CODE_MAX, STEP_CODE_MIN, steps_from_codes
from .lineage_common import read_symbols

LAYOUTS = ("out_in", "in_out")
TRANSFORMS = ("none", "float16")
CHUNK_SYMBOLS = 1 << 20  # encoder choice: symbols per chunk
MAX_BANDS = 4096  # spec §7.5.1

_PARAMS = [("band_rows", list), ("steps", list), ("q_min", list), ("counts", list)]
_OPTIONAL = {"layout": "out_in", "transform": "none"}  # spec §7.5.1: absent = default
MAX_COUNT_BYTES = 6  # a LEB128 count holds up to 42 bits (numel <= 2^36, spec §12)


def pack_counts(counts: np.ndarray) -> bytes:
    """Spec §7.5.1: unsigned LEB128 of each count, concatenated."""
    return pack_leb128(counts)


def unpack_counts(data: bytes, total: int, name: str) -> np.ndarray:
    """Spec §7.5.1 rule 7: parse a band's counts and check them (``BAD_TABLE``)."""
    values = unpack_leb128(data, MAX_COUNT_BYTES, "count", name)
    if values[0] == 0 or values[-1] == 0:
        raise fail("BAD_TABLE", f"tensor {name!r}: a band's first and last counts must not be 0")
    if sum(values) != total:
        raise fail("BAD_TABLE", f"tensor {name!r}: a band's counts sum to {sum(values)}, not its {total} symbols")
    return np.array(values, dtype=np.int64)


class _Parsed:
    __slots__ = ("layout", "transform", "n", "m", "k", "rows", "steps", "q_min", "freqs", "cols")


def _ints(values: list, what: str, name: str) -> list[int]:
    if not all(type(v) is int for v in values):
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: {what} must be integers")
    return values


def _parse(record: TensorRecord) -> _Parsed:
    """Spec §7.5.1's parameter rules, in order."""
    name = record.name
    given = dict(record.params)
    for key in _OPTIONAL:
        if key in given and not isinstance(given[key], str):
            raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: params[{key!r}] is not str")
    p = {**_OPTIONAL, **given}
    check_record_value_types({k: v for k, v in given.items() if k not in _OPTIONAL}, _PARAMS, name)
    rows = _ints(p["band_rows"], "band_rows", name)  # rule 1: element types before any value check
    steps = _ints(p["steps"], "steps", name)
    qmins = _ints(p["q_min"], "q_min", name)
    if not all(isinstance(blob, bytes) for blob in p["counts"]):
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: counts must be bins")
    if record.dtype not in FLOAT_NAMES:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: tq mode needs a float dtype, not {record.dtype}")
    if len(record.shape) < 1 or record.numel < 1:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: tq mode needs at least one dimension and element")
    out = _Parsed()
    out.layout, out.transform = p["layout"], p["transform"]
    if out.layout not in LAYOUTS:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: layout {out.layout!r} not in {LAYOUTS}")
    if out.layout == "in_out" and len(record.shape) != 2:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: layout in_out needs a 2-D tensor")
    if out.transform not in TRANSFORMS:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: transform {out.transform!r} not in {TRANSFORMS}")
    out.n = record.shape[0] if out.layout == "out_in" else record.shape[1]
    out.m = record.numel // out.n
    nb = len(rows)
    if nb < 1 or nb > MAX_BANDS or len(p["steps"]) != nb or len(p["q_min"]) != nb or len(p["counts"]) != nb:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: band_rows, steps, q_min and counts must have the "
                                        f"same length, 1..{MAX_BANDS}")
    if min(rows) < 1:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: a band has no rows")
    k = sum(rows)
    if out.transform == "none" and k != out.n:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: bands cover {k} rows, not {out.n}")
    if out.transform == "float16" and k > min(out.m, out.n):
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: {k} coefficient rows for a {out.n}x{out.m} matrix "
                                        "(at most min(n, m))")
    if min(steps) < STEP_CODE_MIN or max(steps) > STEP_CODE_MAX:
        raise fail("BAD_STEP", f"tensor {name!r}: step code outside [{STEP_CODE_MIN}, {STEP_CODE_MAX}]")
    cols = out.m if out.transform == "none" else out.n
    freqs = []
    for b, (blob, q0, r) in enumerate(zip(p["counts"], qmins, rows)):
        c = unpack_counts(blob, r * cols, name)
        if q0 < -L.MAX_LEVEL or q0 + len(c) - 1 > L.MAX_LEVEL:
            raise fail("LIMIT_EXCEEDED", f"tensor {name!r}: band {b} levels outside -2^20..2^20")
        freqs.append(frequencies_from_counts(c) if len(c) > 1 else None)  # spec §8.6, normative here
    out.k, out.rows, out.steps, out.q_min, out.freqs, out.cols = k, rows, steps, qmins, freqs, cols
    return out


def _band_cols(p: _Parsed) -> int:
    return p.cols


def stream_items(index: int, record: TensorRecord, records: Sequence[TensorRecord]) -> tuple[int, ...]:
    """Stream 0: the transform's bytes (2*m*k, or 0); stream 1+b: band b's symbols (0 when its
    table has one entry)."""
    p = _parse(record)
    cols = _band_cols(p)
    first = 2 * p.m * p.k if p.transform == "float16" else 0
    return (first,) + tuple(r * cols if f is not None else 0 for r, f in zip(p.rows, p.freqs))


def _band_levels(p: _Parsed, b: int, chunks: list[tuple[int, bytes]], count: int, name: str) -> np.ndarray:
    """Band ``b``'s levels: its symbols (§7.5.2, read as every counts-table mode reads them) + q_min."""
    return read_symbols(chunks, p.freqs[b], count, name) + p.q_min[b]


def _transform(p: _Parsed, chunks: list[tuple[int, bytes]], name: str) -> np.ndarray:
    """Spec §7.5.2 stream 0: the synthesis transform S [m, k] as float16 (finite, §7.5.3)."""
    for count, payload in chunks:
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


def decode(record: TensorRecord, streams: list[list[tuple[int, bytes]]]) -> np.ndarray:
    """Spec §7.5.3: levels -> coefficients -> (transform) -> dtype."""
    p = _parse(record)
    cols = _band_cols(p)
    steps = steps_from_codes(np.array(p.steps, dtype=np.int64))
    coeff = np.empty((p.k, cols), dtype=np.float64)
    r0 = 0
    for b, rows in enumerate(p.rows):
        lv = _band_levels(p, b, streams[1 + b], rows * cols, record.name)
        coeff[r0:r0 + rows] = lv.reshape(rows, cols) * steps[b]  # exact (§7.5.3 step 2)
        r0 += rows
    if p.transform == "none":
        mat = coeff.astype(np.float32)  # exact: < 2^21 levels times a 3-bit-mantissa step
    else:
        s = _transform(p, streams[0], record.name).astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            mat = (s @ coeff).T.astype(np.float32)  # [n, m]; §7.5.3 step 3 (tolerance stated there)
    if p.layout == "in_out":
        mat = mat.T
    return round_exact_float32(record.dtype, np.ascontiguousarray(mat)).reshape(record.shape)


def decode_parts(record: TensorRecord, streams: list[list[tuple[int, bytes]]]) -> dict:
    """Spec §7.5.3 steps 1-2 only (the integer stage, for transform-domain layers, ``tqcodec.nn``):
    ``levels`` (band b's [band_rows[b], c] levels, narrowest of int8/int16/int32), ``steps``
    (float64 step of each band), ``band_rows``, ``transform`` (S [m, k] float16, or None),
    ``layout``, ``n``, ``m``, ``k``. Same checks as :func:`decode`."""
    p = _parse(record)
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
    return {"levels": levels, "steps": steps, "band_rows": list(p.rows), "transform": s, "layout": p.layout,
            "n": p.n, "m": p.m, "k": p.k}


# --- encoder ------------------------------------------------------------------------------

def counts_for(levels: np.ndarray) -> tuple[int, np.ndarray]:
    """(q_min, symbol counts) of one band's levels."""
    flat = np.asarray(levels, dtype=np.int64).reshape(-1)
    q_min, q_max = int(flat.min()), int(flat.max())
    if q_max - q_min + 1 > L.MAX_ALPHABET or q_min < -L.MAX_LEVEL or q_max > L.MAX_LEVEL:
        raise fail("BAD_OPTION", "levels span more than the format allows (65536 symbols within ±2^20)")
    return q_min, np.bincount(flat - q_min, minlength=q_max - q_min + 1)


def encode(band_levels: Sequence[np.ndarray], band_steps: Sequence[int], *, layout: str = "out_in",
           transform: Optional[np.ndarray] = None) -> tuple[dict, list[list[tuple[int, bytes]]]]:
    """Params and streams of a ``tq`` tensor.

    ``band_levels[b]``: int levels [rows_b, cols] (cols = m without transform, n with one);
    ``band_steps[b]``: its step code; ``transform``: synthesis S [m, k] (stored as float16, so
    pass values already rounded to float16 if the encoder's reconstruction must match).
    """
    streams: list[list[tuple[int, bytes]]] = []
    if transform is None:
        streams.append([])
    else:
        data = np.ascontiguousarray(transform, dtype="<f2").tobytes()
        streams.append([(len(data), data)])
    rows, qmins, blobs = [], [], []
    for lv in band_levels:
        lv = np.asarray(lv, dtype=np.int64)
        q_min, counts = counts_for(lv)
        rows.append(int(lv.shape[0]))
        qmins.append(q_min)
        blobs.append(pack_counts(counts))
        chunks: list[tuple[int, bytes]] = []
        if len(counts) > 1:
            freqs = frequencies_from_counts(counts)
            sym = (lv.reshape(-1) - q_min).astype(np.int32)
            for start in range(0, sym.size, CHUNK_SYMBOLS):
                piece = sym[start:start + CHUNK_SYMBOLS]
                chunks.append((piece.size, np.asarray(encode_symbols(piece, freqs), dtype="<u4").tobytes()))
        streams.append(chunks)
    params = {"band_rows": rows, "steps": [int(c) for c in band_steps], "q_min": qmins, "counts": blobs}
    if layout != "out_in":
        params["layout"] = layout
    if transform is not None:
        params["transform"] = "float16"
    return params, streams

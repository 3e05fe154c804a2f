"""Shared definitions of modes ``ecsq``, ``kmeans``, ``pq`` and ``dither`` (spec §7.S,
``spec/mode-lineage.md``): parameter parsing, counts tables (§7.S.2), value streams (§7.S.3),
symbol streams (§7.S.4), rounding to the dtype (§7.S.5) and the SplitMix64 dither generator
(§7.S.6). Encoder helpers (packing a stream) sit next to the decoder's.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from .. import limits as L
from ..coding.rangecoder import Model, decode_symbols, encode_symbols
from ..coding.tables import frequencies_from_counts
from ..dtypes import FLOAT_NAMES, float32_to_bfloat16_bits
from ..errors import fail
from ..format.freqtable import pack_leb128, unpack_leb128
from ..format.manifest import TensorRecord

PRECISIONS = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}  # spec §7.S.3
MAX_COUNT_BYTES = 6  # spec §7.S.2: a LEB128 count holds up to 42 bits (numel <= 2^36)
CHUNK_SYMBOLS = 1 << 20  # encoder choice: symbols per chunk
CHUNK_BYTES = 1 << 22  # encoder choice: value-stream bytes per chunk

# --- parameters ---------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return type(v) is int  # msgpack integers; a bool is not one (spec §5.1)


_TYPES = {int: _is_int, str: lambda v: isinstance(v, str), bytes: lambda v: isinstance(v, bytes),
          list: lambda v: isinstance(v, list)}


def check_keys(record: TensorRecord, required: dict[str, type], optional: dict[str, type],
               elements: Optional[dict[str, type]] = None) -> dict:
    """Rule 1 of each mode: required keys present, no other key than ``optional`` ones, the
    types (``elements``: the element type of array keys). ``BAD_TENSOR_RECORD``."""
    name = record.name
    p = record.params
    missing = [k for k in required if k not in p]
    if missing:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: mode {record.mode} needs params {missing}")
    unknown = sorted(k for k in p if k not in required and k not in optional)
    if unknown:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: unknown params {unknown} for mode {record.mode}")
    for key, typ in {**required, **optional}.items():
        if key in p and not _TYPES[typ](p[key]):
            raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: params[{key!r}] is not {typ.__name__}")
    for key, typ in (elements or {}).items():
        if key in p and not all(_TYPES[typ](v) for v in p[key]):
            raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: the elements of params[{key!r}] must be "
                                            f"{'integers' if typ is int else 'bins'}")
    return p


def check_float(record: TensorRecord, rows: bool) -> None:
    """Rule 2: a float dtype, at least one element (and one dimension when ``rows``)."""
    if record.dtype not in FLOAT_NAMES:
        raise fail("BAD_TENSOR_RECORD", f"tensor {record.name!r}: mode {record.mode} needs a float dtype, "
                                        f"not {record.dtype}")
    if record.numel < 1 or (rows and len(record.shape) < 1):
        raise fail("BAD_TENSOR_RECORD", f"tensor {record.name!r}: mode {record.mode} needs at least one "
                                        f"{'dimension and ' if rows else ''}element")


def check_precision(record: TensorRecord, value: str) -> str:
    if value not in PRECISIONS:
        raise fail("BAD_TENSOR_RECORD", f"tensor {record.name!r}: precision {value!r} is not float16 or float32")
    return value


def row_view(shape: Sequence[int]) -> tuple[int, int]:
    """Spec §7.S.1: ``(n, m)`` = (shape[0], numel / n); a 0 row count cannot occur (numel >= 1)."""
    n = int(shape[0])
    numel = 1
    for d in shape:
        numel *= int(d)
    return n, numel // n


# --- §7.S.2 counts tables -----------------------------------------------------------------------

def parse_counts(blob: bytes, total: int, name: str, zeros: str) -> np.ndarray:
    """Spec §7.S.2: parse a counts table and check it (``BAD_TABLE``). ``zeros``: ``"inner"`` (first
    and last counts not 0: grid levels) or ``"none"`` (no count 0: codebook indices)."""
    values = unpack_leb128(blob, MAX_COUNT_BYTES, "count", name)
    if zeros == "none":
        if 0 in values:
            raise fail("BAD_TABLE", f"tensor {name!r}: count 0 for codebook entry {values.index(0)} "
                                    "(every stored entry must be used)")
    elif values[0] == 0 or values[-1] == 0:
        raise fail("BAD_TABLE", f"tensor {name!r}: the first and last counts must not be 0")
    if sum(values) != total:
        raise fail("BAD_TABLE", f"tensor {name!r}: counts sum to {sum(values)}, not the stream's {total} symbols")
    return np.array(values, dtype=np.int64)


def check_levels(q_min: int, alphabet: int, name: str) -> None:
    """Levels within §12's -2^20..2^20 (``LIMIT_EXCEEDED``)."""
    if q_min < -L.MAX_LEVEL or q_min + alphabet - 1 > L.MAX_LEVEL:
        raise fail("LIMIT_EXCEEDED", f"tensor {name!r}: levels outside -2^20..2^20")


def table(counts: np.ndarray) -> Optional[np.ndarray]:
    """The range-coder table of §8.6 (normative here), or None for a one-entry table."""
    return frequencies_from_counts(counts) if len(counts) > 1 else None


def pack_counts(counts: np.ndarray) -> bytes:
    """Spec §7.S.2: LEB128 of each count."""
    return pack_leb128(counts)


# --- §7.S.3 value streams -----------------------------------------------------------------------

def read_values(chunks: list[tuple[int, bytes]], count: int, precision: str, name: str) -> np.ndarray:
    """Spec §7.S.3: ``count`` stored values as float32 (exact), each finite (``BAD_PAYLOAD``);
    every chunk's ``Payload_Length`` equals its ``Item_Count`` (``BAD_CHUNK``)."""
    for items, payload in chunks:
        if len(payload) != items:
            raise fail("BAD_CHUNK", f"tensor {name!r}: a value chunk of {len(payload)} bytes declares "
                                    f"{items} items (they must be equal)")
    data = b"".join(payload for _, payload in chunks)
    dt = PRECISIONS[precision]
    if len(data) != count * dt.itemsize:
        raise fail("BAD_CHUNK", f"tensor {name!r}: value stream of {len(data)} bytes, expected {count * dt.itemsize}")
    values = np.frombuffer(data, dtype=dt).astype(np.float32)
    if not np.isfinite(values).all():
        raise fail("BAD_PAYLOAD", f"tensor {name!r}: a stored value is NaN or infinite")
    return values


def check_increasing(values: np.ndarray, name: str, what: str) -> None:
    """Strictly increasing (as real numbers: -0 == +0), else ``BAD_PAYLOAD``."""
    if values.size > 1 and not np.all(values[1:] > values[:-1]):
        raise fail("BAD_PAYLOAD", f"tensor {name!r}: {what} values are not strictly increasing")


def value_chunks(values: np.ndarray, precision: str) -> list[tuple[int, bytes]]:
    """Encoder: a value stream's chunks (``values`` already representable in ``precision``)."""
    data = np.ascontiguousarray(values, dtype=PRECISIONS[precision]).tobytes()
    return [(len(data[i:i + CHUNK_BYTES]), data[i:i + CHUNK_BYTES]) for i in range(0, len(data), CHUNK_BYTES)]


# --- §7.S.4 symbol streams ----------------------------------------------------------------------

def read_symbols(chunks: list[tuple[int, bytes]], freqs: Optional[np.ndarray], count: int,
                 name: str) -> np.ndarray:
    """Spec §7.S.4: ``count`` symbols (int64); all 0 for a one-entry table."""
    if freqs is None:
        return np.zeros(count, dtype=np.int64)
    out = np.empty(count, dtype=np.int64)
    model = Model(freqs)
    pos = 0
    for items, payload in chunks:
        if len(payload) % 4 or not payload:
            raise fail("BAD_CHUNK", f"tensor {name!r}: range-coded payload of {len(payload)} bytes "
                                    "is not a positive multiple of 4")
        out[pos:pos + items] = decode_symbols(np.frombuffer(payload, dtype="<u4"), model, items)
        pos += items
    return out


def symbol_chunks(symbols: np.ndarray, counts: np.ndarray) -> list[tuple[int, bytes]]:
    """Encoder: a symbol stream's chunks (none for a one-entry table)."""
    if len(counts) < 2:
        return []
    freqs = frequencies_from_counts(counts)
    sym = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
    out = []
    for start in range(0, sym.size, CHUNK_SYMBOLS):
        piece = sym[start:start + CHUNK_SYMBOLS]
        out.append((piece.size, np.asarray(encode_symbols(piece, freqs), dtype="<u4").tobytes()))
    return out


# --- §7.S.5 rounding to the dtype ---------------------------------------------------------------

def round_binary32(dtype: str, v: np.ndarray) -> np.ndarray:
    """Spec §7.S.5, binary32 values: the dtype's storage array (as §7.3.2)."""
    v = np.asarray(v, dtype=np.float32)
    if dtype == "float32":
        return v
    if dtype == "float64":
        return v.astype(np.float64)
    if dtype == "float16":
        with np.errstate(over="ignore"):  # overflow to +-inf is the spec's rounding
            return v.astype(np.float16)
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(v)
    raise ValueError(f"not a float dtype: {dtype}")


def round_binary64(dtype: str, r: np.ndarray) -> np.ndarray:
    """Spec §7.S.5, binary64 values: float64 kept; else to binary32 (nearest even), then as above."""
    r = np.asarray(r, dtype=np.float64)
    if dtype == "float64":
        return r
    with np.errstate(over="ignore"):
        return round_binary32(dtype, r.astype(np.float32))


# --- §7.S.6 dither generator ----------------------------------------------------------------------

GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(seed: int, start: int, count: int) -> np.ndarray:
    """Spec §7.S.6: outputs ``z_start .. z_{start+count-1}`` of SplitMix64 from state ``seed``
    (uint64, arithmetic mod 2^64)."""
    k = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = np.uint64(seed) + k * GAMMA
        x = (x ^ (x >> np.uint64(30))) * MIX1
        x = (x ^ (x >> np.uint64(27))) * MIX2
    return x ^ (x >> np.uint64(31))


def numerators(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spec §7.S.6: the dither numerators ``(t1, t2)`` (int64, odd, |t| < 2^21) of outputs ``z``."""
    r1 = (z >> np.uint64(43)).astype(np.int64)
    r2 = ((z >> np.uint64(22)) & np.uint64((1 << 21) - 1)).astype(np.int64)
    return 2 * r1 + 1 - (1 << 21), 2 * r2 + 1 - (1 << 21)

"""Stream forms several modes share (spec §7.S, ``spec/mode-lineage.md``, and §7.5.2): a counts
table's range-coder table (§7.S.2), value streams (§7.S.3) and symbol streams (§7.S.4), read and
written. Arrays in, arrays out."""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from .. import limits as L
from ..coding.rangecoder import Model, decode_symbols, encode_symbols
from ..coding.tables import frequencies_from_counts
from ..errors import fail
from ..format.manifest import TensorRecord
from .base import Chunks

PRECISIONS = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}  # spec §7.S.3
CHUNK_SYMBOLS = 1 << 20  # encoder choice: symbols per chunk
CHUNK_BYTES = 1 << 22  # encoder choice: value-stream bytes per chunk


def check_precision(record: TensorRecord, value: str) -> str:
    """Spec §7.S.3: a value stream's ``precision`` is float16 or float32 (``BAD_TENSOR_RECORD``)."""
    if value not in PRECISIONS:
        raise fail("BAD_TENSOR_RECORD", f"tensor {record.name!r}: precision {value!r} is not float16 or float32")
    return value


def check_levels(q_min: int, alphabet: int, name: str) -> None:
    """Levels within §12's -2^20..2^20 (``LIMIT_EXCEEDED``)."""
    if q_min < -L.MAX_LEVEL or q_min + alphabet - 1 > L.MAX_LEVEL:
        raise fail("LIMIT_EXCEEDED", f"tensor {name!r}: levels outside -2^20..2^20")


def table(counts: np.ndarray) -> Optional[np.ndarray]:
    """The range-coder table of §8.6 (normative here) for a counts table, or None for a
    one-entry table (its stream has no chunks)."""
    return frequencies_from_counts(counts) if len(counts) > 1 else None


# --- §7.S.3 value streams -----------------------------------------------------------------------

def read_values(chunks: Chunks, count: int, precision: str, name: str) -> np.ndarray:
    """Spec §7.S.3: ``count`` stored values as float32 (exact), each finite (``BAD_PAYLOAD``);
    every chunk's ``Payload_Length`` equals its ``Item_Count`` (``BAD_CHUNK``: the container reader
    checks it from each header, spec §10.1 step 3; checked again here for direct callers)."""
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


def value_chunks(values: np.ndarray, precision: str) -> Chunks:
    """Encoder: a value stream's chunks (``values`` already representable in ``precision``)."""
    data = np.ascontiguousarray(values, dtype=PRECISIONS[precision]).tobytes()
    return [(len(data[i:i + CHUNK_BYTES]), data[i:i + CHUNK_BYTES]) for i in range(0, len(data), CHUNK_BYTES)]


# --- §7.S.4 symbol streams ----------------------------------------------------------------------

class Predecoded(list):
    """A range-coded stream's chunks (``(Item_Count, payload)``, as any ``Chunks``) whose symbols
    were asked of worker threads ahead of the decode (``tqcodec.pipeline.decode.Prefetch``):
    ``tasks[j]`` gives chunk j's symbols (``tqcodec.coding.workers.Task``), or is None for a chunk
    decoded here. :func:`iter_symbols` takes them in the same order, with the same checks."""

    tasks: list


def iter_symbols(chunks: Chunks, freqs: np.ndarray, name: str) -> Iterator[tuple[int, int, np.ndarray]]:
    """Spec §7.S.4 (and §7.5.2's bands): ``(first symbol, count, symbols)`` of each chunk of a
    range-coded stream, in order, each chunk decoded with the §8.5 check (``BAD_CHUNK`` for a
    payload that is no positive multiple of 4 words, ``BAD_PAYLOAD`` for one that does not
    decode canonically). The symbols are unsigned integers (any width) below ``len(freqs)``."""
    model = Model(freqs)  # the table checked once per stream; constriction's model built on first use
    tasks = getattr(chunks, "tasks", None)
    pos = 0
    for j, (items, payload) in enumerate(chunks):
        if len(payload) % 4 or not payload:
            raise fail("BAD_CHUNK", f"tensor {name!r}: range-coded payload of {len(payload)} bytes "
                                    "is not a positive multiple of 4")
        task = tasks[j] if tasks is not None else None
        if task is not None:
            sym = task.result(model)
        else:
            sym = decode_symbols(np.frombuffer(payload, dtype="<u4"), model, items)
        yield pos, items, sym
        pos += items


def read_symbols(chunks: Chunks, freqs: Optional[np.ndarray], count: int, name: str) -> np.ndarray:
    """Spec §7.S.4 (and §7.5.2's bands): ``count`` symbols (int64); all 0 for a one-entry table.
    Payload lengths are checked again (the container reader checks them from the headers)."""
    if freqs is None:
        return np.zeros(count, dtype=np.int64)
    out = np.empty(count, dtype=np.int64)
    for pos, items, sym in iter_symbols(chunks, freqs, name):
        out[pos:pos + items] = sym
    return out


def symbol_chunks(symbols: np.ndarray, counts: np.ndarray) -> Chunks:
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

"""Mode ``uniform`` (spec §7.3): uniform scalar quantization, per tensor or per output
channel, exact dyadic steps, levels range-coded with one frequency table."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .. import limits as L
from ..coding.rangecoder import encode_symbols
from ..coding.tables import frequencies_from_counts
from ..errors import fail
from ..format.chunks import PayloadKind, StreamSpec
from ..format.dtypes import FLOAT_NAMES, round_binary32, storage_to_float64
from ..format.leb128 import TOTAL, pack_freqs, unpack_freqs
from ..format.manifest import TensorRecord
from ..format.steps import STEP_CODE_MAX, STEP_CODE_MIN, code_at_most, steps_from_codes
from .base import Chunks, Encoded, check_keys
from .streams import iter_symbols

GRANULARITIES = ("tensor", "channel")
CHUNK_SYMBOLS = 1 << 20  # encoder choice: symbols per chunk (chunks decode in parallel)

_PARAMS = {"granularity": str, "steps": list, "q_min": int, "freqs": bytes}


@dataclass(frozen=True)
class Params:
    granularity: str
    codes: tuple[int, ...]  # step codes: one, or one per output channel
    q_min: int
    freqs: np.ndarray  # the checked frequency table (uint32, read-only)


def parse(record: TensorRecord) -> Params:
    """Spec §7.3's parameter rules, in order."""
    name = record.name
    p = check_keys(record, _PARAMS)
    if record.dtype not in FLOAT_NAMES:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: uniform mode needs a float dtype, not {record.dtype}")
    if record.numel < 1:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: uniform mode needs at least one element")
    gran = p["granularity"]
    if gran not in GRANULARITIES:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: granularity {gran!r} not in {GRANULARITIES}")
    want = 1 if gran == "tensor" else (record.shape[0] if record.shape else -1)
    if want < 1 or len(p["steps"]) != want:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: {len(p['steps'])} steps for granularity {gran!r}")
    steps = p["steps"]
    # exact type test: msgpack gives plain ints; a bool (numpy would make True a 1), a float or a
    # nested array is not a step code (conformance: uniform_step_bool_among_ints, uniform_steps_nested)
    if not all(type(c) is int for c in steps):
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: steps must be integers")
    # range test on Python ints: any integer msgpack holds (-2^63 .. 2^64-1) is BAD_STEP when out of
    # range, even mixed with negatives (conformance: uniform_step_codes_mixed_extremes)
    if min(steps) < STEP_CODE_MIN or max(steps) > STEP_CODE_MAX:
        raise fail("BAD_STEP", f"tensor {name!r}: step code outside [{STEP_CODE_MIN}, {STEP_CODE_MAX}]")
    freqs = unpack_freqs(p["freqs"], name)
    freqs.flags.writeable = False
    q_min = p["q_min"]
    if q_min < -L.MAX_LEVEL or q_min + len(freqs) - 1 > L.MAX_LEVEL:
        raise fail("LIMIT_EXCEEDED", f"tensor {name!r}: levels outside -2^20..2^20")
    return Params(gran, tuple(steps), q_min, freqs)


def stream_items(p: Params, index: int, records: Sequence[TensorRecord]) -> tuple[StreamSpec, ...]:
    """Spec §7.3.2: stream 0 the symbols (none for a one-entry table)."""
    return (StreamSpec(records[index].numel if len(p.freqs) > 1 else 0, PayloadKind.SYMBOLS),)


def symbol_tables(p: Params) -> tuple[Optional[np.ndarray], ...]:
    """The range-coder table of each stream (None: not range-coded): stream 0's."""
    return (p.freqs if len(p.freqs) > 1 else None,)


def _decoded_levels(p: Params, record: TensorRecord, streams: list[Chunks], dtype: type) -> np.ndarray:
    """Spec §7.3.2 steps 1-2: the tensor's levels, flat, as ``dtype``."""
    n = record.numel
    levels = np.empty(n, dtype=dtype)
    q_min, freqs = p.q_min, p.freqs
    if len(freqs) == 1:
        levels.fill(q_min)
    else:
        for pos, count, sym in iter_symbols(streams[0], freqs, record.name):
            np.add(sym, np.int64(q_min), out=levels[pos:pos + count], casting="unsafe")  # symbols may be uint8
    return levels


def decode(p: Params, record: TensorRecord, streams: list[Chunks]) -> np.ndarray:
    """Spec §7.3.2: symbols -> levels -> exact values -> rounded to the dtype."""
    levels = _decoded_levels(p, record, streams, np.float32)  # exact: |level| <= 2^20
    steps = steps_from_codes(np.array(p.codes, dtype=np.int64)).astype(np.float32)  # exact: 3 significant bits
    if p.granularity == "tensor":
        levels *= steps[0]
    else:
        levels.reshape(record.shape[0], -1)[...] *= steps[:, None]
    return round_binary32(record.dtype, levels).reshape(record.shape)


def parts(p: Params, record: TensorRecord, streams: list[Chunks]) -> dict:
    """The integer stage: ``levels`` (int32, the tensor's shape), ``granularity``, ``codes``
    (step codes), ``steps`` (float64, exact), ``q_min``, ``q_max`` (the table's level range)."""
    levels = _decoded_levels(p, record, streams, np.int32).reshape(record.shape)
    return {"levels": levels, "granularity": p.granularity, "codes": list(p.codes),
            "steps": steps_from_codes(np.array(p.codes, dtype=np.int64)), "q_min": p.q_min,
            "q_max": p.q_min + len(p.freqs) - 1}


# --- encoder ------------------------------------------------------------------------------

BLOCK_ELEMENTS = 1 << 22  # the encoder's working set: float64 blocks of about this many elements


class _Source:
    """Float64 values of a tensor read in flat ranges (converted from its storage on demand)."""

    def __init__(self, values: Callable[[int, int], np.ndarray], shape: tuple, granularity: str):
        self.read, self.n = values, int(np.prod(shape)) if shape else 1
        self.rows = 1 if granularity == "tensor" else shape[0]
        self.m = self.n // self.rows if self.rows else 0

    def row_blocks(self) -> Iterator[tuple[int, int]]:
        """Whole rows (channel granularity) or flat ranges (tensor) of about BLOCK_ELEMENTS."""
        if self.rows == 1:
            for s in range(0, self.n, BLOCK_ELEMENTS):
                yield s, min(self.n, s + BLOCK_ELEMENTS)
            return
        per = max(1, BLOCK_ELEMENTS // max(self.m, 1))
        for r in range(0, self.rows, per):
            yield r * self.m, min(self.rows, r + per) * self.m


def _step_codes(src: "_Source", snr_db: float) -> np.ndarray:
    """Per tensor or channel: the largest step whose uniform noise gives at least ``snr_db``
    of weight SQNR (noise step^2/12 against the mean square), and never so small that
    levels leave -2^20..2^20 or the alphabet passes 65536."""
    sq, peak = np.zeros(src.rows), np.zeros(src.rows)
    lo, hi = np.full(src.rows, np.inf), np.full(src.rows, -np.inf)
    for s, e in src.row_blocks():
        block = src.read(s, e).reshape(-1, src.m if src.rows > 1 else e - s)  # [rows of the block, row]
        r = slice(0, 1) if src.rows == 1 else slice(s // src.m, e // src.m)
        sq[r] += np.sum(np.square(block), axis=1)
        peak[r] = np.maximum(peak[r], np.max(np.abs(block), axis=1))
        lo[r] = np.minimum(lo[r], np.min(block, axis=1))
        hi[r] = np.maximum(hi[r], np.max(block, axis=1))
    rms = np.sqrt(sq / max(src.n // src.rows, 1))
    span = hi - lo
    codes = []
    for r, pk, sp in zip(rms.tolist(), peak.tolist(), span.tolist()):
        target = r * math.sqrt(12.0) * 10.0 ** (-snr_db / 20.0) if r > 0 else 1.0
        code = code_at_most(target)
        floor_step = max(pk / L.MAX_LEVEL, sp / (L.MAX_ALPHABET - 2), 2.0 ** -40)
        while code < STEP_CODE_MAX and steps_from_codes([code])[0] < floor_step:
            code += 1
        codes.append(code)
    return np.array(codes, dtype=np.int64)


def _levels(src: "_Source", steps: np.ndarray, s: int, e: int) -> np.ndarray:
    """Nearest levels (ties to even) of flat elements s..e, each divided by its row's step."""
    x = src.read(s, e)
    step = steps[0] if src.rows == 1 else steps[np.arange(s, e) // src.m]
    q = np.rint(x / step)
    return np.clip(q, -L.MAX_LEVEL, L.MAX_LEVEL).astype(np.int64)


def encode(values: np.ndarray, dtype: str, granularity: str = "channel", snr_db: float = 40.0,
           codes: np.ndarray | None = None, levels: np.ndarray | None = None,
           ) -> Encoded:
    """Spec §7.3 encoder for float64 ``values``.

    ``codes`` (step codes) and ``levels`` (integer levels) may be given by a smarter
    encoder; by default steps come from ``snr_db`` and levels from rounding.
    """
    if levels is not None:
        flat = np.asarray(levels).reshape(-1)
        return _encode(lambda s, e: values.reshape(-1)[s:e], values.shape, granularity, snr_db, codes,
                       lambda s, e: flat[s:e])
    return _encode(lambda s, e: values.reshape(-1)[s:e], values.shape, granularity, snr_db, codes)


def encode_storage(arr: np.ndarray, dtype: str, granularity: str = "channel", snr_db: float = 40.0,
                   ) -> Encoded:
    """The same bytes as ``encode(storage_to_float64(dtype, arr), dtype, ...)``, converting the
    storage ``arr`` in blocks: the working set is a few blocks of ``BLOCK_ELEMENTS``, not eight
    bytes per element of the tensor, whatever its size."""
    flat = arr.reshape(-1)
    return _encode(lambda s, e: storage_to_float64(dtype, flat[s:e]), arr.shape, granularity, snr_db)


def _encode(read: Callable[[int, int], np.ndarray], shape: tuple, granularity: str, snr_db: float,
            codes: np.ndarray | None = None, given: Callable[[int, int], np.ndarray] | None = None,
            ) -> Encoded:
    if granularity not in GRANULARITIES:
        raise fail("BAD_OPTION", f"granularity {granularity!r} not in {GRANULARITIES}")
    if granularity == "channel" and (len(shape) == 0 or shape[0] == 0):
        granularity = "tensor"
    src = _Source(read, tuple(shape), granularity)
    if codes is None:
        codes = _step_codes(src, snr_db)
    steps = steps_from_codes(codes)
    levels_of = given if given is not None else (lambda s, e: _levels(src, steps, s, e))
    # pass 1: the alphabet and the symbol counts, block by block
    counts = np.zeros(2 * L.MAX_LEVEL + 2, dtype=np.int64)
    for s in range(0, src.n, BLOCK_ELEMENTS):
        lv = levels_of(s, min(src.n, s + BLOCK_ELEMENTS))
        if lv.size and (lv.min() < -L.MAX_LEVEL or lv.max() > L.MAX_LEVEL):
            raise fail("BAD_OPTION", "levels span more than the format allows (65536 symbols within ±2^20)")
        counts += np.bincount(lv + L.MAX_LEVEL, minlength=len(counts))
    used = np.flatnonzero(counts)
    q_min, q_max = int(used[0]) - L.MAX_LEVEL, int(used[-1]) - L.MAX_LEVEL
    if q_max - q_min + 1 > L.MAX_ALPHABET:
        raise fail("BAD_OPTION", "levels span more than the format allows (65536 symbols within ±2^20)")
    alphabet = q_max - q_min + 1
    chunks: list[tuple[int, bytes]] = []
    if alphabet == 1:
        freqs = np.array([TOTAL], dtype=np.uint32)
    else:
        freqs = frequencies_from_counts(counts[q_min + L.MAX_LEVEL:q_max + L.MAX_LEVEL + 1])
        # pass 2: each chunk's levels again (the same arithmetic, so the same levels), range-coded
        for start in range(0, src.n, CHUNK_SYMBOLS):
            piece = (levels_of(start, min(src.n, start + CHUNK_SYMBOLS)) - q_min).astype(np.int32)
            words = encode_symbols(piece, freqs)
            chunks.append((piece.size, np.asarray(words, dtype="<u4").tobytes()))
    params = {"granularity": granularity, "steps": [int(c) for c in codes], "q_min": q_min,
              "freqs": pack_freqs(freqs)}
    return Encoded("uniform", params, [chunks])

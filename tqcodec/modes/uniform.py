"""Mode ``uniform`` (spec §7.3): uniform scalar quantization, per tensor or per output
channel, exact dyadic steps, levels range-coded with one frequency table."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .. import limits as L
from ..coding.rangecoder import Model, decode_symbols, encode_symbols
from ..coding.tables import frequencies_from_counts
from ..dtypes import FLOAT_NAMES, round_exact_float32
from ..errors import fail
from ..format.freqtable import TOTAL, pack_freqs, unpack_freqs
from ..format.manifest import TensorRecord, check_record_value_types
from ..steps import STEP_CODE_MAX, STEP_CODE_MIN, code_at_most, steps_from_codes

GRANULARITIES = ("tensor", "channel")
CHUNK_SYMBOLS = 1 << 20  # encoder choice: symbols per chunk (chunks decode in parallel)

_PARAMS = [("granularity", str), ("steps", list), ("q_min", int), ("freqs", bytes)]


def _parse(record: TensorRecord) -> tuple[str, np.ndarray, int, np.ndarray]:
    """Spec §7.3's parameter rules; returns (granularity, step codes, q_min, freqs)."""
    name = record.name
    check_record_value_types(record.params, _PARAMS, name)
    p = record.params
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
    codes_arr = np.array(steps, dtype=np.int64)
    freqs = unpack_freqs(p["freqs"], name)
    q_min = p["q_min"]
    if q_min < -L.MAX_LEVEL or q_min + len(freqs) - 1 > L.MAX_LEVEL:
        raise fail("LIMIT_EXCEEDED", f"tensor {name!r}: levels outside -2^20..2^20")
    return gran, codes_arr, q_min, freqs


def stream_items(index: int, record: TensorRecord, records: Sequence[TensorRecord]) -> tuple[int, ...]:
    _, _, _, freqs = _parse(record)
    return (record.numel if len(freqs) > 1 else 0,)


def decode(record: TensorRecord, streams: list[list[tuple[int, bytes]]]) -> np.ndarray:
    """Spec §7.3.2: symbols -> levels -> exact values -> rounded to the dtype."""
    gran, codes, q_min, freqs = _parse(record)
    n = record.numel
    levels = np.empty(n, dtype=np.float32)
    if len(freqs) == 1:
        levels.fill(q_min)
    else:
        pos = 0
        model = Model(freqs)  # once per tensor, not per chunk
        for count, payload in streams[0]:
            if len(payload) % 4 or not payload:
                raise fail("BAD_CHUNK", f"tensor {record.name!r}: range-coded payload of {len(payload)} bytes "
                                        "is not a positive multiple of 4")
            words = np.frombuffer(payload, dtype="<u4")
            sym = decode_symbols(words, model, count)
            np.add(sym, q_min, out=levels[pos:pos + count], casting="unsafe")
            pos += count
    steps = steps_from_codes(codes).astype(np.float32)  # exact: 3 significant bits
    if gran == "tensor":
        levels *= steps[0]
    else:
        levels.reshape(record.shape[0], -1)[...] *= steps[:, None]
    return round_exact_float32(record.dtype, levels).reshape(record.shape)


# --- encoder ------------------------------------------------------------------------------

def choose_step_codes(values: np.ndarray, granularity: str, snr_db: float) -> np.ndarray:
    """Per tensor or channel: the largest step whose uniform noise gives at least ``snr_db``
    of weight SQNR (noise step^2/12 against the mean square), and never so small that
    levels leave -2^20..2^20 or the alphabet passes 65536."""
    rows = values.reshape(1, -1) if granularity == "tensor" else values.reshape(values.shape[0], -1)
    rms = np.sqrt(np.mean(np.square(rows), axis=1))
    peak = np.max(np.abs(rows), axis=1)
    span = np.max(rows, axis=1) - np.min(rows, axis=1)
    codes = []
    for r, pk, sp in zip(rms.tolist(), peak.tolist(), span.tolist()):
        target = r * math.sqrt(12.0) * 10.0 ** (-snr_db / 20.0) if r > 0 else 1.0
        code = code_at_most(target)
        floor_step = max(pk / L.MAX_LEVEL, sp / (L.MAX_ALPHABET - 2), 2.0 ** -40)
        while code < STEP_CODE_MAX and steps_from_codes([code])[0] < floor_step:
            code += 1
        codes.append(code)
    return np.array(codes, dtype=np.int64)


def quantize(values: np.ndarray, granularity: str, codes: np.ndarray) -> np.ndarray:
    """Nearest levels (ties to even) for float64 ``values`` with the given step codes."""
    steps = steps_from_codes(codes)
    rows = values.reshape(1, -1) if granularity == "tensor" else values.reshape(values.shape[0], -1)
    q = np.rint(rows / steps[:, None])
    return np.clip(q, -L.MAX_LEVEL, L.MAX_LEVEL).astype(np.int64).reshape(values.shape)


def encode(values: np.ndarray, dtype: str, granularity: str = "channel", snr_db: float = 40.0,
           codes: np.ndarray | None = None, levels: np.ndarray | None = None,
           ) -> tuple[dict, list[list[tuple[int, bytes]]]]:
    """Spec §7.3 encoder for float64 ``values``: params and stream 0's chunks.

    ``codes`` (step codes) and ``levels`` (integer levels) may be given by a smarter
    encoder; by default steps come from ``snr_db`` and levels from rounding.
    """
    if granularity not in GRANULARITIES:
        raise fail("BAD_OPTION", f"granularity {granularity!r} not in {GRANULARITIES}")
    if granularity == "channel" and (values.ndim == 0 or values.shape[0] == 0):
        granularity = "tensor"
    if codes is None:
        codes = choose_step_codes(values, granularity, snr_db)
    if levels is None:
        levels = quantize(values, granularity, codes)
    flat = levels.reshape(-1)
    q_min, q_max = int(flat.min()), int(flat.max())
    if q_max - q_min + 1 > L.MAX_ALPHABET or q_min < -L.MAX_LEVEL or q_max > L.MAX_LEVEL:
        raise fail("BAD_OPTION", "levels span more than the format allows (65536 symbols within ±2^20)")
    sym = (flat - q_min).astype(np.int32)
    alphabet = q_max - q_min + 1
    if alphabet == 1:
        freqs = np.array([TOTAL], dtype=np.uint32)
        chunks: list[tuple[int, bytes]] = []
    else:
        counts = np.bincount(sym, minlength=alphabet)
        freqs = frequencies_from_counts(counts)
        chunks = []
        for start in range(0, sym.size, CHUNK_SYMBOLS):
            piece = sym[start:start + CHUNK_SYMBOLS]
            words = encode_symbols(piece, freqs)
            chunks.append((piece.size, np.asarray(words, dtype="<u4").tobytes()))
    params = {"granularity": granularity, "steps": [int(c) for c in codes], "q_min": q_min,
              "freqs": pack_freqs(freqs)}
    return params, [chunks]

"""Unsigned LEB128 and the two tables written with it: frequency tables (spec §7.3.1) and
symbol-counts tables (spec §7.5.1 rule 7, §7.S.2)."""
from __future__ import annotations

import numpy as np

from .. import limits as L
from ..errors import fail

TOTAL = 1 << 24  # spec §7.3.1 / §8.2: a frequency table sums to 2^24
MAX_FREQUENCY_BYTES = 4  # a frequency < 2^24 takes at most 4 LEB128 bytes
MAX_COUNT_BYTES = 6  # a count holds up to 42 bits (numel <= 2^36, spec §12)
COUNTS_ZEROS = ("inner", "none")


def pack_leb128(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of each non-negative integer, concatenated."""
    out = bytearray()
    for f in np.asarray(values, dtype=np.int64).tolist():
        while True:
            byte = f & 0x7F
            f >>= 7
            if f:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
    return bytes(out)


def _unpack_regular(data: bytes, max_bytes: int) -> "np.ndarray | None":
    """The integers of ``data`` (int64) when it breaks none of :func:`unpack_leb128`'s rules,
    else None (:func:`_unpack_bytewise` then finds the first fault). Whole-array work: the
    tables of a 600M-parameter model took 0.5 s byte by byte, before any chunk is decoded."""
    a = np.frombuffer(data, dtype=np.uint8)
    if a.size == 0 or a[-1] & 0x80:
        return None  # no values, or the last one cut short
    ends = np.flatnonzero(a < 0x80)
    if ends.size > L.MAX_ALPHABET:
        return None
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > max_bytes or bool(np.any((a[ends] == 0) & (lengths > 1))):
        return None  # too long, or overlong
    low = (a & 0x7F).astype(np.int64)
    values = low[starts]
    for j in range(1, int(lengths.max())):  # at most max_bytes - 1 passes; 7 * 5 + 7 bits < 2^63
        more = starts[lengths > j]
        values[lengths > j] |= low[more + j] << (7 * j)
    return values


def unpack_leb128(data: bytes, max_bytes: int, what: str, name: str) -> list[int]:
    """Parse 1..65536 unsigned LEB128 integers: ``BAD_TABLE`` for a varint over ``max_bytes``,
    an overlong one (last byte 00 after the first), a truncated one, none at all, or more than
    65536."""
    regular = _unpack_regular(data, max_bytes)
    if regular is not None:
        return regular.tolist()
    return _unpack_bytewise(data, max_bytes, what, name)


def _unpack_bytewise(data: bytes, max_bytes: int, what: str, name: str) -> list[int]:
    """:func:`unpack_leb128` byte by byte, raising the first fault in byte order."""
    values: list[int] = []
    cur = shift = nbytes = 0
    for byte in data:
        nbytes += 1
        if nbytes > max_bytes:
            raise fail("BAD_TABLE", f"tensor {name!r}: {what} varint longer than {max_bytes} bytes")
        cur |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if byte == 0 and nbytes > 1:
                raise fail("BAD_TABLE", f"tensor {name!r}: overlong {what} varint")
            values.append(cur)
            if len(values) > L.MAX_ALPHABET:
                raise fail("BAD_TABLE", f"tensor {name!r}: more than {L.MAX_ALPHABET} {what} values")
            cur = shift = nbytes = 0
    if nbytes:
        raise fail("BAD_TABLE", f"tensor {name!r}: {what} values end inside a varint")
    if not values:
        raise fail("BAD_TABLE", f"tensor {name!r}: no {what} values")
    return values


# --- spec §7.3.1 frequency tables ------------------------------------------------------------

def pack_freqs(freqs: np.ndarray) -> bytes:
    """LEB128 bytes of a valid table (each f >= 1, sum 2^24)."""
    return pack_leb128(freqs)


def unpack_freqs(data: bytes, name: str = "?") -> np.ndarray:
    """Spec §7.3.1: parse and check a table; uint32 array of length A (1 <= A <= 65536)."""
    values = unpack_leb128(data, MAX_FREQUENCY_BYTES, "frequency", name)
    if 0 in values:
        raise fail("BAD_TABLE", f"tensor {name!r}: frequency 0 at symbol {values.index(0)}")
    freqs = np.array(values, dtype=np.int64)
    if int(freqs.sum()) != TOTAL:
        raise fail("BAD_TABLE", f"tensor {name!r}: frequencies sum to {int(freqs.sum())}, not 2^24")
    return freqs.astype(np.uint32)


# --- spec §7.5.1 rule 7 and §7.S.2 symbol-counts tables ---------------------------------------

def pack_counts(counts: np.ndarray) -> bytes:
    """A counts table: LEB128 of each count."""
    return pack_leb128(counts)


def unpack_counts(blob: bytes, total: int, name: str, zeros: str = "inner") -> np.ndarray:
    """Parse a counts table and check it (``BAD_TABLE``): the counts sum to the stream's
    ``total`` symbols; ``zeros`` ``"inner"``: the first and last counts are not 0 (grid levels,
    tq bands); ``"none"``: no count is 0 (codebook indices: every stored entry is used)."""
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


def packed_counts_bytes(counts: np.ndarray) -> int:
    """Bytes of ``pack_counts(counts)`` without packing (the encoders' rate estimates)."""
    c = np.asarray(counts, dtype=np.int64)
    nbytes = np.ones(len(c), dtype=np.int64)
    for k in range(1, MAX_COUNT_BYTES):
        nbytes += c >= (1 << (7 * k))
    return int(nbytes.sum())

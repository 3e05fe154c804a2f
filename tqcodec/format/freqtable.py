"""The wire form of a frequency table (spec §7.3.1): A unsigned LEB128 integers summing to 2^24."""
from __future__ import annotations

import numpy as np

from .. import limits as L
from ..errors import fail

TOTAL = 1 << 24


def pack_freqs(freqs: np.ndarray) -> bytes:
    """LEB128 bytes of a valid table (each f >= 1, sum 2^24)."""
    return pack_leb128(freqs)


def pack_leb128(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of each non-negative integer, concatenated (spec §7.3.1, §7.5.1)."""
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


def unpack_freqs(data: bytes, name: str = "?") -> np.ndarray:
    """Spec §7.3.1: parse and check a table; uint32 array of length A (1 <= A <= 65536)."""
    values = unpack_leb128(data, 4, "frequency", name)
    if 0 in values:
        raise fail("BAD_TABLE", f"tensor {name!r}: frequency 0 at symbol {values.index(0)}")
    freqs = np.array(values, dtype=np.int64)
    if int(freqs.sum()) != TOTAL:
        raise fail("BAD_TABLE", f"tensor {name!r}: frequencies sum to {int(freqs.sum())}, not 2^24")
    return freqs.astype(np.uint32)


def unpack_leb128(data: bytes, max_bytes: int, what: str, name: str) -> list[int]:
    """Parse 1..65536 unsigned LEB128 integers (spec §7.3.1, §7.5.1): ``BAD_TABLE`` for a varint
    over ``max_bytes``, an overlong one (last byte 00 after the first), a truncated one, none at
    all, or more than 65536."""
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

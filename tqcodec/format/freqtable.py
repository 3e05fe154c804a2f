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
    values = []
    cur = 0
    shift = 0
    nbytes = 0
    for byte in data:
        nbytes += 1
        if nbytes > 4:
            raise fail("BAD_TABLE", f"tensor {name!r}: frequency varint longer than 4 bytes")
        cur |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if byte == 0 and nbytes > 1:
                raise fail("BAD_TABLE", f"tensor {name!r}: overlong frequency varint")
            if cur == 0:
                raise fail("BAD_TABLE", f"tensor {name!r}: frequency 0 at symbol {len(values)}")
            values.append(cur)
            if len(values) > L.MAX_ALPHABET:
                raise fail("BAD_TABLE", f"tensor {name!r}: frequency table longer than {L.MAX_ALPHABET}")
            cur = shift = nbytes = 0
    if nbytes:
        raise fail("BAD_TABLE", f"tensor {name!r}: frequency table ends inside a varint")
    if not values:
        raise fail("BAD_TABLE", f"tensor {name!r}: empty frequency table")
    freqs = np.array(values, dtype=np.int64)
    if int(freqs.sum()) != TOTAL:
        raise fail("BAD_TABLE", f"tensor {name!r}: frequencies sum to {int(freqs.sum())}, not 2^24")
    return freqs.astype(np.uint32)

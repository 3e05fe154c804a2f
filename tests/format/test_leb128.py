"""LEB128 tables (spec §7.3.1, §7.5.1 rule 7): the whole-array reading of a well-formed table
gives what the byte-by-byte reading gives, and every ill-formed table the same error."""
import random

import numpy as np
import pytest

from tqcodec.errors import TqzError
from tqcodec.format import leb128


def outcome(read, data: bytes, max_bytes: int):
    try:
        return "ok", read(data, max_bytes, "count", "t")
    except TqzError as exc:
        return exc.code, exc.message


@pytest.mark.parametrize("data, code", [
    (b"", "BAD_TABLE"),  # no values
    (b"\x81", "BAD_TABLE"),  # ends inside a varint
    (b"\x05\x80\x00", "BAD_TABLE"),  # overlong
    (b"\x80\x80\x80\x80\x01", "BAD_TABLE"),  # 5 bytes where 4 are allowed
])
def test_ill_formed_tables_are_refused(data, code):
    with pytest.raises(TqzError) as err:
        leb128.unpack_leb128(data, 4, "frequency", "t")
    assert err.value.code == code


def test_whole_array_reading_matches_byte_by_byte():
    rng = random.Random(7)
    for _ in range(1000):
        values = [rng.choice([0, 1, 127, 128, 300, 1 << 14, 1 << 21, rng.randrange(1 << 42)])
                  for _ in range(rng.randrange(0, 6))]
        data = bytearray(leb128.pack_leb128(np.array(values, dtype=np.int64)))
        for _ in range(rng.choice([0, 0, 1, 2])):  # a byte changed: any fault, or none
            if data:
                data[rng.randrange(len(data))] = rng.choice([0x00, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        if data and rng.random() < 0.1:
            del data[-1]
        for max_bytes in (4, 6):
            assert outcome(leb128.unpack_leb128, bytes(data), max_bytes) == outcome(leb128._unpack_bytewise, bytes(data), max_bytes)


@pytest.mark.parametrize("n", [65536, 65537])
def test_the_alphabet_limit_is_the_same_either_way(n):
    data = b"\x01" * n
    assert outcome(leb128.unpack_leb128, data, 6) == outcome(leb128._unpack_bytewise, data, 6)

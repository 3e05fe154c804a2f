"""The mode's rule on a DATA chunk's Payload_Length (spec §10.1 step 3): checked from the chunk
header, after the order and count rules and before the payload is read (so before TRUNCATED and
the payload CRC), by both readers; each mode gives every stream its payload kind."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest

import tqcodec
from tqcodec.errors import TqzError
from tqcodec.format.chunks import ChunkHeader, PayloadKind, StreamSpec, check_payload_length
from tqcodec.format.manifest import TensorRecord
from tqcodec.format.writer import ContainerWriter
from tqcodec.modes import MODES, dither, ecsq, kmeans, pq, raw, tq, uniform

BYTES, SYMBOLS, ZSTD = PayloadKind.BYTES, PayloadKind.SYMBOLS, PayloadKind.ZSTD


def _header(item_count: int, payload_length: int) -> ChunkHeader:
    return ChunkHeader(1, 0, 0, 0, item_count, payload_length, 0)


@pytest.mark.parametrize("kind,items,length,ok", [
    (BYTES, 12, 12, True), (BYTES, 12, 11, False), (BYTES, 12, 13, False), (BYTES, 1, 0, False),
    (SYMBOLS, 100, 4, True), (SYMBOLS, 1, 400, True), (SYMBOLS, 5, 0, False), (SYMBOLS, 5, 3, False),
    (SYMBOLS, 5, 9, False), (ZSTD, 80, 0, True), (ZSTD, 80, 3, True), (ZSTD, 1, 1000, True),
])
def test_the_rule_of_each_kind(kind, items, length, ok):
    h = _header(items, length)
    if ok:
        check_payload_length(h, kind)
    else:
        with pytest.raises(TqzError) as ei:
            check_payload_length(h, kind)
        assert ei.value.code == "BAD_CHUNK"


def _kinds(record: TensorRecord, records=None) -> tuple:
    mod = MODES[record.mode]
    specs = mod.stream_items(mod.parse(record), 0, records or [record])
    assert all(isinstance(s, StreamSpec) for s in specs)
    return tuple(s.kind for s in specs)


def test_every_mode_gives_its_streams_kinds():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    for codec, kind in (("none", BYTES), ("zstd", ZSTD)):
        enc = raw.write(arr, codec)
        assert _kinds(TensorRecord("x", "float32", (3, 4), "raw", enc.params)) == (kind,)
    enc = uniform.encode(arr.astype(np.float64), "float32")
    assert _kinds(TensorRecord("x", "float32", (3, 4), "uniform", enc.params)) == (SYMBOLS,)
    enc = tq.write([np.arange(8).reshape(2, 4) % 3, np.zeros((1, 4), dtype=np.int64)], [-4, -4])
    assert _kinds(TensorRecord("x", "float32", (3, 4), "tq", enc.params)) == (BYTES, SYMBOLS, SYMBOLS)
    enc = ecsq.write(np.arange(12) % 3, recon="codebook", values=np.array([-1.0, 0.0, 1.0]))
    assert _kinds(TensorRecord("x", "float32", (3, 4), "ecsq", enc.params)) == (BYTES, SYMBOLS)
    enc = kmeans.write([np.arange(8).reshape(2, 4) % 2, np.zeros((1, 4), dtype=np.int64)],
                       [np.array([-1.0, 1.0]), np.array([0.5])])
    assert _kinds(TensorRecord("x", "float32", (3, 4), "kmeans", enc.params)) == (BYTES, SYMBOLS, SYMBOLS)
    enc = pq.write(np.arange(6).reshape(3, 2) % 2, np.array([[0.0, 1.0], [2.0, 3.0]]))
    assert _kinds(TensorRecord("x", "float32", (3, 4), "pq", enc.params)) == (BYTES, SYMBOLS)
    enc = dither.write([np.arange(6) % 3, np.arange(6) % 2], step=-4, seed=1, lattice="hex")
    assert _kinds(TensorRecord("x", "float32", (3, 4), "dither", enc.params)) == (SYMBOLS, SYMBOLS)


def test_alias_has_no_streams():
    r = TensorRecord("x", "float32", (3, 4), "raw", {"codec": "none"})
    a = TensorRecord("y", "float32", (3, 4), "alias", {"of": 0})
    mod = MODES["alias"]
    assert mod.stream_items(mod.parse(a), 1, [r, a]) == ()


# --- whole files -------------------------------------------------------------------------------

def _file(tensors) -> bytes:
    """A .tqz file of (record, Encoded) pairs written by the container writer."""
    buf = io.BytesIO()
    w = ContainerWriter(buf)
    for name, dtype, shape, enc in tensors:
        w.add_tensor(TensorRecord(name, dtype, shape, enc.mode, enc.params), enc.streams)
    w.finish({})
    return buf.getvalue()


def _chunks(data: bytes) -> list[int]:
    """Offsets of the DATA chunks, in file order."""
    pos = 32 + struct.unpack_from("<I", data, 20)[0]
    out = []
    while data[pos:pos + 4] == b"TQCK":
        out.append(pos)
        pos += 32 + struct.unpack_from("<I", data, pos + 20)[0]
    return out


def _set_payload_length(data: bytes, at: int, length: int) -> bytes:
    """Chunk at ``at`` with Payload_Length ``length`` (header CRC recomputed, payload and its CRC kept)."""
    head = bytearray(data[at:at + 32])
    struct.pack_into("<I", head, 20, length)
    struct.pack_into("<I", head, 28, zlib.crc32(bytes(head[:28])) & 0xFFFFFFFF)
    return data[:at] + bytes(head) + data[at + 32:]


def _base() -> bytes:
    """raw none [12 + 20 bytes in two chunks], uniform (two range-coded chunks), raw zstd, raw none."""
    b = np.linspace(-1, 1, 8).astype(np.float32).tobytes()
    raw_b = raw.write(np.frombuffer(b, np.uint8), "none")
    raw_b = raw_b._replace(streams=[[(12, b[:12]), (20, b[12:])]])
    old = uniform.CHUNK_SYMBOLS
    uniform.CHUNK_SYMBOLS = 16
    try:
        u = uniform.encode(np.random.default_rng(0).normal(size=(4, 8)), "float32", snr_db=20.0)
    finally:
        uniform.CHUNK_SYMBOLS = old
    z = raw.write(np.arange(-20, 20, dtype="<i2"), "zstd")
    m = raw.write(np.array([1, 0, 0, 1, 1], dtype=np.uint8), "none")
    return _file([("b", "float32", (8,), raw_b), ("w", "float32", (4, 8), u), ("z", "int16", (40,), z),
                  ("m", "bool", (5,), m)])


def _codes(data: bytes) -> tuple:
    """(front to back from a pipe-like stream, random access) outcome codes."""
    out = []
    for read in (lambda: list(tqcodec.iter_tensors(io.BufferedReader(io.BytesIO(data)))),
                 lambda: [f.get_tensor(n) for f in [tqcodec.open(data)] for n in f.keys()]):
        try:
            read()
            out.append(None)
        except TqzError as exc:
            out.append(exc.code)
    return tuple(out)


def test_base_file_decodes():
    data = _base()
    assert _codes(data) == (None, None)
    assert len(_chunks(data)) == 6


def test_raw_none_length_off_by_one_is_bad_chunk_not_checksum():
    data = _base()
    at = _chunks(data)[0]  # 12 bytes: Payload_Length 11 would read 11 bytes whose CRC fails
    assert _codes(_set_payload_length(data, at, 11)) == ("BAD_CHUNK", "BAD_CHUNK")
    assert _codes(_set_payload_length(data, at, 13)) == ("BAD_CHUNK", "BAD_CHUNK")


def test_raw_none_length_past_the_end_is_bad_chunk_not_truncated():
    data = _base()
    at = _chunks(data)[-1]
    bad = _set_payload_length(data, at, len(data) - (at + 32) + 1)
    assert _codes(bad) == ("BAD_CHUNK", "BAD_CHUNK")
    # checked before the payload is read: the file may even end right after the header
    assert _codes(bad[:at + 32])[0] == "BAD_CHUNK"


def test_range_coded_length_not_a_multiple_of_4_is_bad_chunk():
    data = _base()
    at = _chunks(data)[2]  # the uniform tensor's first chunk
    n = struct.unpack_from("<I", data, at + 20)[0]
    assert _codes(_set_payload_length(data, at, n - 1)) == ("BAD_CHUNK", "BAD_CHUNK")
    assert _codes(_set_payload_length(data, at, 0)[:at + 32])[0] == "BAD_CHUNK"


def test_zstd_has_no_length_rule():
    data = _base()
    at = _chunks(data)[4]
    n = struct.unpack_from("<I", data, at + 20)[0]
    # a shorter zstd payload is read and CRC-checked like any other: CHECKSUM_MISMATCH, not BAD_CHUNK
    assert _codes(_set_payload_length(data, at, n - 1))[0] == "CHECKSUM_MISMATCH"
    # an empty one (CRC of nothing) is not a frame: BAD_PAYLOAD
    rec = [("z", "int16", (40,), raw.Encoded("raw", {"codec": "zstd"}, [[(80, b"")]]))]
    assert _codes(_file(rec)) == ("BAD_PAYLOAD", "BAD_PAYLOAD")


def test_order_and_limits_come_before_the_length_rule():
    data = _base()
    at = _chunks(data)[0]
    bad = bytearray(_set_payload_length(data, at, 11))
    struct.pack_into("<I", bad, at + 12, 1)  # Sequence 1 where 0 is due: the order rule speaks first
    struct.pack_into("<I", bad, at + 28, zlib.crc32(bytes(bad[at:at + 28])))
    with pytest.raises(TqzError, match="out of order"):
        list(tqcodec.iter_tensors(bytes(bad)))
    over = _set_payload_length(data, at, (1 << 28) + 1)
    assert _codes(over)[0] == "LIMIT_EXCEEDED"


def test_decoders_still_check_lengths_for_direct_callers():
    rec = TensorRecord("x", "uint8", (4,), "raw", {"codec": "none"})
    with pytest.raises(TqzError) as ei:
        raw.decode(raw.parse(rec), rec, [[(4, b"abc")]])
    assert ei.value.code == "BAD_CHUNK"



MAGIC = b"\x28\xb5\x2f\xfd"
WINDOW_2E31 = bytes([(31 - 10) << 3])  # Window_Descriptor: exponent 21, mantissa 0
EMPTY_LAST_RAW_BLOCK = b"\x01\x00\x00"


@pytest.mark.parametrize("frame,code", [
    # §7.2 step 1 before step 3: a frame naming dictionary 7 with a 2^31 window is BAD_PAYLOAD
    (MAGIC + b"\x01" + WINDOW_2E31 + b"\x07" + EMPTY_LAST_RAW_BLOCK, "BAD_PAYLOAD"),
    # step 2 before step 3: a single-segment frame whose content size (so its window) is 2^28, not 80
    (MAGIC + b"\xe0" + (1 << 28).to_bytes(8, "little") + EMPTY_LAST_RAW_BLOCK, "BAD_PAYLOAD"),
    # step 3 when the content size (4-byte field) is right: a 2^31 window
    (MAGIC + b"\x80" + WINDOW_2E31 + (80).to_bytes(4, "little") + EMPTY_LAST_RAW_BLOCK, "LIMIT_EXCEEDED"),
])
def test_zstd_frame_checks_in_spec_order(frame, code):
    with pytest.raises(TqzError) as ei:
        raw.decode(raw.Params("zstd"), TensorRecord("z", "int16", (40,), "raw", {"codec": "zstd"}), [[(80, frame)]])
    assert ei.value.code == code

#!/usr/bin/env python3
"""refdec's own checks of the rules settled by spec/tqz.md §15 "1.2, clarifications".

Every file here is built from the spec's description alone (header §3, canonical MessagePack
§5.1, chunks §6, index and footer §9, zstd frames by RFC 8878's frame layout); none comes from
the project's vector generator.  Each case states the section whose rule it exercises and the
code §1's one-defect rule (first rule in §10.1's order) requires.

    python conformance/refdec/selftest_1_2.py          # quick cases (a few seconds)
    python conformance/refdec/selftest_1_2.py --big    # also a 1 GiB tensor within Level 1

(Named selftest_*, not test_*, so that no test collector picks up the --big case.)
"""

import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import refdec  # noqa: E402


# ---------------------------------------------------------------------------------------------
# builders (§5.1, §3, §6, §9)
# ---------------------------------------------------------------------------------------------

def mp(v):
    """Canonical MessagePack (§5.1)."""
    if v is None:
        return b"\xc0"
    if v is False:
        return b"\xc2"
    if v is True:
        return b"\xc3"
    if isinstance(v, int):
        if 0 <= v <= 0x7F:
            return bytes([v])
        if -32 <= v < 0:
            return struct.pack("b", v)
        if v >= 0:
            for t, f, lim in ((0xCC, ">B", 1 << 8), (0xCD, ">H", 1 << 16),
                              (0xCE, ">I", 1 << 32), (0xCF, ">Q", 1 << 64)):
                if v < lim:
                    return bytes([t]) + struct.pack(f, v)
        for t, f, lim in ((0xD0, ">b", 1 << 7), (0xD1, ">h", 1 << 15), (0xD2, ">i", 1 << 31),
                          (0xD3, ">q", 1 << 63)):
            if v >= -lim:
                return bytes([t]) + struct.pack(f, v)
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode("utf-8")
        n = len(b)
        if n < 32:
            return bytes([0xA0 | n]) + b
        if n < 256:
            return b"\xd9" + bytes([n]) + b
        if n < 65536:
            return b"\xda" + struct.pack(">H", n) + b
        return b"\xdb" + struct.pack(">I", n) + b
    if isinstance(v, bytes):
        n = len(v)
        if n < 256:
            return b"\xc4" + bytes([n]) + v
        if n < 65536:
            return b"\xc5" + struct.pack(">H", n) + v
        return b"\xc6" + struct.pack(">I", n) + v
    if isinstance(v, list):
        n = len(v)
        h = bytes([0x90 | n]) if n < 16 else (b"\xdc" + struct.pack(">H", n) if n < 65536
                                              else b"\xdd" + struct.pack(">I", n))
        return h + b"".join(mp(x) for x in v)
    if isinstance(v, dict):
        n = len(v)
        h = bytes([0x80 | n]) if n < 16 else (b"\xde" + struct.pack(">H", n) if n < 65536
                                              else b"\xdf" + struct.pack(">I", n))
        items = sorted(v.items(), key=lambda kv: kv[0].encode("utf-8"))
        return h + b"".join(mp(k) + mp(x) for k, x in items)
    raise TypeError(v)


def leb(values):
    out = bytearray()
    for v in values:
        while True:
            b = v & 0x7F
            v >>= 7
            if v:
                out.append(b | 0x80)
            else:
                out.append(b)
                break
    return bytes(out)


def crc(b):
    return zlib.crc32(b) & 0xFFFFFFFF


def chunk(tindex, stream, seq, items, payload, ctype=1, plen=None, pcrc=None):
    """§6: a chunk header (fields may be overridden to make a defect) and its payload."""
    plen = len(payload) if plen is None else plen
    pcrc = crc(payload) if pcrc is None else pcrc
    h = b"TQCK" + struct.pack("<HHIIIII", ctype, stream, tindex, seq, items, plen, pcrc)
    return {"bytes": h + struct.pack("<I", crc(h)) + payload, "tindex": tindex, "ctype": ctype}


def build(manifest, chunks=(), cut_after_manifest=None, n_tensors=None):
    """A whole file: header (§3), manifest, chunks, index (§9.1, spans from the chunks) and
    footer (§9.2).  cut_after_manifest: the file ends that many bytes after the manifest."""
    m = mp(manifest)
    head = b"\x89TQZ\r\n\x1a\n" + struct.pack("<HHIIII", 1, 2, 0, 0, len(m), crc(m))
    head += struct.pack("<I", crc(head))
    out = bytearray(head + m)
    if cut_after_manifest is not None:
        return bytes(out) + b"XY"[:cut_after_manifest]
    T = len(manifest["tensors"]) if n_tensors is None else n_tensors
    spans = [[0, 0] for _ in range(T)]
    for c in chunks:
        if c["ctype"] == 1 and c["tindex"] < T:
            if spans[c["tindex"]][0] == 0:
                spans[c["tindex"]][0] = len(out)
            spans[c["tindex"]][1] = len(out) + len(c["bytes"]) - spans[c["tindex"]][0]
        out += c["bytes"]
    index_offset = len(out)
    index = b"TQIX" + b"".join(struct.pack("<QQ", o, n) for o, n in spans)
    out += index
    f = struct.pack("<QIII", index_offset, T, crc(index), len(m))
    out += f + struct.pack("<I", crc(f)) + b"\x89TQZEND\n"
    return bytes(out)


def rec(name, dtype, shape, mode, params):
    return {"name": name, "dtype": dtype, "shape": shape, "mode": mode, "params": params}


def raw_rec(name="t", n=8, codec="none"):
    return rec(name, "uint8", [n], "raw", {"codec": codec})


def uniform_const(name, dtype, shape):
    """A uniform tensor with A = 1 (one frequency 2^24): constant, no chunk (§7.3.1)."""
    return rec(name, dtype, shape, "uniform", {"granularity": "tensor", "steps": [0],
                                               "q_min": 3, "freqs": leb([1 << 24])})


def outcome(data):
    """The §11 code, or 'OK' with the tensors."""
    try:
        r = refdec.decode_file(data)
    except refdec.TqzError as e:
        return e.code, e.message
    return "OK", r


# ---------------------------------------------------------------------------------------------
# zstd frames (RFC 8878 §3.1.1), written by hand
# ---------------------------------------------------------------------------------------------

ZMAGIC = b"\x28\xb5\x2f\xfd"


def fhd(fcs_flag=0, single=0, reserved=0, checksum=0, did_flag=0):
    return bytes([(fcs_flag << 6) | (single << 5) | (reserved << 3) | (checksum << 2) | did_flag])


def raw_block(content, last=1):
    return (last | (0 << 1) | (len(content) << 3)).to_bytes(3, "little") + content


def rle_block(byte, n, last=1):
    return (last | (1 << 1) | (n << 3)).to_bytes(3, "little") + bytes([byte])


def frame_single(content_size_field, fcs_flag, blocks):
    """Single-segment frame: no Window_Descriptor; FCS of 1 (flag 0), 2, 4 or 8 bytes."""
    size = (1, 2, 4, 8)[fcs_flag]
    v = content_size_field - (256 if fcs_flag == 1 else 0)
    return ZMAGIC + fhd(fcs_flag, single=1) + v.to_bytes(size, "little") + blocks


def frame_windowed(exponent, mantissa, blocks, fcs=None, reserved=0):
    """A frame with a Window_Descriptor; FCS absent (flag 0) or 8 bytes (flag 3)."""
    wd = bytes([(exponent << 3) | mantissa])
    if fcs is None:
        return ZMAGIC + fhd(0, reserved=reserved) + wd + blocks
    return ZMAGIC + fhd(3, reserved=reserved) + wd + fcs.to_bytes(8, "little") + blocks


def zstd_file(payload, items, n=None):
    n = items if n is None else n
    return build({"metadata": {}, "tensors": [raw_rec(n=n, codec="zstd")]},
                 [chunk(0, 0, 0, items, payload)])


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

CASES = []


def case(f):
    CASES.append(f)
    return f


def expect(data, code, why):
    got, info = outcome(data)
    assert got == code, "%s: expected %s, got %s (%s)" % (why, code, got,
                                                           info if got != "OK" else "")


DATA8 = bytes(range(10, 18))


@case
def zstd_frames():
    """§7.2 checks 1-4 in order."""
    # valid: single-segment raw block, RLE block, windowed frame without content size
    got, r = outcome(zstd_file(frame_single(8, 0, raw_block(DATA8)), 8))
    assert got == "OK" and bytes(r[4][0]) == DATA8, got
    got, r = outcome(zstd_file(frame_single(8, 0, rle_block(7, 8)), 8))
    assert got == "OK" and bytes(r[4][0]) == b"\x07" * 8, got
    got, r = outcome(zstd_file(frame_windowed(0, 0, raw_block(DATA8)), 8))
    assert got == "OK" and bytes(r[4][0]) == DATA8, got
    # a frame made by libzstd
    import zstandard
    blob = bytes(range(256)) * 40
    got, r = outcome(zstd_file(zstandard.ZstdCompressor(write_checksum=True).compress(blob),
                               len(blob)))
    assert got == "OK" and bytes(r[4][0]) == blob, got
    # empty and short payloads: BAD_PAYLOAD, never BAD_CHUNK ("zstd" has no length rule)
    for p in (b"", b"\x28", b"\x28\xb5\x2f", ZMAGIC, ZMAGIC + fhd(0)):
        expect(zstd_file(p, 8), "BAD_PAYLOAD", "short zstd payload %r" % p)
    # skippable frame
    expect(zstd_file(b"\x50\x2a\x4d\x18" + struct.pack("<I", 8) + DATA8, 8), "BAD_PAYLOAD",
           "skippable frame")
    # single-segment frame whose Frame_Content_Size 2^28 differs from Item_Count 80: its
    # Window_Size is also 2^28, but check 2 (content size) comes before check 3 (window)
    expect(zstd_file(frame_single(1 << 28, 2, raw_block(bytes(80))), 80), "BAD_PAYLOAD",
           "single-segment FCS 2^28, Item_Count 80")
    # single-segment frame whose FCS (8-byte field) is 2^27 + 1, Item_Count 8: BAD_PAYLOAD
    expect(zstd_file(frame_single((1 << 27) + 1, 3, raw_block(DATA8)), 8), "BAD_PAYLOAD",
           "single-segment FCS 2^27 + 1")
    # Window_Descriptor of 2^28 (exponent 18): LIMIT_EXCEEDED with or without a matching FCS
    expect(zstd_file(frame_windowed(18, 0, raw_block(DATA8)), 8), "LIMIT_EXCEEDED",
           "window 2^28, no FCS")
    expect(zstd_file(frame_windowed(18, 0, raw_block(DATA8), fcs=8), 8), "LIMIT_EXCEEDED",
           "window 2^28, FCS = Item_Count")
    # 2^27 exactly is allowed
    got, _ = outcome(zstd_file(frame_windowed(17, 0, raw_block(DATA8)), 8))
    assert got == "OK", got
    # window 2^27 + 2^24 (mantissa 1): over the limit
    expect(zstd_file(frame_windowed(17, 1, raw_block(DATA8)), 8), "LIMIT_EXCEEDED",
           "window 2^27 + 2^24")
    # window too large AND content size wrong: check 2 first
    expect(zstd_file(frame_windowed(18, 0, raw_block(DATA8), fcs=9), 8), "BAD_PAYLOAD",
           "window 2^28, FCS != Item_Count")
    # reserved bit (check 1) before the window (check 3)
    expect(zstd_file(frame_windowed(18, 0, raw_block(DATA8), reserved=1), 8), "BAD_PAYLOAD",
           "reserved bit and window 2^28")
    # window too large AND bytes after the frame: check 3 before check 4
    expect(zstd_file(frame_windowed(18, 0, raw_block(DATA8)) + b"\x00", 8), "LIMIT_EXCEEDED",
           "window 2^28 and a trailing byte")
    # check 4: trailing byte, reserved block type, truncated block, too few / too many bytes,
    # block over Block_Maximum_Size (single segment: min(FCS, 128 KiB))
    good = frame_single(8, 0, raw_block(DATA8))
    expect(zstd_file(good + b"\x00", 8), "BAD_PAYLOAD", "byte after the frame")
    expect(zstd_file(frame_single(8, 0, (1 | (3 << 1) | (8 << 3)).to_bytes(3, "little")
                                  + DATA8), 8), "BAD_PAYLOAD", "reserved block type")
    expect(zstd_file(good[:-1], 8), "BAD_PAYLOAD", "truncated block")
    expect(zstd_file(frame_windowed(0, 0, raw_block(DATA8[:7])), 8), "BAD_PAYLOAD",
           "7 bytes for Item_Count 8")
    expect(zstd_file(frame_windowed(0, 0, raw_block(DATA8 + b"!")), 8), "BAD_PAYLOAD",
           "9 bytes for Item_Count 8")
    got, r = outcome(zstd_file(frame_single(8, 0, raw_block(DATA8[:4], last=0)
                                            + raw_block(DATA8[4:])), 8))
    assert got == "OK" and bytes(r[4][0]) == DATA8, got
    expect(zstd_file(frame_single(8, 0, raw_block(DATA8 + b"!")), 8), "BAD_PAYLOAD",
           "raw block of 9 bytes over Block_Maximum_Size 8")
    # a checksum that does not match
    zc = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(blob))
    zc[-1] ^= 0xFF
    expect(zstd_file(bytes(zc), len(blob)), "BAD_PAYLOAD", "content checksum")


@case
def chunk_header_order():
    """§10.1 step 3: limits first, then BAD_CHUNK rules, the mode's Payload_Length rule, then
    TRUNCATED and the payload CRC."""
    man = {"metadata": {}, "tensors": [raw_rec(n=8)]}
    got, r = outcome(build(man, [chunk(0, 0, 0, 8, DATA8)]))
    assert got == "OK" and bytes(r[4][0]) == DATA8, got
    # Payload_Length 2^32 - 1: over §12 and past the end of the file and != Item_Count
    expect(build(man, [chunk(0, 0, 0, 8, DATA8, plen=0xFFFFFFFF)]), "LIMIT_EXCEEDED",
           "Payload_Length 2^32 - 1")
    # Item_Count 2^26 + 1 on a chunk whose Tensor_Index is out of range
    expect(build(man, [chunk(5, 0, 0, (1 << 26) + 1, DATA8)]), "LIMIT_EXCEEDED",
           "Item_Count 2^26 + 1, Tensor_Index 5")
    # Item_Count 2^26 + 1 that also overfills the stream (8 items)
    expect(build(man, [chunk(0, 0, 0, (1 << 26) + 1, DATA8)]), "LIMIT_EXCEEDED",
           "Item_Count 2^26 + 1 > the stream's 8")
    # raw "none": Payload_Length 100 != Item_Count 8 and past the end: the mode's rule first
    expect(build(man, [chunk(0, 0, 0, 8, DATA8, plen=100)]), "BAD_CHUNK",
           "Payload_Length 100 past EOF")
    # ... and with a wrong payload CRC
    expect(build(man, [chunk(0, 0, 0, 8, DATA8, plen=9, pcrc=1)]), "BAD_CHUNK",
           "Payload_Length 9, bad payload CRC")
    # Item_Count 0 -> BAD_CHUNK; Stream 1 of a raw tensor -> BAD_CHUNK
    expect(build(man, [chunk(0, 0, 0, 0, b"")]), "BAD_CHUNK", "Item_Count 0")
    expect(build(man, [chunk(0, 1, 0, 8, DATA8)]), "BAD_CHUNK", "Stream 1")
    # unknown critical chunk type before the Payload_Length limit
    expect(build(man, [chunk(0, 0, 0, 8, DATA8, ctype=2, plen=0xFFFFFFFF)]), "UNKNOWN_CHUNK",
           "critical type 2")
    # ancillary chunk: Payload_Length limit, then "not inside a group"
    anc = chunk(0, 0, 0, 0, b"hello", ctype=0x8001)
    got, _ = outcome(build(man, [anc, chunk(0, 0, 0, 8, DATA8), anc]))
    assert got == "OK", got
    man2 = {"metadata": {}, "tensors": [raw_rec(n=16)]}
    expect(build(man2, [chunk(0, 0, 0, 8, DATA8), anc, chunk(0, 0, 1, 8, DATA8)]), "BAD_CHUNK",
           "ancillary chunk inside a stream")
    expect(build(man, [chunk(0, 0, 0, 8, b"", ctype=0x8001, plen=(1 << 28) + 1),
                       chunk(0, 0, 0, 8, DATA8)]), "LIMIT_EXCEEDED", "ancillary over 2^28")
    # fewer than 4 bytes where a chunk or the index is due: TRUNCATED whatever they are
    for k in (0, 1, 2):
        expect(build(man, cut_after_manifest=k), "TRUNCATED", "%d bytes after the manifest" % k)


@case
def ancillary_between_streams():
    """§6.2 group: an ancillary chunk between two streams of one tensor is inside its group.
    An ecsq codebook tensor: stream 0 values (float16), stream 1 symbols (range-coded)."""
    k = [3, 1]
    values = np.array([-1.0, 1.0], dtype="<f2").tobytes()
    syms = [0, 0, 1, 0]
    model = refdec.Model(refdec.table_from_counts(k))
    words = refdec.rc_encode(syms, model)
    payload = struct.pack("<%dI" % len(words), *words)
    man = {"metadata": {}, "tensors": [rec("e", "float32", [4], "ecsq",
                                           {"recon": "codebook", "counts": leb(k)})]}
    c0, c1 = chunk(0, 0, 0, 4, values), chunk(0, 1, 0, 4, payload)
    got, r = outcome(build(man, [c0, c1]))
    assert got == "OK" and np.frombuffer(r[4][0], "<f4").tolist() == [-1, -1, 1, -1], got
    anc = chunk(0, 0, 0, 0, b"", ctype=0x8123)
    expect(build(man, [c0, anc, c1]), "BAD_CHUNK", "ancillary between two streams")
    got, _ = outcome(build(man, [anc, c0, c1, anc]))
    assert got == "OK", got
    # a non-increasing codebook: BAD_PAYLOAD when stream 0 is complete, before stream 1
    bad = np.array([1.0, -1.0], dtype="<f2").tobytes()
    expect(build(man, [chunk(0, 0, 0, 4, bad), chunk(0, 1, 0, 4, b"\0\0\0\0")]), "BAD_PAYLOAD",
           "codebook not increasing")


@case
def manifest_order():
    """§5.2 and §5.3 reference orders."""
    # metadata over 4096 entries (LIMIT_EXCEEDED) before tensors' type (BAD_MANIFEST)
    big = {"k%05d" % i: 0 for i in range(4097)}
    expect(build({"metadata": big, "tensors": "x"}, n_tensors=0), "LIMIT_EXCEEDED",
           "metadata 4097 entries, tensors a string")
    # both keys present before metadata's type
    expect(build({"metadata": 1}, n_tensors=0), "BAD_MANIFEST", "no tensors key")
    # an element of tensors that is not a map
    expect(build({"metadata": {}, "tensors": [[1]]}, n_tensors=1), "BAD_TENSOR_RECORD",
               "record is an array")
    # presence of all five keys before any value: a 9-dimension shape and no params
    r = rec("a", "float32", [1] * 9, "uniform", {})
    del r["params"]
    expect(build({"metadata": {}, "tensors": [r]}), "BAD_TENSOR_RECORD", "no params, ndim 9")
    # shape typed completely before limits: [1]*8 + [-1]
    expect(build({"metadata": {}, "tensors": [rec("a", "float32", [1] * 8 + [-1], "raw",
                                                  {"codec": "none"})]}),
           "BAD_TENSOR_RECORD", "negative 9th dimension")
    expect(build({"metadata": {}, "tensors": [rec("a", "float32", [1] * 9, "raw",
                                                  {"codec": "none"})]}),
           "LIMIT_EXCEEDED", "9 dimensions")
    # a bool dimension after an over-limit one: the types come first
    expect(build({"metadata": {}, "tensors": [rec("a", "float32", [(1 << 40) + 1, True],
                                                  "raw", {"codec": "none"})]}),
           "BAD_TENSOR_RECORD", "dimension over 2^40 then a bool")
    # [2^40, 2^40, 0]: no element, but over the element-count limit
    expect(build({"metadata": {}, "tensors": [rec("a", "float32", [1 << 40, 1 << 40, 0],
                                                  "raw", {"codec": "none"})]}),
           "LIMIT_EXCEEDED", "[2^40, 2^40, 0]")
    # step 5 (params a map) before step 6 (mode in the registry)
    expect(build({"metadata": {}, "tensors": [rec("a", "float32", [1], "nope", [])]}),
           "BAD_TENSOR_RECORD", "unknown mode and params an array")
    expect(build({"metadata": {}, "tensors": [rec("a", "float32", [1], "nope", {})]}),
           "UNKNOWN_MODE", "unknown mode")


@case
def metadata_name():
    """§5.4: `__metadata__` is a valid name, written as `/__metadata__` by the protocol."""
    man = {"metadata": {"x": 1}, "tensors": [raw_rec("__metadata__", 8), raw_rec("b", 8)]}
    data = build(man, [chunk(0, 0, 0, 8, DATA8), chunk(1, 0, 0, 8, DATA8[::-1])])
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "m.tqz"), os.path.join(d, "m.safetensors")
        with open(src, "wb") as f:
            f.write(data)
        assert refdec.main(["refdec.py", "decode", src, dst]) == 0
        with open(dst, "rb") as f:
            blob = f.read()
    n = struct.unpack("<Q", blob[:8])[0]
    hdr = json.loads(blob[8:8 + n])
    assert set(hdr) == {"/__metadata__", "b"}, hdr
    o = 8 + n + hdr["/__metadata__"]["data_offsets"][0]
    assert blob[o:o + 8] == DATA8
    o = 8 + n + hdr["b"]["data_offsets"][0]
    assert blob[o:o + 8] == DATA8[::-1]


@case
def level_1():
    """§12.1: measures right after the manifest; beyond Level 1 only LIMIT_EXCEEDED."""
    # B1 = 2^30 + 4 (float32 [2^28 + 1]); the file then ends: LIMIT_EXCEEDED comes first
    man = {"metadata": {}, "tensors": [uniform_const("u", "float32", [(1 << 28) + 1])]}
    expect(build(man, cut_after_manifest=0), "LIMIT_EXCEEDED", "B1 > 2^30")
    # BT = 5 x 2^30 (five float32 [2^28]), each tensor within B1
    man = {"metadata": {}, "tensors": [uniform_const("u%d" % i, "float32", [1 << 28])
                                       for i in range(5)]}
    expect(build(man), "LIMIT_EXCEEDED", "BT > 2^32")
    # ... aliases included in BT
    man = {"metadata": {}, "tensors": [uniform_const("u", "float32", [1 << 28])] +
           [rec("a%d" % i, "float32", [1 << 28], "alias", {"of": 0}) for i in range(4)]}
    expect(build(man), "LIMIT_EXCEEDED", "BT > 2^32 with aliases")
    # W = n m k = 2^14 x 2^14 x 2^10 = 2^38 (float16, 2^29 bytes: within B1)
    n = 1 << 14
    tq = rec("w", "float16", [n, n], "tq", {"band_rows": [1024], "steps": [0], "q_min": [0],
                                          "counts": [leb([1024 * n])], "transform": "float16"})
    expect(build({"metadata": {}, "tensors": [tq]}, cut_after_manifest=0), "LIMIT_EXCEEDED",
           "W > 2^36")
    m = refdec.level_measures(refdec.check_manifest(
        {"metadata": {}, "tensors": [tq, rec("v", "float16", [n, n], "alias", {"of": 0})]}), 7)
    assert m == {"B1": 1 << 29, "BT": 1 << 30, "W": 1 << 38, "L": 7}, m
    # within Level 1 exactly (W = 2^36) is not refused
    tq["params"]["band_rows"] = [256]
    tq["params"]["counts"] = [leb([256 * n])]
    expect(build({"metadata": {}, "tensors": [tq]}, cut_after_manifest=0), "TRUNCATED",
           "W = 2^36 (within Level 1)")
    # L > 2^32: a sparse file (valid header and manifest, a hole, one byte at 2^32)
    man = {"metadata": {}, "tensors": [raw_rec(n=8)]}
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "big.tqz")
        with open(src, "wb") as f:
            f.write(build(man, [chunk(0, 0, 0, 8, DATA8)]))
            f.seek(1 << 32)
            f.write(b"\0")
        p = subprocess.run([sys.executable, os.path.join(HERE, "refdec.py"), "info", src],
                           capture_output=True, text=True)
        assert p.returncode == 1 and p.stderr.rstrip().endswith("[LIMIT_EXCEEDED]"), p.stderr


@case
def out_of_memory():
    """§12.1: running out of memory is LIMIT_EXCEEDED, not a crash.  A file within Level 1
    (float32 [2^28], 1 GiB) decoded under a 768 MiB address-space limit."""
    man = {"metadata": {}, "tensors": [uniform_const("u", "float32", [1 << 28])]}
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "c.tqz"), os.path.join(d, "c.safetensors")
        with open(src, "wb") as f:
            f.write(build(man))
        code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (768 << 20, "
                "768 << 20)); sys.path.insert(0, %r); import refdec; "
                "sys.exit(refdec.main(['refdec.py', 'decode', %r, %r]))" % (HERE, src, dst))
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, OPENBLAS_NUM_THREADS="1",
                                    OMP_NUM_THREADS="1"))
        assert p.returncode == 1 and p.stderr.rstrip().endswith("[LIMIT_EXCEEDED]"), \
            (p.returncode, p.stderr[-2000:])
        assert not os.path.exists(dst)


@case
def zstd_block_maximum_size():
    """§7.2 check 4: a block whose decompressed size is over Block_Maximum_Size =
    min(Window_Size, 128 KiB) breaks RFC 8878 (BAD_PAYLOAD).  A compressed block holding only
    RLE literals of R bytes (Block_Size 5); refdec relies on libzstd for this check."""
    def rle_literals_block(R):
        content = bytes([1 | (3 << 2) | ((R & 0xF) << 4), (R >> 4) & 0xFF, (R >> 12) & 0xFF,
                         0x41]) + b"\x00"                       # literals, then 0 sequences
        return (1 | (2 << 1) | (len(content) << 3)).to_bytes(3, "little") + content
    for exponent, R, code in ((0, 1024, "OK"), (0, 1025, "BAD_PAYLOAD"),
                              (10, 128 * 1024, "OK"), (10, 128 * 1024 + 1, "BAD_PAYLOAD")):
        got, r = outcome(zstd_file(frame_windowed(exponent, 0, rle_literals_block(R)), R))
        assert got == code, (exponent, R, got, r)
        if got == "OK":
            assert bytes(r[4][0]) == b"A" * R


def symbol_chunks(tindex, stream, syms, counts, per=5):
    """Range-coded chunks (§8, with refdec's own §8.3 encoder) of at most `per` symbols."""
    model = refdec.Model(refdec.table_from_counts(counts))
    out = []
    for q, i in enumerate(range(0, len(syms), per)):
        w = refdec.rc_encode(syms[i:i + per], model)
        out.append(chunk(tindex, stream, q, len(syms[i:i + per]),
                         struct.pack("<%dI" % len(w), *w)))
    return out


def byte_chunks(tindex, stream, data, per=7):
    return [chunk(tindex, stream, q, len(data[i:i + per]), data[i:i + per])
            for q, i in enumerate(range(0, len(data), per))]


def random_symbols(rng, n, A, all_used):
    """n symbols in 0..A-1 with the first and last symbol used (or every symbol)."""
    s = rng.integers(0, A, n).tolist()
    if all_used:
        s[:A] = range(A)
    else:
        s[0], s[1] = 0, A - 1
    return s, [s.count(a) for a in range(A)]


@case
def reconstruction_blocks():
    """The block-wise reconstruction (refdec.BLOCK) gives the same bytes whatever the block
    size: every mode, several blocks per tensor (BLOCK = 1, 3, 7 against 2^22)."""
    rng = np.random.default_rng(12)
    tensors, chunks = [], []

    def add(r, cks):
        tensors.append(r)
        chunks.extend(cks)
    t = 0
    # uniform, channel steps
    sy, k = random_symbols(rng, 42, 7, False)
    su = sy
    add(rec("u", "float16", [6, 7], "uniform", {
        "granularity": "channel", "steps": [0, 1, 2, 3, -4, 5], "q_min": -3,
        "freqs": leb(refdec.table_from_counts(k))}), symbol_chunks(t, 0, sy, k))
    t += 1
    # tq without transform, out_in [6, 5, 2] and in_out [10, 6] (n = 6, m = 10)
    for name, shape, layout in (("tn", [6, 5, 2], "out_in"), ("ti", [10, 6], "in_out")):
        params = {"band_rows": [2, 4], "steps": [0, -3], "q_min": [-2, 1], "counts": []}
        cks = []
        for b, rows in enumerate([2, 4]):
            sy, k = random_symbols(rng, rows * 10, 5 + b, False)
            params["counts"].append(leb(k))
            cks += symbol_chunks(t, 1 + b, sy, k)
        if layout == "in_out":
            params["layout"] = "in_out"
        add(rec(name, "float32", shape, "tq", params), cks)
        t += 1
    # tq with a float16 transform (small integers: every sum exact), out_in [8, 6] and
    # in_out [6, 8] (n = 8, m = 6, k = 4)
    for name, shape, layout, dtype in (("fo", [8, 6], "out_in", "bfloat16"),
                                       ("fi", [6, 8], "in_out", "float64")):
        S = rng.integers(-4, 5, (6, 4)).astype("<f2").tobytes()
        params = {"band_rows": [1, 3], "steps": [2, -1], "q_min": [-1, -3], "counts": [],
                  "transform": "float16"}
        cks = byte_chunks(t, 0, S)
        for b, rows in enumerate([1, 3]):
            sy, k = random_symbols(rng, rows * 8, 3 + 2 * b, False)
            params["counts"].append(leb(k))
            cks += symbol_chunks(t, 1 + b, sy, k)
        if layout == "in_out":
            params["layout"] = "in_out"
        add(rec(name, dtype, shape, "tq", params), cks)
        t += 1
    # ecsq grid and codebook
    sy, k = random_symbols(rng, 33, 6, False)
    add(rec("eg", "bfloat16", [3, 11], "ecsq", {"recon": "grid", "step": -2, "q_min": -5,
                                                "counts": leb(k)}), symbol_chunks(t, 1, sy, k))
    t += 1
    sy, k = random_symbols(rng, 20, 4, True)
    vals = np.array([-2.5, -0.0, 0.75, 3.0], dtype="<f4").tobytes()
    add(rec("ec", "float16", [4, 5], "ecsq", {"recon": "codebook", "counts": leb(k),
                                              "precision": "float32"}),
        byte_chunks(t, 0, vals, 5) + symbol_chunks(t, 1, sy, k))
    t += 1
    # kmeans, two groups
    s0, k0 = random_symbols(rng, 8, 3, True)
    s1, k1 = random_symbols(rng, 12, 4, True)
    vals = np.array([-1, 0, 2, -3, -1, 1, 3], dtype="<f2").tobytes()
    add(rec("km", "float32", [5, 4], "kmeans", {"group_rows": [2, 3],
                                                "counts": [leb(k0), leb(k1)]}),
        byte_chunks(t, 0, vals, 3) + symbol_chunks(t, 1, s0, k0) + symbol_chunks(t, 2, s1, k1))
    t += 1
    # pq: m = 7, dim 3 (a short last sub-vector), K = 4
    sy, k = random_symbols(rng, 12, 4, True)
    vals = rng.integers(-8, 8, 12).astype("<f2").tobytes()
    add(rec("pq", "float32", [4, 7], "pq", {"dim": 3, "counts": leb(k)}),
        byte_chunks(t, 0, vals, 5) + symbol_chunks(t, 1, sy, k))
    t += 1
    # dither scalar and hex (odd numel)
    sy, k = random_symbols(rng, 13, 5, False)
    add(rec("ds", "float32", [13], "dither", {"step": -4, "seed": 99, "q_min": [-3],
                                              "counts": [leb(k)]}), symbol_chunks(t, 0, sy, k))
    t += 1
    sa, ka = random_symbols(rng, 8, 4, False)
    sb, kb = random_symbols(rng, 8, 3, False)
    add(rec("dh", "float16", [3, 5], "dither", {"step": 1, "seed": 7, "q_min": [-2, -1],
                                                "counts": [leb(ka), leb(kb)],
                                                "lattice": "hex"}),
        symbol_chunks(t, 0, sa, ka) + symbol_chunks(t, 1, sb, kb))
    data = build({"metadata": {}, "tensors": tensors}, chunks)
    got, r = outcome(data)
    assert got == "OK", (got, r)
    want = [bytes(x) for x in r[4]]
    saved = refdec.BLOCK
    try:
        for block in (1, 3, 7):
            refdec.BLOCK = block
            got, r = outcome(data)
            assert got == "OK", got
            for rc, a, b in zip(tensors, want, r[4]):
                assert a == bytes(b), (block, rc["name"])
    finally:
        refdec.BLOCK = saved
    # the uniform tensor against §7.3.2 computed here: (q_min + sym) x step(steps[i // 7])
    steps = [1.0, 1.25, 1.5, 1.75, 0.5, 2.5]                  # codes 0, 1, 2, 3, -4, 5 (§7.1)
    u = np.frombuffer(want[0], "<f2")
    assert u.tolist() == [float(np.float16((su[i] - 3) * steps[i // 7])) for i in range(42)]


def big_level_1():
    """A 1 GiB tensor (B1 = 2^30 exactly) is within Level 1 and decodes."""
    man = {"metadata": {}, "tensors": [uniform_const("u", "float32", [1 << 28])]}
    got, r = outcome(build(man))
    assert got == "OK", got
    v = r[4][0].view("<f4")
    assert v.size == 1 << 28 and v[0] == 3.0 and v[-1] == 3.0 and np.all(v[::4097] == 3.0)


def main():
    for f in CASES:
        f()
        print("ok", f.__name__)
    if "--big" in sys.argv:
        big_level_1()
        print("ok big_level_1")
    print("all %d cases passed" % (len(CASES) + ("--big" in sys.argv)))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""refdec's own checks of format 1.3: required feature bit 0 `ZSTD_MANIFEST` (spec/tqz.md §4) and
the stored manifest (§5.0), beyond what the conformance vectors pin.

Every file here is built from the spec's description alone (header §3, canonical MessagePack
§5.1, index and footer §9, zstd frames by RFC 8878's frame layout, or by libzstd); none comes
from the project's vector generator.  Each case states the rule it exercises and the code §1's
one-defect rule (first rule in §10.1's order, here §3 then §5.0's numbered checks) requires.

    python conformance/refdec/selftest_1_3.py       # a few seconds (one case decodes a
                                                    # manifest of 2^26 bytes, ~0.3 GiB RSS)
"""

import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from selftest_1_2 import (ZMAGIC, crc, expect, fhd, mp, outcome, raw_block, rle_block,  # noqa: E402
                          uniform_const)

MAX_M = 1 << 26


# ---------------------------------------------------------------------------------------------
# builders: a file without chunks around a given stored manifest (§2, §3, §9)
# ---------------------------------------------------------------------------------------------

def build_stored(stored, n_tensors, required=1, minor=3, manifest_crc=None, cut=None,
                 footer_ml=None, manifest_length=None):
    """Header (§3) + stored manifest (§5.0) + index of n_tensors chunk-less entries (§9.1) +
    footer (§9.2).  Fields may be overridden to make one defect."""
    ml = len(stored) if manifest_length is None else manifest_length
    mc = crc(stored) if manifest_crc is None else manifest_crc
    head = b"\x89TQZ\r\n\x1a\n" + struct.pack("<HHIIII", 1, minor, required, 0, ml, mc)
    head += struct.pack("<I", crc(head))
    out = bytearray(head + stored)
    if cut is not None:
        return bytes(out[:cut])
    index_offset = len(out)
    index = b"TQIX" + b"\0" * (16 * n_tensors)
    out += index
    f = struct.pack("<QIII", index_offset, n_tensors, crc(index),
                    len(stored) if footer_ml is None else footer_ml)
    out += f + struct.pack("<I", crc(f)) + b"\x89TQZEND\n"
    return bytes(out)


MAN = {"metadata": {"k": "v" * 40}, "tensors": [uniform_const("u", "float32", [2, 3])]}
M = mp(MAN)                                                  # 87 bytes


def single(content, blocks, fcs_flag=0, fcs=None, checksum=0, did=b""):
    """Single-segment frame: FCS of 1 (flag 0), 2 (value - 256), 4 or 8 bytes."""
    fcs = len(content) if fcs is None else fcs
    size = (1, 2, 4, 8)[fcs_flag]
    v = fcs - (256 if fcs_flag == 1 else 0)
    did_flag = {0: 0, 1: 1, 2: 2, 4: 3}[len(did)]
    return (ZMAGIC + fhd(fcs_flag, single=1, checksum=checksum, did_flag=did_flag) + did
            + v.to_bytes(size, "little") + blocks)


def windowed(exponent, mantissa, blocks, fcs=None, reserved=0, did=b""):
    """A frame with a Window_Descriptor; FCS absent (flag 0) or 8 bytes (flag 3)."""
    wd = bytes([(exponent << 3) | mantissa])
    did_flag = {0: 0, 1: 1, 2: 2, 4: 3}[len(did)]
    if fcs is None:
        return ZMAGIC + fhd(0, reserved=reserved, did_flag=did_flag) + wd + did + blocks
    return (ZMAGIC + fhd(3, reserved=reserved, did_flag=did_flag) + wd + did
            + fcs.to_bytes(8, "little") + blocks)


def ok_tensor(data):
    got, r = outcome(data)
    assert got == "OK", (got, r)
    assert r[1] == MAN, r[1]
    assert bytes(r[4][0]) == struct.pack("<f", 3.0) * 6
    return r


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

CASES = []


def case(f):
    CASES.append(f)
    return f


@case
def valid_frames():
    """§5.0: a stored frame whose content is the manifest decodes like the plain manifest."""
    import zstandard
    ok_tensor(build_stored(M, 1, required=0, minor=0))                 # plain, bit clear
    for level, chk in ((19, False), (1, True)):
        fr = zstandard.ZstdCompressor(level=level, write_checksum=chk).compress(M)
        r = ok_tensor(build_stored(fr, 1))
        assert r[0]["Manifest_Length"] == len(fr)
    ok_tensor(build_stored(single(M, raw_block(M)), 1))                # longer than M: valid
    ok_tensor(build_stored(single(M, raw_block(M[:50], last=0) + raw_block(M[50:])), 1))
    ok_tensor(build_stored(single(M, raw_block(M), fcs_flag=2), 1))
    ok_tensor(build_stored(windowed(0, 0, raw_block(M), fcs=len(M)), 1))
    ok_tensor(build_stored(windowed(17, 0, raw_block(M), fcs=len(M)), 1))   # window 2^27
    ok_tensor(build_stored(single(M, raw_block(M), did=b"\0"), 1))    # Dictionary_ID 0 present
    ok_tensor(build_stored(single(M, raw_block(M)), 1, minor=0))       # minor not compared
    ok_tensor(build_stored(single(M, raw_block(M)), 1, minor=9))
    # Unused_Bit (bit 4 of the descriptor) is ignored
    fr = bytearray(single(M, raw_block(M)))
    fr[4] |= 0x10
    ok_tensor(build_stored(bytes(fr), 1))
    # 2-byte Frame_Content_Size field (value + 256): a manifest of 300 bytes
    man = {"metadata": {"k": "v" * 280}, "tensors": []}
    m = mp(man)
    got, r = outcome(build_stored(single(m, raw_block(m), fcs_flag=1), 0))
    assert got == "OK" and r[1] == man, got
    # `info` prints the stored and the decompressed length
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "m.tqz")
        with open(src, "wb") as f:
            f.write(build_stored(single(M, raw_block(M)), 1))
        p = subprocess.run([sys.executable, os.path.join(HERE, "refdec.py"), "info", src],
                           capture_output=True, text=True)
        assert p.returncode == 0 and '"Manifest_Content_Length": %d' % len(M) in p.stdout, p


@case
def feature_bits():
    """§3 and §4: bit 0 is known; any other required bit is UNKNOWN_REQUIRED_FEATURE, found in
    the header before the manifest is read; the bit must match the stored manifest (§5.0)."""
    fr = single(M, raw_block(M))
    for req in (2, 1 << 31, 3, 1 | (1 << 5)):
        for stored in (M, fr, b"\xff" * 5):
            expect(build_stored(stored, 1, required=req), "UNKNOWN_REQUIRED_FEATURE",
                   "required 0x%x" % req)
    got, info = outcome(build_stored(fr, 1, required=1 | (1 << 5)))
    assert "bit 5" in info, info                                       # names the unknown bit
    expect(build_stored(M, 1, required=1), "BAD_MANIFEST", "bit 0 over a plain manifest")
    expect(build_stored(fr, 1, required=0), "BAD_MANIFEST", "bit 0 clear over a frame")
    # the header's order: Required_Features before Manifest_Length (§3)
    expect(build_stored(fr, 1, required=2, manifest_length=0), "UNKNOWN_REQUIRED_FEATURE",
           "unknown bit and Manifest_Length 0")
    expect(build_stored(fr, 1, required=1, manifest_length=MAX_M + 1), "LIMIT_EXCEEDED",
           "stored Manifest_Length over 2^26")
    # optional bits are ignored, with or without the required bit
    d = bytearray(build_stored(fr, 1))
    d[16:20] = b"\xff\xff\xff\xff"
    d[28:32] = struct.pack("<I", crc(bytes(d[:28])))
    ok_tensor(bytes(d))


@case
def before_the_frame():
    """§10.1 step 2: TRUNCATED, then Manifest_CRC32 (of the stored bytes), then §5.0."""
    fr = single(M, raw_block(M))
    full = build_stored(fr, 1)
    expect(build_stored(fr, 1, cut=32 + len(fr) - 1), "TRUNCATED", "file ends in the frame")
    expect(build_stored(fr, 1, manifest_crc=crc(M)), "CHECKSUM_MISMATCH", "CRC of the content")
    expect(build_stored(b"\x28", 1, manifest_crc=0), "CHECKSUM_MISMATCH", "CRC before check 1")
    # footer Manifest_Length is the header's field, the stored length (§9.2)
    expect(build_stored(fr, 1, footer_ml=len(M)), "BAD_INDEX", "footer with the content length")
    assert full[-16:-12] == struct.pack("<I", len(fr))


@case
def check_1_frame_header():
    """§5.0 check 1 (as §7.2 check 1): BAD_MANIFEST, before checks 2-4."""
    for stored in (b"\x28", b"\x28\xb5", b"\x28\xb5\x2f", ZMAGIC, ZMAGIC + fhd(0),
                   ZMAGIC + fhd(3, single=1) + b"\0\0", b"\x50\x2a\x4d\x18" + b"\0" * 8):
        expect(build_stored(stored, 1), "BAD_MANIFEST", "short/bad frame header %r" % stored)
    # dictionary 7 with a content size over the limit: check 1 first
    expect(build_stored(single(M, raw_block(M), fcs_flag=3, fcs=MAX_M + 1, did=b"\x07"), 1),
           "BAD_MANIFEST", "dictionary and FCS 2^26 + 1")
    # reserved bit and a window over the limit: check 1 first
    expect(build_stored(windowed(20, 0, raw_block(M), fcs=len(M), reserved=1), 1),
           "BAD_MANIFEST", "reserved bit and window 2^30")


@case
def check_2_content_size():
    """§5.0 check 2: present and >= 1 (BAD_MANIFEST), then <= 2^26 (LIMIT_EXCEEDED); before
    the window (check 3) and the blocks (check 4)."""
    expect(build_stored(windowed(0, 0, raw_block(M)), 1), "BAD_MANIFEST", "no FCS")
    expect(build_stored(windowed(21, 0, raw_block(M)), 1), "BAD_MANIFEST",
           "no FCS and window 2^31")
    expect(build_stored(windowed(21, 0, raw_block(M), fcs=0), 1), "BAD_MANIFEST",
           "FCS 0 and window 2^31")
    expect(build_stored(single(b"", raw_block(b"")), 1), "BAD_MANIFEST", "FCS 0, empty frame")
    expect(build_stored(windowed(21, 0, raw_block(M), fcs=MAX_M + 1), 1), "LIMIT_EXCEEDED",
           "FCS 2^26 + 1 and window 2^31")
    expect(build_stored(single(M, raw_block(M), fcs_flag=3, fcs=1 << 28) + b"\0", 1),
           "LIMIT_EXCEEDED", "single-segment FCS 2^28 (also its window) and a trailing byte")
    expect(build_stored(single(M, raw_block(M), fcs_flag=3, fcs=(1 << 64) - 1), 1),
           "LIMIT_EXCEEDED", "FCS 2^64 - 1")


@case
def check_3_window():
    """§5.0 check 3: Window_Size <= 2^27 (LIMIT_EXCEEDED), before the blocks."""
    expect(build_stored(windowed(17, 1, raw_block(M), fcs=len(M)), 1), "LIMIT_EXCEEDED",
           "window 2^27 + 2^24")
    expect(build_stored(windowed(18, 0, raw_block(M), fcs=len(M)) + b"\0", 1),
           "LIMIT_EXCEEDED", "window 2^28 and a trailing byte")
    expect(build_stored(windowed(18, 0, b"\x07\x00\x00", fcs=len(M)), 1), "LIMIT_EXCEEDED",
           "window 2^28 and a reserved block type")


@case
def check_4_blocks():
    """§5.0 check 4: every breach BAD_MANIFEST (never BAD_PAYLOAD)."""
    fr = single(M, raw_block(M))
    for stored, why in (
            (fr + b"\0", "a byte after the frame"),
            (fr + fr, "two frames"),
            (fr[:-1], "truncated block"),
            (single(M, (1 | (3 << 1) | (len(M) << 3)).to_bytes(3, "little") + M),
             "reserved block type"),
            (single(M, raw_block(M[:-1]), fcs=len(M)), "one byte fewer than FCS"),
            (windowed(0, 0, raw_block(M + b"\xc0"), fcs=len(M)), "one byte more than FCS"),
            (single(M, raw_block(M) + b"\0\0\0\0"), "trailing 4 bytes, no checksum flag"),
            (single(M, raw_block(M), checksum=1), "checksum flag, no checksum"),
            (single(M, raw_block(M), checksum=1) + b"\0\0\0\0", "checksum that does not match"),
            (single(M, rle_block(0xC0, 1 << 17)), "RLE block over Block_Maximum_Size"),
            (windowed(0, 0, rle_block(0xC0, 1025, last=0) + raw_block(M), fcs=len(M) + 1025),
             "RLE block of 1025 bytes in a 1 KiB window")):
        expect(build_stored(stored, 1), "BAD_MANIFEST", why)
    # a bomb that only the output bound catches (SPEC_FINDINGS 1.3C-4): window 2^17, so its
    # 128 KiB RLE blocks are within Block_Maximum_Size; FCS = the manifest's length; 2^30
    # bytes of blocks.  refdec asks libzstd for at most FCS + 1 bytes and stops.
    bomb = windowed(7, 0, b"".join(rle_block(0xC0, 1 << 17, last=0) for _ in range(8191))
                    + rle_block(0xC0, 1 << 17), fcs=len(M))
    expect(build_stored(bomb, 1), "BAD_MANIFEST", "RLE bomb of 2^30 bytes, FCS 87")


@case
def then_5_1_on_the_content():
    """After §5.0, §5.1-§5.3 apply to the content unchanged, with its own length."""
    for content, code, why in (
            (M + b"\xc0", "BAD_MANIFEST", "content with a trailing value"),
            (b"\xc1", "BAD_MANIFEST", "content not MessagePack"),
            (mp({"metadata": {}, "tensors": [1]}), "BAD_TENSOR_RECORD", "record not a map"),
            (mp({"metadata": {"k%04d" % i: 0 for i in range(4097)}, "tensors": []}),
             "LIMIT_EXCEEDED", "4097 metadata entries"),
            (mp({"metadata": {}, "tensors": [uniform_const("u", "float32", [1 << 31])]}),
             "LIMIT_EXCEEDED", "beyond Level 1 (B1 = 2^33)")):
        expect(build_stored(single(content, raw_block(content), fcs_flag=2), 1), code, why)
    # a declared length past the content's end (but within the stored bytes): BAD_MANIFEST
    content = b"\x82\xa8metadata\x80\xa7tensors\xdd\x00\x01\x00\x00"
    expect(build_stored(single(content, raw_block(content)) + b"", 1), "BAD_MANIFEST",
           "array of 65536 in a 22-byte content")


@case
def largest_manifest():
    """§12: a compressed manifest of exactly 2^26 bytes (a few KiB stored) is valid; 2^26 + 1 is
    LIMIT_EXCEEDED before anything of that size is allocated."""
    def frame(total):
        n = total - 27                 # bin 32 of n bytes: 27 bytes of everything else
        head = b"\x82\xa8metadata\x81\xa1x\xc6" + n.to_bytes(4, "big")
        tail = b"\xa7tensors\x90"
        blocks = bytearray(raw_block(head, last=0))
        left = n
        while left:
            k = min(left, 1 << 17)
            blocks += rle_block(0x5A, k, last=0)
            left -= k
        blocks += raw_block(tail)
        return single(bytes(head + tail), bytes(blocks), fcs_flag=2, fcs=total)
    got, r = outcome(build_stored(frame(MAX_M), 0))
    assert got == "OK", (got, r)
    x = r[1]["metadata"]["x"]
    assert len(x) == MAX_M - 27 and x[:3] == b"ZZZ" and x[-1:] == b"Z"
    del r, x
    expect(build_stored(frame(MAX_M + 1), 0), "LIMIT_EXCEEDED", "content of 2^26 + 1 bytes")


def main():
    for f in CASES:
        f()
        print("ok", f.__name__)
    print("all %d cases passed" % len(CASES))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Independent reference decoder for the .tqz format, written from spec/ alone.

Spec files used (format version 1.4: mode tq's optional parameter row_band, mode-tq.md §7.5.1;
1.3: required feature bit 0 ZSTD_MANIFEST, the stored manifest of §5.0; and 1.2 with its
"clarifications" entries of §15): spec/tqz.md (sections cited as "§N"),
spec/range-coder.md (its §8), spec/mode-tq.md (its §7.5) and spec/mode-lineage.md (its §7.S and
§7.6-§7.9: modes ecsq, kmeans, pq, dither).  Only numpy is imported at start; the `zstandard`
package is imported lazily, and only when a raw tensor with codec "zstd" or a compressed
manifest is met (writing a Zstandard decoder is out of scope; the frame header and block
structure are checked here in §7.2's / §5.0's order, the blocks are decoded by zstandard with
output bounded by Item_Count, or by a compressed manifest's Frame_Content_Size).

Conformance level (§12.1): refdec is a **Level 1** decoder.  It decodes every valid file within
Level 1 (B1 <= 2^30, BT <= 2^32, W <= 2^36, L <= 2^32).  It computes the four measures right
after the manifest (§10.1 step 2) and rejects a file beyond Level 1 there, with LIMIT_EXCEEDED
and no other code; an out-of-memory condition met later (MemoryError, a zstd allocation
failure) is also reported as LIMIT_EXCEEDED, never as a crash.  It keeps every decoded tensor
until the end (so it needs about BT bytes plus one tensor's stream buffers; reconstruction works
in blocks of 2^22 elements).

Usage:
    refdec.py decode IN.tqz OUT.safetensors   exit 0, or exit 1 with "... [CODE]" on stderr
    refdec.py info IN.tqz                     print header, manifest and §12.1 measures as JSON
Usage errors exit 2.

The decoder maps the file (mmap) and decodes front to back in the reference order of checks
of §10.1.  Nothing is written when the file is rejected.  Output follows the conformance
decoder protocol of §5.4: a tensor named `__metadata__` is written under the safetensors key
`/__metadata__`, every other tensor under its own name.
"""

import bisect
import json
import math
import mmap
import os
import signal
import struct
import sys
import tempfile
import zlib
from array import array

import numpy as np


# ----------------------------------------------------------------------------------------------
# §11 Error codes
# ----------------------------------------------------------------------------------------------

ERROR_CODES = {
    "TRUNCATED", "BAD_MAGIC", "UNSUPPORTED_VERSION", "UNKNOWN_REQUIRED_FEATURE",
    "RESERVED_NONZERO", "CHECKSUM_MISMATCH", "BAD_MANIFEST", "BAD_TENSOR_RECORD",
    "LIMIT_EXCEEDED", "BAD_CHUNK", "UNKNOWN_CHUNK", "BAD_INDEX", "TRAILING_DATA",
    "UNKNOWN_MODE", "BAD_TABLE", "BAD_STEP", "BAD_PAYLOAD",
}


class TqzError(Exception):
    """A rejection: §1 "reject with CODE"."""

    def __init__(self, code, message):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message


def fail(code, message):
    raise TqzError(code, message)


# ----------------------------------------------------------------------------------------------
# §1 Conventions: little-endian integers, CRC32 (ISO-HDLC, as zlib)
# ----------------------------------------------------------------------------------------------

def crc32(b):
    return zlib.crc32(b) & 0xFFFFFFFF


assert crc32(b"123456789") == 0xCBF43926  # §1


def u16(b, o):
    return struct.unpack_from("<H", b, o)[0]


def u32(b, o):
    return struct.unpack_from("<I", b, o)[0]


def u64(b, o):
    return struct.unpack_from("<Q", b, o)[0]


# ----------------------------------------------------------------------------------------------
# §12 Limits
# ----------------------------------------------------------------------------------------------

MAX_MANIFEST_LENGTH = 1 << 26
MAX_TENSORS = 1 << 20
MAX_METADATA_ENTRIES = 4096
MAX_DEPTH = 16
MAX_NAME_BYTES = 1024
MAX_NDIM = 8
MAX_DIM = 1 << 40
MAX_NUMEL = 1 << 36
MAX_ITEM_COUNT = 1 << 26
MAX_PAYLOAD_LENGTH = 1 << 28
MAX_ZSTD_WINDOW = 1 << 27
MAX_TABLE_LENGTH = 65536
MIN_LEVEL, MAX_LEVEL = -(1 << 20), 1 << 20
MIN_STEP_CODE, MAX_STEP_CODE = -160, 103

# §12.1 Conformance levels.  refdec claims Level 1: it decodes every valid file within these
# measures and rejects a file beyond them (only) with LIMIT_EXCEEDED, right after the manifest.
LEVEL_1 = (("B1", "tensor bytes", 1 << 30), ("BT", "decoded bytes", 1 << 32),
           ("W", "transform work", 1 << 36), ("L", "file length", 1 << 32))


# ----------------------------------------------------------------------------------------------
# §3 Header
# ----------------------------------------------------------------------------------------------

MAGIC = b"\x89TQZ\r\n\x1a\n"
HEADER_SIZE = 32

# §4 Feature bits
FEATURE_ZSTD_MANIFEST = 1 << 0       # required bit 0, since 1.3: the manifest is one zstd frame
KNOWN_REQUIRED_FEATURES = FEATURE_ZSTD_MANIFEST


def parse_header(data):
    """§3, checks in the order given there."""
    n = len(data)
    if n < 8:
        if data[:n] == MAGIC[:n]:
            fail("TRUNCATED", "file of %d bytes is a prefix of the magic" % n)
        fail("BAD_MAGIC", "not a .tqz file (magic does not match)")
    if data[:8] != MAGIC:
        fail("BAD_MAGIC", "not a .tqz file (magic does not match)")
    if n < HEADER_SIZE:
        fail("TRUNCATED", "file ends inside the 32-byte header")
    major, minor = u16(data, 8), u16(data, 10)
    if major != 1:
        fail("UNSUPPORTED_VERSION", "major version %d (this decoder implements 1)" % major)
    if crc32(data[0:28]) != u32(data, 28):
        fail("CHECKSUM_MISMATCH", "header CRC32 does not match")
    required, optional = u32(data, 12), u32(data, 16)
    # §4 Feature bits: this version (1.4, as 1.3) knows required bit 0, ZSTD_MANIFEST (§5.0);
    # any other set bit is unknown and named (the lowest, if several), whatever the manifest
    # holds.
    unknown = required & ~KNOWN_REQUIRED_FEATURES
    if unknown != 0:
        bit = (unknown & -unknown).bit_length() - 1
        fail("UNKNOWN_REQUIRED_FEATURE", "required feature bit %d is set" % bit)
    # Optional_Features: unknown bits are ignored (§4).
    manifest_length = u32(data, 20)
    if not (1 <= manifest_length <= MAX_MANIFEST_LENGTH):
        fail("LIMIT_EXCEEDED", "Manifest_Length %d outside 1..2^26" % manifest_length)
    return {
        "Major_Version": major, "Minor_Version": minor,
        "Required_Features": required, "Optional_Features": optional,
        "Manifest_Length": manifest_length, "Manifest_CRC32": u32(data, 24),
    }


# ----------------------------------------------------------------------------------------------
# §5.1 Canonical MessagePack (strict parser)
# ----------------------------------------------------------------------------------------------

class MsgpackCanonicalParser:
    """Parses exactly the subset of §5.1 and enforces its canonical rules.

    Values: None, bool, int (Python int; test with `type(x) is int`, bools are not integers),
    float (from float 64 only), str, bytes (binary), list, dict (insertion order = file order).
    """

    def __init__(self, buf):
        self.b = buf
        self.pos = 0
        self.end = len(buf)

    def bad(self, msg):
        fail("BAD_MANIFEST", "manifest: " + msg)

    def need(self, k):
        if k > self.end - self.pos:
            self.bad("value runs past the end of the manifest")

    def parse_document(self):
        v = self.value(1)
        if self.pos != self.end:
            self.bad("%d bytes after the manifest value" % (self.end - self.pos))
        return v

    def _len(self, size):
        self.need(size)
        p = self.pos
        self.pos += size
        if size == 1:
            return self.b[p]
        return int.from_bytes(self.b[p:p + size], "big")    # msgpack lengths are big-endian

    def value(self, depth):
        if depth > MAX_DEPTH:
            self.bad("nesting depth over %d" % MAX_DEPTH)
        self.need(1)
        t = self.b[self.pos]
        self.pos += 1
        b = self.b
        if t <= 0x7F:                                   # positive fixint
            return t
        if t >= 0xE0:                                   # negative fixint
            return t - 0x100
        if 0x80 <= t <= 0x8F:                           # fixmap
            return self.map_body(t & 0x0F, depth)
        if 0x90 <= t <= 0x9F:                           # fixarray
            return self.array_body(t & 0x0F, depth)
        if 0xA0 <= t <= 0xBF:                           # fixstr
            return self.str_body(t & 0x1F)
        if t == 0xC0:
            return None
        if t == 0xC2:
            return False
        if t == 0xC3:
            return True
        if t in (0xC4, 0xC5, 0xC6):                     # bin 8/16/32
            size = {0xC4: 1, 0xC5: 2, 0xC6: 4}[t]
            n = self._len(size)
            if (size == 2 and n < 0x100) or (size == 4 and n < 0x10000):
                self.bad("binary length %d not in the shortest header" % n)
            self.need(n)
            v = bytes(b[self.pos:self.pos + n])
            self.pos += n
            return v
        if t == 0xCB:                                   # float 64
            self.need(8)
            v = struct.unpack_from(">d", b, self.pos)[0]
            self.pos += 8
            return v
        if t in (0xCC, 0xCD, 0xCE, 0xCF):               # uint 8/16/32/64 (big-endian, msgpack)
            size = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}[t]
            self.need(size)
            v = int.from_bytes(b[self.pos:self.pos + size], "big")
            self.pos += size
            lo = {1: 0x80, 2: 0x100, 4: 0x10000, 8: 0x100000000}[size]
            if v < lo:
                self.bad("integer %d not in its shortest encoding" % v)
            return v
        if t in (0xD0, 0xD1, 0xD2, 0xD3):               # int 8/16/32/64
            size = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}[t]
            self.need(size)
            v = int.from_bytes(b[self.pos:self.pos + size], "big", signed=True)
            self.pos += size
            # negative values only, and only those the next shorter form cannot hold
            hi = {1: -33, 2: -129, 4: -(1 << 15) - 1, 8: -(1 << 31) - 1}[size]
            if v > hi:
                self.bad("integer %d not in its shortest encoding" % v)
            return v
        if t in (0xD9, 0xDA, 0xDB):                     # str 8/16/32
            size = {0xD9: 1, 0xDA: 2, 0xDB: 4}[t]
            n = self._len(size)
            lo = {1: 32, 2: 0x100, 4: 0x10000}[size]
            if n < lo:
                self.bad("string length %d not in the shortest header" % n)
            return self.str_body(n)
        if t in (0xDC, 0xDD):                           # array 16/32
            size = 2 if t == 0xDC else 4
            n = self._len(size)
            if n < (16 if size == 2 else 0x10000):
                self.bad("array length %d not in the shortest header" % n)
            return self.array_body(n, depth)
        if t in (0xDE, 0xDF):                           # map 16/32
            size = 2 if t == 0xDE else 4
            n = self._len(size)
            if n < (16 if size == 2 else 0x10000):
                self.bad("map length %d not in the shortest header" % n)
            return self.map_body(n, depth)
        # c1 (never used), c7-c9 / d4-d8 (extensions), ca (float 32)
        self.bad("type byte 0x%02x not allowed" % t)

    def str_body(self, n):
        self.need(n)
        raw = bytes(self.b[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8", errors="strict")  # rejects overlongs and surrogates
        except UnicodeDecodeError:
            self.bad("string is not valid UTF-8")

    def array_body(self, n, depth):
        # each element takes at least one byte: check before building anything
        self.need(n)
        return [self.value(depth + 1) for _ in range(n)]

    def map_body(self, n, depth):
        self.need(2 * n)
        out = {}
        prev = None
        for _ in range(n):
            k = self.value(depth + 1)
            if type(k) is not str:
                self.bad("map key is not a string")
            kb = k.encode("utf-8")
            if prev is not None and not kb > prev:
                self.bad("map keys not strictly increasing in UTF-8 byte order (%r)" % k)
            prev = kb
            out[k] = self.value(depth + 1)
        return out


def is_int(x):
    """§5.1: only the integer encodings qualify (bool is not an integer)."""
    return type(x) is int


# ----------------------------------------------------------------------------------------------
# §5.5 Data types
# ----------------------------------------------------------------------------------------------

DTYPES = {
    # name: (itemsize, numpy dtype for the stored little-endian bytes, safetensors name)
    "float64": (8, "<f8", "F64"), "float32": (4, "<f4", "F32"), "float16": (2, "<f2", "F16"),
    "bfloat16": (2, "<u2", "BF16"),
    "int64": (8, "<i8", "I64"), "int32": (4, "<i4", "I32"), "int16": (2, "<i2", "I16"),
    "int8": (1, "i1", "I8"),
    "uint64": (8, "<u8", "U64"), "uint32": (4, "<u4", "U32"), "uint16": (2, "<u2", "U16"),
    "uint8": (1, "u1", "U8"),
    "bool": (1, "u1", "BOOL"),
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


# ----------------------------------------------------------------------------------------------
# §7.1 Step codes
# ----------------------------------------------------------------------------------------------

def step_value(s):
    """step(s) = (4 + (s & 3)) * 2^((s >> 2) - 2), exact (a Python float is exact here)."""
    return math.ldexp(4 + (s & 3), (s >> 2) - 2)


def check_step_code(s):
    if not (MIN_STEP_CODE <= s <= MAX_STEP_CODE):
        fail("BAD_STEP", "step code %d outside [-160, 103]" % s)


# ----------------------------------------------------------------------------------------------
# §7.3.1 Frequency table (and §7.5.1 counts): unsigned LEB128 lists
# ----------------------------------------------------------------------------------------------

def parse_leb128_list(blob, max_bytes, what):
    """Parse a concatenation of unsigned LEB128 integers; BAD_TABLE on any defect of form."""
    vals = []
    i, n = 0, len(blob)
    while i < n:
        v, shift, start = 0, 0, i
        while True:
            if i >= n:
                fail("BAD_TABLE", "%s: truncated last varint" % what)
            byte = blob[i]
            i += 1
            if i - start > max_bytes:
                fail("BAD_TABLE", "%s: varint longer than %d bytes" % (what, max_bytes))
            v |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if byte == 0 and i - start > 1:
            fail("BAD_TABLE", "%s: overlong varint" % what)
        vals.append(v)
        if len(vals) > MAX_TABLE_LENGTH:
            fail("BAD_TABLE", "%s: more than %d entries" % (what, MAX_TABLE_LENGTH))
    return vals


def parse_freq_table(blob):
    """§7.3.1"""
    f = parse_leb128_list(blob, 4, "frequency table")
    if any(x == 0 for x in f):
        fail("BAD_TABLE", "frequency table: a frequency is 0")
    if sum(f) != 1 << 24:
        fail("BAD_TABLE", "frequency table: sum %d is not 2^24" % sum(f))
    return f


def table_from_counts(k):
    """range-coder.md §8.6 (normative for mode tq, §7.5.1)."""
    A = len(k)
    K = sum(k)
    if K == 0:
        k = [1] * A
        K = A
    free = (1 << 24) - A
    prods = [ks * free for ks in k]
    f = [1 + p // K for p in prods]
    left = free - sum(p // K for p in prods)
    if left:
        order = sorted(range(A), key=lambda s: (-(prods[s] % K), s))
        for s in order[:left]:
            f[s] += 1
    assert sum(f) == 1 << 24
    return f


# ----------------------------------------------------------------------------------------------
# §8 Range coding (range-coder.md)
# ----------------------------------------------------------------------------------------------

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1
TOTAL = 1 << 24   # §8.1


class Model:
    """§8.2: frequency table and cumulative table."""

    def __init__(self, f):
        assert len(f) >= 2 and sum(f) == TOTAL
        self.f = list(f)
        self.c = [0]
        for x in f:
            self.c.append(self.c[-1] + x)


def rc_decode(w, count, model):
    """§8.4 decoder on the payload's words w (a sequence of ints); returns `count` symbols as
    an array('H') (symbols are < A <= 65536) or rejects (§8.5 rule 1)."""
    n = len(w)
    if n == 0:
        fail("BAD_PAYLOAD", "empty range-coded payload")
    f, c = model.f, model.c
    pos = 2
    lower = 0
    rng = M64
    point = (w[0] << 32) + (w[1] if n > 1 else 0)   # a one-word payload reads w_0 then 0
    out = array("H", [0]) * count
    br = bisect.bisect_right
    for i in range(count):
        scale = rng >> 24
        q = ((point - lower) & M64) // scale
        if q >= TOTAL:
            fail("BAD_PAYLOAD", "range decoder: quantile out of range (§8.5)")
        s = br(c, q) - 1
        out[i] = s
        lower = (lower + scale * c[s]) & M64
        rng = scale * f[s]
        if rng < (1 << 32):
            lower = (lower << 32) & M64
            rng <<= 32
            point = ((point << 32) & M64) + (w[pos] if pos < n else 0)
            pos += 1
    return out


def rc_encode(symbols, model):
    """§8.3 encoder (used for §8.5 rule 2); returns the words as an array('I')."""
    f, c = model.f, model.c
    lower, rng = 0, M64
    out = array("I")
    N, P = 0, 0
    for s in symbols:
        # §8.3.1 interval update
        scale = rng >> 24
        rng = scale * f[s]
        new_lower = (lower + scale * c[s]) & M64
        if N > 0 and new_lower + rng < (1 << 64):
            if new_lower < lower:
                out.append((P + 1) & M32)
                out.extend([0] * (N - 1))
            else:
                out.append(P)
                out.extend([M32] * (N - 1))
            N = 0
        lower = new_lower
        # §8.3.2 renormalisation
        if rng < (1 << 32):
            rng <<= 32
            word = lower >> 32
            lower = (lower << 32) & M64
            if N > 0:
                N += 1
            elif lower + rng < (1 << 64):
                out.append(word)
            else:
                N, P = 1, word
    # §8.3.3 seal
    if rng == M64:
        return out
    point = (lower + M32) & M64
    if N > 0:
        if point >= lower:
            out.append(P)
            out.extend([M32] * (N - 1))
        else:
            out.append((P + 1) & M32)
            out.extend([0] * (N - 1))
    out.append(point >> 32)
    if ((lower + rng) & M64) >> 32 == point >> 32:
        out.append(0)
    return out


assert array("I").itemsize == 4 and array("H").itemsize == 2


def rc_decode_payload(payload, count, model):
    """A range-coded chunk payload: words (LE u32), decode, then §8.5 rule 2.  Words and
    symbols are kept in arrays (4 and 2 bytes each), not lists of Python ints, so a chunk of
    2^26 symbols costs about 128 MiB for its symbols (§12.1: memory about B1)."""
    words = array("I", payload)
    if sys.byteorder == "big":
        words.byteswap()                               # §8: words are little-endian
    syms = rc_decode(words, count, model)
    if rc_encode(syms, model) != words:
        fail("BAD_PAYLOAD", "range-coded payload is not the canonical coding of its "
                            "%d symbols (§8.5)" % count)
    return syms


# Self-check against the worked vectors of range-coder.md §8.7.
def _selftest_rc():
    m = Model([1 << 23, 1 << 22, 1 << 22])
    assert rc_encode([0, 1, 2, 0], m).tolist() == [1476395008]
    assert rc_encode([2], m).tolist() == [3221225472]
    assert rc_encode([0] * 10, Model([(1 << 24) - 1, 1])).tolist() == [0]
    assert rc_decode([1476395008], 4, m).tolist() == [0, 1, 2, 0]
    assert rc_decode_payload(b"\x00\x00\x00\x58", 4, m).tolist() == [0, 1, 2, 0]


_selftest_rc()


# ----------------------------------------------------------------------------------------------
# §7.2 zstd frames (header, content size, window and block structure checked here, in the order
# of §7.2's numbered checks; the blocks are decoded by the `zstandard` package)
# ----------------------------------------------------------------------------------------------

ZSTD_MAGIC = 0xFD2FB528
ZSTD_BLOCK_MAX = 128 * 1024          # RFC 8878: Block_Maximum_Size <= 128 KiB


def zstd_bad(msg, code="BAD_PAYLOAD"):
    """A frame that breaks §7.2's checks 1, 2 or 4: BAD_PAYLOAD for a chunk's payload (§7.2),
    BAD_MANIFEST for a stored manifest (§5.0, which applies the same checks)."""
    fail(code, "zstd: " + msg)


def zstd_frame_header(p, code="BAD_PAYLOAD"):
    """§7.2 check 1, frame header (RFC 8878 §3.1.1.1), in the order of §7.2: at least 4 bytes
    and the frame magic (a skippable frame's magic is not allowed); the whole header that the
    Frame_Header_Descriptor declares; Reserved_Bit 0 (Unused_Bit ignored); Dictionary_ID 0 or
    absent.  All BAD_PAYLOAD (an empty or short payload included: "zstd" has no Payload_Length
    rule, so never BAD_CHUNK); `code` is BAD_MANIFEST for a stored manifest (§5.0 check 1).
    Returns (header length, Single_Segment_Flag, Window_Size from the Window_Descriptor or
    None, Frame_Content_Size or None, Content_Checksum_Flag)."""
    n = len(p)
    if n < 4:
        zstd_bad("payload of %d bytes, too short for a frame's magic number" % n, code)
    magic = u32(p, 0)
    if (magic & 0xFFFFFFF0) == 0x184D2A50:
        zstd_bad("skippable frame", code)
    if magic != ZSTD_MAGIC:
        zstd_bad("not a Zstandard frame (magic)", code)
    if n < 5:
        zstd_bad("truncated frame header (no Frame_Header_Descriptor)", code)
    fhd = p[4]
    fcs_flag = fhd >> 6
    single = (fhd >> 5) & 1
    # bit 4: Unused_Bit, ignored
    reserved = (fhd >> 3) & 1
    has_checksum = (fhd >> 2) & 1
    did_flag = fhd & 3
    did_size = (0, 1, 2, 4)[did_flag]
    fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    header_len = 5 + (0 if single else 1) + did_size + fcs_size
    if n < header_len:
        zstd_bad("truncated frame header (%d bytes declared, %d present)" % (header_len, n),
                 code)
    if reserved:
        zstd_bad("Reserved_Bit of the Frame_Header_Descriptor is set", code)
    pos = 5
    window = None
    if not single:
        wd = p[pos]
        pos += 1
        exponent, mantissa = wd >> 3, wd & 7
        base = 1 << (10 + exponent)
        window = base + (base // 8) * mantissa           # RFC 8878 §3.1.1.1.2
    did = int.from_bytes(p[pos:pos + did_size], "little")
    pos += did_size
    if did != 0:
        zstd_bad("frame needs dictionary %d" % did, code)
    content_size = None
    if fcs_size:
        content_size = int.from_bytes(p[pos:pos + fcs_size], "little")
        if fcs_size == 2:
            content_size += 256
        pos += fcs_size
    assert pos == header_len
    return header_len, single, window, content_size, has_checksum


def zstd_frame_end(p, pos, window, has_checksum, code="BAD_PAYLOAD"):
    """§7.2 check 4, block structure (RFC 8878 §3.1.1.2): a reserved block type, a block over
    Block_Maximum_Size = min(Window_Size, 128 KiB), a truncated block or checksum: BAD_PAYLOAD
    (`code`: BAD_MANIFEST for a stored manifest, §5.0 check 4).  Returns the offset just after
    the frame."""
    n = len(p)
    block_max = min(window, ZSTD_BLOCK_MAX)
    while True:
        if pos + 3 > n:
            zstd_bad("truncated block header", code)
        bh = int.from_bytes(p[pos:pos + 3], "little")
        pos += 3
        last = bh & 1
        btype = (bh >> 1) & 3
        bsize = bh >> 3
        if btype == 3:
            zstd_bad("reserved block type", code)
        if bsize > block_max:
            zstd_bad("block size %d over Block_Maximum_Size %d" % (bsize, block_max), code)
        adv = 1 if btype == 1 else bsize               # RLE block: one byte of content
        if pos + adv > n:
            zstd_bad("truncated block", code)
        pos += adv
        if last:
            break
    if has_checksum:
        if pos + 4 > n:
            zstd_bad("truncated content checksum", code)
        pos += 4
    return pos


def zstd_decode(payload, item_count):
    """§7.2 codec "zstd": exactly one frame decompressing to exactly item_count bytes, checked
    in §7.2's order: 1 frame header, 2 content size against Item_Count, 3 window limit,
    4 blocks (output bounded by Item_Count), checksum, nothing after the frame."""
    # 1. frame header (BAD_PAYLOAD)
    header_len, single, window, content_size, has_checksum = zstd_frame_header(payload)
    # 2. content size (BAD_PAYLOAD), before the window: a single-segment frame's content size
    #    is also its window (§1: one value, several rules; the first in the order wins)
    if content_size is not None and content_size != item_count:
        zstd_bad("Frame_Content_Size %d but the chunk declares %d bytes"
                 % (content_size, item_count))
    # 3. window (LIMIT_EXCEEDED); a single-segment frame's Window_Size is its
    #    Frame_Content_Size (RFC 8878 §3.1.1.1.2), here = Item_Count <= 2^26: never rejected
    if single:
        window = content_size
    if window > MAX_ZSTD_WINDOW:
        fail("LIMIT_EXCEEDED", "zstd Window_Size %d over 2^27" % window)
    # 4. blocks (BAD_PAYLOAD): structure, bytes after the frame, then decompression
    flen = zstd_frame_end(payload, header_len, window, has_checksum)
    if flen != len(payload):
        zstd_bad("%d payload bytes after the frame" % (len(payload) - flen))
    return zstd_decompress_bounded(payload, item_count, "the chunk declares")


def zstd_decompress_bounded(frame, size, what, code="BAD_PAYLOAD"):
    """§7.2 check 4, the decompression itself: one frame whose structure has been checked,
    decoded into one buffer of `size` bytes (Item_Count, or a compressed manifest's
    Frame_Content_Size, §5.0), never more; a block libzstd cannot decode, a content checksum that
    does not match, or output of more or fewer than `size` bytes: `code`."""
    import zstandard  # lazily: only files with zstd tensors or a compressed manifest need it
    # Memory (§7.2): the output is bounded by `size` (at most size + 1 bytes are ever
    # requested); a streaming window is at most 2^27 bytes (check 3, max_window_size).  A
    # frame whose matches reach further back than its Window_Size but stay within its output
    # is decoded or rejected by libzstd -- either is allowed (§7.2), and a rejection is `code`.
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
    out = np.empty(size, dtype=np.uint8)
    total = 0
    try:
        reader = dctx.stream_reader(bytes(frame), read_across_frames=False)
        while total <= size:
            b = reader.read(min(size + 1 - total, 1 << 22))
            if not b:
                break
            if total + len(b) > size:
                total += len(b)
                break
            out[total:total + len(b)] = np.frombuffer(b, dtype=np.uint8)
            total += len(b)
    except zstandard.ZstdError as e:
        if "alloc" in str(e).lower():                 # out of memory (§12.1): not the file's fault
            raise MemoryError(str(e))
        zstd_bad(str(e), code)
    if total != size:
        zstd_bad("frame decompresses to %s bytes, %s %d"
                 % ("more than %d" % size if total > size else total, what, size), code)
    return out


# ----------------------------------------------------------------------------------------------
# §5.0 Stored manifest (since 1.3: with ZSTD_MANIFEST, one zstd frame)
# ----------------------------------------------------------------------------------------------

def manifest_from_stored(stored, required):
    """§5.0: the stored manifest's bytes (Manifest_CRC32 already checked, §10.1 step 2) ->
    the manifest's bytes, which §5.1 parses.  Without ZSTD_MANIFEST (§4 bit 0) the stored bytes
    are the manifest.  With it they are exactly one Zstandard frame, checked in §5.0's order
    (first failure wins, §1), by §7.2's rules for a frame but with §5.0's codes."""
    if not required & FEATURE_ZSTD_MANIFEST:
        return stored
    code = "BAD_MANIFEST"
    # 1. Frame header, as §7.2 check 1 (magic 28 B5 2F FD, not a skippable frame, the whole
    #    header present, Reserved_Bit 0, Dictionary_ID 0 or absent): else BAD_MANIFEST.  A plain
    #    MessagePack manifest under the bit fails here (its first byte is not the magic's).
    header_len, single, window, content_size, has_checksum = zstd_frame_header(stored, code)
    # 2. Content size: Frame_Content_Size present and >= 1 (BAD_MANIFEST), then <= 2^26
    #    (§12, LIMIT_EXCEEDED).  refdec has no lower limit of its own on the manifest.  This is
    #    checked before anything of that size is allocated (§12).
    if content_size is None:
        zstd_bad("compressed manifest without Frame_Content_Size", code)
    if content_size < 1:
        zstd_bad("compressed manifest of Frame_Content_Size 0", code)
    if content_size > MAX_MANIFEST_LENGTH:
        fail("LIMIT_EXCEEDED", "compressed manifest's Frame_Content_Size %d over 2^26"
             % content_size)
    # 3. Window, as §7.2 check 3: Window_Size <= 2^27 (LIMIT_EXCEEDED); a single-segment
    #    frame's Window_Size is its Frame_Content_Size (RFC 8878 §3.1.1.1.2), <= 2^26 by
    #    check 2, so this never rejects a single-segment frame.
    if single:
        window = content_size
    if window > MAX_ZSTD_WINDOW:
        fail("LIMIT_EXCEEDED", "compressed manifest's Window_Size %d over 2^27" % window)
    # 4. Blocks, as §7.2 check 4 (the same closed list of breaches): structure, any stored byte
    #    after the frame, then decompression into one buffer of Frame_Content_Size bytes (§7.2's
    #    note on memory, with Frame_Content_Size in place of Item_Count): output of more or fewer
    #    bytes, a block that cannot be decoded, a content checksum that does not match: all
    #    BAD_MANIFEST.  (A frame whose matches reach beyond its Window_Size but stay within its
    #    output is decoded or, if libzstd refuses it, BAD_MANIFEST: SPEC_FINDINGS 1.3C-2.)
    flen = zstd_frame_end(stored, header_len, window, has_checksum, code)
    if flen != len(stored):
        zstd_bad("%d stored manifest bytes after the frame" % (len(stored) - flen), code)
    out = zstd_decompress_bounded(stored, content_size, "Frame_Content_Size is", code)
    return memoryview(out)            # bytes-like for §5.1's parser (indexing gives Python ints)


# ----------------------------------------------------------------------------------------------
# §5.2 - §5.5 and §7: manifest and tensor records
# ----------------------------------------------------------------------------------------------

def check_name(name, seen):
    """§5.4"""
    if type(name) is not str:
        fail("BAD_TENSOR_RECORD", "name is not a string")
    nb = name.encode("utf-8")
    if not nb:
        fail("BAD_TENSOR_RECORD", "empty tensor name")
    if len(nb) > MAX_NAME_BYTES:
        fail("BAD_TENSOR_RECORD", "tensor name of %d UTF-8 bytes (over 1024)" % len(nb))
    for ch in name:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            fail("BAD_TENSOR_RECORD", "tensor name %r holds a control character" % name)
    if "\\" in name:
        fail("BAD_TENSOR_RECORD", "tensor name %r holds a backslash" % name)
    if name.startswith("/"):
        fail("BAD_TENSOR_RECORD", "tensor name %r starts with '/'" % name)
    if any(seg in (".", "..") for seg in name.split("/")):
        fail("BAD_TENSOR_RECORD", "tensor name %r has a '.' or '..' segment" % name)
    if nb in seen:
        fail("BAD_TENSOR_RECORD", "tensor name %r used twice" % name)
    seen.add(nb)


def check_shape(shape):
    """§5.3 step 4: an array whose every element is an integer, then every element >= 0
    (BAD_TENSOR_RECORD: the shape is typed completely before any limit); then §12 as
    LIMIT_EXCEEDED: ndim <= 8, then each dimension <= 2^40, then the element count (a 0
    dimension counted as 1) <= 2^36."""
    if type(shape) is not list:
        fail("BAD_TENSOR_RECORD", "shape is not an array")
    for d in shape:
        if not is_int(d):
            fail("BAD_TENSOR_RECORD", "a dimension is not an integer")
    for d in shape:
        if d < 0:
            fail("BAD_TENSOR_RECORD", "negative dimension %d" % d)
    if len(shape) > MAX_NDIM:
        fail("LIMIT_EXCEEDED", "ndim %d over 8" % len(shape))
    for d in shape:
        if d > MAX_DIM:
            fail("LIMIT_EXCEEDED", "dimension %d over 2^40" % d)
    counted = 1
    for d in shape:
        counted *= max(d, 1)      # §5.3: a dimension of 0 counts as 1 for the limit
        if counted > MAX_NUMEL:
            fail("LIMIT_EXCEEDED", "element count over 2^36")
    numel = 1
    for d in shape:
        numel *= d
    return numel


# §7 registry: tq since 1.1 (mode-tq.md); ecsq, kmeans, pq, dither since 1.2 (mode-lineage.md)
MODES = ("raw", "uniform", "alias", "tq", "ecsq", "kmeans", "pq", "dither")


def check_keys(params, required, optional=()):
    for k in required:
        if k not in params:
            fail("BAD_TENSOR_RECORD", "params lack %r" % k)
    for k in params:
        if k not in required and k not in optional:
            fail("BAD_TENSOR_RECORD", "params have an unknown key %r" % k)


def check_params_raw(rec):
    """§7.2"""
    p = rec["params"]
    check_keys(p, ("codec",))
    codec = p["codec"]
    if type(codec) is not str or codec not in ("none", "zstd"):
        fail("BAD_TENSOR_RECORD", "raw codec %r is not 'none' or 'zstd'" % (codec,))
    rec["codec"] = codec
    rec["streams"] = [rec["numel"] * DTYPES[rec["dtype"]][0]]


def check_params_uniform(rec):
    """§7.3 (rules in the order listed there)."""
    p = rec["params"]
    check_keys(p, ("granularity", "steps", "q_min", "freqs"))
    g, steps, q_min, freqs = p["granularity"], p["steps"], p["q_min"], p["freqs"]
    # types
    if type(g) is not str or g not in ("tensor", "channel"):
        fail("BAD_TENSOR_RECORD", "granularity %r is not 'tensor' or 'channel'" % (g,))
    if type(steps) is not list or not all(is_int(s) for s in steps):
        fail("BAD_TENSOR_RECORD", "steps is not an array of integers")
    if not is_int(q_min):
        fail("BAD_TENSOR_RECORD", "q_min is not an integer")
    if type(freqs) is not bytes:
        fail("BAD_TENSOR_RECORD", "freqs is not binary")
    # rules
    if rec["dtype"] not in FLOAT_DTYPES:
        fail("BAD_TENSOR_RECORD", "uniform needs a float dtype, not %s" % rec["dtype"])
    if rec["numel"] < 1:
        fail("BAD_TENSOR_RECORD", "uniform tensor with no element")
    shape = rec["shape"]
    if g == "channel":
        if len(shape) < 1 or shape[0] < 1:
            fail("BAD_TENSOR_RECORD", "granularity channel needs ndim >= 1 and shape[0] >= 1")
        want = shape[0]
    else:
        want = 1
    if len(steps) != want:
        fail("BAD_TENSOR_RECORD", "%d step codes, %d expected" % (len(steps), want))
    for s in steps:
        check_step_code(s)
    f = parse_freq_table(freqs)
    A = len(f)
    if q_min < MIN_LEVEL or q_min + A - 1 > MAX_LEVEL:
        fail("LIMIT_EXCEEDED", "levels %d..%d outside -2^20..2^20" % (q_min, q_min + A - 1))
    rec["granularity"] = g
    rec["step_codes"] = steps
    rec["q_min"] = q_min
    rec["model"] = Model(f) if A > 1 else None
    rec["A"] = A
    rec["streams"] = [rec["numel"] if A > 1 else 0]


def check_params_alias(rec, index, records):
    """§7.4"""
    p = rec["params"]
    check_keys(p, ("of",))
    j = p["of"]
    if not is_int(j):
        fail("BAD_TENSOR_RECORD", "alias 'of' is not an integer")
    if not (0 <= j < index):
        fail("BAD_TENSOR_RECORD", "alias of %d, not an earlier tensor" % j)
    t = records[j]
    if t["mode"] == "alias":
        fail("BAD_TENSOR_RECORD", "alias of an alias")
    if t["dtype"] != rec["dtype"] or t["shape"] != rec["shape"]:
        fail("BAD_TENSOR_RECORD", "alias target has another dtype or shape")
    rec["of"] = j
    rec["streams"] = []


def check_params_tq(rec):
    """mode-tq.md §7.5.1, checks 1-7 in their order (row_band, since 1.4: its type in check 1,
    its rules at the end of check 5)."""
    p = rec["params"]
    # 1. keys and types
    check_keys(p, ("band_rows", "steps", "q_min", "counts"), ("layout", "transform", "row_band"))
    for key in ("band_rows", "steps", "q_min"):
        v = p[key]
        if type(v) is not list or not all(is_int(x) for x in v):
            fail("BAD_TENSOR_RECORD", "tq %s is not an array of integers" % key)
    counts = p["counts"]
    if type(counts) is not list or not all(type(x) is bytes for x in counts):
        fail("BAD_TENSOR_RECORD", "tq counts is not an array of binaries")
    layout = p.get("layout", "out_in")
    transform = p.get("transform", "none")
    if type(layout) is not str or type(transform) is not str:
        fail("BAD_TENSOR_RECORD", "tq layout/transform is not a string")
    # row_band: a bin (§5.1 bin 8/16/32; nil, a string or an array of integers is the wrong
    # type: its default is "absent", which no value spells, SPEC_FINDINGS 1.4C-2)
    row_band = p.get("row_band")
    if "row_band" in p and type(row_band) is not bytes:
        fail("BAD_TENSOR_RECORD", "tq row_band is not a binary")
    # 2. dtype, ndim, numel
    shape = rec["shape"]
    if rec["dtype"] not in FLOAT_DTYPES:
        fail("BAD_TENSOR_RECORD", "tq needs a float dtype, not %s" % rec["dtype"])
    if len(shape) < 1 or rec["numel"] < 1:
        fail("BAD_TENSOR_RECORD", "tq needs at least one dimension and one element")
    # 3. layout, transform
    if layout not in ("out_in", "in_out"):
        fail("BAD_TENSOR_RECORD", "tq layout %r" % layout)
    if layout == "in_out" and len(shape) != 2:
        fail("BAD_TENSOR_RECORD", "tq layout in_out needs a 2-d tensor")
    if transform not in ("none", "float16"):
        fail("BAD_TENSOR_RECORD", "tq transform %r" % transform)
    # 4. dimensions
    n = shape[0] if layout == "out_in" else shape[1]
    m = rec["numel"] // n
    # 5. bands
    band_rows, steps, q_mins = p["band_rows"], p["steps"], p["q_min"]
    B = len(band_rows)
    if not (1 <= B <= 4096):
        fail("BAD_TENSOR_RECORD", "tq has %d bands (1..4096 allowed)" % B)
    if len(steps) != B or len(q_mins) != B or len(counts) != B:
        fail("BAD_TENSOR_RECORD", "tq steps/q_min/counts do not have B=%d entries" % B)
    if any(r < 1 for r in band_rows):
        fail("BAD_TENSOR_RECORD", "tq band with fewer than 1 row")
    k = sum(band_rows)
    if transform == "none":
        if k != n:
            fail("BAD_TENSOR_RECORD", "tq band rows add up to %d, not n=%d" % (k, n))
    elif k > min(m, n):
        fail("BAD_TENSOR_RECORD", "tq band rows add up to %d > min(m, n)" % k)
    # 5, row_band (1.4): exactly k bytes, B <= 256, every byte below B, and for every band b
    # exactly band_rows[b] bytes equal to b, in this order (all BAD_TENSOR_RECORD)
    if row_band is not None:
        if len(row_band) != k:
            fail("BAD_TENSOR_RECORD", "tq row_band holds %d bytes, not k=%d"
                 % (len(row_band), k))
        if B > 256:
            fail("BAD_TENSOR_RECORD", "tq row_band with %d bands (at most 256)" % B)
        rb = np.frombuffer(row_band, dtype=np.uint8)
        top = int(rb.max())                            # k >= 1 bytes here
        if top >= B:
            fail("BAD_TENSOR_RECORD", "tq row_band names band %d of %d" % (top, B))
        have = np.bincount(rb, minlength=B)
        for b in range(B):
            if int(have[b]) != band_rows[b]:
                fail("BAD_TENSOR_RECORD", "tq row_band gives band %d %d rows, band_rows %d"
                     % (b, int(have[b]), band_rows[b]))
    c = m if transform == "none" else n
    # 6. step codes
    for s in steps:
        check_step_code(s)
    # 7. counts tables, then level limits
    tables = []
    for b in range(B):
        kk = parse_leb128_list(counts[b], 6, "tq counts[%d]" % b)
        if not kk:
            fail("BAD_TABLE", "tq counts[%d] is empty" % b)
        if kk[0] == 0 or kk[-1] == 0:
            fail("BAD_TABLE", "tq counts[%d]: first or last count is 0" % b)
        if sum(kk) != band_rows[b] * c:
            fail("BAD_TABLE", "tq counts[%d] add up to %d, not %d"
                 % (b, sum(kk), band_rows[b] * c))
        tables.append(kk)
    for b in range(B):
        A = len(tables[b])
        if q_mins[b] < MIN_LEVEL or q_mins[b] + A - 1 > MAX_LEVEL:
            fail("LIMIT_EXCEEDED", "tq band %d levels outside -2^20..2^20" % b)
    rec.update(layout=layout, transform=transform, n=n, m=m, k=k, c=c,
               band_rows=band_rows, row_band=row_band, step_codes=steps, q_mins=q_mins,
               A_list=[len(t) for t in tables],
               models=[Model(table_from_counts(t)) if len(t) > 1 else None for t in tables])
    # §7.5.2 streams
    rec["streams"] = [2 * m * k if transform == "float16" else 0] + \
        [band_rows[b] * c if len(tables[b]) > 1 else 0 for b in range(B)]


# ----------------------------------------------------------------------------------------------
# mode-lineage.md §7.S shared definitions and §7.6-§7.9 parameters (format version 1.2)
# ----------------------------------------------------------------------------------------------

PRECISIONS = {"float16": (2, "<f2"), "float32": (4, "<f4")}   # §7.S.3: bytes per value, format


def parse_counts_table(blob, what):
    """§7.S.2: A unsigned LEB128 counts, each at most 6 bytes, none overlong, the last not
    truncated, 1 <= A <= 65536; BAD_TABLE otherwise.  (Sums and zero rules: per mode.)"""
    k = parse_leb128_list(blob, 6, what)
    if not k:
        fail("BAD_TABLE", "%s is empty (A = 0)" % what)
    return k


def model_from_counts(k):
    """§7.S.2: the stream's table by range-coder.md §8.6 when A >= 2; None when A = 1."""
    return Model(table_from_counts(k)) if len(k) >= 2 else None


def row_view(rec):
    """§7.S.1: n = shape[0] rows of m = numel / n elements (callers ensure ndim >= 1, numel >= 1)."""
    n = rec["shape"][0]
    return n, rec["numel"] // n


def check_lineage_dtype(rec, mode, need_dim):
    """Check 2 of §7.6-§7.9: a float dtype, numel >= 1 (and for kmeans / pq ndim >= 1)."""
    if rec["dtype"] not in FLOAT_DTYPES:
        fail("BAD_TENSOR_RECORD", "%s needs a float dtype, not %s" % (mode, rec["dtype"]))
    if need_dim and len(rec["shape"]) < 1:
        fail("BAD_TENSOR_RECORD", "%s needs at least one dimension" % mode)
    if rec["numel"] < 1:
        fail("BAD_TENSOR_RECORD", "%s tensor with no element" % mode)


def check_precision(mode, precision):
    if precision not in PRECISIONS:
        fail("BAD_TENSOR_RECORD", "%s precision %r is not 'float16' or 'float32'"
             % (mode, precision))


def check_params_ecsq(rec):
    """mode-lineage.md §7.6.1, checks 1-6 in their order."""
    p = rec["params"]
    # 1. keys and types
    check_keys(p, ("recon", "counts"), ("step", "q_min", "precision"))
    if type(p["recon"]) is not str:
        fail("BAD_TENSOR_RECORD", "ecsq recon is not a string")
    if type(p["counts"]) is not bytes:
        fail("BAD_TENSOR_RECORD", "ecsq counts is not a bin")
    for key in ("step", "q_min"):
        if key in p and not is_int(p[key]):
            fail("BAD_TENSOR_RECORD", "ecsq %s is not an integer" % key)
    if "precision" in p and type(p["precision"]) is not str:
        fail("BAD_TENSOR_RECORD", "ecsq precision is not a string")
    # 2. dtype, numel (any number of dimensions)
    check_lineage_dtype(rec, "ecsq", need_dim=False)
    # 3. recon and the keys it needs / forbids
    recon = p["recon"]
    if recon == "grid":
        if "step" not in p or "q_min" not in p:
            fail("BAD_TENSOR_RECORD", "ecsq grid needs step and q_min")
        if "precision" in p:
            fail("BAD_TENSOR_RECORD", "ecsq grid with a precision key")
    elif recon == "codebook":
        if "step" in p or "q_min" in p:
            fail("BAD_TENSOR_RECORD", "ecsq codebook with a step or q_min key")
        check_precision("ecsq", p.get("precision", "float16"))
    else:
        fail("BAD_TENSOR_RECORD", "ecsq recon %r is not 'grid' or 'codebook'" % recon)
    # 4. step code
    if recon == "grid":
        check_step_code(p["step"])
    # 5. counts table
    k = parse_counts_table(p["counts"], "ecsq counts")
    A = len(k)
    if sum(k) != rec["numel"]:
        fail("BAD_TABLE", "ecsq counts add up to %d, not numel %d" % (sum(k), rec["numel"]))
    if recon == "grid":
        if k[0] == 0 or k[-1] == 0:
            fail("BAD_TABLE", "ecsq grid counts: first or last count is 0")
    elif 0 in k:
        fail("BAD_TABLE", "ecsq codebook counts: a count is 0 (an unused stored value)")
    # 6. levels
    if recon == "grid":
        q_min = p["q_min"]
        if q_min < MIN_LEVEL or q_min + A - 1 > MAX_LEVEL:
            fail("LIMIT_EXCEEDED", "ecsq levels %d..%d outside -2^20..2^20" % (q_min, q_min + A - 1))
        rec.update(step_code=p["step"], q_min=q_min)
    else:
        rec["precision"] = p.get("precision", "float16")
    rec.update(recon=recon, A=A, model=model_from_counts(k))
    # §7.6.2 streams: 0 = values (codebook), 1 = symbols
    w = PRECISIONS[rec["precision"]][0] if recon == "codebook" else 0
    rec["streams"] = [A * w, rec["numel"] if A >= 2 else 0]
    rec["value_streams"] = {0} if recon == "codebook" else set()


def check_params_kmeans(rec):
    """mode-lineage.md §7.7.1, checks 1-5 in their order."""
    p = rec["params"]
    # 1. keys and types
    check_keys(p, ("group_rows", "counts"), ("precision",))
    gr, counts = p["group_rows"], p["counts"]
    if type(gr) is not list or not all(is_int(x) for x in gr):
        fail("BAD_TENSOR_RECORD", "kmeans group_rows is not an array of integers")
    if type(counts) is not list or not all(type(x) is bytes for x in counts):
        fail("BAD_TENSOR_RECORD", "kmeans counts is not an array of bins")
    if "precision" in p and type(p["precision"]) is not str:
        fail("BAD_TENSOR_RECORD", "kmeans precision is not a string")
    # 2. dtype, ndim, numel
    check_lineage_dtype(rec, "kmeans", need_dim=True)
    # 3. precision
    precision = p.get("precision", "float16")
    check_precision("kmeans", precision)
    # 4. groups
    n, m = row_view(rec)
    G = len(gr)
    if not (1 <= G <= 4096):
        fail("BAD_TENSOR_RECORD", "kmeans has %d groups (1..4096 allowed)" % G)
    if len(counts) != G:
        fail("BAD_TENSOR_RECORD", "kmeans counts has %d entries, group_rows %d" % (len(counts), G))
    if any(r < 1 for r in gr):
        fail("BAD_TENSOR_RECORD", "kmeans group with fewer than 1 row")
    if sum(gr) != n:
        fail("BAD_TENSOR_RECORD", "kmeans group rows add up to %d, not n = %d" % (sum(gr), n))
    # 5. counts tables, group by group
    tables = []
    for g in range(G):
        k = parse_counts_table(counts[g], "kmeans counts[%d]" % g)
        if 0 in k:
            fail("BAD_TABLE", "kmeans counts[%d]: a count is 0" % g)
        if sum(k) != gr[g] * m:
            fail("BAD_TABLE", "kmeans counts[%d] add up to %d, not %d" % (g, sum(k), gr[g] * m))
        tables.append(k)
    w = PRECISIONS[precision][0]
    K = [len(k) for k in tables]
    rec.update(precision=precision, n=n, m=m, group_rows=gr, K=K,
               models=[model_from_counts(k) for k in tables])
    # §7.7.2 streams: 0 = all codebooks, 1 + g = group g's symbols
    rec["streams"] = [sum(K) * w] + [gr[g] * m if K[g] >= 2 else 0 for g in range(G)]
    rec["value_streams"] = {0}


def check_params_pq(rec):
    """mode-lineage.md §7.8.1, checks 1-5 in their order."""
    p = rec["params"]
    # 1. keys and types
    check_keys(p, ("dim", "counts"), ("precision",))
    if not is_int(p["dim"]):
        fail("BAD_TENSOR_RECORD", "pq dim is not an integer")
    if type(p["counts"]) is not bytes:
        fail("BAD_TENSOR_RECORD", "pq counts is not a bin")
    if "precision" in p and type(p["precision"]) is not str:
        fail("BAD_TENSOR_RECORD", "pq precision is not a string")
    # 2. dtype, ndim, numel
    check_lineage_dtype(rec, "pq", need_dim=True)
    # 3. precision
    precision = p.get("precision", "float16")
    check_precision("pq", precision)
    # 4. dim
    n, m = row_view(rec)
    d = p["dim"]
    if not (1 <= d <= min(m, 256)):
        fail("BAD_TENSOR_RECORD", "pq dim %d outside 1..min(m = %d, 256)" % (d, m))
    s = -(-m // d)
    # 5. counts table
    k = parse_counts_table(p["counts"], "pq counts")
    if 0 in k:
        fail("BAD_TABLE", "pq counts: a count is 0")
    if sum(k) != n * s:
        fail("BAD_TABLE", "pq counts add up to %d, not n x s = %d" % (sum(k), n * s))
    K = len(k)
    w = PRECISIONS[precision][0]
    rec.update(precision=precision, n=n, m=m, d=d, s=s, K=K, model=model_from_counts(k))
    # §7.8.2 streams: 0 = codebook, 1 = sub-vector symbols
    rec["streams"] = [K * d * w, n * s if K >= 2 else 0]
    rec["value_streams"] = {0}


def check_params_dither(rec):
    """mode-lineage.md §7.9.1, checks 1-6 in their order."""
    p = rec["params"]
    # 1. keys and types
    check_keys(p, ("step", "seed", "q_min", "counts"), ("lattice",))
    if not is_int(p["step"]):
        fail("BAD_TENSOR_RECORD", "dither step is not an integer")
    if not is_int(p["seed"]):
        fail("BAD_TENSOR_RECORD", "dither seed is not an integer")
    q_min, counts = p["q_min"], p["counts"]
    if type(q_min) is not list or not all(is_int(x) for x in q_min):
        fail("BAD_TENSOR_RECORD", "dither q_min is not an array of integers")
    if type(counts) is not list or not all(type(x) is bytes for x in counts):
        fail("BAD_TENSOR_RECORD", "dither counts is not an array of bins")
    if "lattice" in p and type(p["lattice"]) is not str:
        fail("BAD_TENSOR_RECORD", "dither lattice is not a string")
    # 2. dtype, numel (any number of dimensions)
    check_lineage_dtype(rec, "dither", need_dim=False)
    # 3. lattice, seed, entry counts
    lattice = p.get("lattice", "scalar")
    if lattice not in ("scalar", "hex"):
        fail("BAD_TENSOR_RECORD", "dither lattice %r is not 'scalar' or 'hex'" % lattice)
    seed = p["seed"]
    if not (0 <= seed <= M64):          # §12: 0 .. 2^64 - 1
        fail("BAD_TENSOR_RECORD", "dither seed %d outside 0..2^64-1" % seed)
    L = 1 if lattice == "scalar" else 2
    if len(q_min) != L or len(counts) != L:
        fail("BAD_TENSOR_RECORD", "dither %s needs %d q_min and counts entries (has %d, %d)"
             % (lattice, L, len(q_min), len(counts)))
    # 4. step code
    check_step_code(p["step"])
    # 5. counts tables, stream by stream; N as defined after the checks
    N = rec["numel"] if lattice == "scalar" else (rec["numel"] + 1) // 2
    tables = []
    for c in range(L):
        k = parse_counts_table(counts[c], "dither counts[%d]" % c)
        if k[0] == 0 or k[-1] == 0:
            fail("BAD_TABLE", "dither counts[%d]: first or last count is 0" % c)
        if sum(k) != N:
            fail("BAD_TABLE", "dither counts[%d] add up to %d, not N = %d" % (c, sum(k), N))
        tables.append(k)
    # 6. levels, stream by stream
    for c in range(L):
        A = len(tables[c])
        if q_min[c] < MIN_LEVEL or q_min[c] + A - 1 > MAX_LEVEL:
            fail("LIMIT_EXCEEDED", "dither stream %d levels %d..%d outside -2^20..2^20"
                 % (c, q_min[c], q_min[c] + A - 1))
    A = [len(k) for k in tables]
    rec.update(lattice=lattice, seed=seed, step_code=p["step"], q_mins=q_min, N=N, A_list=A,
               models=[model_from_counts(k) for k in tables])
    # §7.9.2 streams: one symbol stream per coordinate
    rec["streams"] = [N if A[c] >= 2 else 0 for c in range(L)]
    rec["value_streams"] = set()


RECORD_KEYS = ("name", "dtype", "shape", "mode", "params")


def check_manifest(doc):
    """§5.2 then §5.3 record by record (§10.1 step 2), each in its reference order."""
    # §5.2: the top-level map, both keys present, metadata a map, its entry count within §12,
    # tensors an array, its length within §12
    if type(doc) is not dict:
        fail("BAD_MANIFEST", "manifest is not a map")
    for key in ("metadata", "tensors"):
        if key not in doc:
            fail("BAD_MANIFEST", "manifest has no %r" % key)
    if type(doc["metadata"]) is not dict:
        fail("BAD_MANIFEST", "manifest 'metadata' is not a map")
    if len(doc["metadata"]) > MAX_METADATA_ENTRIES:
        fail("LIMIT_EXCEEDED", "%d metadata entries (over 4096)" % len(doc["metadata"]))
    if type(doc["tensors"]) is not list:
        fail("BAD_MANIFEST", "manifest 'tensors' is not an array")
    if len(doc["tensors"]) > MAX_TENSORS:
        fail("LIMIT_EXCEEDED", "%d tensors (over 2^20)" % len(doc["tensors"]))
    records = []
    seen = set()
    for index, r in enumerate(doc["tensors"]):
        # §5.3 step 1: a map (an element that is not a map is a record of the wrong type,
        # §5.2), and all five keys present, before any value is looked at
        if type(r) is not dict:
            fail("BAD_TENSOR_RECORD", "tensor record %d is not a map" % index)
        for key in RECORD_KEYS:
            if key not in r:
                fail("BAD_TENSOR_RECORD", "tensor record %d has no %r" % (index, key))
        # step 2: name (a string, then §5.4's rules), then its uniqueness
        check_name(r["name"], seen)
        # step 3: dtype
        dtype = r["dtype"]
        if type(dtype) is not str or dtype not in DTYPES:
            fail("BAD_TENSOR_RECORD", "dtype %r not in §5.5" % (dtype,))
        # step 4: shape (types, signs), then its §12 limits
        numel = check_shape(r["shape"])
        # step 5: mode is a string, params is a map
        mode = r["mode"]
        if type(mode) is not str:
            fail("BAD_TENSOR_RECORD", "mode is not a string")
        if type(r["params"]) is not dict:
            fail("BAD_TENSOR_RECORD", "params is not a map")
        # step 6: mode in §7's registry, then the mode's parameter checks
        if mode not in MODES:
            fail("UNKNOWN_MODE", "tensor %r: unknown coding mode %r" % (r["name"], mode))
        rec = {"name": r["name"], "dtype": dtype, "shape": list(r["shape"]), "numel": numel,
               "mode": mode, "params": r["params"]}
        if mode == "raw":
            check_params_raw(rec)
        elif mode == "uniform":
            check_params_uniform(rec)
        elif mode == "alias":
            check_params_alias(rec, index, records)
        elif mode == "tq":
            check_params_tq(rec)
        elif mode == "ecsq":
            check_params_ecsq(rec)
        elif mode == "kmeans":
            check_params_kmeans(rec)
        elif mode == "pq":
            check_params_pq(rec)
        else:
            check_params_dither(rec)
        records.append(rec)
    return records


# ----------------------------------------------------------------------------------------------
# §12.1 Conformance levels: the four measures (refdec claims Level 1)
# ----------------------------------------------------------------------------------------------

def level_measures(records, file_length):
    """§12.1: B1 (largest numel x itemsize), BT (sum of numel x itemsize over every tensor,
    aliases included), W (sum of n x m x k over the tq tensors with transform = float16,
    aliases not included), from the header and manifest alone; and L, the file length."""
    b1 = bt = w = 0
    for rec in records:
        nbytes = rec["numel"] * DTYPES[rec["dtype"]][0]
        b1 = max(b1, nbytes)
        bt += nbytes
        if rec["mode"] == "tq" and rec["transform"] == "float16":
            w += rec["n"] * rec["m"] * rec["k"]
    return {"B1": b1, "BT": bt, "W": w, "L": file_length}


def check_level(measures):
    """§12.1: a file within Level 1 is decoded; one beyond it is refused, only with
    LIMIT_EXCEEDED (§5.3: a decoder's own limit may be applied at any point after a record's
    step 4; refdec applies it once, right after the whole manifest, §10.1 step 2)."""
    for key, what, limit in LEVEL_1:
        if measures[key] > limit:
            fail("LIMIT_EXCEEDED", "%s %s = %d is beyond Level 1 (%d), the conformance level "
                 "this decoder claims (§12.1)" % (what, key, measures[key], limit))


# ----------------------------------------------------------------------------------------------
# Reconstruction (§7.3.2, §7.5.3) and rounding to the dtype
# ----------------------------------------------------------------------------------------------

# Every reconstruction works on blocks of at most BLOCK elements (or rows / pairs of about that
# many elements) and writes into one output array of the tensor's storage dtype, so the working
# memory of a tensor is its output plus its stream buffers plus O(BLOCK) (§12.1: about B1).
BLOCK = 1 << 22
STORAGE = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}


def new_output(rec):
    return np.empty(rec["numel"], dtype=STORAGE[rec["dtype"]])


def f32_to_bf16_bits(a32):
    """§7.3.2 bfloat16: with x the binary32 bit pattern, (x + 0x7FFF + ((x >> 16) & 1)) >> 16,
    computed exactly (round to nearest, ties to an even bit 16, overflow to infinity, sign kept;
    the values here are finite, never NaN)."""
    u = a32.astype("<f4").view("<u4").astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return r.astype("<u2")


def round_from_f32(a32, dtype):
    """§7.3.2 "Rounding a binary32 value to a float dtype": float32 as is, float64 widened
    exactly, float16 by IEEE 754 roundTiesToEven (numpy converts binary32 -> binary16 with one
    correct rounding, subnormals included, |v| >= 65520 to infinity), bfloat16 by the
    bit-pattern formula."""
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype == "float32":
            return a32.astype("<f4")
        if dtype == "float64":
            return a32.astype("<f8")
        if dtype == "float16":
            return a32.astype("<f2")
        return f32_to_bf16_bits(a32)


def _selftest_rounding():
    """The examples of §7.3.2."""
    f32 = lambda bits: np.array(bits, dtype="<u4").view("<f4")  # noqa: E731
    # bfloat16: 257 -> 4380 (tie to even), 259 -> 4382, -0 -> 8000, (2 - 2^-8) x 2^127 (the
    # halfway point 2^128 - 2^119) -> infinity 7F80, just below it -> 7F7F
    assert f32_to_bf16_bits(f32([0x43808000, 0x43818000, 0x80000000, 0x7F7F8000, 0x7F7F7FFF,
                                 0xFF7F8000])).tolist() == [
        0x4380, 0x4382, 0x8000, 0x7F80, 0x7F7F, 0xFF80]
    # float16: 65520 (halfway to 2^16) -> infinity, 65519 -> 65504; subnormal ties to even:
    # 2^-25 -> 0, 3 x 2^-25 -> 2^-23
    v = np.array([65520.0, -65520.0, 65519.0, 2.0 ** -25, 3 * 2.0 ** -25], dtype=np.float32)
    assert round_from_f32(v, "float16").view("<u2").tolist() == [
        0x7C00, 0xFC00, 0x7BFF, 0x0000, 0x0002]


_selftest_rounding()


def exact_f32(v):
    """A binary64 array whose values are exact in binary32 (§7.3.2), as binary32."""
    v32 = v.astype(np.float32)
    assert np.array_equal(v32.astype(np.float64), v)
    return v32


def symbols_block(A, syms, i0, i1):
    """Symbols i0..i1-1 of a stream as int64: all 0 when A = 1 (the stream has no chunk,
    §7.3.2, §7.5.2, §7.S.2), else the decoded ones."""
    if A == 1:
        return np.zeros(i1 - i0, dtype=np.int64)
    return syms[i0:i1].astype(np.int64)


def reconstruct_uniform(rec, stream_data):
    """§7.3.2: v_i = (q_min + sym_i) * step(steps[c]) exactly, then rounded to the dtype."""
    numel, dtype = rec["numel"], rec["dtype"]
    out = new_output(rec)
    if rec["granularity"] == "channel":
        per = numel // rec["shape"][0]
        steps = np.array([step_value(s) for s in rec["step_codes"]], dtype=np.float64)
    else:
        step = step_value(rec["step_codes"][0])
    for i0 in range(0, numel, BLOCK):
        i1 = min(numel, i0 + BLOCK)
        q = (symbols_block(rec["A"], stream_data[0], i0, i1) + rec["q_min"]).astype(np.float64)
        if rec["granularity"] == "tensor":
            v = q * step
        else:
            # c = floor(i / (numel / shape[0]))
            v = q * steps[np.arange(i0, i1, dtype=np.int64) // per]
        v = v + 0.0                                    # q = 0 gives +0 (no -0)
        out[i0:i1] = round_from_f32(exact_f32(v), dtype)
    return out


def check_tq_transform(raw):
    """mode-tq.md §7.5.3 step 3: S as binary16, widened exactly; NaN/inf -> BAD_PAYLOAD (a
    stored-value check: every entry of S, made when stream 0 is complete)."""
    S = np.frombuffer(raw, dtype="<f2")
    if not np.all(np.isfinite(S)):
        fail("BAD_PAYLOAD", "tq transform holds NaN or infinity")
    return S


def tq_band_map(rec):
    """mode-tq.md §7.5.1 with row_band (1.4): for every row i of C its band row_band[i] and its
    place t in that band (band b holds the rows whose byte is b, in increasing order of i, so
    row i's values are the band's values t*c .. t*c + c - 1).  Made once per tensor, when it is
    reconstructed; the counts per band were checked against band_rows (check 5)."""
    band_of = np.frombuffer(rec["row_band"], dtype=np.uint8)
    order = np.argsort(band_of, kind="stable")         # rows of band 0, then band 1, ..., each
    first = np.zeros(len(rec["band_rows"]), dtype=np.int64)   # in increasing order of i
    np.cumsum(rec["band_rows"][:-1], out=first[1:])
    place = np.empty(len(band_of), dtype=np.int64)
    place[order] = np.arange(len(band_of), dtype=np.int64) - first[band_of[order]]
    return band_of, place


def tq_band_levels(rec, stream_data, b, rows, count, j0, j1):
    """Levels of `count` rows of band b, `rows` (a slice or an index array of places within the
    band), columns j0..j1-1 (§7.5.3 step 1), as int64."""
    if rec["A_list"][b] == 1:                          # no symbols: every level is q_min[b]
        return np.full((count, j1 - j0), rec["q_mins"][b], dtype=np.int64)
    sym = stream_data[1 + b].reshape(rec["band_rows"][b], rec["c"])[rows, j0:j1]
    return sym.astype(np.int64) + rec["q_mins"][b]


def tq_coefficients(rec, stream_data, r0, r1, j0, j1):
    """mode-tq.md §7.5.3 steps 1-2: the block C[r0:r1, j0:j1] of the coefficient matrix
    (k x c; without row_band band b holds rows r_b .. r_b + band_rows[b] - 1; with row_band the
    rows whose byte is b, in increasing order; each band row-major), exact in binary64."""
    C = np.empty((r1 - r0, j1 - j0), dtype=np.float64)
    if rec["row_band"] is not None:
        if "band_map" not in rec:
            rec["band_map"] = tq_band_map(rec)
        band_of, place = rec["band_map"]
        bo = band_of[r0:r1]
        order = np.argsort(bo, kind="stable")          # this block's rows grouped by band
        sb = bo[order]
        cuts = np.flatnonzero(np.diff(sb)) + 1
        for sel in np.split(order, cuts):              # the block's rows of one band
            b = int(bo[sel[0]])
            lv = tq_band_levels(rec, stream_data, b, place[r0 + sel], len(sel), j0, j1)
            C[sel, :] = lv.astype(np.float64) * step_value(rec["step_codes"][b]) + 0.0
        return C
    rb = 0
    for b, rows in enumerate(rec["band_rows"]):
        lo, hi = max(r0, rb), min(r1, rb + rows)
        if lo < hi:
            lv = tq_band_levels(rec, stream_data, b, slice(lo - rb, hi - rb), hi - lo, j0, j1)
            C[lo - r0:hi - r0, :] = lv.astype(np.float64) * step_value(rec["step_codes"][b]) + 0.0
        rb += rows
    return C


def reconstruct_tq(rec, stream_data):
    """mode-tq.md §7.5.3, by blocks of R's rows (and, with a transform, of its columns)."""
    k, n, m, dtype = rec["k"], rec["n"], rec["m"], rec["dtype"]
    out = new_output(rec)
    # step 4: out_in: the tensor is R (n x m) in row-major order; in_out: R^T (m x n)
    T = out.reshape(n, m) if rec["layout"] == "out_in" else out.reshape(m, n)

    def put(i0, i1, j0, j1, R32):                      # R32 = R[i0:i1, j0:j1] in binary32
        v = round_from_f32(R32, dtype)
        if rec["layout"] == "out_in":
            T[i0:i1, j0:j1] = v
        else:
            T[j0:j1, i0:i1] = v.T

    if rec["transform"] == "none":
        rows = max(1, BLOCK // m)
        for i0 in range(0, n, rows):                   # R = C, exact (step 3)
            i1 = min(n, i0 + rows)
            put(i0, i1, 0, m, exact_f32(tq_coefficients(rec, stream_data, i0, i1, 0, m)))
    else:
        # S (m x k, binary16; finite, checked when stream 0 was complete), widened exactly to
        # binary64 block by block.  R[i, j] = sum_{r<k} S[j, r] C[r, i], summed in binary64 (in
        # the order the BLAS chooses: within §7.5.3's 2^-20 bound for k <= 2^18), rounded to
        # binary32 (nearest, ties to even), then to the dtype.
        S16 = np.frombuffer(stream_data[0], dtype="<f2").reshape(m, k)
        ni = max(1, BLOCK // k)
        mj = max(1, BLOCK // max(k, ni))
        for i0 in range(0, n, ni):
            i1 = min(n, i0 + ni)
            C = tq_coefficients(rec, stream_data, 0, k, i0, i1)        # k x (i1 - i0)
            for j0 in range(0, m, mj):
                j1 = min(m, j0 + mj)
                S = S16[j0:j1].astype(np.float64)
                with np.errstate(over="ignore", invalid="ignore"):
                    R = (S @ C).T                                      # (i1 - i0) x (j1 - j0)
                    put(i0, i1, j0, j1, R.astype(np.float32))
    rec.pop("band_map", None)                          # row_band's map, made by tq_coefficients
    return out


# ----------------------------------------------------------------------------------------------
# mode-lineage.md: value streams (§7.S.3), rounding (§7.S.5), SplitMix64 (§7.S.6) and the
# reconstructions of §7.6.3, §7.7.3, §7.8.3, §7.9.3
# ----------------------------------------------------------------------------------------------

def check_value_stream(rec, raw):
    """§7.S.3: the stored values (binary16 or binary32, LE) widened exactly to binary32.  The
    stored-value checks cover every value, used or not, in the reference order: finiteness of
    every value first (NaN or infinity: BAD_PAYLOAD), then the order -- the ecsq codebook
    (§7.6.2) and each kmeans group's codebook, group by group (§7.7.2), strictly increasing as
    real numbers (-0 == +0): else BAD_PAYLOAD."""
    v = np.frombuffer(raw, dtype=PRECISIONS[rec["precision"]][1]).astype(np.float32)
    if not np.all(np.isfinite(v)):
        fail("BAD_PAYLOAD", "%s: a stored value is NaN or infinite" % rec["mode"])
    if rec["mode"] == "ecsq":
        books = [v]
    elif rec["mode"] == "kmeans":
        ends = np.cumsum(rec["K"])
        books = np.split(v, ends[:-1])
    else:
        books = []                                   # pq: codewords have no order (§7.8.2)
    for g, c in enumerate(books):
        if not np.all(c[1:] > c[:-1]):
            fail("BAD_PAYLOAD", "%s: codebook %d is not strictly increasing"
                 % (rec["mode"], g))
    return v


def round_from_f64(a64, dtype):
    """§7.S.5 binary64 value: float64 as is; otherwise rounded to binary32 (nearest, ties to
    even), then that binary32 value rounded to the dtype as a binary32 value."""
    if dtype == "float64":
        return a64.astype("<f8")
    with np.errstate(over="ignore", invalid="ignore"):
        a32 = a64.astype(np.float32)
    return round_from_f32(a32, dtype)


SM_GAMMA = 0x9E3779B97F4A7C15
SM_MUL1 = 0xBF58476D1CE4E5B9
SM_MUL2 = 0x94D049BB133111EB


def splitmix64(seed, count, start=0):
    """§7.S.6: outputs z_start .. z_{start+count-1} for seed S (uint64 arithmetic wraps mod
    2^64; each output is computed on its own)."""
    k1 = np.arange(start + 1, start + count + 1, dtype=np.uint64)   # k + 1 (k < 2^36)
    x = np.uint64(seed) + k1 * np.uint64(SM_GAMMA)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(SM_MUL1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(SM_MUL2)
    return x ^ (x >> np.uint64(31))


def dither_numerators(z):
    """§7.S.6: t1, t2 (odd integers in (-2^21, 2^21)) from outputs z, as int64."""
    r1 = (z >> np.uint64(43)).astype(np.int64)
    r2 = ((z >> np.uint64(22)) & np.uint64((1 << 21) - 1)).astype(np.int64)
    return 2 * r1 + 1 - (1 << 21), 2 * r2 + 1 - (1 << 21)


def _selftest_splitmix():
    assert [int(z) for z in splitmix64(0, 3)] == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [int(z) for z in splitmix64(1234567, 3)] == [
        0x599ED017FB08FC85, 0x2C73F08458540FA5, 0x883EBCE5A3F27C77]
    assert [int(z) for z in splitmix64(1234567, 2, start=1)] == [
        0x2C73F08458540FA5, 0x883EBCE5A3F27C77]
    t1, t2 = dither_numerators(splitmix64(0, 1))
    assert (int(t1[0]), int(t2[0])) == (1607723, -1979431)


with np.errstate(over="ignore"):
    _selftest_splitmix()


def reconstruct_ecsq(rec, stream_data):
    """§7.6.3"""
    numel, dtype = rec["numel"], rec["dtype"]
    out = new_output(rec)
    for i0 in range(0, numel, BLOCK):
        i1 = min(numel, i0 + BLOCK)
        sym = symbols_block(rec["A"], stream_data[1], i0, i1)
        if rec["recon"] == "grid":
            q = (sym + rec["q_min"]).astype(np.float64)
            v32 = exact_f32(q * step_value(rec["step_code"]) + 0.0)   # exact; q = 0 gives +0
        else:
            v32 = rec["values"][sym]
        out[i0:i1] = round_from_f32(v32, dtype)
    return out


def reconstruct_kmeans(rec, stream_data):
    """§7.7.3"""
    m, dtype = rec["m"], rec["dtype"]
    out = new_output(rec)
    values = rec["values"]
    e0 = v0 = 0
    for g, rows in enumerate(rec["group_rows"]):
        cnt = rows * m
        for b0 in range(0, cnt, BLOCK):
            b1 = min(cnt, b0 + BLOCK)
            sym = symbols_block(rec["K"][g], stream_data[1 + g], b0, b1)
            out[e0 + b0:e0 + b1] = round_from_f32(values[v0 + sym], dtype)
        e0 += cnt
        v0 += rec["K"][g]
    return out


def reconstruct_pq(rec, stream_data):
    """§7.8.3"""
    n, m, d, s, K = rec["n"], rec["m"], rec["d"], rec["s"], rec["K"]
    out = new_output(rec)
    T = out.reshape(n, m)
    book = rec["values"].reshape(K, d)
    nr = max(1, BLOCK // (s * d))
    for r0 in range(0, n, nr):
        r1 = min(n, r0 + nr)
        sym = symbols_block(K, stream_data[1], r0 * s, r1 * s).reshape(r1 - r0, s)
        # row i: the codewords of its s sub-vectors laid end to end (s*d >= m), cut to m
        R = book[sym].reshape(r1 - r0, s * d)[:, :m]
        T[r0:r1] = round_from_f32(R, rec["dtype"])
    return out


# §7.9.3: H, the binary64 nearest to sqrt(3)/2, from its bit pattern
DITHER_H = struct.unpack("<d", struct.pack("<Q", 0x3FEBB67AE8584CAA))[0]
assert DITHER_H == 3900231685776981 * 2.0 ** -52


def reconstruct_dither(rec, stream_data):
    """§7.9.3 (every product below is exact in binary64 except y = E * H, one rounding), by
    blocks of coordinates (elements for scalar, pairs for hex)."""
    numel, N, dtype = rec["numel"], rec["N"], rec["dtype"]
    out = new_output(rec)
    delta = step_value(rec["step_code"])
    L = len(rec["A_list"])
    for p0 in range(0, N, BLOCK):
        p1 = min(N, p0 + BLOCK)
        with np.errstate(over="ignore"):
            t1, t2 = dither_numerators(splitmix64(rec["seed"], p1 - p0, p0))
        levels = [symbols_block(rec["A_list"][c], stream_data[c], p0, p1) + rec["q_mins"][c]
                  for c in range(L)]
        if rec["lattice"] == "scalar":
            Ni = levels[0] * (1 << 22) - t1                      # |N_i| < 2^43, int64
            r = Ni.astype(np.float64) * delta * 2.0 ** -22
            out[p0:p1] = round_from_f64(r, dtype)
        else:
            a, b = levels
            Nx = a * (1 << 23) + (b & 1) * (1 << 22) - 2 * t1 - t2
            x = Nx.astype(np.float64) * delta * 2.0 ** -23
            Ny = b * (1 << 22) - t2
            E = Ny.astype(np.float64) * delta * 2.0 ** -22
            y = E * DITHER_H                                     # one correctly rounded product
            r = np.empty(2 * (p1 - p0), dtype=np.float64)
            r[0::2] = x
            r[1::2] = y
            e0, e1 = 2 * p0, min(numel, 2 * p1)                  # odd numel: last y discarded
            out[e0:e1] = round_from_f64(r[:e1 - e0], dtype)
    return out


def _selftest_dither():
    """The worked values of §7.9.3 (seed 0)."""
    def run(lattice, step, q_mins, numel):
        rec = {"numel": numel, "N": 1, "step_code": step, "seed": 0,
               "A_list": [2] * len(q_mins), "q_mins": q_mins, "lattice": lattice,
               "shape": [numel], "dtype": "float64"}
        return reconstruct_dither(rec, [np.zeros(1, dtype=np.uint16)] * len(q_mins))
    f64bits = lambda v: struct.unpack("<Q", struct.pack("<d", float(v)))[0]  # noqa: E731
    assert f64bits(run("scalar", 0, [3], 1)[0]) == 0x4004EEFAA0000000
    r = run("scalar", -37, [-2], 1)[0]
    assert f64bits(r) == 0xBF70AEE4B4000000
    assert np.float32(r).view(np.uint32) == 0xBB857726
    x, y = run("hex", 0, [1, -1], 2)
    assert f64bits(x) == 0x3FF5A47A20000000 and f64bits(y) == 0xBFDD44B848BE76CC
    assert np.float32(y).view(np.uint32) == 0xBEEA25C2


_selftest_dither()


# ----------------------------------------------------------------------------------------------
# §6 Chunks, §9 Index and footer, §10.1 front-to-back decoding
# ----------------------------------------------------------------------------------------------

CHUNK_TAG = b"TQCK"
INDEX_TAG = b"TQIX"
FOOTER_MAGIC = b"\x89TQZEND\n"
CHUNK_HEADER_SIZE = 32
FOOTER_SIZE = 32


def decode_file(data, want_tensors=True):
    """Decode a whole file by §10.1; returns (header, manifest doc, records, measures, tensors)
    with tensors a list of flat uint8 arrays (None when want_tensors is false).  `data` is
    the file's bytes or a read-only mmap of it."""
    # §10.1 step 1: header (§3)
    header = parse_header(data)
    ml = header["Manifest_Length"]
    # §10.1 step 2: manifest
    if len(data) < HEADER_SIZE + ml:
        fail("TRUNCATED", "file ends inside the manifest")
    stored = data[HEADER_SIZE:HEADER_SIZE + ml]                  # §5.0: the stored manifest
    if crc32(stored) != header["Manifest_CRC32"]:                # of the stored bytes (§3)
        fail("CHECKSUM_MISMATCH", "manifest CRC32 does not match")
    # with ZSTD_MANIFEST, §5.0's frame checks (BAD_MANIFEST / LIMIT_EXCEEDED) and decompression;
    # "the manifest's length" (§5.1) is then Frame_Content_Size, else Manifest_Length
    mbytes = manifest_from_stored(stored, header["Required_Features"])
    header["Manifest_Content_Length"] = len(mbytes)               # for `info` only
    doc = MsgpackCanonicalParser(mbytes).parse_document()       # §5.1
    records = check_manifest(doc)                                 # §5.2, §5.3 (§5.4, §5.5, §7)
    T = len(records)
    # §12.1: the four measures, known now; beyond Level 1 -> LIMIT_EXCEEDED, before any chunk
    measures = level_measures(records, len(data))
    check_level(measures)

    # The required (tensor, stream) sequence of §6.2: streams with items, in order.
    required = []
    last_required = [None] * T    # index in `required` of each tensor's last stream with items
    for t, rec in enumerate(records):
        for s, cnt in enumerate(rec["streams"]):
            if cnt > 0:
                last_required[t] = len(required)
                required.append((t, s, cnt))
    cur = -1          # index into `required` of the stream being filled (-1: none yet)
    acc = 0           # items of required[cur] seen so far
    next_seq = 0
    span_start = [None] * T
    span_end = [None] * T
    # decoded streams: per tensor, per stream, a buffer of the stream's item count (uint8 for
    # streams of bytes, uint16 for symbol streams), allocated when its first chunk arrives
    streams = [[None] * len(rec["streams"]) for rec in records]
    tensors = [None] * T
    first_open = 0    # tensors before this one are complete

    def cur_complete():
        return cur == -1 or acc == required[cur][2]

    def tensor_complete(t):
        """§10.1 step 3: a complete tensor may be handed out; refdec reconstructs it now (kept
        until the whole file has been checked, §1) and frees its stream buffers."""
        if want_tensors:
            tensors[t] = finish_tensor(records[t], streams[t], tensors)
        streams[t] = None

    # §10.1 step 3: chunks
    pos = HEADER_SIZE + ml
    size = len(data)
    while True:
        if size - pos < 4:
            # no "prefix" test here (unlike §3): the file still owes the index and the footer
            fail("TRUNCATED", "file ends at offset %d where a chunk or the index is due" % pos)
        tag = data[pos:pos + 4]
        if tag == INDEX_TAG:
            if not (cur_complete() and cur == len(required) - 1):
                fail("BAD_CHUNK", "index reached with a tensor's streams incomplete")
            break
        if tag != CHUNK_TAG:
            fail("BAD_CHUNK", "offset %d: neither a chunk nor the index" % pos)
        # step 3.1
        if size - pos < CHUNK_HEADER_SIZE:
            fail("TRUNCATED", "file ends inside a chunk header")
        h = data[pos:pos + CHUNK_HEADER_SIZE]
        # step 3.2: the header CRC before any other field is used (§6.2)
        if crc32(h[:28]) != u32(h, 28):
            fail("CHECKSUM_MISMATCH", "chunk at %d: header CRC32 does not match" % pos)
        ctype, stream, tindex = u16(h, 4), u16(h, 6), u32(h, 8)
        seq, items, plen, pcrc = u32(h, 12), u32(h, 16), u32(h, 20), u32(h, 24)
        # step 3.3: Chunk_Type (§6.1)
        ancillary = bool(ctype & 0x8000)
        if not ancillary and ctype != 0x0001:
            fail("UNKNOWN_CHUNK", "chunk at %d: unknown critical type 0x%04x" % (pos, ctype))
        # step 3.4: Payload_Length within §12, every chunk (DATA or ancillary)
        if plen > MAX_PAYLOAD_LENGTH:
            fail("LIMIT_EXCEEDED", "chunk at %d: Payload_Length %d over 2^28" % (pos, plen))
        # step 3.5
        if ancillary:
            # §6.2: never inside a tensor's group (after a DATA chunk of a tensor that is not
            # complete: its current stream lacks items, or a later stream of it has items)
            if not cur_complete() or (cur >= 0 and cur + 1 < len(required) and
                                      required[cur + 1][0] == required[cur][0]):
                fail("BAD_CHUNK", "ancillary chunk inside tensor %d's group of DATA chunks"
                     % required[cur][0])
        else:
            # the §12 limit on Item_Count comes before every BAD_CHUNK rule (§6.2)
            if items > MAX_ITEM_COUNT:
                fail("LIMIT_EXCEEDED", "chunk at %d: Item_Count %d over 2^26" % (pos, items))
            # §6.2 order: the chunk is the next one expected (Tensor_Index, Stream, Sequence;
            # a Tensor_Index >= the tensor count or a Stream >= the mode's stream count is
            # never expected)
            if cur >= 0 and not cur_complete() and required[cur][:2] == (tindex, stream):
                if seq != next_seq:
                    fail("BAD_CHUNK", "chunk Sequence %d, %d expected" % (seq, next_seq))
            else:
                if tindex >= T:
                    fail("BAD_CHUNK", "chunk Tensor_Index %d >= %d tensors" % (tindex, T))
                if stream >= len(records[tindex]["streams"]):
                    fail("BAD_CHUNK", "chunk Stream %d for a tensor with %d streams"
                         % (stream, len(records[tindex]["streams"])))
                if not cur_complete():
                    fail("BAD_CHUNK", "chunk of tensor %d stream %d while tensor %d stream %d "
                         "is incomplete" % (tindex, stream, *required[cur][:2]))
                if cur + 1 >= len(required) or required[cur + 1][:2] != (tindex, stream):
                    fail("BAD_CHUNK", "chunk of tensor %d stream %d out of order (or for a "
                         "stream without items)" % (tindex, stream))
                if seq != 0:
                    fail("BAD_CHUNK", "first chunk of a stream has Sequence %d" % seq)
                cur += 1
                acc = 0
                next_seq = 0
            # §6.2 field rule: Item_Count >= 1
            if items < 1:
                fail("BAD_CHUNK", "chunk Item_Count 0")
            # §6.2 counts: the running item count of the stream, from the header
            if acc + items > required[cur][2]:
                fail("BAD_CHUNK", "stream's chunks hold more than its %d items"
                     % required[cur][2])
            # the mode's rule on Payload_Length, from the header
            rec = records[tindex]
            check_payload_length(rec, stream, items, plen)
        # step 3.6
        if plen > size - pos - CHUNK_HEADER_SIZE:
            fail("TRUNCATED", "chunk payload runs past the end of the file")
        payload = data[pos + CHUNK_HEADER_SIZE:pos + CHUNK_HEADER_SIZE + plen]
        # step 3.7
        if crc32(payload) != pcrc:
            fail("CHECKSUM_MISMATCH", "chunk at %d: payload CRC32 does not match" % pos)
        chunk_end = pos + CHUNK_HEADER_SIZE + plen
        # step 3.8: the payload (ancillary chunks are skipped after their CRCs, §6.1)
        if not ancillary:
            # tensors before this one that have no chunks are complete now (§10.1 step 3;
            # those with chunks were completed by their last chunk)
            while first_open < tindex:
                if streams[first_open] is not None:
                    tensor_complete(first_open)
                first_open += 1
            buf = streams[tindex][stream]
            if buf is None:
                buf = streams[tindex][stream] = new_stream_buffer(rec, stream)
            decode_payload(rec, stream, items, payload, buf, acc)
            del payload
            acc += items
            next_seq += 1
            if acc == required[cur][2]:
                # stored-value checks when a value stream is complete (§7.5.3, §7.S.3)
                on_stream_complete(rec, stream, buf)
                if cur == last_required[tindex]:
                    tensor_complete(tindex)
            if span_start[tindex] is None:
                span_start[tindex] = pos
            span_end[tindex] = chunk_end
        pos = chunk_end

    # the index is reached: every tensor without chunks is complete
    for t in range(T):
        if streams[t] is not None:
            tensor_complete(t)

    # §10.1 step 4: index
    index_offset = pos
    index_len = 4 + 16 * T
    if size - pos < index_len:
        fail("TRUNCATED", "file ends inside the index")
    index = data[pos:pos + index_len]
    pos += index_len
    # §10.1 step 5: footer
    if size - pos < FOOTER_SIZE:
        fail("TRUNCATED", "file ends inside the footer")
    footer = data[pos:pos + FOOTER_SIZE]
    if footer[24:32] != FOOTER_MAGIC:
        fail("BAD_INDEX", "footer magic does not match")
    if crc32(footer[:20]) != u32(footer, 20):
        fail("CHECKSUM_MISMATCH", "footer CRC32 does not match")
    if crc32(index) != u32(footer, 12):
        fail("CHECKSUM_MISMATCH", "index CRC32 does not match")
    f_index_offset, f_count, f_ml = u64(footer, 0), u32(footer, 8), u32(footer, 16)
    # §9.2's equalities, in §10.1 step 5's order: Tensor_Count, Manifest_Length, then
    # Index_Offset (the end of the last chunk, or of the manifest) and the footer's position
    # (front to back: where this footer was found; bytes after it are TRAILING_DATA, step 6)
    if f_count != T:
        fail("BAD_INDEX", "footer Tensor_Count %d, the manifest has %d" % (f_count, T))
    if f_ml != ml:
        fail("BAD_INDEX", "footer Manifest_Length differs from the header's")
    if f_index_offset != index_offset:
        fail("BAD_INDEX", "footer Index_Offset %d, the index is at %d"
             % (f_index_offset, index_offset))
    if f_index_offset + 4 + 16 * f_count != pos:
        fail("BAD_INDEX", "Index_Offset + 4 + 16 x Tensor_Count is not the footer's offset")
    # §9.1 entries against the chunks seen, entry 0 first
    for t in range(T):
        off, ln = u64(index, 4 + 16 * t), u64(index, 12 + 16 * t)
        if span_start[t] is None:
            want = (0, 0)
        else:
            want = (span_start[t], span_end[t] - span_start[t])
        if (off, ln) != want:
            fail("BAD_INDEX", "index entry %d is (%d, %d), the chunks give (%d, %d)"
                 % (t, off, ln, *want))
    pos += FOOTER_SIZE
    # §10.1 step 6
    if pos != size:
        fail("TRAILING_DATA", "%d bytes after the footer" % (size - pos))
    return header, doc, records, measures, (tensors if want_tensors else None)


def is_byte_stream(rec, stream):
    """True for streams of stored bytes (§7.2, §7.5.2 stream 0, §7.S.3 value streams); False
    for range-coded symbol streams (§7.3.2, §7.5.2 band streams, §7.S.4)."""
    mode = rec["mode"]
    if mode == "raw":
        return True
    if mode == "tq":
        return stream == 0
    if mode in ("ecsq", "kmeans", "pq", "dither"):
        return stream in rec["value_streams"]
    return False


def new_stream_buffer(rec, stream):
    """The buffer of one stream's items (§7): bytes or symbols (< A <= 65536)."""
    count = rec["streams"][stream]
    return np.empty(count, dtype=np.uint8 if is_byte_stream(rec, stream) else np.uint16)


def check_payload_length(rec, stream, items, plen):
    """The mode's rule on Payload_Length, checked from the chunk header (§10.1 step 3.5:
    after §6.2's rules, before TRUNCATED and Payload_CRC32): §7.2 (raw "none" only; "zstd"
    has no such rule), §7.3.2, §7.5.2, §7.S.3, §7.S.4."""
    if rec["mode"] == "raw":
        if rec["codec"] == "none" and plen != items:                          # §7.2
            fail("BAD_CHUNK", "raw none chunk: Payload_Length %d != Item_Count %d"
                 % (plen, items))
    elif is_byte_stream(rec, stream):                                         # §7.5.2, §7.S.3
        if plen != items:
            fail("BAD_CHUNK", "%s stream %d (bytes): Payload_Length %d != Item_Count %d"
                 % (rec["mode"], stream, plen, items))
    elif plen < 4 or plen % 4:                                                # §7.3.2, §7.S.4
        fail("BAD_CHUNK", "%s stream %d: range-coded payload of %d bytes (a multiple of 4, "
             ">= 4 needed)" % (rec["mode"], stream, plen))


def symbol_model(rec, stream):
    """The range-coder model of a symbol stream."""
    mode = rec["mode"]
    if mode in ("uniform", "ecsq", "pq"):          # §7.3.2; §7.6.2 / §7.8.2 stream 1
        return rec["model"]
    if mode in ("tq", "kmeans"):                   # §7.5.2 stream 1 + b; §7.7.2 stream 1 + g
        return rec["models"][stream - 1]
    return rec["models"][stream]                   # dither: §7.9.2 stream c


def decode_payload(rec, stream, items, payload, buf, at):
    """§7: decode one chunk's payload (its length rule already checked) into buf[at:at+items]."""
    mode = rec["mode"]
    if mode == "raw":                                                          # §7.2
        if rec["codec"] == "none":
            b = np.frombuffer(payload, dtype=np.uint8)
        else:
            b = zstd_decode(payload, items)
        if rec["dtype"] == "bool":                                             # §5.5
            if np.any(b > 1):
                fail("BAD_PAYLOAD", "bool tensor holds a byte other than 0 and 1")
        buf[at:at + items] = b
    elif is_byte_stream(rec, stream):              # tq transform, §7.S.3 value streams
        buf[at:at + items] = np.frombuffer(payload, dtype=np.uint8)
    else:                                          # range-coded symbols (§8)
        syms = rc_decode_payload(payload, items, symbol_model(rec, stream))
        buf[at:at + items] = np.frombuffer(syms, dtype=np.uint16)


def on_stream_complete(rec, stream, buf):
    """Stored-value checks, made as soon as a value stream's last chunk has been decoded
    (§10.1 step 3.8; before any symbol of the tensor, the value stream being stream 0)."""
    if rec["mode"] == "tq" and stream == 0:
        # mode-tq.md §7.5.3 step 3: every entry of S finite
        check_tq_transform(buf)
    elif rec["mode"] in ("ecsq", "kmeans", "pq") and stream in rec["value_streams"]:
        # §7.S.3 (finite, every value first), §7.6.2 / §7.7.2 (strictly increasing); kept
        # for the reconstruction
        rec["values"] = check_value_stream(rec, buf)


def finish_tensor(rec, stream_data, done):
    """The tensor's value (§7) as a flat uint8 array of numel x itemsize bytes (§5.5)."""
    mode = rec["mode"]
    if mode == "alias":                                                        # §7.4
        return done[rec["of"]]
    if mode == "raw":                                                          # §7.2
        out = stream_data[0]
        if out is None:                                                        # numel = 0
            out = np.empty(0, dtype=np.uint8)
        return out
    out = {"uniform": reconstruct_uniform, "tq": reconstruct_tq, "ecsq": reconstruct_ecsq,
           "kmeans": reconstruct_kmeans, "pq": reconstruct_pq,
           "dither": reconstruct_dither}[mode](rec, stream_data)
    return out.reshape(-1).view(np.uint8)


# ----------------------------------------------------------------------------------------------
# safetensors output (the conformance decoder protocol)
# ----------------------------------------------------------------------------------------------

def output_key(name):
    """§5.4: `__metadata__` is reserved by safetensors (its header's metadata key), so the
    conformance decoder protocol writes that tensor under `/__metadata__` (injective: no valid
    name starts with '/') and every other tensor under its own name."""
    return "/__metadata__" if name == "__metadata__" else name


def safetensors_header(records, tensors):
    hdr = {}
    off = 0
    for rec, b in zip(records, tensors):
        hdr[output_key(rec["name"])] = {"dtype": DTYPES[rec["dtype"]][2], "shape": rec["shape"],
                                        "data_offsets": [off, off + b.nbytes]}
        off += b.nbytes
    h = json.dumps(hdr, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h


def write_output(path, records, tensors):
    head = safetensors_header(records, tensors)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".refdec-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head)
            for b in tensors:
                f.write(memoryview(b))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def jsonable(v):
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [jsonable(x) for x in v]
    if isinstance(v, bytes):
        return {"bin": v.hex()}
    if isinstance(v, float) and not math.isfinite(v):
        return {"float": repr(v)}
    return v


USAGE = "usage: refdec.py decode IN.tqz OUT.safetensors | refdec.py info IN.tqz"


def map_file(f):
    """The file's bytes as a read-only mmap (nothing is read until used, and L is known before
    anything is read, §12.1); a file that cannot be mapped (empty, a pipe) is read."""
    try:
        if os.fstat(f.fileno()).st_size > 0:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        pass
    return f.read()


def main(argv):
    if len(argv) < 2 or argv[1] not in ("decode", "info"):
        print(USAGE, file=sys.stderr)
        return 2
    cmd = argv[1]
    if (cmd == "decode" and len(argv) != 4) or (cmd == "info" and len(argv) != 3):
        print(USAGE, file=sys.stderr)
        return 2
    src = argv[2]
    try:
        f = open(src, "rb")
    except OSError as e:
        print("%s: cannot read: %s" % (src, e), file=sys.stderr)
        return 2
    try:
        try:
            data = map_file(f)
        except OSError as e:
            print("%s: cannot read: %s" % (src, e), file=sys.stderr)
            return 2
        header, doc, records, measures, tensors = decode_file(
            data, want_tensors=(cmd == "decode"))
        if cmd == "decode":
            try:
                write_output(argv[3], records, tensors)
            except OSError as e:
                print("%s: cannot write: %s" % (argv[3], e), file=sys.stderr)
                return 2
    except TqzError as e:
        print("%s: %s [%s]" % (src, e.message, e.code), file=sys.stderr)
        return 1
    except MemoryError as e:
        # §12.1: out of memory is a resource limit of this decoder, reported as LIMIT_EXCEEDED
        # (never a crash, never another code); nothing is written
        print("%s: out of memory (%s) [LIMIT_EXCEEDED]" % (src, e or "MemoryError"),
              file=sys.stderr)
        return 1
    if cmd == "info":
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        json.dump({"header": header, "manifest": jsonable(doc), "measures": measures},
                  sys.stdout, ensure_ascii=False, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

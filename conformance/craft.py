"""Byte-level helpers to build .tqz files field by field (spec/tqz.md), for conformance vectors.

Independent of tqcodec's container code: the layout, CRCs, canonical MessagePack and the index
are computed here from the spec, so a vector can be made valid everywhere except one chosen
field. Every field of every structure can be overridden.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

MAGIC = b"\x89TQZ\r\n\x1a\n"
FOOTER_MAGIC = b"\x89TQZEND\n"
CHUNK_TAG = b"TQCK"
INDEX_TAG = b"TQIX"
DATA = 0x0001


def crc32(b: bytes) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


# --- MessagePack (spec §5.1), canonical unless told otherwise ------------------------------------

class Raw:
    """Bytes inserted verbatim into a MessagePack value (for non-canonical encodings)."""

    def __init__(self, data: bytes):
        self.data = data


class Pairs:
    """A map written with its pairs in the given order (unsorted, duplicates allowed)."""

    def __init__(self, pairs: list[tuple[Any, Any]]):
        self.pairs = pairs


def _len_header(n: int, fix_base: Optional[int], fix_max: int, c8: Optional[int], c16: int, c32: int) -> bytes:
    if fix_base is not None and n <= fix_max:
        return bytes([fix_base | n])
    if c8 is not None and n < 256:
        return bytes([c8, n])
    if n < 65536:
        return bytes([c16]) + struct.pack(">H", n)
    return bytes([c32]) + struct.pack(">I", n)


def mp(v: Any) -> bytes:
    """Canonical MessagePack of ``v`` (spec §5.1): shortest forms, float64, sorted string keys."""
    if isinstance(v, Raw):
        return v.data
    if v is None:
        return b"\xc0"
    if v is True:
        return b"\xc3"
    if v is False:
        return b"\xc2"
    if isinstance(v, int):
        if 0 <= v <= 0x7F:
            return bytes([v])
        if -32 <= v < 0:
            return struct.pack("b", v)
        if v >= 0:
            for code, fmt, lim in ((0xCC, ">B", 1 << 8), (0xCD, ">H", 1 << 16), (0xCE, ">I", 1 << 32),
                                   (0xCF, ">Q", 1 << 64)):
                if v < lim:
                    return bytes([code]) + struct.pack(fmt, v)
            raise ValueError("int too large")
        for code, fmt, lim in ((0xD0, ">b", 1 << 7), (0xD1, ">h", 1 << 15), (0xD2, ">i", 1 << 31),
                               (0xD3, ">q", 1 << 63)):
            if v >= -lim:
                return bytes([code]) + struct.pack(fmt, v)
        raise ValueError("int too small")
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        b = v.encode("utf-8")
        return _len_header(len(b), 0xA0, 31, 0xD9, 0xDA, 0xDB) + b
    if isinstance(v, (bytes, bytearray)):
        return _len_header(len(v), None, 0, 0xC4, 0xC5, 0xC6) + bytes(v)
    if isinstance(v, (list, tuple)):
        return _len_header(len(v), 0x90, 15, None, 0xDC, 0xDD) + b"".join(mp(x) for x in v)
    if isinstance(v, Pairs):
        return (_len_header(len(v.pairs), 0x80, 15, None, 0xDE, 0xDF)
                + b"".join(mp(k) + mp(x) for k, x in v.pairs))
    if isinstance(v, dict):
        keys = sorted(v, key=lambda k: k.encode("utf-8"))
        return _len_header(len(keys), 0x80, 15, None, 0xDE, 0xDF) + b"".join(mp(k) + mp(v[k]) for k in keys)
    raise TypeError(type(v))


# --- frequency tables (spec §7.3.1) ---------------------------------------------------------------

def leb128(values) -> bytes:
    out = bytearray()
    for f in values:
        f = int(f)
        while True:
            byte = f & 0x7F
            f >>= 7
            if f:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
    return bytes(out)


def step(code: int) -> float:
    """Spec §7.1 (exact in float64)."""
    return math.ldexp(4 + (code & 3), (code >> 2) - 2)


# --- file model -------------------------------------------------------------------------------------

@dataclass
class Chunk:
    payload: bytes
    tensor_index: int = 0
    stream: int = 0
    sequence: int = 0
    item_count: Optional[int] = None          # default: len(payload)
    chunk_type: int = DATA
    tag: bytes = CHUNK_TAG
    payload_length: Optional[int] = None      # overrides: default computed
    payload_crc: Optional[int] = None
    header_crc: Optional[int] = None

    def header(self) -> bytes:
        count = len(self.payload) if self.item_count is None else self.item_count
        plen = len(self.payload) if self.payload_length is None else self.payload_length
        pcrc = crc32(self.payload) if self.payload_crc is None else self.payload_crc
        body = self.tag + struct.pack("<HHIIIII", self.chunk_type, self.stream, self.tensor_index,
                                      self.sequence, count, plen, pcrc)
        hcrc = crc32(body) if self.header_crc is None else self.header_crc
        return body + struct.pack("<I", hcrc)

    def to_bytes(self) -> bytes:
        return self.header() + self.payload


@dataclass
class TqzFile:
    """A .tqz file as fields. ``build()`` computes every derived value not overridden."""

    manifest: bytes
    tensor_count: int
    chunks: list = field(default_factory=list)   # Chunk objects or raw bytes (inserted verbatim)
    magic: bytes = MAGIC
    major: int = 1
    minor: int = 0
    required: int = 0
    optional: int = 0
    manifest_length: Optional[int] = None
    manifest_crc: Optional[int] = None
    header_crc: Optional[int] = None
    index_tag: bytes = INDEX_TAG
    spans: Optional[list] = None                  # override the index entries
    index_offset: Optional[int] = None
    footer_tensor_count: Optional[int] = None
    index_crc: Optional[int] = None
    footer_manifest_length: Optional[int] = None
    footer_crc: Optional[int] = None
    footer_magic: bytes = FOOTER_MAGIC

    def header_bytes(self) -> bytes:
        mlen = len(self.manifest) if self.manifest_length is None else self.manifest_length
        mcrc = crc32(self.manifest) if self.manifest_crc is None else self.manifest_crc
        body = self.magic + struct.pack("<HHIIII", self.major, self.minor, self.required, self.optional,
                                        mlen, mcrc)
        hcrc = crc32(body) if self.header_crc is None else self.header_crc
        return body + struct.pack("<I", hcrc)

    def computed_spans(self) -> list:
        pos = 32 + len(self.manifest)
        spans = [[0, 0] for _ in range(self.tensor_count)]
        for c in self.chunks:
            b = c if isinstance(c, bytes) else c.to_bytes()
            if isinstance(c, Chunk) and not c.chunk_type & 0x8000 and c.tensor_index < self.tensor_count:
                s = spans[c.tensor_index]
                if s[1] == 0:
                    s[0] = pos
                s[1] = pos + len(b) - s[0]
            pos += len(b)
        return [tuple(s) for s in spans]

    def build(self) -> bytes:
        out = bytearray(self.header_bytes() + self.manifest)
        for c in self.chunks:
            out += c if isinstance(c, bytes) else c.to_bytes()
        ioff = len(out) if self.index_offset is None else self.index_offset
        spans = self.computed_spans() if self.spans is None else self.spans
        index = self.index_tag + b"".join(struct.pack("<QQ", o, n) for o, n in spans)
        out += index
        count = self.tensor_count if self.footer_tensor_count is None else self.footer_tensor_count
        icrc = crc32(index) if self.index_crc is None else self.index_crc
        fml = len(self.manifest) if self.footer_manifest_length is None else self.footer_manifest_length
        body = struct.pack("<QIII", ioff, count, icrc, fml)
        fcrc = crc32(body) if self.footer_crc is None else self.footer_crc
        out += body + struct.pack("<I", fcrc) + self.footer_magic
        return bytes(out)


# --- zstd frames made by hand (RFC 8878), independent of any zstd library's choices -----------------

def zstd_frame(data: bytes, content_size: bool = True, block: str = "raw", max_block: int = 1 << 17) -> bytes:
    """One Zstandard frame holding ``data`` in Raw (or RLE) blocks. Deterministic by construction."""
    out = bytearray(b"\x28\xb5\x2f\xfd")
    n = len(data)
    if content_size:
        # single segment: no window descriptor; content size field of 1, 2, 4 or 8 bytes
        if n < 256:
            out += bytes([0x20]) + struct.pack("<B", n)
        elif n < 65536 + 256:
            out += bytes([0x60]) + struct.pack("<H", n - 256)
        elif n < 1 << 32:
            out += bytes([0xA0]) + struct.pack("<I", n)
        else:
            out += bytes([0xE0]) + struct.pack("<Q", n)
    else:
        # no content size: window descriptor; window >= the largest block
        need = max(1, min(n, max_block))
        exp = max(0, math.ceil(math.log2(need)) - 10)
        out += bytes([0x00, exp << 3])
    return bytes(out) + zstd_blocks(data, block, max_block)


def zstd_blocks(data: bytes, block: str = "raw", max_block: int = 1 << 17) -> bytes:
    """The blocks of :func:`zstd_frame` (what follows its frame header): ``data`` in Raw (or RLE)
    blocks of at most ``max_block`` bytes, the last one marked."""
    out = bytearray()
    blocks = [data[i:i + max_block] for i in range(0, len(data), max_block)] or [b""]
    for i, b in enumerate(blocks):
        last = 1 if i == len(blocks) - 1 else 0
        if block == "rle" and b and b == bytes([b[0]]) * len(b):
            out += struct.pack("<I", last | (1 << 1) | (len(b) << 3))[:3] + b[:1]
        else:
            out += struct.pack("<I", last | (0 << 1) | (len(b) << 3))[:3] + b
    return bytes(out)


# --- safetensors (the protocol's output format), written and read without torch --------------------

ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
             "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
             "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL"}
ST_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
            "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "u1"}


def protocol_key(name: str) -> str:
    """The decoder protocol's safetensors key of tensor ``name`` (spec §5.4): ``__metadata__``, the key
    a safetensors header keeps its metadata under, becomes ``/__metadata__`` (no valid name starts with
    ``/``); every other name is its own key."""
    return "/" + name if name == "__metadata__" else name


def write_safetensors(tensors: list, path) -> None:
    """``tensors``: list of (key, dtype name of spec §5.5, shape, raw little-endian bytes); keys are
    written as given (map tensor names with ``protocol_key`` first)."""
    import json
    header = {}
    data = bytearray()
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + bytes(data))


def read_safetensors(path) -> dict:
    """{name: (ST dtype string, shape tuple, raw bytes)} of a safetensors file."""
    import json
    with open(path, "rb") as f:
        blob = f.read()
    (hlen,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8:8 + hlen].decode("utf-8"))
    base = 8 + hlen
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = (info["dtype"], tuple(info["shape"]), blob[base + a:base + b])
    return out


def iter_safetensors(path):
    """(name, ST dtype string, shape tuple, uint8 array) of each tensor of a safetensors file, the arrays
    memory-mapped (for outputs too large to read at once); the ``__metadata__`` entry is skipped."""
    import json

    import numpy as np
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen).decode("utf-8"))
        f.seek(0, 2)
        size = f.tell()
    base = 8 + hlen
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=base) if size > base else np.zeros(0, np.uint8)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        yield name, info["dtype"], tuple(info["shape"]), data[a:b]


# --- a small decoder for files known to be valid (to compute expected outputs from the spec) --------

def rc_decode(words: list, freqs: list, count: int) -> list:
    """Spec §8.4 in plain Python (no checks beyond §8.4's quantile test)."""
    M = (1 << 64) - 1
    c = [0]
    for f in freqs:
        c.append(c[-1] + f)
    pos = 0

    def read():
        nonlocal pos
        w = words[pos] if pos < len(words) else 0
        pos += 1
        return w

    point = (read() << 32) | read()
    lower, rng = 0, M
    out = []
    import bisect
    for _ in range(count):
        scale = rng >> 24
        q = ((point - lower) & M) // scale
        if q >= 1 << 24:
            raise ValueError("quantile outside the model")
        s = bisect.bisect_right(c, q) - 1
        out.append(s)
        lower = (lower + scale * c[s]) & M
        rng = scale * freqs[s]
        if rng < 1 << 32:
            lower = (lower << 32) & M
            rng <<= 32
            point = ((point << 32) & M) | read()
    return out


def unleb128(data: bytes) -> list:
    out, cur, shift = [], 0, 0
    for b in data:
        cur |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            out.append(cur)
            cur = shift = 0
    return out


def parse_valid(data: bytes):
    """(manifest value, {tensor index: [(stream, Item_Count, payload), ...]}) of a valid file."""
    import msgpack
    (required, _, mlen) = struct.unpack_from("<III", data, 12)
    stored = data[32:32 + mlen]
    if required & 1:  # spec §5.0: ZSTD_MANIFEST, the stored manifest is one zstd frame
        import zstandard
        stored = zstandard.ZstdDecompressor().decompress(stored)
    manifest = msgpack.unpackb(stored, raw=False)
    pos = 32 + mlen
    chunks: dict = {}
    while data[pos:pos + 4] == CHUNK_TAG:
        ctype, stream, tidx, seq, count, plen = struct.unpack_from("<HHIIII", data, pos + 4)
        if not ctype & 0x8000:
            chunks.setdefault(tidx, []).append((stream, count, data[pos + 32:pos + 32 + plen]))
        pos += 32 + plen
    assert data[pos:pos + 4] == INDEX_TAG
    return manifest, chunks

"""The fuzz harness of the .tqz decoder (issue 8): generators of hostile files and the check every
case must pass. Used by ``tests/format/test_reader_hostile.py``, ``tests/modes/test_classic.py`` and
``benchmarks/fuzz.py`` (through ``tests/test_fuzz.py``, the name it imports).

Two generators, both deterministic:

- **structured** (hypothesis, ``derandomize=True``): files written by ``ContainerWriter`` (so every
  CRC is right) from tensor records and chunk payloads drawn with wrong values, wrong lengths and
  wrong counts, sometimes with a header, chunk, index or footer field set to a boundary value and
  the CRCs recomputed;
- **mutation** (``random.Random`` with fixed seeds): real encoder output with bit flips, byte
  writes, truncations, insertions, deletions, length/count/offset fields set to 0, 1, 2^31,
  2^32-1, 2^64-1 ..., manifest values replaced or nested up to 5000 deep (manifest re-packed, file
  re-assembled), splices of two files; about half the cases then get every CRC recomputed so the damage reaches the checks
  behind the CRCs.

Each case is decoded front to back (``load``) and by random access (``open`` + every tensor).
Each must give tensors or a ``TqzError`` whose code is a file-validity code of spec §11, within
``TIME_BOUND`` seconds (times the load average per core, when above 1) and ``MEM_BOUND`` bytes of
traced allocations. When ``load`` succeeds,
``open`` must succeed with the same tensors (random access may accept more, spec §10.2).
"""
from __future__ import annotations

import io
import os
import random
import struct
import time
import tracemalloc
import zlib
from typing import Any, Callable, Optional

import msgpack
import numpy as np
import torch
import zstandard
from hypothesis import strategies as st

import tqcodec
from tqcodec.coding.rangecoder import encode_symbols
from tqcodec.errors import ENCODER_CODES, ERROR_CODES, TqzError
from tqcodec.format.chunks import CHUNK_TAG, pack_chunk
from tqcodec.format.header import MAGIC, ZSTD_MANIFEST
from tqcodec.format.index import FOOTER_MAGIC, pack_footer, pack_index
from tqcodec.format.leb128 import pack_freqs
from tqcodec.format.manifest import TensorRecord, unstore_manifest
from tqcodec.format.writer import ContainerWriter
from tqcodec.limits import Limits


# A decoder limit (spec §12 allows lower ones) that keeps every case small: no fuzzed file may
# make the decoder allocate much more than this, whatever its manifest declares.
FUZZ_LIMITS = Limits(max_tensor_bytes=1 << 22)
TIME_BOUND = 2.0          # seconds per case (both decodes)
MEM_BOUND = 160 << 20     # peak traced bytes per case
FILE_CODES = set(ERROR_CODES) - set(ENCODER_CODES)


# --- decoding one case -------------------------------------------------------------------------

def _bytes_of(t: torch.Tensor) -> tuple:
    flat = t.contiguous().reshape(-1)
    return (t.dtype, tuple(t.shape), bytes(flat.view(torch.uint8).numpy()) if flat.numel() else b"")


def decode_load(data: bytes, limits: Limits = FUZZ_LIMITS) -> dict:
    return {k: _bytes_of(v) for k, v in tqcodec.load(data, limits=limits).items()}


def decode_open(data: bytes, limits: Limits = FUZZ_LIMITS) -> dict:
    with tqcodec.open(data, limits=limits) as f:
        return {k: _bytes_of(f.get_tensor(k)) for k in f.keys()}


def outcome(fn: Callable[[bytes], Any], data: bytes) -> tuple[str, Any]:
    """('ok', value) or ('TqzError', code); anything else propagates (a crasher)."""
    try:
        return "ok", fn(data)
    except TqzError as exc:
        assert exc.code in FILE_CODES, f"{exc.code} is not a file-validity code: {exc}"
        assert isinstance(exc.message, str) and exc.message
        return "TqzError", exc.code


_cases = [0]
TRACE_EVERY = 5  # tracemalloc slows a case ~4x: trace one case in five


def check_case(data: bytes, trace: Optional[bool] = None) -> str:
    """Decode ``data`` both ways under the time and memory bounds; returns a summary label.

    The memory bound is checked with tracemalloc (numpy's buffers are traced; torch and
    constriction allocate only in proportion to numpy arrays here) on one case in
    ``TRACE_EVERY``, or when ``trace`` says so.
    """
    _cases[0] += 1
    if trace is None:
        trace = _cases[0] % TRACE_EVERY == 0
    if trace:
        tracemalloc.start()
    try:
        t0 = time.perf_counter()
        a = outcome(decode_load, data)
        b = outcome(decode_open, data)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
    finally:
        if trace:
            tracemalloc.stop()
    # a hang guard, not a speed test: the bound grows with the machine's load (other processes' share)
    busy = max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    assert elapsed < TIME_BOUND * busy * (3 if trace else 1), f"case took {elapsed:.2f} s (load share {busy:.1f})"
    assert peak < MEM_BOUND, f"case allocated {peak >> 20} MiB"
    if a[0] == "ok":
        assert b[0] == "ok", f"load decoded the file but open said {b[1]}"
        assert a[1] == b[1], "load and open decode different tensors"
    return "ok" if a[0] == "ok" else a[1]


# --- structure of a file (tolerant walkers used by the mutators) -------------------------------

def u32(b, off):
    return struct.unpack_from("<I", b, off)[0]


def crc(b) -> int:
    return zlib.crc32(bytes(b)) & 0xFFFFFFFF


def walk(data) -> dict:
    """Offsets of the parts of ``data`` as far as they can be found (never raises)."""
    out: dict = {"chunks": [], "manifest": None, "footer": None, "index": None}
    n = len(data)
    if n >= 32 and bytes(data[:8]) == MAGIC:
        mlen = u32(data, 20)
        if 32 + mlen <= n:
            out["manifest"] = (32, mlen)
            pos = 32 + mlen
            while pos + 32 <= n and bytes(data[pos:pos + 4]) == CHUNK_TAG:
                plen = u32(data, pos + 20)
                if pos + 32 + plen > n:
                    break
                out["chunks"].append((pos, plen))
                pos += 32 + plen
    if n >= 32 and bytes(data[n - 8:]) == FOOTER_MAGIC:
        out["footer"] = n - 32
        ioff = struct.unpack_from("<Q", data, n - 32)[0]
        if ioff <= n - 32:
            out["index"] = (ioff, n - 32 - ioff)
    return out


def fix_crcs(data: bytes) -> bytes:
    """Recompute every CRC that can be located, so damage reaches the checks behind them."""
    b = bytearray(data)
    w = walk(b)
    if w["manifest"]:
        off, mlen = w["manifest"]
        struct.pack_into("<I", b, 24, crc(b[off:off + mlen]))
    if len(b) >= 32 and bytes(b[:8]) == MAGIC:
        struct.pack_into("<I", b, 28, crc(b[:28]))
    for pos, plen in w["chunks"]:
        struct.pack_into("<I", b, pos + 24, crc(b[pos + 32:pos + 32 + plen]))
        struct.pack_into("<I", b, pos + 28, crc(b[pos:pos + 28]))
    if w["footer"] is not None:
        f = w["footer"]
        if w["index"]:
            ioff, ilen = w["index"]
            struct.pack_into("<I", b, f + 12, crc(b[ioff:ioff + ilen]))
        struct.pack_into("<I", b, f + 20, crc(b[f:f + 20]))
    return bytes(b)


def fields(data) -> list[tuple[int, int]]:
    """(offset, size) of every length, count, offset, type and version field found in ``data``."""
    out = [(8, 2), (10, 2), (12, 4), (16, 4), (20, 4)] if len(data) >= 32 else []
    w = walk(data)
    for pos, _ in w["chunks"]:
        out += [(pos + 4, 2), (pos + 6, 2), (pos + 8, 4), (pos + 12, 4), (pos + 16, 4), (pos + 20, 4)]
    if w["footer"] is not None:
        f = w["footer"]
        out += [(f, 8), (f + 8, 4), (f + 16, 4)]
        if w["index"]:
            ioff, ilen = w["index"]
            out += [(ioff + 4 + 8 * k, 8) for k in range(min(ilen - 4, 4096) // 8)]
    return out


def split(data: bytes) -> Optional[tuple[bytes, list[tuple[Optional[int], bytes]]]]:
    """(manifest bytes, [(Tensor_Index or None for ancillary, chunk bytes)]) of a well-formed file.
    A compressed manifest (spec §5.0) is given decompressed; one that does not decompress, as is."""
    w = walk(data)
    if not w["manifest"] or w["index"] is None:
        return None
    off, mlen = w["manifest"]
    chunks = []
    for pos, plen in w["chunks"]:
        ctype = struct.unpack_from("<H", data, pos + 4)[0]
        chunks.append((None if ctype & 0x8000 else u32(data, pos + 8), bytes(data[pos:pos + 32 + plen])))
    manifest = bytes(data[off:off + mlen])
    if u32(data, 12) & ZSTD_MANIFEST:
        try:
            manifest = unstore_manifest(manifest, ZSTD_MANIFEST)
        except TqzError:
            pass
    return manifest, chunks


def assemble(manifest: bytes, chunks: list[tuple[Optional[int], bytes]], tensor_count: int,
             compress: bool = False) -> bytes:
    """A file with right CRCs, index and footer around ``manifest`` and ``chunks`` (in order);
    ``compress``: the manifest stored as one zstd frame with ZSTD_MANIFEST set (spec §5.0)."""
    required = 0
    if compress:
        manifest, required = zstandard.ZstdCompressor(write_content_size=True).compress(manifest), ZSTD_MANIFEST
    body = bytearray()
    body += struct.pack("<8sHHIII", MAGIC, 1, 0, required, 0, len(manifest)) + struct.pack("<I", crc(manifest))
    body += struct.pack("<I", crc(body[:28]))
    body += manifest
    spans: list[list[int]] = [[0, 0] for _ in range(tensor_count)]
    for t, c in chunks:
        if t is not None and t < tensor_count:
            if spans[t][1] == 0:
                spans[t][0] = len(body)
            spans[t][1] = len(body) + len(c) - spans[t][0]
        body += c
    index = pack_index([tuple(s) for s in spans])
    ioff = len(body)
    return bytes(body) + index + pack_footer(ioff, index, tensor_count, len(manifest))


def tensor_count(manifest: bytes) -> int:
    try:
        v = msgpack.unpackb(manifest, raw=False, strict_map_key=False)
        return len(v["tensors"]) if isinstance(v, dict) and isinstance(v.get("tensors"), list) else 0
    except Exception:
        return 0


def pack_sorted(value: Any) -> bytes:
    """Canonical-looking MessagePack of any value (keys sorted where they can be)."""
    def canon(v):
        if isinstance(v, dict):
            try:
                keys = sorted(v)
            except TypeError:
                keys = list(v)
            return {k: canon(v[k]) for k in keys}
        if isinstance(v, list):
            return [canon(x) for x in v]
        return v
    return msgpack.packb(canon(value), use_bin_type=True)


# --- seed files: real encoder output ----------------------------------------------------------

def _chunked_file() -> bytes:
    """Tensors split over several chunks per stream, and an ancillary chunk between tensors."""
    g = np.random.default_rng(5)
    buf = io.BytesIO()
    w = ContainerWriter(buf)
    raw_bytes = g.integers(-1000, 1000, 48, dtype=np.int16).tobytes()
    w.add_tensor(TensorRecord("ints", "int16", (48,), "raw", {"codec": "none"}),
                 [[(32, raw_bytes[:32]), (32, raw_bytes[32:64]), (32, raw_bytes[64:])]])
    import zstandard
    z = zstandard.ZstdCompressor(write_content_size=True)
    fl = g.standard_normal(40).astype("<f4").tobytes()
    w.add_tensor(TensorRecord("floats", "float32", (4, 10), "raw", {"codec": "zstd"}),
                 [[(80, z.compress(fl[:80])), (80, z.compress(fl[80:]))]])
    freqs = np.array([1 << 22, 1 << 23, (1 << 22) - 7, 7], dtype=np.uint32)
    sym = g.integers(0, 3, 50).astype(np.int32)
    chunks = [(len(p), encode_symbols(p, freqs).astype("<u4").tobytes()) for p in (sym[:20], sym[20:45], sym[45:])]
    w.add_tensor(TensorRecord("q", "bfloat16", (5, 10), "uniform",
                              {"granularity": "channel", "steps": [-12, -11, -10, -9, -8], "q_min": -1,
                               "freqs": pack_freqs(freqs)}), [chunks])
    w.add_tensor(TensorRecord("q.tied", "bfloat16", (5, 10), "alias", {"of": 2}), [])
    w.add_tensor(TensorRecord("const", "float16", (3, 3), "uniform",
                              {"granularity": "tensor", "steps": [0], "q_min": 3,
                               "freqs": pack_freqs(np.array([1 << 24]))}), [])
    w.finish({"tqz.encoder": "fuzz seed", "note": [1, 2.5, {"k": None}]})
    manifest, chunks = split(buf.getvalue())
    anc = pack_chunk(0, 0, 0, 0, b"ancillary payload", chunk_type=0x8123)
    chunks = [(None, anc)] + chunks[:3] + [(None, anc)] + chunks[3:] + [(None, pack_chunk(0, 0, 0, 0, b"", 0xFFFF))]
    return assemble(manifest, chunks, tensor_count(manifest))


_SEEDS: list[bytes] = []


def seed_files() -> list[bytes]:
    """A few small, valid files covering every mode, codec and dtype family (deterministic)."""
    if _SEEDS:
        return _SEEDS
    from tests.helpers import small_state_dict
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 24, generator=g) * 0.1
    _SEEDS.extend([
        tqcodec.encode_bytes(small_state_dict()),
        tqcodec.encode_bytes(small_state_dict(1), lossless=True),
        tqcodec.encode_bytes({"w": w, "w.tied": w, "zeros": torch.zeros(4, 4), "b": torch.arange(6.0)},
                             mode="uniform", granularity="tensor", snr_db=20),
        tqcodec.encode_bytes({"x": torch.randn(3, 300, generator=g).to(torch.float16), "m": torch.ones(2, 2, dtype=torch.bool)},
                             metadata={"source": "fuzz", "n": 3}),
        _chunked_file(),
    ])
    for s in _SEEDS:  # the seeds themselves decode
        decode_load(s)
    return _SEEDS


# --- mutations ---------------------------------------------------------------------------------

BOUNDARY = [0, 1, 2, 3, 4, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
            (1 << 26), (1 << 26) + 1, (1 << 28), (1 << 28) + 1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1,
            1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]

MANIFEST_VALUES: list[Any] = [
    0, 1, -1, 2, 3, 255, 256, 65535, 65536, 65537, (1 << 20), (1 << 20) + 1, -(1 << 20) - 1, (1 << 26),
    (1 << 31), (1 << 32) - 1, (1 << 36) + 1, (1 << 40), (1 << 40) + 1, (1 << 63) - 1, (1 << 64) - 1, -(1 << 63),
    103, 104, -160, -161, 1.5, float("nan"), float("inf"), True, False, None, "", "x", "a/../b", "/abs",
    "a\\b", "\x01", "x" * 1025, "raw", "uniform", "alias", "bogus", "tensor", "channel", "none", "zstd",
    "float32", "float16", "bfloat16", "float64", "int8", "uint64", "bool", "complex64",
    b"", b"\x00", b"\x80\x80\x80\x08", b"\x80\x80\x80\x04\x80\x80\x80\x04", b"\xff\xff\xff\xff\x0f",
    b"\x01" * 70000, [], [0], [1, 2], [-1], [1 << 20, 1 << 20], [2] * 9, [0, 2 ** 41], {}, {"codec": "none"},
    {"of": 0}, [[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]],
]


def _paths(v: Any, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(v, dict):
        for k, x in v.items():
            out += _paths(x, prefix + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v[:64]):
            out += _paths(x, prefix + (i,))
    return out


def mutate_manifest(data: bytes, rng: random.Random) -> Optional[bytes]:
    """Replace, delete or add one value inside the manifest; re-assemble a file with right CRCs."""
    parts = split(data)
    if parts is None:
        return None
    manifest, chunks = parts
    try:
        value = msgpack.unpackb(manifest, raw=False, strict_map_key=False)
    except Exception:
        return None
    paths = [p for p in _paths(value) if p]
    if not paths:
        return None
    path = rng.choice(paths)
    parent = value
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    op = rng.random()
    deep = None
    if op < 0.05:  # a value nested deeper than Python's stack (packed by hand)
        deep = b"\x91" * rng.choice([17, 500, 900, 1100, 5000]) + b"\xc0"
        parent[key] = "\x00deep\x00"
    elif op < 0.7:
        parent[key] = rng.choice(MANIFEST_VALUES)
    elif op < 0.85:
        del parent[key]
    elif isinstance(parent, dict):
        parent[rng.choice(["zz", "a", "extra", "of", "codec", "q_min", b"bin"])] = rng.choice(MANIFEST_VALUES)
    else:
        parent.append(rng.choice(MANIFEST_VALUES))
    try:
        new = pack_sorted(value)
    except Exception:
        return None
    if deep is not None:
        new = new.replace(b"\xa6\x00deep\x00", deep, 1)
    count = tensor_count(new)
    if rng.random() < 0.2:
        count = tensor_count(manifest)
    return assemble(new, chunks, count, compress=rng.random() < 0.5)


def mutate(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    """One to four random mutations of ``data``; about half the time every CRC is then fixed."""
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
        op = rng.randrange(11)
        n = len(b)
        if op == 0 and n:                                   # flip one bit
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:                                 # write a byte
            b[rng.randrange(n)] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op == 2:                                       # truncate
            del b[rng.randrange(n + 1):]
        elif op == 3 and n:                                 # delete a run
            i = rng.randrange(n)
            del b[i:i + rng.choice([1, 2, 4, 8, 32, 100])]
        elif op == 4:                                       # insert a run
            i = rng.randrange(n + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 3, 4, 32])))
        elif op == 5 and n:                                 # duplicate a run
            i = rng.randrange(n)
            j = min(n, i + rng.choice([4, 32, 64, 200]))
            b[j:j] = b[i:j]
        elif op in (6, 7, 8):                               # a length/count/offset field to a boundary
            fs = fields(b)
            if fs:
                off, size = rng.choice(fs)
                v = rng.choice(BOUNDARY + [len(b), len(b) - 1, len(b) - 32, int.from_bytes(b[off:off + size], "little") + rng.choice([-1, 1])])
                b[off:off + size] = (v % (1 << (8 * size))).to_bytes(size, "little")
        elif op == 9:                                       # manifest value
            m = mutate_manifest(bytes(b), rng)
            if m is not None:
                b = bytearray(m)
        elif op == 10 and pool:                             # splice with another file
            other = rng.choice(pool)
            i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
            b = b[:i] + other[j:]
    if rng.random() < 0.5:
        return fix_crcs(bytes(b))
    return bytes(b)




# --- structured files (hypothesis) ----------------------------------------------------------

GOOD_NAMES = ["t{}", "layer.{}.weight", "dense/kernel:{}", "x" * 1020 + "{:04d}", "é{}"]
BAD_NAMES = ["x" * 1025, "", "a/../b", "/root", "a\\b", "tab\there", "a/./b", "del\x7f"]
FLOATS = ["float32", "float16", "bfloat16", "float64"]
INTS = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"]
BAD_DTYPES = ["complex64", "f32", ""]
SMALL_SHAPES = st.lists(st.integers(0, 6), min_size=0, max_size=3)
BAD_SHAPES = [(-1,), (2, -3), (1 << 40,), ((1 << 40) + 1,), ((1 << 64) - 1,), (1 << 20, 1 << 20),
              (1 << 19, 1 << 18), (2,) * 9, (1,) * 8, (0, 1 << 40), (1 << 21,)]
COUNT_SKEW = st.sampled_from([0] * 24 + [1, -1, 2, 1 << 26, -(10 ** 9)])


def rarely(draw, good, bad, one_in: int = 8):
    """A value from ``good`` most of the time, from ``bad`` one time in ``one_in``."""
    # hypothesis favours small integers and the first elements of a list: keep "good" first
    is_bad = draw(st.sampled_from([False] * (one_in - 1) + [True]))
    return draw(st.sampled_from(bad if is_bad else good))


@st.composite
def freq_tables(draw) -> bytes:
    kind = rarely(draw, ["ok", "ok", "ok", "one"], ["zero", "sum", "overlong", "cut", "big"], 4)
    a = draw(st.integers(2, 6))
    f = [1] * (a - 1) + [(1 << 24) - (a - 1)]
    if kind == "one":
        f = [1 << 24]
    elif kind == "zero":
        f = [0] + f
    elif kind == "sum":
        f[-1] += draw(st.sampled_from([-1, 1]))
    raw = pack_freqs(np.array([max(x, 0) for x in f]))
    if kind == "zero":
        raw = b"\x00" + pack_freqs(np.array(f[1:]))
    elif kind == "overlong":
        raw = b"\x81\x00" + raw
    elif kind == "cut":
        raw = raw[:-1]
    elif kind == "big":
        raw = b"\x01" * 65537
    return raw


@st.composite
def tensors(draw, index: int, prev: list):
    """(record, streams) of one tensor: mostly plausible, often subtly wrong."""
    mode = rarely(draw, ["raw", "uniform", "uniform", "alias"], ["bogus", "Raw"], 16)
    name = rarely(draw, GOOD_NAMES, BAD_NAMES, 12).format(index)
    if mode == "uniform":
        dtype = rarely(draw, FLOATS, INTS + BAD_DTYPES, 10)
    else:
        dtype = rarely(draw, FLOATS + INTS, BAD_DTYPES, 16)
    shape = tuple(rarely(draw, [tuple(draw(SMALL_SHAPES))], BAD_SHAPES, 12))
    numel = 1
    for d in shape:
        numel *= max(d, 0)
    itemsize = {"float64": 8, "int64": 8, "uint64": 8, "float32": 4, "int32": 4, "uint32": 4,
                "float16": 2, "bfloat16": 2, "int16": 2, "uint16": 2}.get(dtype, 1)
    small = numel <= 4096
    if mode == "raw":
        codec = rarely(draw, ["none", "zstd"], ["lz4", "None"], 16)
        params: dict = {"codec": codec}
        nbytes = numel * itemsize if small else draw(st.integers(1, 64))
        nbytes = max(0, nbytes + draw(COUNT_SKEW if draw(st.booleans()) else st.just(0)) % 100)
        data = bytes(draw(st.binary(min_size=min(nbytes, 64), max_size=min(nbytes, 64)))) * (nbytes // 64 + 1)
        data = data[:nbytes]
        if dtype == "bool" and draw(st.booleans()):
            data = bytes(x & 1 for x in data)
        pieces = draw(st.integers(1, 3))
        step = max(1, -(-len(data) // pieces))
        chunks = []
        import zstandard
        for s in range(0, len(data), step):
            piece = data[s:s + step]
            payload = piece
            if codec == "zstd":
                payload = zstandard.ZstdCompressor(write_content_size=draw(st.booleans())).compress(piece)
                if draw(st.integers(0, 9)) == 0:
                    payload = payload[:-1] + bytes([payload[-1] ^ 1])
            count = len(piece) + draw(COUNT_SKEW)
            chunks.append((count % (1 << 32), payload))
        return TensorRecord(name, dtype, shape, mode, params), [chunks]
    if mode == "uniform":
        gran = rarely(draw, ["tensor", "channel"], ["row", ""], 16)
        nsteps = 1 if gran == "tensor" else (shape[0] if shape and 0 <= shape[0] <= 16 else 1)
        nsteps += rarely(draw, [0], [1, -1], 12)
        steps = [rarely(draw, [-160, -40, -20, -9, 0, 103], [-161, 104, (1 << 64) - 1, -(1 << 63)], 24)
                 for _ in range(max(nsteps, 0))]
        freqs = draw(freq_tables())
        q_min = rarely(draw, [0, -1, -3, -(1 << 20), (1 << 20) - 8], [(1 << 20), -(1 << 20) - 1, 1 << 40], 10)
        params = {"granularity": gran, "steps": steps, "q_min": q_min, "freqs": freqs}
        if draw(st.integers(0, 19)) == 0:
            params.pop(draw(st.sampled_from(sorted(params))))
        try:
            from tqcodec.format.leb128 import unpack_freqs
            table = unpack_freqs(freqs)
        except TqzError:
            table = np.array([1, (1 << 24) - 1], dtype=np.uint32)
        n = numel if small else draw(st.integers(1, 64))
        chunks = []
        if len(table) > 1 and n:
            sym = np.array(draw(st.lists(st.integers(0, len(table) - 1), min_size=min(n, 32), max_size=min(n, 32))) * (n // 32 + 1), dtype=np.int32)[:n]
            pieces = draw(st.integers(1, 3))
            step = max(1, -(-n // pieces))
            for s in range(0, n, step):
                p = sym[s:s + step]
                words = encode_symbols(p, table).astype("<u4").tobytes()
                damage = draw(st.integers(0, 23))
                if damage == 0:
                    words = words[:-4]
                elif damage == 1:
                    words += b"\x00\x00\x00\x00"
                elif damage == 2:
                    words = words[:-1]
                elif damage == 3:
                    words = bytes([words[0] ^ 0x10]) + words[1:]
                chunks.append(((len(p) + draw(COUNT_SKEW)) % (1 << 32), words))
        return TensorRecord(name, dtype, shape, mode, params), [chunks] if chunks else []
    if mode == "alias":
        of = rarely(draw, [0, index - 1], [index, index + 1, -1, 1 << 40], 6)
        if 0 <= of < index and draw(st.integers(0, 5)):  # usually the target's dtype and shape
            dtype, shape = prev[of].dtype, prev[of].shape
        return TensorRecord(name, dtype, shape, mode, {"of": of}), []
    return TensorRecord(name, dtype, shape, mode, {}), [[(4, b"abcd")]]


@st.composite
def structured_files(draw) -> bytes:
    n = draw(st.integers(0, 4))
    buf = io.BytesIO()
    w = ContainerWriter(buf)
    prev: list = []
    for i in range(n):
        rec, streams = draw(tensors(i, prev))
        w.add_tensor(rec, streams)
        prev.append(rec)
    meta = draw(st.sampled_from([{}, {}, {"k": 1}, {"a": [1, {"b": b"x"}]}, {}, {"k": None}] * 3
                                + [{f"k{i}": i for i in range(4097)}]))
    try:
        w.finish(meta)
    except TqzError:
        return b""
    data = buf.getvalue()
    if draw(st.integers(0, 5)) == 0:  # and a field at a boundary, CRCs recomputed
        fs = fields(data)
        if fs:
            off, size = draw(st.sampled_from(fs))
            v = draw(st.sampled_from(BOUNDARY))
            b = bytearray(data)
            b[off:off + size] = (v % (1 << (8 * size))).to_bytes(size, "little")
            data = fix_crcs(bytes(b))
    return data


# --- degenerate calibration statistics (tests/modes/test_degenerate_statistics.py, benchmarks/fuzz_statistics.py)

STATISTICS_KINDS = ("zero", "dead", "range", "plain", "one", "nonfinite", "tiny")


def degenerate_statistics(rows: int, seed: int, kind: str, m: int) -> tuple[np.ndarray, int]:
    """(H [1, m, m], rows): the second moments of ``rows`` random input vectors (columns of very
    different scales), made degenerate by ``kind``: ``zero`` (an input always zero), ``dead``
    (half the channels dead), ``range`` (1e12 between columns), ``plain``, ``one`` (one sample),
    ``nonfinite`` (a NaN or infinity), ``tiny`` (H of order 1e-300)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(max(rows, 1), m)) * rng.choice([1e-6, 1.0, 1e3], size=m)
    if kind == "dead":
        x[:, rng.random(m) < 0.5] = 0.0
    elif kind == "range":
        x *= 10.0 ** rng.uniform(-6, 6, size=m)
    elif kind == "one":
        x = x[:1]
    h = x.T @ x / len(x)
    if kind == "zero":
        h = np.zeros((m, m))
    elif kind == "nonfinite":
        h[rng.integers(m), rng.integers(m)] = rng.choice([np.nan, np.inf])
    elif kind == "tiny":
        h *= 1e-300
    return h[None], rows


def weights(seed: int, n: int, m: int) -> np.ndarray:
    """[n, m] float64 weights of one of three scales."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, m)) * rng.choice([1e-3, 0.1, 10.0])

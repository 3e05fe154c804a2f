#!/usr/bin/env python3
"""(Re)generate the .tqz conformance vectors of the current spec version, deterministically.

    python conformance/make_vectors.py                 # rewrite conformance/valid, invalid, README.md
    python conformance/make_vectors.py --out DIR       # write the same tree under DIR instead
    python conformance/make_vectors.py --init-fixtures # write conformance/fixtures/v<major.minor>/ once;
                                                       # refuses if that folder exists

Running it twice gives identical bytes. Valid vectors are built with tqcodec's encoder where it
can make them (``encoder_*``, and every range-coded / zstd payload of the others) and field by
field with ``craft.py`` where it cannot. Their expected tensors are computed from the spec
(levels x exact steps, rounded by numpy/torch), not by tqcodec's decoder, except for the
``encoder_*`` vectors (see their vector.json). Invalid vectors are a valid base file with exactly
one defect, every CRC and length correct except the one under test.

Bytes that depend on a library: zstd frames made by the ``zstandard`` package (the ``raw_zstd_*``
dtype vectors, ``encoder_*``) and the ``tqz.encoder`` metadata of the ``encoder_*`` vectors (it
names tqcodec's version). A new libzstd or tqcodec version may change those files; the
reproducibility test then says which, and the vectors are regenerated and reviewed.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import struct
import sys
import warnings
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import tqcodec  # noqa: E402
from tqcodec.coding.rangecoder import encode_symbols  # noqa: E402
from tqcodec.coding.tables import frequencies_from_counts  # noqa: E402
from tqcodec.pipeline.tensors import tensor_to_storage  # noqa: E402
from tqcodec.modes import raw as raw_mode  # noqa: E402
from tqcodec.modes import uniform as uniform_mode  # noqa: E402

from craft import (ST_DTYPES, Chunk, Pairs, Raw, TqzFile, crc32, leb128, mp, parse_valid, protocol_key,  # noqa: E402
                   rc_decode, step, unleb128, write_safetensors, zstd_blocks, zstd_frame)

SPEC_VERSION = "1.4"
SPEC_MODES = ("raw", "uniform", "alias", "tq", "ecsq", "kmeans", "pq", "dither")
TOTAL = 1 << 24
NP = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int64": "<i8",
      "int32": "<i4", "int16": "<i2", "int8": "i1", "uint64": "<u8", "uint32": "<u4", "uint16": "<u2",
      "uint8": "u1", "bool": "u1"}
ALL_DTYPES = list(NP)


# --- tensors for crafted files -------------------------------------------------------------------

class T:
    """One tensor of a crafted file: its manifest record, its chunks and its expected value."""

    def __init__(self, name, dtype, shape, mode, params, chunks, expected):
        self.record = {"name": name, "dtype": dtype, "shape": list(shape), "mode": mode, "params": params}
        self.chunks = chunks          # list of Chunk (tensor_index/sequence filled by assemble)
        self.expected = expected      # raw little-endian bytes, or ("alias", j)

    @property
    def name(self):
        return self.record["name"]


def _split(n: int, sizes):
    """Chunk item counts: ``sizes`` None -> one chunk; int -> chunks of that size; list -> as given."""
    if n == 0:
        return []
    if sizes is None:
        return [n]
    if isinstance(sizes, int):
        return [min(sizes, n - i) for i in range(0, n, sizes)]
    assert sum(sizes) == n
    return list(sizes)


def raw_t(name, dtype, arr, codec="none", chunks=None, frame=None) -> T:
    """Mode raw. ``arr``: numpy array of the storage dtype (bfloat16: uint16 bits; bool: uint8)."""
    arr = np.ascontiguousarray(np.asarray(arr, dtype=NP[dtype]))
    data = arr.tobytes()
    out = []
    pos = 0
    for n in _split(len(data), chunks):
        piece = data[pos:pos + n]
        pos += n
        if codec == "none":
            payload = piece
        elif frame is not None:
            payload = frame(piece)
        else:  # tqcodec's encoder makes the frame
            streams = raw_mode.write(np.frombuffer(piece, np.uint8), "zstd").streams
            (count, payload), = streams[0]
        out.append(Chunk(payload, item_count=n))
    return T(name, dtype, arr.shape, "raw", {"codec": codec}, out, data)


def round_to(dtype: str, v64: np.ndarray) -> bytes:
    """Spec §7.3.2: exact values (float64 holds them) rounded to ``dtype`` (nearest even)."""
    f32 = v64.astype(np.float32)
    assert np.array_equal(f32.astype(np.float64), v64), "value not exact in binary32"
    if dtype == "float64":
        return v64.astype("<f8").tobytes()
    if dtype == "float32":
        return f32.astype("<f4").tobytes()
    if dtype == "float16":
        a = torch.from_numpy(f32.copy()).to(torch.float16).view(torch.int16).numpy().view("<u2")
        with np.errstate(over="ignore"):
            assert np.array_equal(a, v64.astype(np.float16).view("<u2")), "numpy and torch disagree on f16"
        return a.tobytes()
    if dtype == "bfloat16":
        return torch.from_numpy(f32.copy()).to(torch.bfloat16).view(torch.int16).numpy().view("<u2").tobytes()
    raise ValueError(dtype)


def uniform_t(name, dtype, shape, levels, codes, granularity="tensor", chunks=None, freqs=None,
              q_min=None) -> T:
    """Mode uniform from integer ``levels`` (C order) and step ``codes``; payloads by tqcodec's
    range coder (spec §8), expected values computed here from the spec."""
    levels = np.asarray(levels, dtype=np.int64).reshape(shape)
    flat = levels.reshape(-1)
    if q_min is None:
        q_min = int(flat.min())
    sym = (flat - q_min).astype(np.int64)
    if freqs is None:
        a = int(sym.max()) + 1
        freqs = [TOTAL] if a == 1 else frequencies_from_counts(np.bincount(sym, minlength=a)).tolist()
    freqs = [int(f) for f in freqs]
    assert sum(freqs) == TOTAL and sym.max() < len(freqs)
    out = []
    if len(freqs) > 1:
        pos = 0
        for n in _split(sym.size, chunks):
            words = encode_symbols(sym[pos:pos + n].astype(np.int32), np.array(freqs, dtype=np.uint32))
            out.append(Chunk(np.asarray(words, dtype="<u4").tobytes(), item_count=n))
            pos += n
    codes = [int(c) for c in codes]
    steps = np.array([step(c) for c in codes], dtype=np.float64)
    if granularity == "tensor":
        v = flat.astype(np.float64) * steps[0]
    else:
        v = (levels.reshape(shape[0], -1).astype(np.float64) * steps[:, None]).reshape(-1)
    v = v + 0.0  # no -0 (spec: q = 0 gives +0)
    v[v == 0] = 0.0
    params = {"granularity": granularity, "steps": codes, "q_min": int(q_min), "freqs": leb128(freqs)}
    return T(name, dtype, shape, "uniform", params, out, round_to(dtype, v))


def alias_t(name, of: int, like: T) -> T:
    return T(name, like.record["dtype"], like.record["shape"], "alias", {"of": of}, [], ("alias", of))


def manifest_value(ts, metadata=None, extra=None):
    v = {"metadata": {} if metadata is None else metadata, "tensors": [t.record for t in ts]}
    if extra:
        v.update(extra)
    return v


def zstd_manifest(manifest: bytes) -> bytes:
    """Spec §5.0: a manifest as one zstd frame, as tqcodec's writer makes it (level 19, content size,
    no checksum)."""
    import zstandard
    return zstandard.ZstdCompressor(level=19, write_content_size=True, write_checksum=False).compress(manifest)


def assemble(ts, metadata=None, extra=None, ancillary=(), manifest=None, compress=None) -> TqzFile:
    """A TqzFile of tensors ``ts`` in order. ``ancillary``: (before tensor k, Chunk) pairs, k may be
    len(ts) for after the last. ``compress``: a function making the stored manifest from the manifest
    (spec §5.0); the file then sets ZSTD_MANIFEST and declares Minor_Version 3."""
    chunks = []
    anc = sorted(ancillary, key=lambda a: a[0])
    for i, t in enumerate(ts):
        chunks += [c for k, c in anc if k == i]
        per_stream: dict = {}
        for c in t.chunks:
            c.tensor_index = i
            c.sequence = per_stream.get(c.stream, 0)
            per_stream[c.stream] = c.sequence + 1
            chunks.append(c)
    chunks += [c for k, c in anc if k >= len(ts)]
    mbytes = mp(manifest_value(ts, metadata, extra)) if manifest is None else manifest
    f = TqzFile(mbytes, len(ts), chunks)
    if any(t.record.get("mode") in ("ecsq", "kmeans", "pq", "dither") for t in ts):
        f.minor = 2  # modes of spec/mode-lineage.md are format 1.2
    elif any(t.record.get("mode") == "tq" for t in ts):
        f.minor = 1  # mode tq is format 1.1 (spec §13: the lowest minor version defining what the file uses)
    if compress is not None:
        f.manifest, f.required, f.minor = compress(mbytes), 1, 3
    if any(t.record.get("mode") == "tq" and "row_band" in t.record.get("params", {}) for t in ts):
        f.minor = 4  # tq's row_band is format 1.4
    return f


def expected_list(ts):
    """(name, dtype, shape, bytes) for the expected safetensors file."""
    out = []
    for t in ts:
        e = t.expected
        if isinstance(e, tuple):
            e = ts[e[1]].expected
        out.append((t.name, t.record["dtype"], t.record["shape"], e))
    return out


def rng(seed):
    return np.random.default_rng(seed)


# --- mode tq (spec 1.1, spec/mode-tq.md §7.5) -------------------------------------------------------

TQ_REL = {"float32": 2.0 ** -23, "float64": 2.0 ** -23, "float16": 2.0 ** -10 + 2.0 ** -23,
          "bfloat16": 2.0 ** -7 + 2.0 ** -23}   # one ulp of the dtype (and of the binary32 rounding)
TQ_ABS = {"float32": 2.0 ** -149, "float64": 2.0 ** -149, "float16": 2.0 ** -24, "bfloat16": 2.0 ** -133}


def table_from_counts(counts) -> list:
    """Spec §8.6 in plain Python integers (normative for mode tq, spec/mode-tq.md §7.5.1)."""
    A, K = len(counts), sum(counts)
    free = TOTAL - A
    shares = [k * free for k in counts]
    f = [1 + s // K for s in shares]
    left = free - sum(s // K for s in shares)
    for s in sorted(range(A), key=lambda s: (-(shares[s] % K), s))[:left]:
        f[s] += 1
    return f


def round_f32_to(dtype: str, f32: np.ndarray) -> bytes:
    """Spec §7.5.3 step 4: binary32 values rounded to ``dtype`` (nearest even, f16 overflow to inf)."""
    f32 = np.ascontiguousarray(f32, dtype=np.float32)
    if dtype == "float64":
        return f32.astype("<f8").tobytes()
    return round_to(dtype, f32.astype(np.float64))


def tq_reconstruct(dtype, shape, layout, coeff: np.ndarray, S):
    """Spec §7.5.3 from the coefficient matrix C [k, c] (float64, exact) and S [m, k] (float64 or None):
    (tensor bytes, per-element tolerance bound as float64 array or None). With a transform the sums are
    computed correctly rounded in binary64 (math.fsum: the products are exact), then rounded to binary32."""
    import math
    numel = int(np.prod(shape, dtype=object))
    n = shape[0] if layout == "out_in" else shape[1]
    m = numel // n
    if S is None:
        R = coeff.astype(np.float32)
        assert np.array_equal(R.astype(np.float64), coeff) and R.shape == (n, m)
        bound = None
    else:
        k = S.shape[1]
        R64 = np.empty((n, m))
        bound = np.empty((n, m))
        for i in range(n):
            for j in range(m):
                terms = [float(S[j, r]) * float(coeff[r, i]) for r in range(k)]
                R64[i, j] = math.fsum(terms)
                bound[i, j] = 2.0 ** -20 * math.fsum(abs(t) for t in terms)
        with np.errstate(over="ignore"):
            R = R64.astype(np.float32)
        if dtype == "float16":  # a sum within its bound of +-65520 could round to a finite value or to inf
            assert not np.any(np.abs(np.abs(R64) - 65520.0) <= bound), "a float16 element near the overflow"
    if layout == "in_out":
        R = R.T
        bound = None if bound is None else bound.T
    return round_f32_to(dtype, R.reshape(-1)), (None if bound is None else np.ascontiguousarray(bound).reshape(shape))


def tq_t(name, dtype, shape, bands, layout="out_in", S=None, chunks=None, s_chunks=None, explicit=False,
         check=True, row_band=None) -> T:
    """Mode tq. ``bands``: [(levels [rows, c] ints, step code)]; ``S``: synthesis [m, k] (rounded to
    float16 here); ``chunks``: per band, as ``_split``; ``s_chunks``: stream 0's split (bytes);
    ``row_band`` (1.4): the band of each coefficient row (band b's levels are its rows in order)."""
    out = []
    if S is not None:
        S = np.asarray(S, dtype=np.float16)
        data = np.ascontiguousarray(S, dtype="<f2").tobytes()
        pos = 0
        for n in _split(len(data), s_chunks):
            out.append(Chunk(data[pos:pos + n], stream=0, item_count=n))
            pos += n
    rows, steps, qmins, blobs, coeff = [], [], [], [], []
    for b, (lv, code) in enumerate(bands):
        lv = np.asarray(lv, dtype=np.int64)
        q_min = int(lv.min())
        counts = np.bincount((lv.reshape(-1) - q_min), minlength=int(lv.max()) - q_min + 1)
        rows.append(int(lv.shape[0]))
        steps.append(int(code))
        qmins.append(q_min)
        blobs.append(leb128(counts))
        if len(counts) > 1:
            freqs = frequencies_from_counts(counts)
            assert freqs.tolist() == table_from_counts(counts.tolist()), "tqcodec's §8.6 table differs"
            sym = (lv.reshape(-1) - q_min).astype(np.int32)
            pos = 0
            for n in _split(sym.size, None if chunks is None else chunks[b]):
                words = encode_symbols(sym[pos:pos + n], freqs)
                out.append(Chunk(np.asarray(words, dtype="<u4").tobytes(), stream=1 + b, item_count=n))
                pos += n
        coeff.append(lv.astype(np.float64) * step(int(code)))
    params = {"band_rows": rows, "steps": steps, "q_min": qmins, "counts": blobs}
    if layout != "out_in" or explicit:
        params["layout"] = layout
    if S is not None or explicit:
        params["transform"] = "none" if S is None else "float16"
    if row_band is not None:
        params["row_band"] = bytes(row_band)
    t = T(name, dtype, shape, "tq", params, out, b"")
    t.bounds = None
    if check:
        c = np.concatenate(coeff)
        if row_band is not None:  # band after band -> C's row order (spec §7.5.1)
            c = c[np.argsort(np.argsort(np.asarray(row_band), kind="stable"), kind="stable")]
        c[c == 0] = 0.0
        t.expected, t.bounds = tq_reconstruct(dtype, list(shape), layout, c,
                                              None if S is None else S.astype(np.float64))
    return t


def tq_by_spec(r, parts):
    """Spec §7.5 (decode of a valid tq tensor): (bytes, bound or None)."""
    p, shape = r["params"], r["shape"]
    assert set(p) <= {"band_rows", "steps", "q_min", "counts", "layout", "transform", "row_band"}
    layout, transform = p.get("layout", "out_in"), p.get("transform", "none")
    numel = int(np.prod(shape, dtype=object))
    n = shape[0] if layout == "out_in" else shape[1]
    m = numel // n
    c = m if transform == "none" else n
    rows_c = []
    for b, rows in enumerate(p["band_rows"]):
        counts = unleb128(p["counts"][b])
        assert sum(counts) == rows * c and counts[0] and counts[-1]
        pl = [(cnt, x) for s, cnt, x in parts if s == 1 + b]
        if len(counts) == 1:
            sym = [0] * (rows * c)
            assert not pl
        else:
            freqs = table_from_counts(counts)
            sym = [s for cnt, x in pl for s in rc_decode(list(struct.unpack(f"<{len(x) // 4}I", x)), freqs, cnt)]
        assert len(sym) == rows * c
        rows_c.append((np.array(sym, dtype=np.int64) + p["q_min"][b]).astype(np.float64).reshape(rows, c)
                      * step(p["steps"][b]))
    coeff = np.concatenate(rows_c)
    if "row_band" in p:  # spec §7.5.1 (1.4): band b holds the rows whose byte is b, in increasing order
        band = list(p["row_band"])
        assert len(band) == coeff.shape[0] and max(band) < len(p["band_rows"]) <= 256
        order = [i for b in range(len(p["band_rows"])) for i in range(len(band)) if band[i] == b]
        placed = np.empty_like(coeff)
        placed[order] = coeff
        coeff = placed
    coeff[coeff == 0] = 0.0
    S = None
    if transform == "float16":
        data = b"".join(x for s, _, x in parts if s == 0)
        S = np.frombuffer(data, "<f2").astype(np.float64).reshape(m, coeff.shape[0])
        assert np.isfinite(S).all()
    return tq_reconstruct(r["dtype"], shape, layout, coeff, S)


# --- output ---------------------------------------------------------------------------------------

class Out:
    def __init__(self, root: Path):
        self.root = root
        self.names: set = set()

    def _dir(self, group, name):
        assert name not in self.names, name
        self.names.add(name)
        d = self.root / group / name
        d.mkdir(parents=True)
        return d

    def valid(self, name, what, spec, data: bytes, expected, tolerance=0, notes=None, may_reject_with=None,
              level=None):
        """A valid vector (or, with ``may_reject_with``, a may_reject one of conformance ``level``, spec
        §12.1). Tensor names become the protocol's safetensors keys (``protocol_key``)."""
        assert (may_reject_with is None) == (level is None), name
        d = self._dir("valid" if may_reject_with is None else "may_reject", name)
        bounds: dict = {}
        by_spec = expected_by_spec(data, bounds)
        assert [(n, t, list(s), b) for n, t, s, b in by_spec] == [(n, t, list(s), b) for n, t, s, b in expected], \
            f"{name}: the spec decoder of make_vectors.py disagrees with the expected tensors"
        if bounds:  # tq tensors with a float16 transform: spec/mode-tq.md §7.5.3's tolerance, not bit-exact
            dts = {t for n, t, s, b in expected if n in bounds}
            tolerance = {"abs": max(TQ_ABS[t] for t in dts), "rel": max(TQ_REL[t] for t in dts),
                         "abs_per_element": "tolerance.safetensors"}
            notes = notes or ("tq tensors with a float16 transform: compare within spec/mode-tq.md §7.5.3's "
                              "tolerance: |got - want| <= bound + abs + rel*|want|, bound per element from "
                              "tolerance.safetensors (2^-20 * sum_r |S[j,r] C[r,i]|, float64, each tensor's "
                              "shape; 0 for tensors without a transform), rel one ulp of the dtype plus the "
                              "binary32 rounding; expected values: sums correctly rounded in binary64, then "
                              "rounded once to binary32 and to the dtype")
            write_safetensors([(protocol_key(n), "float64", s, bounds[n] if n in bounds else
                                np.zeros(s, "<f8").tobytes()) for n, t, s, b in expected], d / "tolerance.safetensors")
        if may_reject_with is None:
            got = expected_from_tqcodec(data)
            want = [(n, t, list(s), b) for n, t, s, b in expected]
            if bounds:
                import run as runner
                tol_b = {n: np.frombuffer(b, "<f8") for n, b in bounds.items()}
                why = runner.compare({n: (ST_DTYPES[t], s, b) for n, t, s, b in want},
                                     {n: (ST_DTYPES[t], s, b) for n, t, s, b in got}, tolerance, tol_b)
                if why:
                    print(f"WARNING {name}: tqcodec decodes this vector outside the tolerance: {why}",
                          file=sys.stderr)
            elif got != want:
                print(f"WARNING {name}: tqcodec decodes this vector differently (a tqcodec bug?)", file=sys.stderr)
        (d / "in.tqz").write_bytes(data)
        write_safetensors([(protocol_key(n), t, s, b) for n, t, s, b in expected], d / "expected.safetensors")
        info = {"what": what, "spec": spec, "tolerance": tolerance,
                "dtype notes": notes or "expected.safetensors holds every tensor in its own dtype "
                                        "(BF16 as safetensors BF16); compare bit for bit"}
        if may_reject_with is not None:
            info["may_reject_with"] = may_reject_with
            info["level"] = level
        (d / "vector.json").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")

    def compact(self, name, what, spec, data: bytes, expected: dict, *, large: bool, level=None,
                may_reject_with=None):
        """A valid (or may_reject) vector whose output is too large to store: ``expected`` is
        ``expected_compact`` ({key: {"dtype", "shape", "row_hex", "row_elems"[, "tolerance_row_hex"]}}, each
        tensor its row repeated), checked here against ``compact_by_spec`` of the file. ``large``: the
        output is 1 GiB or more (run.py runs it only with ``--large``). tqcodec's decoder is not run here
        (it would take minutes): run.py --large does that."""
        assert (may_reject_with is None) == (level is None), name
        assert expected == compact_by_spec(data), f"{name}: the compact expectation disagrees with the file"
        d = self._dir("valid" if may_reject_with is None else "may_reject", name)
        transform = any("tolerance_row_hex" in e for e in expected.values())
        tolerance = 0
        notes = ("the expected output is given compactly (expected_compact: each tensor is its row "
                 "repeated, row_hex its bytes in the safetensors dtype); compare bit for bit")
        if transform:
            dts = {e["dtype"] for e in expected.values() if "tolerance_row_hex" in e}
            st = {v: k for k, v in ST_DTYPES.items()}
            tolerance = {"abs": max(TQ_ABS[st[t]] for t in dts), "rel": max(TQ_REL[st[t]] for t in dts)}
            notes = ("the expected output is given compactly (expected_compact: each tensor is its row repeated, "
                     "row_hex its bytes in the safetensors dtype); tq tensors with a float16 transform: compare "
                     "within spec/mode-tq.md §7.5.3's tolerance, |got - want| <= bound + abs + rel*|want|, bound "
                     "per element from tolerance_row_hex (float64, the row's bounds, repeated like the row)")
        (d / "in.tqz").write_bytes(data)
        info = {"what": what, "spec": spec, "tolerance": tolerance, "dtype notes": notes}
        if may_reject_with is not None:
            info["may_reject_with"] = may_reject_with
            info["level"] = level
        if large:
            info["large"] = True
        info["expected_compact"] = expected
        (d / "vector.json").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")

    def invalid(self, name, what, spec, data: bytes, code):
        d = self._dir("invalid", name)
        (d / "in.tqz").write_bytes(data)
        info = {"what": what, "spec": spec, "expect_error": code}
        (d / "vector.json").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")


# --- values for raw vectors ----------------------------------------------------------------------

def raw_values(dtype):
    if dtype == "float64":
        a = np.array([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, 5e-324, 1.7976931348623157e308, 1e-300, 3.0],
                     dtype="<f8")
        bits = a.view("<u8").copy()
        bits[-1] = 0x7FF8000000000123  # a quiet NaN with payload
        return bits.view("<f8").reshape(2, 5)
    if dtype == "float32":
        return np.array([0x00000000, 0x80000000, 0x3F800000, 0xC0100000, 0x7F800000, 0xFF800000, 0x00000001,
                         0x7F7FFFFF, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x3EAAAAAB], dtype="<u4").view("<f4").reshape(3, 4)
    if dtype == "float16":
        return np.array([0x0000, 0x8000, 0x3C00, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x0001, 0x7BFF, 0x3555],
                        dtype="<u2").view("<f2").reshape(5, 2)
    if dtype == "bfloat16":
        return np.array([0x0000, 0x8000, 0x3F80, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0x0001, 0x7F7F, 0x3EAB, 0xC2F7],
                        dtype="<u2")
    if dtype == "bool":
        return np.array([[1, 0, 1], [1, 1, 0]], dtype="u1")
    info = np.iinfo(NP[dtype])
    vals = [info.min, info.max, 0, 1, info.max - 1, info.min + 1, 2, 3]
    if info.min < 0:
        vals += [-1, -2]
    return np.array(vals, dtype=NP[dtype]).reshape(2, -1)


# --- instrumented §8 encoder to find payloads with pending words, carries and the extra seal word ----

def rc_trace(symbols, freqs):
    """Spec §8.3 (as tests/reference_rangecoder.py), returning (words, max pending, carried, extra_zero)."""
    M = (1 << 64) - 1
    c = [0]
    for f in freqs:
        c.append(c[-1] + f)
    lower, rng_, out, N, P = 0, M, [], 0, 0
    maxn, carried = 0, False
    for s in symbols:
        scale = rng_ >> 24
        rng_ = scale * freqs[s]
        nl = (lower + scale * c[s]) & M
        if N and nl + rng_ <= M:
            if nl < lower:
                out += [(P + 1) & 0xFFFFFFFF] + [0] * (N - 1)
                carried = True
            else:
                out += [P] + [0xFFFFFFFF] * (N - 1)
            N = 0
        lower = nl
        if rng_ < (1 << 32):
            rng_ <<= 32
            w = lower >> 32
            lower = (lower << 32) & M
            if N:
                N += 1
            elif lower + rng_ <= M:
                out.append(w)
            else:
                N, P = 1, w
            maxn = max(maxn, N)
    point = (lower + (1 << 32) - 1) & M
    if N:
        if point >= lower:
            out += [P] + [0xFFFFFFFF] * (N - 1)
        else:
            out += [(P + 1) & 0xFFFFFFFF] + [0] * (N - 1)
            carried = True
    out.append(point >> 32)
    extra = False
    if ((lower + rng_) & M) >> 32 == point >> 32:
        out.append(0)
        extra = True
    return out, maxn, carried, extra


def find_rc_cases():
    """Deterministic search for symbol strings that exercise §8.3's rare branches."""
    r = random.Random(1234)
    found = {}
    tables = [[TOTAL - 3, 1, 1, 1], [1 << 23, (1 << 23) - 1, 1], [3, TOTAL - 6, 3], [TOTAL // 2, TOTAL // 2]]
    for trial in range(200000):
        f = tables[trial % len(tables)]
        n = r.randint(1, 40)
        if f[0] == 3:
            syms = [r.choice([0, 2, 1, 1, 1, 1]) for _ in range(n)]
        elif f[0] == TOTAL - 3:
            syms = [r.choice([0, 0, 0, 1, 2, 3]) for _ in range(n)]
        else:
            syms = [r.randrange(len(f)) for _ in range(n)]
        words, maxn, carried, extra = rc_trace(syms, f)
        if maxn >= 2 and carried and "carry" not in found:
            found["carry"] = (syms, f, words)
        if maxn >= 2 and not carried and "pending" not in found:
            found["pending"] = (syms, f, words)
        if extra and "extra" not in found:
            found["extra"] = (syms, f, words)
        if len(found) == 3:
            break
    return found


# --- the valid vectors ---------------------------------------------------------------------------

def encode_with_tqcodec(tensors: dict, **opts) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = tqcodec.encode_bytes(tensors, **opts)
    # spec §13: the encoder writes the lowest minor version defining what the file uses (tq: 1.1; the
    # 1.2 modes; a compressed manifest, required feature bit 0: 1.3; tq's row_band: 1.4)
    manifest, _ = parse_valid(data)
    modes = {r["mode"] for r in manifest["tensors"]}
    want = 2 if modes & {"ecsq", "kmeans", "pq", "dither"} else 1 if "tq" in modes else 0
    if struct.unpack_from("<I", data, 12)[0] & 1:
        want = 3
    if any(r["mode"] == "tq" and "row_band" in r["params"] for r in manifest["tensors"]):
        want = 4
    got = struct.unpack_from("<H", data, 10)[0]
    assert got == want, f"tqcodec's encoder wrote Minor_Version {got}, expected {want} (spec §13)"
    return data


def expected_from_tqcodec(data: bytes):
    out = []
    for name, t in tqcodec.load(data).items():
        dtype, arr = tensor_to_storage(t)
        out.append((name, dtype, list(t.shape), np.ascontiguousarray(arr).tobytes()))
    return out


def expected_by_spec(data: bytes, bounds: dict | None = None):
    """The tensors of a valid file, computed from the spec by this script (plain-Python range decoder of
    §8.4, levels x exact steps rounded by numpy/torch), independently of tqcodec's decoder."""
    import zstandard
    manifest, chunks = parse_valid(data)
    out = []
    for i, r in enumerate(manifest["tensors"]):
        mode, p, shape = r["mode"], r["params"], r["shape"]
        # a vector of this spec version may use only its modes (an encoder default that starts writing a
        # mode of a later version must not slip into these vectors)
        assert mode in SPEC_MODES, f"tensor {r['name']!r}: mode {mode!r} is not a mode of spec {SPEC_VERSION}"
        numel = int(np.prod(shape, dtype=object)) if shape else 1
        parts = chunks.get(i, [])
        if mode == "alias":
            raw = out[p["of"]][3]
        elif mode in ("ecsq", "kmeans", "pq", "dither"):
            raw = lineage_by_spec(r, parts)
        elif mode == "tq":
            raw, bound = tq_by_spec(r, parts)
            if bound is not None and bounds is not None:
                bounds[r["name"]] = bound.astype("<f8").tobytes()
        elif mode == "raw":
            raw = b"".join(pl if p["codec"] == "none" else
                           zstandard.ZstdDecompressor(max_window_size=1 << 31).decompress(pl, max_output_size=n)
                           for _, n, pl in parts)
        else:
            freqs = unleb128(p["freqs"])
            sym = [0] * numel if len(freqs) == 1 else [
                s for _, n, pl in parts for s in rc_decode(list(struct.unpack(f"<{len(pl) // 4}I", pl)), freqs, n)]
            levels = np.array(sym, dtype=np.int64) + p["q_min"]
            steps = np.array([step(c) for c in p["steps"]])
            per = 1 if p["granularity"] == "tensor" else numel // shape[0]
            v = levels.astype(np.float64) * np.repeat(steps, per if p["granularity"] == "channel" else numel)
            v[v == 0] = 0.0
            raw = round_to(r["dtype"], v)
        out.append((r["name"], r["dtype"], shape, raw))
    return out


def compact_entry(dtype: str, shape, row: bytes, row_elems: int, bound=None) -> dict:
    """One tensor of ``expected_compact``: the tensor is ``row`` (``row_elems`` elements of ``dtype``)
    repeated; ``bound``: the row's §7.5.3 tolerance bounds (float64)."""
    e = {"dtype": ST_DTYPES[dtype], "shape": [int(d) for d in shape], "row_hex": row.hex(), "row_elems": row_elems}
    if bound is not None:
        e["tolerance_row_hex"] = np.asarray(bound, dtype="<f8").tobytes().hex()
    return e


def compact_by_spec(data: bytes) -> dict:
    """``expected_compact`` of a valid file whose every tensor is one row repeated, from the spec alone
    (the forms the large vectors use): a constant ``uniform`` tensor (A = 1), a ``raw`` none tensor (its
    bytes are the row), an ``alias``, and a ``tq`` tensor (layout out_in) with a float16 transform whose
    bands are all constant with one common value c: R[i, j] = sum_r S[j, r] * c for every row i, the sum
    correctly rounded in binary64 (math.fsum), then binary32, then the dtype, as tq_reconstruct does."""
    import math
    manifest, chunks = parse_valid(data)
    out: dict = {}
    names = [r["name"] for r in manifest["tensors"]]
    for i, r in enumerate(manifest["tensors"]):
        mode, p, shape, dtype = r["mode"], r["params"], r["shape"], r["dtype"]
        numel = int(np.prod(shape, dtype=object)) if shape else 1
        parts = chunks.get(i, [])
        key = protocol_key(r["name"])
        if mode == "alias":
            out[key] = dict(out[protocol_key(names[p["of"]])])
        elif mode == "uniform":
            assert len(unleb128(p["freqs"])) == 1 and not parts and len(set(p["steps"])) == 1
            v = np.array([p["q_min"] * step(p["steps"][0])]) + 0.0
            out[key] = compact_entry(dtype, shape, round_to(dtype, v), 1)
        elif mode == "raw":
            assert p["codec"] == "none"
            out[key] = compact_entry(dtype, shape, b"".join(pl for _, _, pl in parts), numel)
        else:
            assert mode == "tq" and p.get("transform") == "float16" and p.get("layout", "out_in") == "out_in"
            assert all(len(unleb128(c)) == 1 for c in p["counts"])
            values = {q * step(code) for q, code in zip(p["q_min"], p["steps"])}
            assert len(values) == 1
            c = values.pop()
            n, k = shape[0], sum(p["band_rows"])
            m = numel // n
            S = np.frombuffer(b"".join(pl for st, _, pl in parts if st == 0), "<f2").astype(np.float64).reshape(m, k)
            assert np.isfinite(S).all()
            v = np.array([math.fsum(S[j] * c) for j in range(m)])  # products exact: 11 by at most 24 bits
            bound = np.array([2.0 ** -20 * math.fsum(np.abs(S[j] * c)) for j in range(m)])
            if dtype == "float16":
                assert not np.any(np.abs(np.abs(v) - 65520.0) <= bound), "a float16 element near the overflow"
            out[key] = compact_entry(dtype, shape, round_f32_to(dtype, v.astype(np.float32)), m, bound)
    return out


@contextmanager
def small_chunks(symbols: int, nbytes: int):
    old = uniform_mode.CHUNK_SYMBOLS, raw_mode.CHUNK_BYTES
    uniform_mode.CHUNK_SYMBOLS, raw_mode.CHUNK_BYTES = symbols, nbytes
    try:
        yield
    finally:
        uniform_mode.CHUNK_SYMBOLS, raw_mode.CHUNK_BYTES = old


def model_state(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 4, 3, 3, generator=g) * 0.2,
        "conv.bias": torch.randn(8, generator=g) * 0.01,
        "bn.running_var": torch.rand(8, generator=g) + 1e-6,
        "bn.num_batches_tracked": torch.tensor(1234),
        "fc.weight": torch.randn(16, 72, generator=g) * 0.1,
        "fc.bias": torch.zeros(16),
        "emb.weight": (torch.randn(50, 12, generator=g) * 0.5).to(torch.bfloat16),
        "half.weight": torch.randn(20, 20, generator=g).to(torch.float16),
        "double.weight": torch.randn(30, 10, generator=g, dtype=torch.float64),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(-5, 5, dtype=torch.int32),
        "bytes": torch.arange(0, 250, 7, dtype=torch.uint8),
        "u16": torch.arange(0, 60000, 999, dtype=torch.int32).to(torch.uint16),
        "u32": torch.tensor([0, 1, 2**32 - 1], dtype=torch.int64).to(torch.uint32),
        "u64": torch.tensor([0, 1, 2**63 - 1], dtype=torch.int64).to(torch.uint64),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "i16": torch.tensor([-32768, 0, 32767], dtype=torch.int16),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
        "one": torch.tensor([7.0]),
    }


ENC_NOTE = ("file written by tqcodec's encoder; expected tensors computed from the file by make_vectors.py's "
            "own spec decoder (not tqcodec's); bit-exact")


def make_valid(out: Out):
    V = out.valid

    def simple(name, what, spec, ts, **kw):
        f = assemble(ts, **{k: v for k, v in kw.items() if k in ("metadata", "extra", "ancillary")})
        V(name, what, spec, f.build(), expected_list(ts), notes=kw.get("notes"))
        return f

    # raw, every dtype, with and without zstd
    for dt in ALL_DTYPES:
        vals = raw_values(dt)
        simple(f"raw_none_{dt}", f"mode raw, codec none, dtype {dt}: extreme values, NaN payloads, "
               "signed zeros, subnormals kept bit for bit", "§7.2 §5.5", [raw_t("x", dt, vals)])
        simple(f"raw_zstd_{dt}", f"mode raw, codec zstd (frame by tqcodec's encoder), dtype {dt}", "§7.2 §5.5",
               [raw_t("x", dt, np.tile(vals.reshape(-1), 20), codec="zstd")])
    u16 = np.arange(3000, dtype="<u2")
    simple("raw_zstd_raw_blocks_no_content_size", "zstd frame without Frame_Content_Size (window descriptor), "
           "Raw blocks of 1000 bytes: the decoder must bound output by Item_Count itself", "§7.2",
           [raw_t("x", "uint16", u16, codec="zstd", frame=lambda b: zstd_frame(b, False, max_block=1000))])
    simple("raw_zstd_rle_block", "zstd frame of one RLE block", "§7.2",
           [raw_t("x", "uint8", np.full(500, 7), codec="zstd", frame=lambda b: zstd_frame(b, True, "rle"))])
    simple("raw_zstd_content_size_4_byte_field", "zstd frame with a 4-byte Frame_Content_Size field and Raw blocks",
           "§7.2", [raw_t("x", "int32", np.arange(-20000, 20000), codec="zstd", frame=lambda b: zstd_frame(b))])

    def checksum_frame(b):
        import zstandard
        return zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True).compress(b)
    simple("raw_zstd_with_checksum", "zstd frame with a content checksum", "§7.2",
           [raw_t("x", "float32", np.linspace(-1, 1, 400), codec="zstd", frame=checksum_frame)])
    simple("raw_none_multichunk", "raw none split into chunks of 1, 7 and 92 bytes (chunk boundaries inside "
           "elements)", "§6.2 §7.2", [raw_t("x", "float64", np.linspace(0, 1, 25).reshape(5, 5), chunks=[1, 7, 192])])
    simple("raw_zstd_multichunk", "raw zstd, one frame per chunk, uneven chunks", "§6.2 §7.2",
           [raw_t("x", "int64", np.arange(300) * 1234567, codec="zstd", chunks=[800, 3, 1597])])
    simple("raw_0d", "0-d tensors (shape [], one element) of several dtypes", "§5.3",
           [raw_t("f", "float32", np.array(2.5)), raw_t("i", "int64", np.array(-7)),
            raw_t("b", "bool", np.array(1)), raw_t("h", "bfloat16", np.array(0x4049, dtype="<u2"))])
    simple("raw_one_element", "1-element tensors", "§5.3",
           [raw_t("a", "float16", np.array([0x3C00], dtype="<u2")), raw_t("b", "uint64", np.array([[2**64 - 1]]))])
    simple("empty_tensors", "tensors with 0 elements: no chunks, index entry (0, 0)", "§5.3 §6.2 §9.1",
           [raw_t("a", "float32", np.zeros((0, 3))), raw_t("b", "int8", np.zeros((4, 0, 2))),
            raw_t("c", "bool", np.zeros(0), codec="zstd"), raw_t("d", "uint8", np.arange(3))])
    simple("empty_dim_at_element_limit", "shape [2^36, 0]: 0 elements; with the 0 counted as 1, exactly §12's "
           "element limit", "§5.3 §12", [T("x", "uint8", [1 << 36, 0], "raw", {"codec": "none"}, [], b"")])
    simple("ndim_8", "8 dimensions (the limit)", "§12", [raw_t("x", "int16", np.arange(256).reshape((2,) * 8))])
    simple("no_tensors", "a file with no tensors (index is the tag alone)", "§9", [])

    # compressed manifest (§4 ZSTD_MANIFEST, §5.0; format 1.3)
    def zman(name, what, ts, compress, metadata=None, minor=None):
        f = assemble(ts, metadata=metadata, compress=compress)
        if minor is not None:
            f.minor = minor
        V(name, what, "§4 §5.0", f.build(), expected_list(ts))

    zman("manifest_zstd", "the invalid vectors' base file (every 1.0 mode, several chunks per stream, an alias, "
         "empty tensors) with its manifest stored as one zstd frame (level 19, content size, no checksum), "
         "ZSTD_MANIFEST set, Minor_Version 3", base(), zstd_manifest)
    zman("manifest_zstd_raw_blocks", "a compressed manifest whose frame is single-segment Raw blocks (a "
         "frame longer than the manifest is still valid: compressing is the encoder's choice)", base(), zstd_frame)
    zman("manifest_zstd_checksum", "a compressed manifest whose frame carries a content checksum", base(),
         lambda m: __import__("zstandard").ZstdCompressor(level=3, write_checksum=True).compress(m))
    zman("manifest_zstd_multiblock", "a compressed manifest of 300,000 bytes (metadata holding a long string) in "
         "Raw blocks of at most 128 KiB, 4-byte Frame_Content_Size", base(), zstd_frame,
         metadata={"notes": "x" * 299_800})
    def windowed_frame(m: bytes) -> bytes:  # descriptor 0x80: 4-byte content size, a 2^17 window, Raw blocks
        return b"\x28\xb5\x2f\xfd\x80" + bytes([(17 - 10) << 3]) + struct.pack("<I", len(m)) + zstd_blocks(m)
    zman("manifest_zstd_window_descriptor", "a compressed manifest whose frame has a Window_Descriptor (2^17) and "
         "a 4-byte Frame_Content_Size (not single-segment)", base(), windowed_frame)
    zman("manifest_zstd_minor_0", "ZSTD_MANIFEST set in a file declaring Minor_Version 0: a decoder does not "
         "compare what a file uses with its Minor_Version (§3, §13)", base(), zstd_manifest, minor=0)

    # uniform
    r = rng(1)
    simple("uniform_tensor_float32", "uniform, one step for the tensor, float32", "§7.3",
           [uniform_t("w", "float32", (8, 16), r.integers(-7, 8, 128), [-20])])
    simple("uniform_channel_float32", "uniform, one step per output channel (shape[0] = 4), float32", "§7.3",
           [uniform_t("w", "float32", (4, 3, 5), r.integers(-9, 10, 60), [-30, 0, 7, 12], "channel")])
    for dt, g, codes in (("float64", "tensor", [-41]), ("float64", "channel", [-3, -60, 9]),
                         ("float16", "tensor", [-17]), ("float16", "channel", [-10, -11, -12]),
                         ("bfloat16", "tensor", [-5]), ("bfloat16", "channel", [-33, 2, 40])):
        shape = (len(codes), 11) if g == "channel" else (6, 7)
        n = shape[0] * shape[1]
        simple(f"uniform_{g}_{dt}", f"uniform, granularity {g}, dtype {dt} (levels x step rounded to {dt})",
               "§7.3 §7.3.2", [uniform_t("w", dt, shape, r.integers(-300, 301, n), codes, g)])
    simple("uniform_0d", "uniform 0-d tensor (A = 1, no chunk)", "§7.3",
           [uniform_t("s", "float32", (), [5], [-4])])
    simple("uniform_one_element_A2", "1 element coded with a 2-symbol table (one chunk, one symbol)", "§7.3 §8",
           [uniform_t("x", "float32", (1,), [1], [0], freqs=[1 << 23, 1 << 23], q_min=0)])
    simple("uniform_single_symbol", "A = 1: constant tensor, no chunks, q_min = -3", "§7.3.1 §7.3.2",
           [uniform_t("c", "bfloat16", (3, 4), np.full(12, -3), [5]),
            uniform_t("z", "float16", (2, 2), np.zeros(4), [0, 0], "channel")])
    lv = np.concatenate([np.arange(65536), rng(2).integers(0, 65536, 256)]) - (1 << 20)
    simple("uniform_max_alphabet", "A = 65536 (the limit), q_min = -2^20 (the lowest level), every symbol used",
           "§7.3.1 §12", [uniform_t("x", "float32", (257, 256), lv, [-160])])
    lv = (1 << 20) - rng(3).integers(0, 65536, 4096)
    lv[0], lv[1] = 1 << 20, (1 << 20) - 65535
    simple("uniform_max_level_f16_subnormals", "levels up to 2^20 (the highest), step 2^-40 (code -160), "
           "float16: results rounded into the subnormal range", "§7.1 §7.3.2 §12",
           [uniform_t("x", "float16", (64, 64), lv, [-160])])
    simple("uniform_step_code_max_overflow", "step code 103 (the largest): float16 overflows to +-inf, "
           "bfloat16 and float32 exact or rounded", "§7.1 §7.3.2",
           [uniform_t("h", "float16", (5,), [-2, -1, 0, 1, 2], [103]),
            uniform_t("b", "bfloat16", (5,), [-2, -1, 0, 1, 2], [103]),
            uniform_t("f", "float32", (5,), [-2, -1, 0, 1, 2], [103]),
            uniform_t("g", "float32", (3,), [(1 << 20) - 2, (1 << 20) - 1, 1 << 20], [103])])
    simple("uniform_every_step_code", "every step code -160..103 once (one channel each)", "§7.1",
           [uniform_t("x", "float32", (264, 3), rng(4).integers(-3, 4, 792), list(range(-160, 104)), "channel")])
    simple("uniform_rounding_ties_f16", "float16 round-to-nearest-even ties (2049 -> 2048, 2051 -> 2052, "
           "65520 -> inf) and the largest finite value", "§7.3.2",
           [uniform_t("x", "float16", (2, 6), [2049, 2051, -2049, 1025, 2050, 4097,
                                              16376, 16379, 16380, -16380, 0, 1], [0, 8], "channel")])
    simple("uniform_rounding_ties_bf16", "bfloat16 round-to-nearest-even ties (257 -> 256, 259 -> 260) and "
           "23-bit values", "§7.3.2",
           [uniform_t("x", "bfloat16", (6,), [257, 259, -257, 258, 1, 0], [0]),
            uniform_t("y", "bfloat16", (5,), [1048575, 1048573, 1048574, 999999, 1000001], [-7])])
    simple("uniform_multichunk", "uniform symbols in chunks of 1000, 1 and 1999 symbols (a fresh range coder "
           "per chunk)", "§6.2 §7.3.2 §8",
           [uniform_t("x", "float32", (3000,), rng(5).integers(-40, 41, 3000), [-12], chunks=[1000, 1, 1999])])
    simple("uniform_channel_multichunk", "per-channel steps with chunk boundaries inside channels", "§7.3.2",
           [uniform_t("x", "bfloat16", (7, 13), rng(6).integers(-5, 6, 91), [-8, -7, -6, -5, -4, -3, -2],
                      "channel", chunks=[10, 50, 31])])
    f3 = [1 << 23, 1 << 22, 1 << 22]
    wv = [uniform_t("a", "float32", (4,), [0, 1, 2, 0], [0], freqs=f3),
          uniform_t("b", "float32", (1,), [2], [0], freqs=f3, q_min=0),
          uniform_t("c", "float32", (10,), [0] * 10, [0], freqs=[TOTAL - 1, 1], q_min=0)]
    for t, want in zip(wv, ([0x58000000], [0xC0000000], [0])):
        assert np.frombuffer(t.chunks[0].payload, "<u4").tolist() == want, "§8.7 worked vector differs"
    simple("rangecoder_worked_vectors", "the worked vectors of §8.7: [0,1,2,0] -> word 0x58000000; [2] -> "
           "0xC0000000; ten 0s with [2^24-1, 1] -> word 0", "§8.7", wv)
    cases = find_rc_cases()
    assert set(cases) == {"carry", "pending", "extra"}, sorted(cases)
    ts = []
    for k, (syms, f, words) in sorted(cases.items()):
        t = uniform_t(f"rc_{k}", "float32", (len(syms),), syms, [0], freqs=f, q_min=0)
        assert np.frombuffer(t.chunks[0].payload, "<u4").tolist() == words, "tqcodec's coder differs from §8.3"
        ts.append(t)
    simple("rangecoder_rare_branches", "payloads that exercise §8.3's pending words resolved without and with "
           "a carry, and the seal's extra 0 word", "§8.3", ts)
    skew = [1] * 255 + [TOTAL - 255]
    simple("rangecoder_skewed_table", "a 256-symbol table with 255 frequencies of 1 (renormalisation on "
           "nearly every rare symbol)", "§8",
           [uniform_t("x", "float32", (2000,), rng(7).choice([0, 17, 254, 255, 255, 255, 255, 255], 2000), [-2],
                      freqs=skew, q_min=0)])

    # alias
    w = uniform_t("w", "float32", (4, 8), rng(8).integers(-3, 4, 32), [-6, -5, -4, -3], "channel")
    b = raw_t("b", "bfloat16", np.arange(0x3F00, 0x3F10, dtype="<u2"))
    s = raw_t("s", "int32", np.array(99))
    e = raw_t("e", "float32", np.zeros((0, 2)))
    ts = [w, b, s, e]
    ts += [alias_t("w_tied", 0, w), alias_t("b_tied", 1, b), alias_t("s_tied", 2, s), alias_t("e_tied", 3, e),
           alias_t("w_tied_again", 0, w)]
    simple("alias", "tied tensors: aliases of a uniform, a raw bf16, a 0-d and an empty tensor; two aliases of "
           "one tensor", "§7.4", ts)

    # manifest, names, metadata
    meta = {"ints": [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -1, -32, -33, -128, -129,
                     -32768, -32769, -2**31, -2**31 - 1, -2**63],
            "floats": [0.5, -0.0, float("inf"), float("-inf"), 1e300],
            "nan": float("nan"), "nil": None, "t": True, "f": False, "bin": b"\x00\x01\xff", "bin16": bytes(300),
            "str8": "x" * 32, "str16": "y" * 300, "str32": "z" * 65536, "arr16": list(range(16)),
            "map16": {f"k{i:02d}": i for i in range(16)}, "empty": {}, "emptyarr": [], "": "empty key",
            "Z": 1, "a": 2, "\u00e9": 3, "\uffff": 4, "\U0001F600": 5, "tqz.note": "reserved prefix, readable"}
    deep = "leaf"
    for _ in range(14):
        deep = [deep]
    meta["deep"] = deep[0]  # depth: manifest 1, metadata 2, "deep" arrays 3..15, leaf 16
    simple("metadata_all_types", "metadata with every MessagePack type and length form, keys sorted by UTF-8 "
           "bytes (U+FFFF before U+1F600), nesting depth exactly 16", "§5.1 §5.2",
           [raw_t("x", "uint8", np.arange(4))], metadata=meta)
    simple("metadata_max_entries", "4096 metadata entries (the limit)", "§12",
           [raw_t("x", "uint8", np.arange(4))], metadata={f"key{i:05d}": i for i in range(4096)})
    t = raw_t("x", "int8", np.arange(-3, 3))
    t.record["zz_future_record_key"] = {"ignored": True}
    simple("manifest_unknown_keys", "unknown top-level manifest key and unknown tensor-record key (both "
           "reserved for later minor versions): ignored", "§5.2 §5.3",
           [t], extra={"a_future_key": [1, 2, 3], "zzz": None})
    f = assemble([raw_t("x", "float32", np.arange(6.0))])
    f.minor, f.optional = 9, 0xFFFFFFFF
    V("future_minor_and_optional_features", "minor version 9 and every optional feature bit set: read as 1.0",
      "§4 §13", f.build(), expected_list([raw_t("x", "float32", np.arange(6.0))]))
    names = ["a.b", "layer.0.weight", "dense/kernel:0", "..a", "a..", ".hidden", "a/b/c", "\u00e9/\u00fc",
             "sp ace", "\U0001F600", "x" * 1022 + "\u00e9", "~!@#$%^&*()[]{}|;'\",<>?", "a//b", "a/",
             "c1\u0085control", "rtl\u202eoverride"]
    simple("tensor_names", "names allowed by §5.4 (dots inside segments, ':', unicode, 1024 UTF-8 bytes, empty "
           "segments 'a//b' and 'a/', C1 control U+0085 and U+202E, which §5.4 does not forbid)", "§5.4",
           [raw_t(n, "uint8", np.array([i])) for i, n in enumerate(names)])
    ts = []
    r = rng(9)
    for i in range(1000):
        k = i % 4
        if k == 0:
            ts.append(raw_t(f"t{i:04d}", "float32", r.standard_normal(3)))
        elif k == 1:
            ts.append(uniform_t(f"t{i:04d}", "float16", (2, 3), r.integers(-2, 3, 6), [-3]))
        elif k == 2:
            ts.append(uniform_t(f"t{i:04d}", "float32", (2,), [i, i], [0]))
        else:
            ts.append(alias_t(f"t{i:04d}", i - 3, ts[i - 3]))
    simple("many_tensors", "1000 tensors: raw, uniform, constant uniform and aliases", "§5.2 §9", ts)

    # ancillary chunks
    ts = [raw_t("a", "float32", np.arange(4.0), chunks=[8, 8]), uniform_t("b", "float32", (10,), np.arange(10), [0]),
          uniform_t("c", "float32", (2,), [3, 3], [0])]
    anc = [(0, Chunk(b"before everything", chunk_type=0x8000)),
           (1, Chunk(b"", chunk_type=0xFFFF, stream=7, tensor_index=99, sequence=5, item_count=0)),
           (1, Chunk(b"two in a row", chunk_type=0x8001, stream=65535, tensor_index=0xFFFFFFFF,
                     sequence=0xFFFFFFFF, item_count=0xFFFFFFFF)),
           (2, Chunk(b"\x00" * 100, chunk_type=0xC001)),
           (3, Chunk(b"after the last tensor", chunk_type=0x8002))]
    f = assemble(ts, ancillary=anc)
    # assemble sets fields only on DATA chunks of tensors; ancillary fields stay as given
    V("ancillary_chunks", "ancillary chunks (bit 15 of Chunk_Type) before the first tensor, between tensors, "
      "after the last; empty payload; unused fields non-zero: all skipped", "§6.1 §6.2", f.build(), expected_list(ts))

    # made by tqcodec's encoder
    enc = [("encoder_default", "tqcodec.save defaults (mode auto: uniform for 2-d+ floats, raw zstd/none "
            "for the rest)", {}),
           ("encoder_mode_uniform_tensor_snr60", "mode uniform for every float tensor, granularity tensor, "
            "snr_db 60", {"mode": "uniform", "granularity": "tensor", "snr_db": 60.0}),
           ("encoder_mode_uniform_channel_snr12", "mode uniform, granularity channel, snr_db 12",
            {"mode": "uniform", "granularity": "channel", "snr_db": 12.0}),
           ("encoder_mode_raw", "mode raw (everything exact)", {"mode": "raw"}),
           ("encoder_lossless_metadata", "lossless=True and user metadata", {"lossless": True,
            "metadata": {"model": "test", "layers": 3, "lr": 1e-3, "tags": ["a", "b"], "cfg": {"d": 16}}})]
    for name, what, opts in enc:
        data = encode_with_tqcodec(model_state(), **opts)
        V(name, what, "§7 (all modes the encoder writes)", data, expected_by_spec(data),
          notes=ENC_NOTE)
    sd = model_state(1)
    sd["tied.a"] = sd["fc.weight"]
    sd["tied.b"] = sd["emb.weight"]
    sd["tied.c"] = sd["ids"]
    with small_chunks(100, 64):
        data = encode_with_tqcodec(sd, metadata={"note": "tied and multi-chunk"})
    V("encoder_tied_multichunk", "tqcodec.save with shared-storage tensors (alias) and small chunks (100 "
      "symbols, 64 bytes) so most tensors span several chunks", "§6.2 §7.4", data, expected_by_spec(data),
      notes=ENC_NOTE)
    sd = model_state(2)
    sd["tied.fc"] = sd["fc.weight"]
    with small_chunks(64, 32):
        data = encode_with_tqcodec(sd, mode="uniform", granularity="tensor", snr_db=25.5, lossless=False,
                                   metadata={"every": "option", "n": [1, 2.5, None, True, b"\x00"]})
    V("encoder_every_option", "tqcodec.save with every option at once: mode uniform, granularity tensor, "
      "snr_db 25.5, metadata, a tied tensor, chunks of 64 symbols / 32 bytes", "§6.2 §7", data,
      expected_by_spec(data), notes=ENC_NOTE)
    sd = {"nan": torch.tensor([[1.0, float("nan")], [float("inf"), -0.0]]).repeat(10, 10),
          "ok": torch.randn(16, 16, generator=torch.Generator().manual_seed(3))}
    data = encode_with_tqcodec(sd, mode="uniform")
    V("encoder_nonfinite_fallback", "mode uniform with a tensor holding NaN/inf: the encoder stores it raw",
      "§7.2", data, expected_by_spec(data), notes=ENC_NOTE)

    # spec 1.2 clarifications
    simple("tensor_named_metadata", "a tensor named '__metadata__' (valid, §5.4) and one named 'x': the protocol "
           "writes the first under the safetensors key '/__metadata__' (expected.safetensors has keys "
           "'/__metadata__' and 'x')", "§5.4",
           [raw_t("__metadata__", "float32", np.array([1.5, -2.0])), raw_t("x", "uint8", np.arange(3))])


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 4 * 4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def tq_encoder_file(seed: int, stats: bool, bits: float) -> bytes:
    """tqcodec.save(mode="tq") of a tiny seeded model, with stats from tqcodec.calibrate or without."""
    sd, st = tiny_state(seed, stats)
    return encode_with_tqcodec(sd, mode="tq", bits=bits, stats=st)


def tq_base():
    """Base file of the tq invalid vectors (format 1.1): two coded bands; a float16 transform (k = 3 <
    min(m, n) = 6); a constant band (A = 1, no chunks); a [1] tensor; a raw tensor after them."""
    r = rng(300)
    return [
        tq_t("q", "float32", (6, 16), [(r.integers(-4, 5, (2, 16)), -6), (r.integers(-20, 3, (4, 16)), -9)],
             chunks=[None, [40, 24]]),
        tq_t("s", "float32", (6, 8), [(r.integers(-9, 10, (1, 6)), -5), (r.integers(-9, 10, (2, 6)), -7)],
             S=rng(301).standard_normal((8, 3)) * 0.3),
        tq_t("k", "bfloat16", (3, 4), [(np.full((3, 4), 2), 0)]),
        tq_t("one", "float16", (1,), [(np.full((1, 1), 3), -2)]),
        raw_t("r", "int8", np.arange(-3, 3)),
    ]


TQ_Q, TQ_S, TQ_K, TQ_ONE, TQ_R = range(5)


def make_tq_invalid(out: Out):
    X = out.invalid
    S7 = "§7.5.1"

    def ts_x(name, what, spec, ts, code):
        f = assemble(ts)
        assert f.minor == 1
        X(name, what, spec, f.build(), code)

    def rec(name, what, code, i, change, spec=S7):
        ts = tq_base()
        change(ts[i].record)
        ts_x(name, what, spec, ts, code)

    def par(name, what, code, i, change, spec=S7):
        rec(name, what, code, i, lambda r: change(r["params"]), spec)

    def put(k, v):
        return lambda p: p.__setitem__(k, v)

    def put_at(k, j, v):
        return lambda p: p[k].__setitem__(j, v)

    BTR = "BAD_TENSOR_RECORD"
    # rule 1: keys and types
    par("tq_params_unknown_key", "tq params with an unknown key 'scale'", BTR, TQ_Q, put("scale", 1))
    for k in ("band_rows", "steps", "q_min", "counts"):
        par(f"tq_params_missing_{k}", f"tq params without '{k}'", BTR, TQ_Q, lambda p, k=k: p.pop(k))
    par("tq_band_rows_not_array", "band_rows is an integer", BTR, TQ_ONE, put("band_rows", 1))
    par("tq_band_rows_bool", "band_rows [true, 2] (a bool where the integer 1 belongs)", BTR, TQ_S,
        put_at("band_rows", 0, True))
    par("tq_band_rows_float", "band_rows [2.0, 4]", BTR, TQ_Q, put_at("band_rows", 0, 2.0))
    par("tq_steps_bool", "steps with a bool (true) among integers", BTR, TQ_Q, put_at("steps", 1, True))
    par("tq_steps_nested", "steps as one-element arrays", BTR, TQ_Q,
        lambda p: p.update(steps=[[c] for c in p["steps"]]))
    par("tq_steps_float", "steps with an integral float (-9.0)", BTR, TQ_Q, put_at("steps", 1, -9.0))
    par("tq_steps_not_array", "steps is an integer", BTR, TQ_ONE, put("steps", -2))
    par("tq_q_min_bool", "q_min with a bool (false) among integers", BTR, TQ_Q, put_at("q_min", 0, False))
    par("tq_q_min_float", "q_min with a float", BTR, TQ_Q, lambda p: p["q_min"].__setitem__(1, float(p["q_min"][1])))
    par("tq_q_min_not_array", "q_min is an integer", BTR, TQ_ONE, put("q_min", 3))
    par("tq_counts_str", "counts with a string element (the counts' bytes as text)", BTR, TQ_ONE,
        put_at("counts", 0, "\x01"))
    par("tq_counts_int_array", "counts with an array of integers instead of a bin", BTR, TQ_ONE,
        put_at("counts", 0, [1]))
    par("tq_counts_not_array", "counts is a bin, not an array of bins", BTR, TQ_ONE, put("counts", b"\x01"))
    par("tq_layout_int", "layout is an integer", BTR, TQ_Q, put("layout", 0))
    par("tq_transform_nil", "transform is nil", BTR, TQ_Q, put("transform", None))
    par("tq_transform_bool", "transform is true", BTR, TQ_S, put("transform", True))
    # rule 2
    rec("tq_int_dtype", "tq with dtype int32", BTR, TQ_Q, lambda r: r.update(dtype="int32"))
    rec("tq_bool_dtype", "tq with dtype bool", BTR, TQ_K, lambda r: r.update(dtype="bool"))
    rec("tq_0d", "tq 0-d tensor (shape [], one element; band_rows [1])", BTR, TQ_ONE, lambda r: r.update(shape=[]))
    rec("tq_empty_tensor", "tq tensor with 0 elements (shape [0, 4])", BTR, TQ_K, lambda r: r.update(shape=[0, 4]))
    # rule 3
    par("tq_layout_unknown", "layout 'in-out'", BTR, TQ_Q, put("layout", "in-out"))
    par("tq_layout_case", "layout 'OUT_IN'", BTR, TQ_Q, put("layout", "OUT_IN"))
    rec("tq_in_out_3d", "layout in_out on a 3-D tensor [6, 16, 1]", BTR, TQ_Q,
        lambda r: (r.update(shape=[6, 16, 1]), r["params"].update(layout="in_out")))
    rec("tq_in_out_1d", "layout in_out on a 1-D tensor [1]", BTR, TQ_ONE, lambda r: r["params"].update(layout="in_out"))
    par("tq_transform_unknown", "transform 'float32'", BTR, TQ_S, put("transform", "float32"))
    par("tq_transform_case", "transform 'Float16'", BTR, TQ_S, put("transform", "Float16"))
    # rule 5: band counts and rows
    par("tq_bands_0", "B = 0 (band_rows, steps, q_min, counts empty)", BTR, TQ_K,
        lambda p: p.update(band_rows=[], steps=[], q_min=[], counts=[]))
    t = tq_t("x", "float32", (4097, 1), [(np.full((1, 1), i % 5), -3) for i in range(4097)])
    ts_x("tq_bands_4097", "B = 4097 one-row bands (A_b = 1 each, consistent otherwise)", S7, [t], BTR)
    par("tq_steps_length_more", "steps with B + 1 entries", BTR, TQ_Q, lambda p: p["steps"].append(0))
    par("tq_steps_length_less", "steps with B - 1 entries", BTR, TQ_Q, lambda p: p["steps"].pop())
    par("tq_q_min_length_more", "q_min with B + 1 entries", BTR, TQ_Q, lambda p: p["q_min"].append(0))
    par("tq_counts_length_less", "counts with B - 1 entries", BTR, TQ_Q, lambda p: p["counts"].pop())
    par("tq_counts_length_more", "counts with B + 1 entries", BTR, TQ_Q, lambda p: p["counts"].append(b"\x01"))
    par("tq_band_rows_zero", "a band of 0 rows added (steps, q_min, counts have B entries; its counts '00')",
        BTR, TQ_Q, lambda p: (p["band_rows"].insert(1, 0), p["steps"].insert(1, 0), p["q_min"].insert(1, 0),
                              p["counts"].insert(1, b"\x00")))
    par("tq_band_rows_negative", "band_rows [3, -1, 4] (sum 6)", BTR, TQ_Q,
        lambda p: (p["band_rows"].__setitem__(0, 3), p["band_rows"].insert(1, -1), p["steps"].insert(1, 0),
                   p["q_min"].insert(1, 0), p["counts"].insert(1, b"\x01")))
    r = rng(310)
    ts_x("tq_k_less_than_n", "transform none, bands of 2 + 3 rows for a [6, 5] tensor (k = 5 != n = 6; counts "
         "and streams consistent with the bands)", S7,
         [tq_t("q", "float32", (6, 5), [(r.integers(-4, 5, (2, 5)), -6), (r.integers(-4, 5, (3, 5)), -6)],
               check=False)], BTR)
    ts_x("tq_k_more_than_n", "transform none, bands of 3 + 4 rows for a [6, 5] tensor (k = 7 != n = 6)", S7,
         [tq_t("q", "float32", (6, 5), [(r.integers(-4, 5, (3, 5)), -6), (r.integers(-4, 5, (4, 5)), -6)],
               check=False)], BTR)
    ts_x("tq_k_over_m_transform", "transform float16, k = 5 > min(m, n) = m = 4 for a [6, 4] tensor (S is 4 x 5, "
         "stream 0 of 40 bytes)", S7,
         [tq_t("s", "float32", (6, 4), [(r.integers(-4, 5, (5, 6)), -6)], S=r.standard_normal((4, 5)),
               check=False)], BTR)
    ts_x("tq_k_over_n_transform", "transform float16, k = 4 > min(m, n) = n = 3 for a [3, 8] tensor", S7,
         [tq_t("s", "float32", (3, 8), [(r.integers(-4, 5, (4, 3)), -6)], S=r.standard_normal((8, 4)),
               check=False)], BTR)
    # rule 6
    for label, v in (("below", -161), ("above", 104), ("huge", 2**64 - 1), ("min_i64", -2**63)):
        par(f"tq_step_code_{label}", f"band 1's step code {v}", "BAD_STEP", TQ_Q, put_at("steps", 1, v),
            "§7.1 §7.5.1")
    # rule 7: counts
    ts = tq_base()
    c0 = unleb128(ts[TQ_Q].record["params"]["counts"][0])
    assert c0[0] < 128 and len(c0) >= 2

    def cnt(name, what, blob, code="BAD_TABLE", i=TQ_Q, b=0, qmin=None):
        def ch(p):
            p["counts"][b] = blob
            if qmin is not None:
                p["q_min"][b] = qmin
        par(name, f"band {b}'s counts: {what}", code, i, ch)

    q0 = tq_base()[TQ_Q].record["params"]["q_min"][0]
    cnt("tq_counts_overlong", f"first count {c0[0]} written overlong ({c0[0] | 0x80:02x} 00)",
        bytes([c0[0] | 0x80, 0]) + leb128(c0[1:]))
    cnt("tq_counts_varint_7_bytes", "first count written in 7 bytes (80 x6 then 00 is overlong too; here "
        "ff ff ff ff ff ff 01: > 42 bits)", b"\xff" * 6 + b"\x01" + leb128(c0[1:]))
    cnt("tq_counts_truncated", "the last varint cut (high bit set on the last byte)", leb128(c0) + b"\x80")
    cnt("tq_counts_zero_first", "a 0 count first (q_min one lower: the same levels)", leb128([0] + c0), qmin=q0 - 1)
    cnt("tq_counts_zero_last", "a 0 count last", leb128(c0 + [0]))
    cnt("tq_counts_sum_high", "counts adding up to the band's symbols + 1", leb128([c0[0] + 1] + c0[1:]))
    cnt("tq_counts_sum_low", "counts adding up to the band's symbols - 1 (A = 1 band: one count 11 for 12)",
        leb128([11]), i=TQ_K)
    cnt("tq_counts_empty", "an empty bin (A = 0)", b"")
    cnt("tq_counts_zero_only", "a single count 0 (A = 1, sum 0)", b"\x00", i=TQ_ONE)
    t = tq_t("x", "float32", (1, 65537), [(np.arange(65537).reshape(1, 65537) - 32768, -20)], check=False)
    ts_x("tq_alphabet_65537", "a band with A = 65537 counts (each 1; levels -32768 .. 32768; its payload coded "
         "with the §8.6 table of those counts)", S7, [t], "BAD_TABLE")
    par("tq_q_min_below_limit", "q_min = -2^20 - 1 (A = 1 band)", "LIMIT_EXCEEDED", TQ_K,
        put_at("q_min", 0, -(1 << 20) - 1),
        "§7.5.1 §12")
    A1 = len(unleb128(tq_base()[TQ_Q].record["params"]["counts"][1]))
    par("tq_q_max_above_limit", f"band 1: q_min = 2^20 - {A1 - 2} with A = {A1} (top level 2^20 + 1)",
        "LIMIT_EXCEEDED", TQ_Q, put_at("q_min", 1, (1 << 20) - A1 + 2), "§7.5.1 §12")
    par("tq_q_min_i64_max_wraps", f"band 1: q_min = 2^63 - 1 with A = {A1} (q_min + A - 1 overflows signed "
        "64-bit arithmetic)", "LIMIT_EXCEEDED", TQ_Q, put_at("q_min", 1, 2**63 - 1), "§7.5.1 §12")
    par("tq_band_rows_sum_wraps_u64", "band_rows [2^63 + 2, 2^63 + 4]: the sum is 2^64 + 6, which is n = 6 "
        "modulo 2^64", BTR, TQ_Q, put("band_rows", [2**63 + 2, 2**63 + 4]))
    par("tq_band_rows_huge", "band_rows [2, 2^64 - 1]", BTR, TQ_Q, put_at("band_rows", 1, 2**64 - 1))
    par("tq_q_min_u64_max", "q_min = 2^64 - 1", "LIMIT_EXCEEDED", TQ_ONE, put_at("q_min", 0, 2**64 - 1), "§7.5.1 §12")
    par("tq_q_min_i64_min", "q_min = -2^63", "LIMIT_EXCEEDED", TQ_ONE, put_at("q_min", 0, -2**63), "§7.5.1 §12")

    # streams (§7.5.2, §6.2)
    S72 = "§6.2 §7.5.2"

    def chunks_x(name, what, change, code="BAD_CHUNK", spec=S72):
        ts = tq_base()
        change(ts)
        ts_x(name, what, spec, ts, code)

    def recode(t, b, syms):
        p = t.record["params"]
        freqs = frequencies_from_counts(np.array(unleb128(p["counts"][b])))
        return Chunk(np.asarray(encode_symbols(np.array(syms, dtype=np.int32), freqs), "<u4").tobytes(),
                     stream=1 + b, item_count=len(syms))

    def band_chunks(t, b):
        return [c for c in t.chunks if c.stream == 1 + b]

    def more(ts):
        t = ts[TQ_Q]
        i = t.chunks.index(band_chunks(t, 0)[0])
        t.chunks[i] = recode(t, 0, [0, 1] * 16 + [1])
    chunks_x("tq_band_items_more", "band 0's stream holds 33 symbols (one chunk, correctly coded) for a band of "
             "2 x 16", more)

    def fewer(ts):
        t = ts[TQ_Q]
        i = t.chunks.index(band_chunks(t, 0)[0])
        t.chunks[i] = recode(t, 0, [0, 1] * 15 + [1])
    chunks_x("tq_band_items_fewer", "band 0's stream holds 31 symbols for a band of 2 x 16 (the next band follows)",
             fewer)
    chunks_x("tq_band_chunk_missing", "band 1's last chunk missing (24 of 64 symbols short)",
             lambda ts: ts[TQ_Q].chunks.pop())
    chunks_x("tq_chunk_for_single_symbol_band", "a chunk in the stream of a band with A_b = 1",
             lambda ts: ts[TQ_K].chunks.append(Chunk(b"\x00" * 4, stream=1, item_count=12)))
    chunks_x("tq_chunk_stream_0_without_transform", "a stream 0 chunk (2 bytes) in a tq tensor without transform",
             lambda ts: ts[TQ_Q].chunks.insert(0, Chunk(b"\x00\x3c", stream=0, item_count=2)))
    chunks_x("tq_chunk_stream_past_bands", "a chunk in stream 1 + B (no such band)",
             lambda ts: ts[TQ_Q].chunks.append(Chunk(b"\x00" * 4, stream=3, item_count=1)))

    def swap_bands(ts):
        t = ts[TQ_Q]
        t.chunks = band_chunks(t, 1) + band_chunks(t, 0)
    chunks_x("tq_band_streams_out_of_order", "band 1's chunks before band 0's (stream order)", swap_bands)
    chunks_x("tq_transform_stream_short", "stream 0 holds 2mk - 2 bytes", lambda ts: setattr(
        ts[TQ_S].chunks[0], "payload", ts[TQ_S].chunks[0].payload[:-2]) or setattr(
        ts[TQ_S].chunks[0], "item_count", len(ts[TQ_S].chunks[0].payload)))
    chunks_x("tq_transform_stream_long", "stream 0 holds 2mk + 2 bytes", lambda ts: setattr(
        ts[TQ_S].chunks[0], "payload", ts[TQ_S].chunks[0].payload + b"\x00\x00") or setattr(
        ts[TQ_S].chunks[0], "item_count", len(ts[TQ_S].chunks[0].payload)))
    chunks_x("tq_transform_stream_missing", "transform float16 but no stream 0 chunk",
             lambda ts: ts[TQ_S].chunks.pop(0))

    def split_uneven(ts):
        # stream 0 in two chunks whose Item_Counts add up and whose payloads concatenate to S, but
        # chunk 0 carries 2 bytes more than it declares (and chunk 1 two fewer): §7.5.2's length rule
        t = ts[TQ_S]
        whole = t.chunks[0].payload
        a = 2 * (len(whole) // 4)
        t.chunks[0:1] = [Chunk(whole[:a + 2], stream=0, item_count=a),
                         Chunk(whole[a + 2:], stream=0, item_count=len(whole) - a)]
    chunks_x("tq_transform_chunk_length_not_items", "stream 0 split in two chunks: Payload_Length != Item_Count "
             "in each (sums and bytes right)", split_uneven)

    def payload(b, k, f):
        def ch(ts):
            c = band_chunks(ts[TQ_Q], b)[k]
            c.payload = f(c.payload)
        return ch
    chunks_x("tq_rc_append_word", "band 1's first chunk with one more word (0): not canonical",
             payload(1, 0, lambda p: p + b"\x00" * 4), "BAD_PAYLOAD", "§7.5.2 §8.5")
    chunks_x("tq_rc_seal_plus_1", "band 0's payload with its seal word + 1 (same symbols, not canonical)",
             payload(0, 0, lambda p: p[:-4] + struct.pack("<I", (struct.unpack("<I", p[-4:])[0] + 1) & 0xFFFFFFFF)),
             "BAD_PAYLOAD", "§7.5.2 §8.5")
    chunks_x("tq_rc_drop_word", "band 1's first payload without its last word", payload(1, 0, lambda p: p[:-4]),
             "BAD_PAYLOAD", "§7.5.2 §8.5")
    chunks_x("tq_rc_length_0", "band 0's payload of 0 bytes", payload(0, 0, lambda p: b""), "BAD_CHUNK",
             "§7.5.2 §7.3.2")
    chunks_x("tq_rc_length_not_multiple_of_4", "band 1's second payload of 4n + 1 bytes",
             payload(1, 1, lambda p: p + b"\x00"), "BAD_CHUNK", "§7.5.2 §7.3.2")

    def tq_other_table(ts):
        p = ts[TQ_Q].record["params"]
        c = unleb128(p["counts"][1])
        d = 1 if c[-1] > 1 else -1
        p["counts"][1] = leb128([c[0] + d] + c[1:-1] + [c[-1] - d])
    chunks_x("tq_rc_other_counts", "band 1's counts replaced by other valid counts of the same A and sum (payloads "
             "coded with the first table)", tq_other_table, "BAD_PAYLOAD", "§7.5.1 §8.5")
    for label, bits in (("nan", 0x7E00), ("inf", 0x7C00), ("minus_inf", 0xFC00), ("nan_payload", 0x7C01)):
        def bad_s(ts, bits=bits):
            c = ts[TQ_S].chunks[0]
            c.payload = c.payload[:6] + struct.pack("<H", bits) + c.payload[8:]
        chunks_x(f"tq_transform_{label}", f"the float16 transform holds {bits:#06x} (entry 3)", bad_s,
                 "BAD_PAYLOAD", "§7.5.3")

    # spec 1.2 clarifications
    cnt("tq_counts_42_bit", "[2^42 - 1, 2^42 - 1] (two 6-byte varints: parse, first and last non-zero; the sum "
        "is not the band's 32 symbols; a decoder building the §8.6 table before the sum check overflows 64 "
        "bits)", leb128([(1 << 42) - 1] * 2))
    # base: valid/tq_transform_constant_bands (stream 0 is the tensor's only stream)
    t = tq_t("w", "float32", (4, 5), [(np.full((1, 4), -3), -4), (np.full((2, 4), 5), -6)],
             S=rng(209).standard_normal((5, 3)))
    t.chunks[0].payload = t.chunks[0].payload[:8] + struct.pack("<H", 0x7E00) + t.chunks[0].payload[10:]
    ts_x("tq_transform_nan_constant_bands", "valid/tq_transform_constant_bands with one transform entry "
         "(S[1, 1]) NaN: stored values are checked whether or not symbols follow", "§7.5.3", [t], "BAD_PAYLOAD")


def make_tq_valid(out: Out):
    V = out.valid

    def simple(name, what, spec, ts):
        V(name, what, spec, assemble(ts).build(), expected_list(ts))

    r = rng(200)
    simple("tq_none_one_band", "tq, transform none, one band, float32 [6, 10] (exact)", "§7.5",
           [tq_t("w", "float32", (6, 10), [(r.integers(-7, 8, (6, 10)), -12)])])
    simple("tq_none_bands", "tq, transform none, 4 bands of 1, 3, 2 and 6 rows with their own steps, q_min and "
           "tables", "§7.5.1 §7.5.3",
           [tq_t("w", "float32", (12, 9), [(r.integers(-3, 4, (1, 9)), -20), (r.integers(0, 40, (3, 9)), -8),
                                           (r.integers(-100, -90, (2, 9)), 3), (r.integers(-1, 2, (6, 9)), -30)])])
    simple("tq_single_symbol_bands", "tq bands with A_b = 1 (counts one varint, no chunks, every level q_min) "
           "between coded bands, and a tensor whose every band has A_b = 1 (no chunks at all)", "§7.5.2",
           [tq_t("a", "float32", (7, 4), [(np.full((2, 4), -5), -4), (r.integers(-2, 3, (3, 4)), -4),
                                          (np.full((2, 4), 9), 0)]),
            tq_t("b", "bfloat16", (3, 5), [(np.zeros((1, 5)), 7), (np.full((2, 5), -1), 7)])])
    lv = np.concatenate([np.arange(65536), rng(201).integers(0, 65536, 256)]) - (1 << 20)
    lv2 = (1 << 20) - rng(202).integers(0, 65536, 256 * 3)
    lv2[0], lv2[1] = 1 << 20, (1 << 20) - 65535
    simple("tq_max_alphabet_band", "tq band with A_b = 65536 (every symbol used) and q_min = -2^20; a second "
           "band whose levels reach 2^20 with A_b = 65536", "§7.5.1 §12",
           [tq_t("x", "float32", (260, 256), [(lv.reshape(257, 256), -160), (lv2.reshape(3, 256), -150)])])
    simple("tq_extreme_steps", "tq step codes -160 and 103 (the range ends): float16 overflows to +-inf and "
           "rounds into subnormals, bfloat16 and float32 exact or rounded", "§7.1 §7.5.3",
           [tq_t("h", "float16", (4, 3), [(np.array([[-2, -1, 0], [1, 2, 0]]), 103),
                                          (np.array([[1, 2, 3], [16384, 49152, 65535]]), -160)]),
            tq_t("b", "bfloat16", (2, 3), [(np.array([[-2, -1, 0]]), 103), (np.array([[1, 3, 65536]]), -160)]),
            tq_t("f", "float32", (2, 3), [(np.array([[-2, 1, 65530]]), 103),
                                          (np.array([[1, 3, -65530]]), -160)])])
    simple("tq_layout_in_out", "tq layout in_out: a [10, 6] tensor stored as R^T (n = shape[1] = 6 rows of "
           "m = 10), 2 bands", "§7.5.1 §7.5.3",
           [tq_t("w", "float32", (10, 6), [(r.integers(-9, 10, (2, 10)), -10), (r.integers(-9, 10, (4, 10)), -6)],
                 layout="in_out")])
    simple("tq_explicit_defaults", "tq params with the optional keys at their defaults written out (layout "
           "out_in, transform none)", "§7.5.1",
           [tq_t("w", "float32", (3, 4), [(r.integers(-4, 5, (3, 4)), -3)], explicit=True)])
    simple("tq_bias_m1", "tq 1-D tensors (m = 1, bias-like): float32 [16] in two bands, float16 [5]", "§7.5",
           [tq_t("b", "float32", (16,), [(r.integers(-50, 50, (10, 1)), -14), (r.integers(-5, 5, (6, 1)), -18)]),
            tq_t("c", "float16", (5,), [(r.integers(-50, 50, (5, 1)), -9)])])
    simple("tq_conv_4d", "tq conv weight [8, 3, 3, 3] (out_in: n = 8, m = 27), 3 bands", "§7.5.3",
           [tq_t("conv", "float32", (8, 3, 3, 3), [(r.integers(-6, 7, (2, 27)), -7), (r.integers(-6, 7, (3, 27)), -9),
                                                   (r.integers(-6, 7, (3, 27)), -11)])])
    for dt, code in (("float16", -14), ("bfloat16", -9), ("float64", -40)):
        simple(f"tq_dtype_{dt}", f"tq with dtype {dt} (levels x step rounded to {dt}), 2 bands", "§7.5.3",
               [tq_t("w", dt, (5, 7), [(r.integers(-300, 301, (2, 7)), code),
                                       (r.integers(-3000, 3001, (3, 7)), code - 3)])])
    simple("tq_multichunk", "tq bands split into several chunks (400 + 1 + 399 symbols, 7 + 33, one chunk)",
           "§6.2 §7.5.2",
           [tq_t("w", "float32", (30, 40), [(r.integers(-40, 41, (20, 40)), -12), (r.integers(-2, 3, (1, 40)), -5),
                                            (r.integers(-9, 9, (9, 40)), -4)],
                 chunks=[[400, 1, 399], [7, 33], None])])
    simple("tq_bands_4096", "B = 4096 bands (the limit) of one row each, mostly A_b = 1, every 7th coded",
           "§7.5.1", [tq_t("x", "float32", (4096, 3), [(np.full((1, 3), i % 5) if i % 7 else
                                                        np.array([[0, i % 3 + 1, 2]]), -3 - i % 4)
                                                       for i in range(4096)])])
    # float16 transform
    S = rng(203).standard_normal((12, 4)) * 0.3
    S[0, 0], S[1, 1], S[2, 2], S[3, 3] = 2.0 ** -24, -0.0, 65504.0, -(2.0 ** -14) + 2.0 ** -24  # subnormal, -0, max
    simple("tq_transform_reduced", "tq transform float16, k = 4 < min(m, n) = 8 (dimensionality reduction): "
           "[8, 12] tensor, R = (S C)^T, 2 bands; S holds 2^-24, -0, 65504 and minus the largest subnormal",
           "§7.5.2 §7.5.3",
           [tq_t("w", "float32", (8, 12), [(r.integers(-20, 21, (1, 8)), -6), (r.integers(-20, 21, (3, 8)), -8)],
                 S=S)])
    S = rng(204).standard_normal((6, 6)) * 0.5
    simple("tq_transform_full_tall", "tq transform float16, k = min(m, n) = m = 6 for a [10, 6] tensor "
           "(n > m), stream 0 split into chunks of 7, 50 and 15 bytes (inside float16 values)", "§7.5.2 §7.5.3",
           [tq_t("w", "float32", (10, 6), [(r.integers(-30, 31, (6, 10)), -7)], S=S, s_chunks=[7, 50, 15])])
    S = rng(205).standard_normal((27, 8)) * 0.2
    simple("tq_transform_conv", "tq transform float16 on a conv weight [8, 3, 3, 3]: k = min(27, 8) = 8, "
           "3 bands, float16 dtype", "§7.5.3",
           [tq_t("conv", "float16", (8, 3, 3, 3), [(r.integers(-9, 10, (2, 8)), -5), (r.integers(-9, 10, (3, 8)), -6),
                                                   (np.full((3, 8), 2), -9)], S=S)])
    S = rng(206).standard_normal((9, 3)) * 0.4
    simple("tq_transform_in_out_bf16", "tq transform float16 with layout in_out, bfloat16 [9, 5] (n = 5, m = 9, "
           "k = 3)", "§7.5.3",
           [tq_t("w", "bfloat16", (9, 5), [(r.integers(-15, 16, (3, 5)), -4)], layout="in_out", S=S)])
    S = rng(209).standard_normal((5, 3))
    simple("tq_transform_constant_bands", "tq transform float16 whose bands all have A_b = 1: stream 0 is the "
           "tensor's only stream", "§7.5.2 §7.5.3",
           [tq_t("w", "float32", (4, 5), [(np.full((1, 4), -3), -4), (np.full((2, 4), 5), -6)], S=S)])
    S = rng(207).standard_normal((4, 2))
    simple("tq_transform_float64", "tq transform float16 with dtype float64 (the binary32 result widened)",
           "§7.5.3", [tq_t("w", "float64", (6, 4), [(r.integers(-99, 100, (2, 6)), -10)], S=S)])
    # alias of a tq tensor
    w = tq_t("w", "float32", (4, 6), [(r.integers(-5, 6, (1, 6)), -3), (r.integers(-5, 6, (3, 6)), -2)])
    t = tq_t("t", "float32", (6, 4), [(r.integers(-5, 6, (2, 6)), -3)], S=rng(208).standard_normal((4, 2)))
    simple("tq_alias", "tq tensors aliased: an alias of a tq tensor without transform and of one with a "
           "float16 transform, next to a uniform tensor", "§7.4 §7.5",
           [w, uniform_t("u", "float32", (3, 3), r.integers(-2, 3, 9), [-4]), t, alias_t("w_tied", 0, w),
            alias_t("t_tied", 2, t)])
    # tqcodec's encoder
    for name, what, seed, st, bits in (
            ("encoder_tq_bits4", "tqcodec.save(mode='tq', bits=4) of a tiny seeded conv+MLP model, no calibration "
             "statistics", 0, False, 4.0),
            ("encoder_tq_stats", "tqcodec.save(mode='tq', bits=3, stats=tqcodec.calibrate(...)) of a tiny seeded "
             "conv+MLP model (biases as tq m = 1 tensors)", 1, True, 3.0)):
        data = tq_encoder_file(seed, st, bits)
        V(name, what + "; header Minor_Version 1", "§7.5 §13", data, expected_by_spec(data), notes=ENC_NOTE)

    # spec 1.2 clarifications
    bands = [(np.full((1, 65), 8192), 0), (np.full((63, 65), 1), 0), (np.full((1, 65), 8192), 0)]
    row = np.array([2048.0] + [1.0] * 63 + [-2048.0])
    ts = [tq_t("a", "float32", (65, 65), bands, S=np.tile(row, (65, 1))),
          tq_t("b", "float32", (65, 65), bands, S=np.tile(row[::-1], (65, 1)))]
    assert all(np.all(np.frombuffer(t.expected, "<f4") == 63.0) for t in ts)
    simple("tq_transform_long_sum", "tq transform float16, k = 65 terms per element in three constant bands "
           "(q_min 8192, 1, 8192; step 1): every element sums 2^24, 63 ones and -2^24 (tensor b: the mirrored "
           "order) = 63. Binary64 in any order gives 63; binary32 accumulation in index order gives 0 on a, "
           "in reverse order 0 on b, outside the bound 2^-20 * (2^25 + 63) = 32", "§7.5.3", ts)
    t0 = raw_t("t0", "float32", np.array([0.5, -1.0, 2.0]))
    ts = [t0, alias_t("t1", 0, t0), uniform_t("t2", "float32", (2, 2), [3, 3, 3, 3], [-1]),
          raw_t("t3", "int8", np.array([-1, 0, 1])),
          tq_t("t4", "float32", (3, 4), [(np.array([[0, 1, 2, 3], [1, 2, 3, 0]]), -2), (np.full((1, 4), 5), -3)]),
          raw_t("t5", "uint8", np.array([7, 8]))]
    anc = [(1, Chunk(b"after t0's group, before the chunk-less t1 and t2", chunk_type=0x8000)),
           (5, Chunk(b"after t4's last coded band (t4 complete: its last band has A_b = 1)", chunk_type=0x8001))]
    V("ancillary_around_chunkless_tensors", "ancillary chunks between groups (§6.2): one after t0's chunks with "
      "an alias and a constant uniform tensor (no groups) before t3's, one right after the last chunk of a tq "
      "tensor whose last band has A_b = 1 (the tensor is complete there)", "§6.2",
      assemble(ts, ancillary=anc).build(), expected_list(ts))


# --- tq row_band (spec 1.4, spec/mode-tq.md §7.5.1) ----------------------------------------------

def row_band_bands(levels: np.ndarray, band, codes) -> list:
    """tq_t's bands for rows of ``levels`` [k, c] grouped by ``band`` (each band's rows in order)."""
    band = np.asarray(band)
    return [(levels[band == b], code) for b, code in enumerate(codes)]


def row_band_base():
    """Base file of the row_band invalid vectors: a [9, 5] tensor in 3 bands named by row_band."""
    r = rng(400)
    band = [2, 0, 1, 0, 2, 2, 1, 0, 0]
    return [tq_t("w", "float32", (9, 5), row_band_bands(r.integers(-6, 7, (9, 5)), band, [-8, -4, 0]),
                 row_band=band),
            raw_t("r", "int8", np.arange(-3, 3))]


def embedding_state(seed: int, vocab: int = 120):
    """A tiny seeded embedding + linear model and its tqcodec.calibrate statistics from token ids whose
    frequencies follow no order of id (so the encoder's bands by frequency are sets of rows)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, 8)).eval()
    weights = 1.0 / (1.0 + torch.randperm(vocab, generator=g).float())
    ids = torch.multinomial(weights, 2048, replacement=True, generator=g).reshape(32, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = tqcodec.calibrate(model, [ids[i:i + 8] for i in range(0, 32, 8)])
    return model.state_dict(), st


def make_tq_row_band(out: Out):
    V, X = out.valid, out.invalid
    S7 = "§7.5.1"

    def simple(name, what, spec, ts):
        f = assemble(ts)
        assert f.minor == 4
        V(name, what, spec, f.build(), expected_list(ts))

    r = rng(410)
    band = [2, 0, 1, 0, 2, 2, 1, 0, 0]
    band_t = [1, 0, 1, 1, 0, 0]
    simple("tq_row_band", "tq row_band (1.4): a float32 [9, 5] tensor whose 3 bands are the rows named 0, 1 "
           "and 2 in row_band [2, 0, 1, 0, 2, 2, 1, 0, 0] (band 1 constant, A_b = 1); a layout in_out [7, 6] "
           "tensor (n = 6 rows) in 2 interleaved bands, the first band's symbols split into two chunks",
           "§7.5.1 §7.5.2 §7.5.3",
           [tq_t("w", "float32", (9, 5), [(r.integers(-6, 7, (4, 5)), -8), (np.full((2, 5), 3), -4),
                                          (r.integers(-40, 41, (3, 5)), -12)], row_band=band),
            tq_t("t", "float32", (7, 6), row_band_bands(r.integers(-9, 10, (6, 7)), band_t, [-6, -9]),
                 layout="in_out", row_band=band_t, chunks=[[10, 11], None])])
    S = rng(411).standard_normal((8, 4)) * 0.3
    simple("tq_row_band_transform", "tq row_band with a float16 transform: k = 4 coefficient rows of a "
           "[6, 8] tensor in 2 bands, row_band [1, 0, 0, 1] (rows of C, not of the tensor)", "§7.5.1 §7.5.3",
           [tq_t("s", "float32", (6, 8), row_band_bands(r.integers(-20, 21, (4, 6)), [1, 0, 0, 1], [-6, -8]),
                 S=S, row_band=[1, 0, 0, 1])])
    simple("tq_row_band_consecutive", "tq row_band written although its bands are consecutive runs, band 0 "
           "first ([0, 0, 1, 1, 1]): the same as without it", S7,
           [tq_t("w", "float32", (5, 4), [(r.integers(-5, 6, (2, 4)), -3), (r.integers(-5, 6, (3, 4)), -5)],
                 row_band=[0, 0, 1, 1, 1])])
    band = [(i * 37) % 256 for i in range(300)]
    simple("tq_row_band_256_bands", "tq row_band with B = 256 bands (the limit with row_band) over 300 rows of "
           "a [300, 2] tensor, band (37 i) mod 256 for row i", S7,
           [tq_t("x", "float32", (300, 2), row_band_bands(r.integers(-3, 4, (300, 2)), band,
                                                          [-4 - b % 5 for b in range(256)]), row_band=band)])

    # tqcodec's encoder: an embedding's rows banded by token frequency
    sd, st = embedding_state(3)
    data = encode_with_tqcodec(sd, mode="tq", bits=3.0, stats=st)
    manifest, _ = parse_valid(data)
    assert "row_band" in manifest["tensors"][0]["params"]
    V("encoder_tq_row_band", "tqcodec.save(mode='tq', bits=3, stats=tqcodec.calibrate(...)) of a tiny seeded "
      "embedding + linear model whose token counts follow no order of id: the embedding's bands are sets of "
      "rows (row_band); header Minor_Version 4", "§7.5.1 §13", data, expected_by_spec(data), notes=ENC_NOTE)

    BTR = "BAD_TENSOR_RECORD"

    def par(name, what, change, code=BTR):
        ts = row_band_base()
        change(ts[0].record["params"])
        f = assemble(ts)
        assert f.minor == 4
        X(name, what, S7, f.build(), code)

    par("tq_row_band_short", "row_band of 8 bytes for k = 9 rows", lambda p: p.update(row_band=p["row_band"][:-1]))
    par("tq_row_band_long", "row_band of 10 bytes for k = 9 rows (the extra byte 0)",
        lambda p: p.update(row_band=p["row_band"] + b"\x00"))
    par("tq_row_band_unknown_band", "row_band naming band 3 of B = 3 bands (row 1; bytes must be below B)",
        lambda p: p.update(row_band=bytes([2, 3, 1, 0, 2, 2, 1, 0, 0])))
    par("tq_row_band_counts_mismatch", "row_band naming band 0 five times and band 1 once (band_rows [4, 2, 3])",
        lambda p: p.update(row_band=bytes([2, 0, 0, 0, 2, 2, 1, 0, 0])))
    par("tq_row_band_not_bin", "row_band as a string", lambda p: p.update(row_band="201022100"))
    par("tq_row_band_array", "row_band as an array of integers", lambda p: p.update(row_band=list(p["row_band"])))
    par("tq_row_band_nil", "row_band nil (absence, its default, has no written form)",
        lambda p: p.update(row_band=None))
    r = rng(420)
    band = list(range(257))
    band[0], band[-1] = 256, 0
    lv = r.integers(-3, 4, (257, 2))
    ts = [tq_t("x", "float32", (257, 2), [(lv[[i]], -4) for i in range(257)], check=False)]
    ts[0].record["params"]["row_band"] = bytes(b % 256 for b in band)
    f = assemble(ts)
    assert f.minor == 4
    X("tq_row_band_257_bands", "row_band with B = 257 bands (at most 256 with row_band; its bytes could only "
      "name 256 of them)", S7, f.build(), BTR)


# --- modes ecsq, kmeans, pq, dither (spec 1.2, spec/mode-lineage.md §7.6-§7.9) -----------------------

LINEAGE_MODES = ("ecsq", "kmeans", "pq", "dither")
PREC_NP = {"float16": "<f2", "float32": "<f4"}
HEX_H = struct.unpack("<d", struct.pack("<Q", 0x3FEBB67AE8584CAA))[0]  # §7.9.3's H


def sm64(seed: int, k: int) -> int:
    """Spec §7.S.6 in Python integers: SplitMix64 output number k from state ``seed``."""
    M = (1 << 64) - 1
    x = (seed + (k + 1) * 0x9E3779B97F4A7C15) & M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M
    return x ^ (x >> 31)


def numer(z: int) -> tuple[int, int]:
    """Spec §7.S.6: the dither numerators t1, t2 of an output."""
    r1, r2 = z >> 43, (z >> 22) & ((1 << 21) - 1)
    return 2 * r1 + 1 - (1 << 21), 2 * r2 + 1 - (1 << 21)


def round_f64_to(dtype: str, v: np.ndarray) -> bytes:
    """Spec §7.S.5 for binary64 values: float64 kept; else to binary32 (nearest even), then the dtype."""
    v = np.ascontiguousarray(v, dtype=np.float64)
    if dtype == "float64":
        return v.astype("<f8").tobytes()
    with np.errstate(over="ignore"):
        return round_f32_to(dtype, v.astype(np.float32))


def dither_values(lattice: str, coords, code: int, seed: int, numel: int) -> np.ndarray:
    """Spec §7.9.3 element by element in Python integers and floats (binary64)."""
    d = step(code)
    out = []
    if lattice == "scalar":
        for i, q in enumerate(coords[0]):
            t1, _ = numer(sm64(seed, i))
            out.append(float(int(q) * (1 << 22) - t1) * d * 2.0 ** -22)
    else:
        for p, (a, b) in enumerate(zip(coords[0], coords[1])):
            a, b = int(a), int(b)
            t1, t2 = numer(sm64(seed, p))
            nx = a * (1 << 23) + (b & 1) * (1 << 22) - 2 * t1 - t2
            ny = b * (1 << 22) - t2
            assert abs(nx) < 1 << 44 and abs(ny) < 1 << 43
            out.append(float(nx) * d * 2.0 ** -23)
            out.append((float(ny) * d * 2.0 ** -22) * HEX_H)  # E exact, then the one rounded product
        out = out[:numel]
    return np.array(out, dtype=np.float64)


def sym_chunks(stream: int, sym, counts, sizes) -> list:
    """Range-coded chunks of a symbol stream (§7.S.4) with the §8.6 table of ``counts``."""
    counts = [int(c) for c in counts]
    if len(counts) < 2:
        return []
    freqs = frequencies_from_counts(np.array(counts))
    assert freqs.tolist() == table_from_counts(counts), "tqcodec's §8.6 table differs"
    sym = np.asarray(sym, dtype=np.int32).reshape(-1)
    out, pos = [], 0
    for n in _split(sym.size, sizes):
        words = encode_symbols(sym[pos:pos + n], freqs)
        out.append(Chunk(np.asarray(words, dtype="<u4").tobytes(), stream=stream, item_count=n))
        pos += n
    return out


def val_chunks(values: np.ndarray, precision: str, sizes) -> list:
    data = np.ascontiguousarray(values, dtype=PREC_NP[precision]).tobytes()
    out, pos = [], 0
    for n in _split(len(data), sizes):
        out.append(Chunk(data[pos:pos + n], stream=0, item_count=n))
        pos += n
    return out


def _prec(params: dict, precision, explicit: bool) -> str:
    p = precision or "float16"
    if precision is not None and (precision != "float16" or explicit):
        params["precision"] = precision
    return p


def ecsq_t(name, dtype, shape, sym, *, recon="grid", code=None, q_min=None, values=None, precision=None,
           chunks=None, v_chunks=None, counts=None, check=True) -> T:
    """Mode ecsq (§7.6) from symbols (C order). grid: ``code``, ``q_min``; codebook: ``values``
    (stored in ``precision``, default float16 and omitted)."""
    sym = np.asarray(sym, dtype=np.int64).reshape(-1)
    if counts is None:
        counts = np.bincount(sym, minlength=(len(values) if values is not None else 1)).tolist()
    params = {"recon": recon, "counts": leb128(counts)}
    out = []
    if recon == "grid":
        params.update(step=int(code), q_min=int(q_min))
        v = (sym + q_min).astype(np.float64) * step(code)
        v[v == 0] = 0.0
        expected = round_f32_to(dtype, v.astype(np.float32)) if check else b""
        assert not check or np.array_equal(v.astype(np.float32).astype(np.float64), v)
    else:
        p = _prec(params, precision, precision is not None)
        vals = np.asarray(values, dtype=PREC_NP[p])
        out += val_chunks(vals, p, v_chunks)
        expected = round_f32_to(dtype, vals.astype(np.float32)[sym]) if check else b""
    out += sym_chunks(1, sym, counts, chunks)
    return T(name, dtype, shape, "ecsq", params, out, expected)


def kmeans_t(name, dtype, shape, groups, precision=None, chunks=None, v_chunks=None, explicit=False) -> T:
    """Mode kmeans (§7.7). ``groups``: [(symbols [rows, m], codebook values)]."""
    p_ = {}
    p = _prec(p_, precision, explicit)
    rows, blobs, out, books, vals_all = [], [], [], [], []
    for g, (sym, book) in enumerate(groups):
        sym = np.asarray(sym, dtype=np.int64)
        book = np.asarray(book, dtype=PREC_NP[p])
        counts = np.bincount(sym.reshape(-1), minlength=len(book)).tolist()
        rows.append(int(sym.shape[0]))
        blobs.append(leb128(counts))
        out += sym_chunks(1 + g, sym, counts, None if chunks is None else chunks[g])
        books.append(book)
        vals_all.append(book.astype(np.float32)[sym.reshape(-1)])
    out = val_chunks(np.concatenate(books), p, v_chunks) + out
    params = {"group_rows": rows, "counts": blobs, **p_}
    return T(name, dtype, shape, "kmeans", params, out, round_f32_to(dtype, np.concatenate(vals_all)))


def pq_t(name, dtype, shape, sym, book, precision=None, chunks=None, v_chunks=None, explicit=False,
         check=True) -> T:
    """Mode pq (§7.8): ``sym`` [n, s] codeword indices, ``book`` [K, d]."""
    params = {}
    p = _prec(params, precision, explicit)
    book = np.asarray(book, dtype=PREC_NP[p])
    sym = np.asarray(sym, dtype=np.int64)
    k, d = book.shape
    counts = np.bincount(sym.reshape(-1), minlength=k).tolist()
    params.update(dim=int(d), counts=leb128(counts))
    out = val_chunks(book.reshape(-1), p, v_chunks) + sym_chunks(1, sym, counts, chunks)
    expected = b""
    if check:
        n = shape[0]
        m = int(np.prod(shape)) // n
        s = -(-m // d)
        assert sym.shape == (n, s)
        expected = round_f32_to(dtype, book.astype(np.float32)[sym].reshape(n, s * d)[:, :m].reshape(-1))
    return T(name, dtype, shape, "pq", params, out, expected)


def dither_t(name, dtype, shape, coords, code, seed, lattice=None, chunks=None, explicit=False) -> T:
    """Mode dither (§7.9) from integer coordinates (scalar: [levels]; hex: [a, b] per pair)."""
    numel = int(np.prod(shape, dtype=object)) if len(shape) else 1
    lat = lattice or "scalar"
    coords = [np.asarray(c, dtype=np.int64).reshape(-1) for c in coords]
    qmins, blobs, out = [], [], []
    for c, lv in enumerate(coords):
        q0 = int(lv.min())
        counts = np.bincount(lv - q0).tolist()
        qmins.append(q0)
        blobs.append(leb128(counts))
        out += sym_chunks(c, lv - q0, counts, None if chunks is None else chunks[c])
    params = {"step": int(code), "seed": int(seed), "q_min": qmins, "counts": blobs}
    if lattice is not None and (lattice != "scalar" or explicit):
        params["lattice"] = lattice
    expected = round_f64_to(dtype, dither_values(lat, coords, code, seed, numel))
    return T(name, dtype, shape, "dither", params, out, expected)


def _stored(data: bytes, precision: str) -> np.ndarray:
    v = np.frombuffer(data, dtype=PREC_NP[precision]).astype(np.float32)
    assert np.isfinite(v).all()
    return v


def _syms(parts, stream, counts, count):
    if len(counts) == 1:
        assert not [x for s, _, x in parts if s == stream]
        return [0] * count
    freqs = table_from_counts(counts)
    sym = [s for st, cnt, x in parts if st == stream
           for s in rc_decode(list(struct.unpack(f"<{len(x) // 4}I", x)), freqs, cnt)]
    assert len(sym) == count
    return sym


def lineage_by_spec(r, parts) -> bytes:
    """Spec §7.6-§7.9 (decode of a valid tensor of these modes), independent of tqcodec's decoder."""
    mode, p, shape, dtype = r["mode"], r["params"], r["shape"], r["dtype"]
    numel = int(np.prod(shape, dtype=object)) if shape else 1
    values = b"".join(x for s, _, x in parts if s == 0)
    if mode == "ecsq":
        counts = unleb128(p["counts"])
        sym = np.array(_syms(parts, 1, counts, numel), dtype=np.int64)
        if p["recon"] == "grid":
            v = (sym + p["q_min"]).astype(np.float64) * step(p["step"])
            v[v == 0] = 0.0
            return round_f32_to(dtype, v.astype(np.float32))
        book = _stored(values, p.get("precision", "float16"))
        assert len(book) == len(counts) and all(book[1:] > book[:-1]) and all(counts)
        return round_f32_to(dtype, book[sym])
    if mode == "kmeans":
        n = shape[0]
        m = numel // n
        book = _stored(values, p.get("precision", "float16"))
        out, v0 = [], 0
        for g, rows in enumerate(p["group_rows"]):
            counts = unleb128(p["counts"][g])
            bk = book[v0:v0 + len(counts)]
            assert all(bk[1:] > bk[:-1]) and all(counts)
            out.append(bk[np.array(_syms(parts, 1 + g, counts, rows * m), dtype=np.int64)])
            v0 += len(counts)
        assert v0 == len(book)
        return round_f32_to(dtype, np.concatenate(out))
    if mode == "pq":
        n = shape[0]
        m = numel // n
        d = p["dim"]
        s = -(-m // d)
        counts = unleb128(p["counts"])
        book = _stored(values, p.get("precision", "float16")).reshape(len(counts), d)
        sym = np.array(_syms(parts, 1, counts, n * s), dtype=np.int64).reshape(n, s)
        vals = [float(book[sym[i, j // d], j % d]) for i in range(n) for j in range(m)]
        return round_f32_to(dtype, np.array(vals, dtype=np.float32))
    assert mode == "dither"
    lat = p.get("lattice", "scalar")
    n_sym = numel if lat == "scalar" else (numel + 1) // 2
    coords = [np.array(_syms(parts, c, unleb128(p["counts"][c]), n_sym), dtype=np.int64) + p["q_min"][c]
              for c in range(1 if lat == "scalar" else 2)]
    return round_f64_to(dtype, dither_values(lat, coords, p["step"], p["seed"], numel))


def f16(bits: int) -> float:
    return float(np.array([bits], dtype="<u2").view("<f2")[0])


def make_lineage_valid(out: Out):
    V = out.valid

    def simple(name, what, spec, ts):
        f = assemble(ts)
        assert f.minor == 2
        V(name, what + "; header Minor_Version 2", spec, f.build(), expected_list(ts))

    r = rng(400)
    # ecsq (§7.6)
    simple("ecsq_grid_float32", "ecsq recon grid, float32 [6, 10], one table, q_min -7", "§7.6",
           [ecsq_t("w", "float32", (6, 10), np.concatenate([[0, 14], r.integers(0, 15, 58)]), code=-12, q_min=-7)])
    g = r.integers(0, 9, 35)
    g[0], g[-1] = 0, 8
    simple("ecsq_grid_dtypes", "ecsq grid on float16 [5, 7], bfloat16 [35], float64 [7, 5] and a 0-d float32 "
           "tensor (any number of dimensions)", "§7.6.1 §7.6.3 §7.S.5",
           [ecsq_t("h", "float16", (5, 7), g, code=-14, q_min=-300),
            ecsq_t("b", "bfloat16", (35,), g, code=-9, q_min=1000),
            ecsq_t("d", "float64", (7, 5), g, code=-40, q_min=-4),
            ecsq_t("z", "float32", (), [0], code=3, q_min=5)])
    simple("ecsq_grid_single_symbol", "ecsq grid with A = 1 (counts one varint, no chunks: every level q_min), "
           "and with q_min 0 (all +0)", "§7.S.2 §7.6.2",
           [ecsq_t("c", "float32", (3, 4), np.zeros(12), code=-2, q_min=-3),
            ecsq_t("z", "bfloat16", (2, 2), np.zeros(4), code=0, q_min=0)])
    simple("ecsq_grid_extreme_steps", "ecsq grid, step codes 103 (float16 overflows to +-inf) and -160 (float16 "
           "subnormals), levels at +-2^20", "§7.1 §7.6.3 §12",
           [ecsq_t("h", "float16", (2, 3), [0, 1, 2, 3, 4, 2], code=103, q_min=-2),
            ecsq_t("s", "float16", (2, 2), [0, 1, 16384, 65535], code=-160, q_min=1),
            ecsq_t("e", "float32", (3,), [0, 1, 2], code=-30, q_min=(1 << 20) - 2)])
    book = [f16(0x8000), f16(0x0001), 0.25, 1.0, 3.5, 65504.0]  # -0, smallest subnormal, ..., max (sorted: -0 first)
    book = [-3.0] + book
    s = r.integers(0, len(book), 300)
    s[:len(book)] = np.arange(len(book))
    simple("ecsq_codebook_float16", "ecsq recon codebook, float16 values (precision omitted: the default) holding "
           "-0, the smallest subnormal and 65504; symbols in 3 chunks (100 + 1 + 199), the value stream split "
           "inside a value (5 + 9 bytes)", "§7.6 §7.S.3 §7.S.4",
           [ecsq_t("w", "float32", (10, 30), s, recon="codebook", values=book, chunks=[100, 1, 199],
                   v_chunks=[5, 9])])
    bk32 = np.array([-1e5, -1.0009765625, 1.00048828125, 1.000732421875, 70000.0], dtype="<f4")
    s = np.array([0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 2, 2])
    simple("ecsq_codebook_float32_rounding", "ecsq codebook with precision float32 on float16 and bfloat16 "
           "tensors: values round to the dtype (ties to even: 1 + 2^-11 -> 1, 1 + 3*2^-12 -> 1 + 2^-10; "
           "+-1e5 and 70000 overflow float16 to +-inf) and the same codebook on float64 (widened)",
           "§7.6.3 §7.S.5",
           [ecsq_t("h", "float16", (3, 4), s, recon="codebook", values=bk32, precision="float32"),
            ecsq_t("b", "bfloat16", (12,), s, recon="codebook", values=bk32, precision="float32"),
            ecsq_t("d", "float64", (4, 3), s, recon="codebook", values=bk32, precision="float32")])
    simple("ecsq_codebook_single_value", "ecsq codebook with A = 1: one stored value, no symbol chunks; and the "
           "precision key written with its default value", "§7.6.1 §7.6.2",
           [ecsq_t("c", "float32", (2, 5), np.zeros(10), recon="codebook", values=[-0.375]),
            ecsq_t("e", "float32", (2, 2), [0, 1, 1, 0], recon="codebook", values=[0.5, 2.0], precision="float16")])
    # kmeans (§7.7)
    simple("kmeans_groups", "kmeans float32 [9, 6] in 3 groups of 2, 3 and 4 rows, codebooks of 4, 1 and 3 "
           "float16 values (the middle group: no chunks); group 2's codebook starts below group 0's last value",
           "§7.7",
           [kmeans_t("w", "float32", (9, 6), [(np.tile(np.arange(6) % 4, (2, 1)), [-1.5, -0.25, 0.5, 2.0]),
                                              (np.zeros((3, 6), dtype=int), [0.125]),
                                              (np.arange(24).reshape(4, 6) % 3, [-4.0, 0.0, 1.0])])])
    simple("kmeans_precision_dtypes", "kmeans with precision float32 on bfloat16 [4, 5] and float16 [2, 3, 2] "
           "tensors (values rounded to the dtype), float16 values on a float64 [6, 2] tensor", "§7.7.3 §7.S.5",
           [kmeans_t("b", "bfloat16", (4, 5), [(np.arange(20).reshape(4, 5) % 5,
                                                 [-3.14159, -1e-3, 2.5e-3, 1.0000001, 3e38])], precision="float32"),
            kmeans_t("h", "float16", (2, 3, 2), [(np.arange(6).reshape(1, 6) % 2, [-7e4, 1.00048828125]),
                                                  (np.arange(6).reshape(1, 6) % 3, [-1.0, 0.0, 1e-8])],
                     precision="float32"),
            kmeans_t("d", "float64", (6, 2), [(np.arange(12).reshape(6, 2) % 4, [-2.0, -0.0, 0.333, 1.5])])])
    simple("kmeans_conv_multichunk", "kmeans conv weight [8, 3, 3, 3] (n = 8, m = 27) in 2 groups, group 0's "
           "symbols in chunks of 50 + 58, the codebook stream in 3 chunks", "§6.2 §7.7.2",
           [kmeans_t("c", "float32", (8, 3, 3, 3), [(np.arange(108).reshape(4, 27) * 5 % 16, np.linspace(-1, 1, 16)),
                                                    (np.arange(108).reshape(4, 27) % 5, [-0.5, -0.1, 0.0, 0.1, 0.5])],
                     chunks=[[50, 58], None], v_chunks=[3, 20, 19])])
    simple("kmeans_1d", "kmeans 1-D tensor [10] (m = 1): 2 groups of 7 and 3 rows", "§7.S.1 §7.7",
           [kmeans_t("b", "float32", (10,), [(np.array([[0], [1], [2], [0], [1], [2], [1]]), [-1.0, 0.0, 1.0]),
                                             (np.array([[1], [0], [1]]), [2.0, 4.0])])])
    simple("kmeans_groups_4096", "kmeans with G = 4096 groups (the limit) of one row each, most with one value",
           "§7.7.1 §12",
           [kmeans_t("x", "float16", (4096, 2), [((np.array([[0, 1]]), [-(i % 7) - 1.0, float(i % 5)]) if i % 9 == 0
                                                   else (np.zeros((1, 2), dtype=int), [float(i % 11) / 4]))
                                                  for i in range(4096)])])
    kk = np.concatenate([np.arange(65536), rng(401).integers(0, 65536, 256)])
    allf16 = np.arange(65536).astype("<u2").view("<f2")
    bookx = np.unique(allf16[np.isfinite(allf16)].astype(np.float64))  # 63487 values: -0 and +0 are one
    bookx[bookx == 0] = 0.0  # np.unique keeps -0.0 or +0.0 depending on the numpy version: pin +0.0
    bookx = np.concatenate([bookx, 70000.0 + np.arange(65536 - len(bookx))])
    simple("kmeans_max_codebook", "kmeans one group with K = 65536 (the limit): every finite float16 value once "
           "(-0 and +0 are one entry) and larger float32 values, precision float32, float32 [256, 257]",
           "§7.7.1 §12", [kmeans_t("x", "float32", (256, 257), [(kk.reshape(256, 257), bookx)], precision="float32")])
    # pq (§7.8)
    bk = r.integers(-64, 64, (6, 4)) / 32.0
    simple("pq_dim4", "pq float32 [8, 12], dim 4 (s = 3), K = 6 float16 codewords", "§7.8",
           [pq_t("w", "float32", (8, 12), np.arange(24).reshape(8, 3) % 6, bk)])
    bk = r.integers(-64, 64, (5, 4)) / 16.0
    bk[:, 2:] = 60000.0  # components beyond the short last sub-vector are unused where codewords serve it
    sp = np.array([[0, 1, 2], [1, 4, 3], [4, 0, 2], [1, 1, 3], [0, 4, 2]])
    bk[[0, 1, 4], 2:] = r.integers(-8, 8, (3, 2)) / 8.0
    simple("pq_padded", "pq [5, 10] with dim 4: s = 3, the last sub-vector of each row holds 2 elements; "
           "codewords 2 and 3 (only used there) hold 60000 in components 2, 3 (never reconstructed)",
           "§7.8 §7.8.3", [pq_t("w", "float32", (5, 10), sp, bk)])
    simple("pq_dims", "pq with dim 1 (float16 [4, 3]), dim = m (bfloat16 [3, 5], one sub-vector per row) and "
           "dim 256 on m = 300 (float32 [2, 300]: s = 2, padded)", "§7.8.1",
           [pq_t("a", "float16", (4, 3), np.arange(12).reshape(4, 3) % 3, [[-1.0], [0.5], [2.0]]),
            pq_t("b", "bfloat16", (3, 5), np.array([[0], [1], [0]]), r.integers(-9, 9, (2, 5)) / 4.0),
            pq_t("c", "float32", (2, 300), np.array([[0, 1], [1, 0]]), r.integers(-99, 99, (2, 256)) / 64.0)])
    bk = np.array([[-1e5, 1.00048828125], [3e-8, -2.5]], dtype="<f4")
    simple("pq_precision_float32_dtypes", "pq precision float32 on float16 (overflow to -inf, ties to even), "
           "float64 [3, 2, 2] and a 1-D tensor [6] (m = 1, dim 1)", "§7.8.3 §7.S.5",
           [pq_t("h", "float16", (2, 4), np.array([[0, 1], [1, 0]]), bk, precision="float32"),
            pq_t("d", "float64", (3, 2, 2), np.array([[0, 1], [1, 1], [0, 0]]), bk, precision="float32"),
            pq_t("v", "float32", (6,), np.array([[0], [1], [1], [0], [1], [0]]), [[0.75], [-0.5]], precision="float32")])
    simple("pq_single_codeword_multichunk", "pq K = 1 (no symbol chunks; precision key written with its default) "
           "and pq with its symbols in chunks of 7 + 13 and the codebook in 2 chunks", "§6.2 §7.8.2",
           [pq_t("k", "float32", (4, 6), np.zeros((4, 3), dtype=int), [[1.0, -2.0]], explicit=True),
            pq_t("m", "float32", (10, 8), np.arange(20).reshape(10, 2) * 7 % 9, r.integers(-9, 9, (9, 4)) / 8.0,
                 chunks=[7, 13], v_chunks=[31, 41])])
    # dither (§7.9)
    simple("dither_worked_values", "the worked values of §7.9.3: seed 0, step code 0, scalar q_0 = 3 (float64 "
           "[1]) and hex (a_0, b_0) = (1, -1) (float64 [2])", "§7.9.3",
           [dither_t("s", "float64", (1,), [[3]], 0, 0),
            dither_t("x", "float64", (2,), [[1], [-1]], 0, 0, lattice="hex")])
    simple("dither_scalar_float32", "dither scalar (lattice key omitted), float32 [8, 16], seed 0, step -12",
           "§7.9", [dither_t("w", "float32", (8, 16), [r.integers(-20, 21, 128)], -12, 0)])
    simple("dither_scalar_dtypes", "dither scalar on float16 [5, 7], bfloat16 [35], float64 [7, 5] and a 0-d "
           "tensor (binary64 values rounded to binary32, then the dtype)", "§7.9.3 §7.S.5",
           [dither_t("h", "float16", (5, 7), [r.integers(-300, 301, 35)], -14, 7),
            dither_t("b", "bfloat16", (35,), [r.integers(-300, 301, 35)], -9, 12345678901234567),
            dither_t("d", "float64", (7, 5), [r.integers(-3000, 3001, 35)], -40, 99),
            dither_t("z", "float32", (), [[4]], 1, 5, lattice="scalar", explicit=True)])
    simple("dither_seeds_and_single_level", "dither with seed 2^64 - 1 (the output index wraps mod 2^64), and a "
           "constant level (A = 1, no chunks: the dither alone varies)", "§7.9.1 §7.S.6",
           [dither_t("m", "float32", (4, 9), [r.integers(-5, 6, 36)], -6, (1 << 64) - 1),
            dither_t("c", "float32", (3, 3), [np.full(9, 2)], -8, 3)])
    simple("dither_extreme_steps", "dither step codes 103 (float16: +-inf) and -160, levels at 2^20 and -2^20",
           "§7.1 §7.9.3 §12",
           [dither_t("h", "float16", (2, 2), [[(1 << 20) - 3, (1 << 20) - 1, (1 << 20) - 2, 1 << 20]], 103, 1),
            dither_t("f", "float32", (2, 2), [[-(1 << 20), -(1 << 20) + 1, -(1 << 20) + 5, 1 - (1 << 20)]], -160, 2),
            dither_t("d", "float64", (3,), [[1 - (1 << 20), -(1 << 20), 7 - (1 << 20)]], 103, 3)])
    simple("dither_multichunk", "dither scalar with its symbols in chunks of 100 + 1 + 139 (each chunk's "
           "elements use generator outputs by their index in the tensor)", "§6.2 §7.9.2 §7.S.6",
           [dither_t("w", "float32", (12, 20), [r.integers(-50, 51, 240)], -10, 42, chunks=[[100, 1, 139]])])
    a, b = r.integers(-30, 31, 24), r.integers(-30, 31, 24)
    a[0], b[0] = 0, -1
    simple("dither_hex_even", "dither hex, float32 [6, 8] (24 pairs), rows b of both signs and parities",
           "§7.9.2 §7.9.3", [dither_t("w", "float32", (6, 8), [a, b], -10, 2024, lattice="hex")])
    simple("dither_hex_odd", "dither hex with an odd numel: float32 [5, 7] (18 pairs, the last one's second "
           "value discarded), a 1-element float16 [1] (one pair) and a 0-d bfloat16", "§7.9.2",
           [dither_t("w", "float32", (5, 7), [r.integers(-9, 10, 18), r.integers(-9, 10, 18)], -8, 5, lattice="hex"),
            dither_t("o", "float16", (1,), [[3], [-3]], -4, 6, lattice="hex"),
            dither_t("z", "bfloat16", (), [[-2], [1]], 0, 7, lattice="hex")])
    simple("dither_hex_dtypes_multichunk", "dither hex on float16, bfloat16 and float64 [9, 4]; the bfloat16 one "
           "with a constant b (A = 1, stream 1 without chunks) and stream 0 in chunks of 5 + 13", "§7.9",
           [dither_t("h", "float16", (9, 4), [r.integers(-99, 100, 18), r.integers(-99, 100, 18)], -12, 8,
                     lattice="hex"),
            dither_t("b", "bfloat16", (9, 4), [r.integers(-99, 100, 18), np.full(18, -3)], -12, 9, lattice="hex",
                     chunks=[[5, 13], None]),
            dither_t("d", "float64", (9, 4), [r.integers(-9999, 9999, 18), r.integers(-9999, 9999, 18)], -30, 10,
                     lattice="hex")])
    # tqcodec's encoder (bytes depend on its float arithmetic)
    sd = model_state(30)
    for mode, bits in (("ecsq", 3.0), ("kmeans", 3.0), ("pq", 2.0), ("dither", 4.0)):
        data = encode_with_tqcodec(sd, mode=mode, bits=bits)
        V(f"encoder_{mode}", f"tqcodec.save(mode='{mode}', bits={bits}) of a small model with float16, bfloat16 "
          f"and float64 tensors (the rest raw); header Minor_Version 2", "§7.6-§7.9 §13", data,
          expected_by_spec(data), notes=ENC_NOTE)
    g = torch.Generator().manual_seed(31)
    centers = torch.tensor([-0.31, -0.12, 0.07, 0.26, 0.52])
    sd = {"clustered.weight": centers[torch.randint(0, 5, (48, 64), generator=g)]
          + torch.randn(48, 64, generator=g) * 0.002,
          "gauss.weight": torch.randn(32, 64, generator=g) * 0.1, "gauss.bias": torch.randn(32, generator=g) * 0.01}
    data = encode_with_tqcodec(sd, mode="auto", bits=3.0)
    modes = {r["mode"] for r in parse_valid(data)[0]["tensors"]}
    assert modes & set(LINEAGE_MODES), f"encoder_auto_bits3: mode auto chose only {modes}"
    V("encoder_auto_bits3", f"tqcodec.save(mode='auto', bits=3) of clustered and Gaussian weights without "
      f"statistics: each weight tq or a lineage mode by D + lam R (here: {', '.join(sorted(modes))}); header "
      "Minor_Version 2", "§7.5-§7.9 §13", data, expected_by_spec(data), notes=ENC_NOTE)

    # spec 1.2 clarifications: §7.3.2's bfloat16 rounding at its edges
    bits = np.array([0xFF7F8000, 0xFF7F7FFF, 0x80000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x7F7F7FFF,
                     0x7F7F8000], dtype="<u4")
    want = [0xFF80, 0xFF7F, 0x8000, 0x0000, 0x0002, 0x0080, 0x7F7F, 0x7F80]
    assert [(int(x) + 0x7FFF + ((int(x) >> 16) & 1)) >> 16 for x in bits] == want  # §7.3.2's formula
    t = ecsq_t("x", "bfloat16", (8,), np.arange(8), recon="codebook", values=bits.view("<f4"), precision="float32")
    assert np.frombuffer(t.expected, "<u2").tolist() == want
    simple("ecsq_codebook_bf16_rounding_edges", "ecsq codebook, precision float32, bfloat16 [8]: binary32 values "
           "FF7F8000 -> FF80 (-inf: the tie at -(2^128 - 2^119) rounds to even), FF7F7FFF -> FF7F, 80000001 -> "
           "8000 (-0), 00008000 -> 0000 (tie to even), 00018000 -> 0002 (tie up to even), 007FFFFF -> 0080 (a "
           "subnormal rounds into the normal range), 7F7F7FFF -> 7F7F, 7F7F8000 -> 7F80 (+inf)",
           "§7.3.2 §7.S.5", [t])


def lineage_base():
    """Base file of the lineage invalid vectors (format 1.2): ecsq grid (2 symbol chunks) and codebook,
    kmeans in 3 groups (one with K = 1), pq with padded sub-vectors, dither scalar and hex, a raw tensor."""
    r = rng(500)
    g = r.integers(0, 6, 32)
    g[0], g[1] = 0, 5
    return [
        ecsq_t("g", "float32", (4, 8), g, code=-6, q_min=-3, chunks=[20, 12]),
        ecsq_t("c", "float32", (3, 5), np.arange(15) % 4, recon="codebook", values=[-1.0, 0.0, 0.5, 2.0]),
        kmeans_t("k", "float32", (6, 4), [(np.arange(8).reshape(2, 4) % 3, [-1.0, 0.0, 1.0]),
                                          (np.zeros((1, 4), dtype=int), [0.25]),
                                          (np.arange(12).reshape(3, 4) % 4, [-2.0, -0.5, 0.5, 2.0])]),
        pq_t("p", "float32", (4, 10), np.array([[0, 1, 2], [3, 4, 2], [1, 0, 2], [4, 3, 2]]),
             r.integers(-9, 9, (5, 4)) / 4.0),
        dither_t("s", "float32", (5, 6), [r.integers(-7, 8, 30)], -5, 11),
        dither_t("x", "float32", (3, 5), [r.integers(-5, 6, 8), r.integers(-5, 6, 8)], -5, 12, lattice="hex"),
        raw_t("r", "int8", np.arange(-3, 3)),
    ]


LG, LC, LK, LP, LS, LX, LR = range(7)


def make_lineage_invalid(out: Out):
    X = out.invalid
    BTR, BT, BC, BP, LE = "BAD_TENSOR_RECORD", "BAD_TABLE", "BAD_CHUNK", "BAD_PAYLOAD", "LIMIT_EXCEEDED"
    SEC = {LG: "§7.6.1", LC: "§7.6.1", LK: "§7.7.1", LP: "§7.8.1", LS: "§7.9.1", LX: "§7.9.1"}

    def ts_x(name, what, spec, ts, code):
        f = assemble(ts)
        assert f.minor == 2
        X(name, what, spec, f.build(), code)

    def rec(name, what, code, i, change, spec=None):
        ts = lineage_base()
        change(ts[i].record)
        ts_x(name, what, spec or SEC[i], ts, code)

    def par(name, what, code, i, change, spec=None):
        rec(name, what, code, i, lambda r: change(r["params"]), spec)

    def put(k, v):
        return lambda p: p.__setitem__(k, v)

    def put_at(k, j, v):
        return lambda p: p[k].__setitem__(j, v)

    def pop(k):
        return lambda p: p.pop(k)

    def with_t(name, what, spec, i, t, code):
        ts = lineage_base()
        ts[i] = t
        ts_x(name, what, spec, ts, code)

    def chunks_x(name, what, change, code=BC, spec="§6.2 §7.S.3 §7.S.4"):
        ts = lineage_base()
        change(ts)
        ts_x(name, what, spec, ts, code)

    def stream_of(t, s):
        return [c for c in t.chunks if c.stream == s]

    def recode(t, s, syms, counts):
        freqs = frequencies_from_counts(np.array(counts))
        return Chunk(np.asarray(encode_symbols(np.array(syms, dtype=np.int32), freqs), "<u4").tobytes(),
                     stream=s, item_count=len(syms))

    def payload(i, s, k, f):
        def ch(ts):
            c = stream_of(ts[i], s)[k]
            c.payload = f(c.payload)
            if s == 0 and i in (LC, LK, LP):  # value streams: Item_Count follows the bytes
                c.item_count = len(c.payload)
        return ch

    def set_value(i, j, raw16: int):
        def ch(ts):
            c = stream_of(ts[i], 0)[0]
            c.payload = c.payload[:2 * j] + struct.pack("<H", raw16) + c.payload[2 * j + 2:]
        return ch

    # --- ecsq: §7.6.1 rule 1 (keys and types)
    par("ecsq_missing_recon", "ecsq params without 'recon'", BTR, LG, pop("recon"))
    par("ecsq_missing_counts", "ecsq params without 'counts'", BTR, LC, pop("counts"))
    par("ecsq_unknown_key", "ecsq params with an unknown key 'scale'", BTR, LG, put("scale", 1))
    par("ecsq_recon_int", "recon is the integer 0", BTR, LG, put("recon", 0))
    par("ecsq_counts_str", "counts is a string", BTR, LC, put("counts", "\x01\x02"))
    par("ecsq_counts_array", "counts is an array holding the bin", BTR, LC,
        lambda p: p.update(counts=[p["counts"]]))
    par("ecsq_step_bool", "step is true", BTR, LG, put("step", True))
    par("ecsq_step_float", "step is -6.0 (an integral float)", BTR, LG, put("step", -6.0))
    par("ecsq_q_min_float", "q_min is -3.0", BTR, LG, put("q_min", -3.0))
    par("ecsq_precision_int", "precision is the integer 16", BTR, LC, put("precision", 16))
    # rule 2
    rec("ecsq_int_dtype", "ecsq with dtype int32", BTR, LG, lambda r: r.update(dtype="int32"))
    rec("ecsq_empty_tensor", "ecsq tensor with 0 elements (shape [0, 8])", BTR, LG, lambda r: r.update(shape=[0, 8]))
    # rule 3
    par("ecsq_recon_unknown", "recon 'Grid'", BTR, LG, put("recon", "Grid"))
    par("ecsq_grid_missing_step", "recon grid without step", BTR, LG, pop("step"))
    par("ecsq_grid_missing_q_min", "recon grid without q_min", BTR, LG, pop("q_min"))
    par("ecsq_grid_with_precision", "recon grid with precision float16", BTR, LG, put("precision", "float16"))
    par("ecsq_codebook_with_step", "recon codebook with a step", BTR, LC, put("step", 0))
    par("ecsq_codebook_with_q_min", "recon codebook with a q_min", BTR, LC, put("q_min", 0))
    par("ecsq_precision_unknown", "precision 'float64'", BTR, LC, put("precision", "float64"))
    par("ecsq_precision_case", "precision 'Float16'", BTR, LC, put("precision", "Float16"))
    # rule 4
    for label, v in (("below", -161), ("above", 104), ("huge", 2**64 - 1)):
        par(f"ecsq_step_code_{label}", f"step code {v}", "BAD_STEP", LG, put("step", v), "§7.1 §7.6.1")
    # rule 5
    cg = unleb128(lineage_base()[LG].record["params"]["counts"])
    cc = unleb128(lineage_base()[LC].record["params"]["counts"])
    par("ecsq_counts_empty", "counts an empty bin (A = 0)", BT, LG, put("counts", b""), "§7.S.2 §7.6.1")
    par("ecsq_counts_overlong", f"first count {cg[0]} written overlong", BT, LG,
        put("counts", bytes([cg[0] | 0x80, 0]) + leb128(cg[1:])), "§7.S.2")
    par("ecsq_counts_varint_7_bytes", "first count written in 7 bytes", BT, LG,
        put("counts", b"\xff" * 6 + b"\x01" + leb128(cg[1:])), "§7.S.2")
    par("ecsq_counts_truncated", "counts ending inside a varint", BT, LC, put("counts", leb128(cc) + b"\x80"),
        "§7.S.2")
    par("ecsq_counts_sum_high", "counts adding up to numel + 1", BT, LG, put("counts", leb128([cg[0] + 1] + cg[1:])))
    par("ecsq_counts_sum_low", "codebook counts adding up to numel - 1", BT, LC,
        put("counts", leb128([cc[0] - 1] + cc[1:])))
    par("ecsq_grid_counts_zero_first", "grid counts with a 0 first (q_min one lower: the same levels)", BT, LG,
        lambda p: p.update(counts=leb128([0] + cg), q_min=p["q_min"] - 1))
    par("ecsq_grid_counts_zero_last", "grid counts with a 0 last", BT, LG, put("counts", leb128(cg + [0])))
    t = lineage_base()[LC]
    sym = np.arange(15) % 4
    sym = sym + (sym >= 2)
    with_t("ecsq_codebook_count_zero", "codebook counts [4, 4, 0, 4, 3] with a fifth stored value 0.25 that no "
           "element uses (stream and symbols consistent)", "§7.6.1", LC,
           ecsq_t("c", "float32", (3, 5), sym, recon="codebook", values=[-1.0, 0.0, 0.25, 0.5, 2.0],
                  counts=[4, 4, 0, 4, 3], check=False), BT)
    with_t("ecsq_alphabet_65537", "grid counts of A = 65537 entries [1, 0, ..., 0, 1] for 2 elements (levels "
           "q_min and q_min + 65536, coded with that table)", "§7.S.2 §12", LG,
           ecsq_t("g", "float32", (2,), [0, 65536], code=-6, q_min=-32768, counts=[1] + [0] * 65535 + [1],
                  check=False), BT)
    # rule 6
    par("ecsq_q_min_below_limit", "q_min = -2^20 - 1", LE, LG, put("q_min", -(1 << 20) - 1), "§7.6.1 §12")
    par("ecsq_q_max_above_limit", f"q_min + A - 1 = 2^20 + 1 (A = {len(cg)})", LE, LG,
        put("q_min", (1 << 20) + 2 - len(cg)), "§7.6.1 §12")
    par("ecsq_q_min_i64_max_wraps", "q_min = 2^63 - 1 (q_min + A - 1 overflows signed 64-bit)", LE, LG,
        put("q_min", 2**63 - 1), "§7.6.1 §12")
    # streams
    chunks_x("ecsq_values_short", "the codebook's value stream 2 bytes short (Item_Count matching)",
             payload(LC, 0, 0, lambda b: b[:-2]))
    chunks_x("ecsq_values_long", "the codebook's value stream 2 bytes long", payload(LC, 0, 0, lambda b: b + b"\0\0"))
    chunks_x("ecsq_values_missing", "recon codebook without its value stream", lambda ts: ts[LC].chunks.pop(0))

    def split_uneven(i):
        def ch(ts):
            c = stream_of(ts[i], 0)[0]
            k = ts[i].chunks.index(c)
            whole = c.payload
            ts[i].chunks[k:k + 1] = [Chunk(whole[:5], stream=0, item_count=4),
                                     Chunk(whole[5:], stream=0, item_count=len(whole) - 4)]
        return ch
    chunks_x("ecsq_value_chunk_length_not_items", "value stream in 2 chunks, Payload_Length != Item_Count in "
             "each (sums and bytes right)", split_uneven(LC))
    chunks_x("ecsq_grid_stream_0_chunk", "a stream 0 chunk (2 bytes) in a grid tensor (stream 0 has 0 items)",
             lambda ts: ts[LG].chunks.insert(0, Chunk(b"\x00\x3c", stream=0, item_count=2)))
    chunks_x("ecsq_symbols_fewer", "the grid's second symbol chunk codes 11 of its 12 symbols",
             lambda ts: ts[LG].chunks.__setitem__(1, recode(ts[LG], 1, [1] * 11, cg)))
    chunks_x("ecsq_stream_2", "a chunk in stream 2 (ecsq has 2 streams)",
             lambda ts: ts[LG].chunks.append(Chunk(b"\0" * 4, stream=2, item_count=1)))
    chunks_x("ecsq_rc_length_0", "a symbol payload of 0 bytes", payload(LG, 1, 0, lambda b: b""))
    chunks_x("ecsq_rc_length_not_multiple_of_4", "a symbol payload of 4n + 2 bytes",
             payload(LG, 1, 1, lambda b: b + b"\0\0"))
    chunks_x("ecsq_rc_append_word", "a symbol payload with one more word (0): not canonical",
             payload(LG, 1, 0, lambda b: b + b"\0" * 4), BP, "§7.S.4 §8.5")
    chunks_x("ecsq_rc_seal_plus_1", "the codebook's symbol payload with its last word + 1 (not canonical)",
             payload(LC, 1, 0, lambda p: p[:-4] + struct.pack("<I", (struct.unpack("<I", p[-4:])[0] + 1) & 0xFFFFFFFF)),
             BP, "§7.S.4 §8.5")
    # values (codebook [-1, 0, 0.5, 2] as float16)
    for label, raw16 in (("nan", 0x7E00), ("inf", 0x7C00), ("minus_inf", 0xFC00)):
        chunks_x(f"ecsq_codebook_{label}", f"codebook value 3 is {raw16:#06x}", set_value(LC, 3, raw16), BP,
                 "§7.S.3")
    chunks_x("ecsq_codebook_not_increasing", "codebook values 1 and 2 swapped (-1, 0.5, 0, 2)",
             lambda ts: (set_value(LC, 1, 0x3800)(ts), set_value(LC, 2, 0x0000)(ts)), BP, "§7.6.2")
    chunks_x("ecsq_codebook_equal_values", "codebook values (-1, 0.5, 0.5, 2)", set_value(LC, 1, 0x3800), BP,
             "§7.6.2")
    chunks_x("ecsq_codebook_minus_zero_then_zero", "codebook values (-1, -0, +0, 2): -0 equals +0", lambda ts: (
        set_value(LC, 1, 0x8000)(ts), set_value(LC, 2, 0x0000)(ts)), BP, "§7.6.2")

    # --- kmeans
    par("kmeans_missing_group_rows", "kmeans params without 'group_rows'", BTR, LK, pop("group_rows"))
    par("kmeans_missing_counts", "kmeans params without 'counts'", BTR, LK, pop("counts"))
    par("kmeans_unknown_key", "kmeans params with an unknown key 'recon'", BTR, LK, put("recon", "codebook"))
    par("kmeans_group_rows_not_array", "group_rows is the integer 6", BTR, LK, put("group_rows", 6))
    par("kmeans_group_rows_bool", "group_rows [2, true, 3]", BTR, LK, put_at("group_rows", 1, True))
    par("kmeans_group_rows_float", "group_rows [2.0, 1, 3]", BTR, LK, put_at("group_rows", 0, 2.0))
    par("kmeans_counts_not_array", "counts is one bin", BTR, LK, lambda p: p.update(counts=p["counts"][0]))
    par("kmeans_counts_str_element", "a counts element is a string", BTR, LK, put_at("counts", 1, "\x04"))
    par("kmeans_precision_int", "precision is the integer 32", BTR, LK, put("precision", 32))
    rec("kmeans_int_dtype", "kmeans with dtype uint8", BTR, LK, lambda r: r.update(dtype="uint8"))
    rec("kmeans_0d", "kmeans on a 0-d tensor (shape [])", BTR, LK, lambda r: r.update(shape=[]))
    rec("kmeans_empty_tensor", "kmeans tensor with 0 elements (shape [6, 0])", BTR, LK, lambda r: r.update(shape=[6, 0]))
    par("kmeans_precision_unknown", "precision 'bfloat16'", BTR, LK, put("precision", "bfloat16"))
    par("kmeans_groups_0", "G = 0 (group_rows and counts empty)", BTR, LK, lambda p: p.update(group_rows=[], counts=[]))
    t = kmeans_t("k", "float32", (4097, 1), [(np.zeros((1, 1), dtype=int), [float(i % 13)]) for i in range(4097)])
    with_t("kmeans_groups_4097", "G = 4097 one-row groups (K = 1 each, consistent otherwise)", "§7.7.1 §12", LK, t, BTR)
    par("kmeans_counts_length_less", "counts with G - 1 entries", BTR, LK, lambda p: p["counts"].pop())
    par("kmeans_counts_length_more", "counts with G + 1 entries", BTR, LK, lambda p: p["counts"].append(b"\x04"))
    par("kmeans_group_rows_zero", "a group of 0 rows added (its counts '00')", BTR, LK,
        lambda p: (p["group_rows"].insert(1, 0), p["counts"].insert(1, b"\x00")))
    par("kmeans_group_rows_negative", "group_rows [3, -1, 1, 3] (sum 6)", BTR, LK,
        lambda p: (p["group_rows"].__setitem__(0, 3), p["group_rows"].insert(1, -1), p["counts"].insert(1, b"\x04")))
    par("kmeans_group_rows_sum_less", "group_rows [2, 1, 2] (sum 5 < n = 6)", BTR, LK, put_at("group_rows", 2, 2))
    par("kmeans_group_rows_sum_more", "group_rows [2, 1, 4] (sum 7 > n = 6)", BTR, LK, put_at("group_rows", 2, 4))
    par("kmeans_group_rows_sum_wraps_u64", "group_rows [2^63 + 2, 2^63 + 1, 3]: the sum is 6 modulo 2^64", BTR,
        LK, lambda p: p.update(group_rows=[2**63 + 2, 2**63 + 1, 3]))
    ck = unleb128(lineage_base()[LK].record["params"]["counts"][2])
    par("kmeans_counts_sum_high", "group 2's counts add up to 13 (3 rows x 4 = 12)", BT, LK,
        put_at("counts", 2, leb128([ck[0] + 1] + ck[1:])), "§7.7.1")
    par("kmeans_counts_empty", "group 0's counts an empty bin", BT, LK, put_at("counts", 0, b""), "§7.S.2 §7.7.1")
    par("kmeans_counts_overlong", "group 1's count 4 written 84 00", BT, LK, put_at("counts", 1, b"\x84\x00"),
        "§7.S.2")
    g2 = np.arange(12).reshape(3, 4) % 4
    t2 = kmeans_t("k", "float32", (6, 4), [(np.arange(8).reshape(2, 4) % 3, [-1.0, 0.0, 1.0]),
                                           (np.zeros((1, 4), dtype=int), [0.25]),
                                           (g2 + (g2 >= 1), [-2.0, -1.0, -0.5, 0.5, 2.0])])
    assert unleb128(t2.record["params"]["counts"][2]) == [3, 0, 3, 3, 3]
    with_t("kmeans_counts_zero", "group 2's counts [3, 0, 3, 3, 3]: stored value -1.0 unused (codebook stream "
           "and symbols consistent)", "§7.7.1", LK, t2, BT)
    chunks_x("kmeans_codebook_short", "the codebook stream 2 bytes short", payload(LK, 0, 0, lambda b: b[:-2]))
    chunks_x("kmeans_chunk_for_single_value_group", "a chunk in the stream of group 1 (K = 1)",
             lambda ts: ts[LK].chunks.insert(len(stream_of(ts[LK], 0)) + len(stream_of(ts[LK], 1)),
                                             Chunk(b"\0" * 4, stream=2, item_count=4)))
    chunks_x("kmeans_stream_past_groups", "a chunk in stream 1 + G", lambda ts: ts[LK].chunks.append(
        Chunk(b"\0" * 4, stream=4, item_count=1)))

    def swap_groups(ts):
        t = ts[LK]
        t.chunks = stream_of(t, 0) + stream_of(t, 3) + stream_of(t, 1)
    chunks_x("kmeans_group_streams_out_of_order", "group 2's chunk before group 0's", swap_groups)
    chunks_x("kmeans_rc_append_word", "group 2's payload with one more word (0): not canonical",
             payload(LK, 3, 0, lambda b: b + b"\0" * 4), BP, "§7.S.4 §8.5")
    chunks_x("kmeans_codebook_nan", "group 2's third value is NaN (0x7e00)", set_value(LK, 6, 0x7E00), BP, "§7.S.3")
    chunks_x("kmeans_codebook_not_increasing", "group 0's codebook (-1, 0, -0.5)", set_value(LK, 2, 0xB800), BP,
             "§7.7.2")

    # --- pq
    par("pq_missing_dim", "pq params without 'dim'", BTR, LP, pop("dim"))
    par("pq_missing_counts", "pq params without 'counts'", BTR, LP, pop("counts"))
    par("pq_unknown_key", "pq params with an unknown key 'k'", BTR, LP, put("k", 5))
    par("pq_dim_float", "dim is 4.0", BTR, LP, put("dim", 4.0))
    par("pq_dim_bool", "dim is true", BTR, LP, put("dim", True))
    par("pq_counts_array", "counts is an array of one bin", BTR, LP, lambda p: p.update(counts=[p["counts"]]))
    par("pq_precision_int", "precision is nil", BTR, LP, put("precision", None))
    rec("pq_int_dtype", "pq with dtype int16", BTR, LP, lambda r: r.update(dtype="int16"))
    rec("pq_0d", "pq on a 0-d tensor", BTR, LP, lambda r: r.update(shape=[]))
    rec("pq_empty_tensor", "pq tensor with 0 elements (shape [0, 10])", BTR, LP, lambda r: r.update(shape=[0, 10]))
    par("pq_precision_unknown", "precision 'half'", BTR, LP, put("precision", "half"))
    par("pq_dim_0", "dim 0", BTR, LP, put("dim", 0))
    par("pq_dim_negative", "dim -4", BTR, LP, put("dim", -4))
    par("pq_dim_over_m", "dim 11 for m = 10", BTR, LP, put("dim", 11))
    with_t("pq_dim_257", "dim 257 for m = 300 (over §12's 256; one codeword, consistent otherwise)",
           "§7.8.1 §12", LP, pq_t("p", "float32", (1, 300), np.zeros((1, 2), dtype=int),
                                   np.ones((1, 257)), check=False), BTR)
    cp = unleb128(lineage_base()[LP].record["params"]["counts"])
    par("pq_counts_sum_n_times_m", "counts adding up to n x m / d = 10 (rounding down) instead of n x s = 12 "
        "(codeword 2's count 4 -> 2)", BT,
        LP, put("counts", leb128([c - 2 if j == 2 else c for j, c in enumerate(cp)])), "§7.8.1")
    tp = lineage_base()[LP]
    sp = np.array([[0, 1, 2], [3, 4, 2], [1, 0, 2], [4, 3, 2]])
    books = np.frombuffer(stream_of(tp, 0)[0].payload, "<f2").reshape(5, 4).astype(np.float64)
    t3 = pq_t("p", "float32", (4, 10), sp + (sp >= 3), np.concatenate([books[:3], [[7.0, 7.0, 7.0, 7.0]], books[3:]]),
              check=False)
    assert unleb128(t3.record["params"]["counts"]) == [2, 2, 4, 0, 2, 2]
    with_t("pq_counts_zero", "counts [2, 2, 4, 0, 2, 2]: codeword 3 stored but unused (stream and symbols "
           "consistent)", "§7.8.1", LP, t3, BT)
    chunks_x("pq_codebook_long", "the codebook stream 8 bytes long", payload(LP, 0, 0, lambda b: b + b"\0" * 8))
    chunks_x("pq_symbols_more", "the symbol stream codes 13 symbols for n x s = 12",
             lambda ts: ts[LP].chunks.__setitem__(1, recode(ts[LP], 1, [0, 1, 2, 3, 4, 2, 1, 0, 2, 4, 3, 2, 2], cp)))
    chunks_x("pq_codeword_nan_unused_component", "codeword 2 (used only by the short last sub-vectors) holds NaN in "
             "component 3, which is never reconstructed: every stored value must be finite",
             set_value(LP, 2 * 4 + 3, 0x7E00), BP, "§7.S.3 §7.8.2")
    chunks_x("pq_codeword_inf", "codeword 0 component 0 is -inf", set_value(LP, 0, 0xFC00), BP, "§7.S.3")

    # --- dither
    for k in ("step", "seed", "q_min", "counts"):
        par(f"dither_missing_{k}", f"dither params without '{k}'", BTR, LS, pop(k))
    par("dither_unknown_key", "dither params with an unknown key 'dither'", BTR, LS, put("dither", "splitmix64"))
    par("dither_seed_float", "seed is 11.0", BTR, LS, put("seed", 11.0))
    par("dither_seed_bool", "seed is true", BTR, LS, put("seed", True))
    par("dither_step_float", "step is -5.0", BTR, LS, put("step", -5.0))
    par("dither_q_min_not_array", "q_min is an integer", BTR, LS, lambda p: p.update(q_min=p["q_min"][0]))
    par("dither_q_min_float_element", "q_min [-7.0]", BTR, LS, lambda p: p.update(q_min=[float(p["q_min"][0])]))
    par("dither_counts_str_element", "counts ['...'] (a string element)", BTR, LS, put("counts", ["\x01"]))
    par("dither_counts_bin", "counts is a bin, not an array of bins", BTR, LS, lambda p: p.update(counts=p["counts"][0]))
    par("dither_lattice_int", "lattice is the integer 2", BTR, LX, put("lattice", 2))
    rec("dither_int_dtype", "dither with dtype int64", BTR, LS, lambda r: r.update(dtype="int64"))
    rec("dither_empty_tensor", "dither tensor with 0 elements (shape [5, 0])", BTR, LS, lambda r: r.update(shape=[5, 0]))
    par("dither_lattice_unknown", "lattice 'A2'", BTR, LX, put("lattice", "A2"))
    par("dither_seed_negative", "seed -1", BTR, LS, put("seed", -1))
    par("dither_seed_i64_min", "seed -2^63", BTR, LS, put("seed", -2**63))
    par("dither_scalar_two_streams", "lattice scalar with q_min and counts of 2 entries (hex's second copied)", BTR,
        LS, lambda p: (p["q_min"].append(p["q_min"][0]), p["counts"].append(p["counts"][0])))
    par("dither_hex_one_stream", "lattice hex with q_min and counts of 1 entry", BTR, LX,
        lambda p: (p["q_min"].pop(), p["counts"].pop()))
    par("dither_q_min_length_mismatch", "lattice hex with 2 counts but 1 q_min", BTR, LX, lambda p: p["q_min"].pop())
    par("dither_hex_lattice_missing", "hex coordinates (2 streams) without the lattice key (default scalar)", BTR,
        LX, pop("lattice"))
    for label, v in (("below", -161), ("above", 104)):
        par(f"dither_step_code_{label}", f"step code {v}", "BAD_STEP", LS, put("step", v), "§7.1 §7.9.1")
    cs = unleb128(lineage_base()[LS].record["params"]["counts"][0])
    cx = [unleb128(b) for b in lineage_base()[LX].record["params"]["counts"]]
    par("dither_counts_zero_first", "counts with a 0 first (q_min one lower)", BT, LS,
        lambda p: p.update(counts=[leb128([0] + cs)], q_min=[p["q_min"][0] - 1]))
    par("dither_counts_zero_last", "hex stream 1's counts with a 0 last", BT, LX,
        put_at("counts", 1, leb128(cx[1] + [0])))
    par("dither_hex_counts_sum_numel", "hex stream 0's counts adding up to numel = 15 instead of P = 8", BT, LX,
        put_at("counts", 0, leb128(cx[0][:-1] + [cx[0][-1] + 7])), "§7.9.1")
    par("dither_counts_overlong", "a count written in two bytes (xx 00)", BT, LS,
        put("counts", [bytes([cs[0] | 0x80, 0]) + leb128(cs[1:])]), "§7.S.2")
    par("dither_q_min_below_limit", "q_min [-2^20 - 1]", LE, LS, put("q_min", [-(1 << 20) - 1]), "§7.9.1 §12")
    par("dither_q_max_above_limit", "hex stream 1: q_min + A - 1 = 2^20 + 1", LE, LX,
        put_at("q_min", 1, (1 << 20) + 2 - len(cx[1])), "§7.9.1 §12")
    chunks_x("dither_hex_stream_1_missing", "hex without its stream 1 chunk",
             lambda ts: ts[LX].chunks.pop())
    chunks_x("dither_scalar_stream_1_chunk", "a chunk in stream 1 of a scalar dither tensor",
             lambda ts: ts[LS].chunks.append(Chunk(b"\0" * 4, stream=1, item_count=30)))
    chunks_x("dither_symbols_fewer", "the scalar stream codes 29 of its 30 symbols",
             lambda ts: ts[LS].chunks.__setitem__(0, recode(ts[LS], 0, [1] * 29, cs)))
    chunks_x("dither_rc_seal_plus_1", "hex stream 0's seal word + 1 (not canonical)", payload(
        LX, 0, 0, lambda p: p[:-4] + struct.pack("<I", (struct.unpack("<I", p[-4:])[0] + 1) & 0xFFFFFFFF)),
        BP, "§7.S.4 §8.5")

    def other_counts(ts):
        p = ts[LS].record["params"]
        c = list(cs)
        d = 1 if c[-1] > 1 else -1
        p["counts"] = [leb128([c[0] + d] + c[1:-1] + [c[-1] - d])]
    chunks_x("dither_rc_other_counts", "counts replaced by other valid counts (same A and sum); payload coded with "
             "the first table", other_counts, BP, "§7.S.2 §8.5")

    # --- spec 1.2 clarifications
    def between_streams(ts):
        t = ts[LC]
        k = len(stream_of(t, 0))
        t.chunks.insert(k, Chunk(b"x", chunk_type=0x8000, stream=0xFFFF))
    chunks_x("ancillary_between_streams", "an ancillary chunk between the ecsq codebook tensor's value stream "
             "(stream 0, complete) and its symbol stream: inside the tensor's group", between_streams, BC, "§6.2")
    par("pq_counts_42_bit", "counts [2^42 - 1, 2^42 - 1] (two 6-byte varints; the sum is not n x s = 12)", BT, LP,
        put("counts", leb128([(1 << 42) - 1] * 2)), "§7.S.2 §7.8.1")
    # base: valid/kmeans_groups (its middle group has K_g = 1, no symbol chunks)
    t = kmeans_t("w", "float32", (9, 6), [(np.tile(np.arange(6) % 4, (2, 1)), [-1.5, -0.25, 0.5, 2.0]),
                                          (np.zeros((3, 6), dtype=int), [0.125]),
                                          (np.arange(24).reshape(4, 6) % 3, [-4.0, 0.0, 1.0])])
    c = stream_of(t, 0)[0]
    c.payload = c.payload[:8] + struct.pack("<H", 0x7E00) + c.payload[10:]
    ts_x("kmeans_codebook_nan_single_value_group", "valid/kmeans_groups with its middle group's one value (K_g = "
         "1: no symbols use it through a stream) NaN", "§7.S.3 §7.7.2", [t], BP)
    # base: valid/ecsq_codebook_single_value (tensor c: A = 1, one stored value, no symbol chunks)
    ts = [ecsq_t("c", "float32", (2, 5), np.zeros(10), recon="codebook", values=[-0.375]),
          ecsq_t("e", "float32", (2, 2), [0, 1, 1, 0], recon="codebook", values=[0.5, 2.0], precision="float16")]
    c = stream_of(ts[0], 0)[0]
    c.payload = struct.pack("<H", 0x7C00)
    ts_x("ecsq_codebook_single_value_inf", "valid/ecsq_codebook_single_value with the one stored value of tensor "
         "c (A = 1, no symbol stream) +inf", "§7.S.3 §7.6.2", ts, BP)


# --- the invalid vectors ---------------------------------------------------------------------------

def base_tensors():
    """The base file of the invalid vectors: every mode, multi-chunk streams, tensors without chunks."""
    r = rng(100)
    return [
        uniform_t("w", "float32", (4, 8), r.integers(-5, 6, 32), [-8, -7, -6, -5], "channel", chunks=[16, 16]),
        raw_t("b", "float32", np.linspace(-1, 1, 8), chunks=[12, 20]),
        raw_t("z", "int16", np.arange(-20, 20), codec="zstd"),
        uniform_t("c", "bfloat16", (2, 2), [4, 4, 4, 4], [1]),
    ]


def base():
    ts = base_tensors()
    ts += [alias_t("w_tied", 0, ts[0]), raw_t("e", "float32", np.zeros(0)),
           raw_t("m", "bool", np.array([1, 0, 0, 1, 1]))]
    return ts


# tensor indices in the base file
W, B, Z, C, WT, E, M = range(7)


def make_invalid(out: Out):
    X = out.invalid

    def good() -> TqzFile:
        return assemble(base())

    g = good().build()
    f0 = good()
    f0.build()
    mlen = len(f0.manifest)
    chunk_starts = []
    pos = 32 + mlen
    for c in f0.chunks:
        chunk_starts.append((pos, c))
        pos += len(c.to_bytes())
    index_off = pos
    footer_off = len(g) - 32

    def hdr(name, what, code, **fields):
        f = good()
        for k, v in fields.items():
            setattr(f, k, v)
        X(name, what, "§3", f.build(), code)

    # --- not a .tqz file / header (§3, §4)
    X("empty_file", "0 bytes", "§3", b"", "TRUNCATED")
    X("magic_prefix_1", "1 byte, a prefix of the magic", "§3", g[:1], "TRUNCATED")
    X("magic_prefix_7", "7 bytes, a prefix of the magic", "§3", g[:7], "TRUNCATED")
    X("short_not_magic", "3 bytes that are not a prefix of the magic", "§3", b"PK\x03", "BAD_MAGIC")
    X("magic_only", "the 8 magic bytes alone", "§3", g[:8], "TRUNCATED")
    X("header_truncated", "31 of the header's 32 bytes", "§3", g[:31], "TRUNCATED")
    X("html_page", "an HTML error page saved as .tqz", "§3",
      b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>\n",
      "BAD_MAGIC")
    X("magic_crlf_to_lf", "magic with its \\r\\n rewritten to \\n (text-mode transfer)", "§3",
      g[:4] + b"\n" + g[6:], "BAD_MAGIC")
    X("magic_first_byte", "magic with the high bit of byte 0 cleared (7-bit transfer)", "§3",
      bytes([g[0] & 0x7F]) + g[1:], "BAD_MAGIC")
    X("safetensors_file", "a safetensors file", "§3",
      struct.pack("<Q", 16) + b'{"__metadata__":' + b"{}}", "BAD_MAGIC")
    X("footer_magic_at_start", "the footer magic where the header magic belongs", "§3",
      b"\x89TQZEND\n" + g[8:], "BAD_MAGIC")
    hdr("version_0", "Major_Version 0", "UNSUPPORTED_VERSION", major=0)
    hdr("version_2", "Major_Version 2 (a future major version)", "UNSUPPORTED_VERSION", major=2)
    hdr("version_65535", "Major_Version 65535", "UNSUPPORTED_VERSION", major=65535)
    f = good()
    hb = bytearray(f.header_bytes())
    hb[8:32] = b"".join(hb[i:i + 2][::-1] if i < 12 else hb[i:i + 4][::-1] for i in
                        (8, 10, 12, 16, 20, 24, 28))
    X("header_byte_swapped", "header fields written big-endian (Major_Version reads 256)", "§3",
      bytes(hb) + g[32:], "UNSUPPORTED_VERSION")
    hdr("header_crc", "Header_CRC32 off by one", "CHECKSUM_MISMATCH", header_crc=crc32(g[:28]) ^ 1)
    hdr("header_crc_version_changed", "Minor_Version changed without updating Header_CRC32",
        "CHECKSUM_MISMATCH", minor=1, header_crc=struct.unpack_from("<I", g, 28)[0])
    hdr("required_feature_bit1", "Required_Features bit 1 set (bit 0 is ZSTD_MANIFEST since 1.3)",
        "UNKNOWN_REQUIRED_FEATURE", required=2)
    hdr("required_feature_bits_0_and_1", "Required_Features bits 0 and 1 set over a compressed manifest: the "
        "unknown bit is found in the header, before the manifest is read", "UNKNOWN_REQUIRED_FEATURE",
        required=3, manifest=zstd_manifest(f0.manifest), minor=3)
    hdr("required_feature_bit31", "Required_Features bit 31 set", "UNKNOWN_REQUIRED_FEATURE", required=1 << 31)
    hdr("manifest_length_0", "Manifest_Length 0", "LIMIT_EXCEEDED", manifest_length=0)
    hdr("manifest_length_over_limit", "Manifest_Length 2^26 + 1", "LIMIT_EXCEEDED", manifest_length=(1 << 26) + 1)
    hdr("manifest_length_max_u32", "Manifest_Length 2^32 - 1", "LIMIT_EXCEEDED", manifest_length=0xFFFFFFFF)
    hdr("manifest_length_at_limit_past_eof", "Manifest_Length 2^26 (allowed) in a small file", "TRUNCATED",
        manifest_length=1 << 26)
    hdr("manifest_length_too_short", "Manifest_Length one byte short (CRC over the shorter bytes)", "BAD_MANIFEST",
        manifest_length=mlen - 1, manifest_crc=crc32(f0.manifest[:-1]), footer_manifest_length=mlen - 1)

    # --- manifest (§5)
    hdr("manifest_crc", "Manifest_CRC32 wrong", "CHECKSUM_MISMATCH", manifest_crc=crc32(f0.manifest) ^ 0x80000000)
    f = good()
    bad = bytearray(f.manifest)
    bad[len(bad) // 2] ^= 0x20
    f.manifest_crc = crc32(f.manifest)
    f.manifest = bytes(bad)
    f.manifest_length = mlen
    X("manifest_byte_flipped", "a manifest byte changed, Manifest_CRC32 of the original", "§5",
      f.build(), "CHECKSUM_MISMATCH")

    def man(name, what, spec, manifest_bytes, code, tensor_count=7, keep_chunks=True):
        f = good()
        f.manifest = manifest_bytes
        f.tensor_count = tensor_count
        if not keep_chunks:
            f.chunks = []
        X(name, what, spec, f.build(), code)

    mv = manifest_value(base())
    mbytes = mp(mv)
    man("manifest_not_msgpack", "manifest is the byte c1 (never used in MessagePack)", "§5.1", b"\xc1",
        "BAD_MANIFEST")
    man("manifest_trailing_bytes", "a valid manifest followed by one more byte inside Manifest_Length", "§5.1",
        mbytes + b"\xc0", "BAD_MANIFEST")
    man("manifest_truncated_value", "the manifest's last byte cut (Manifest_Length matches the shorter bytes)",
        "§5.1", mbytes[:-1], "BAD_MANIFEST")
    man("manifest_json", "a JSON manifest", "§5.1", json.dumps({"metadata": {}, "tensors": []}).encode(),
        "BAD_MANIFEST", tensor_count=0, keep_chunks=False)

    def man_v(name, what, spec, value, code, **kw):
        man(name, what, spec, mp(value), code, **kw)

    tv = mv["tensors"]
    man_v("manifest_keys_unsorted", "top-level keys in the wrong order (tensors before metadata)", "§5.1",
          Pairs([("tensors", tv), ("metadata", {})]), "BAD_MANIFEST")
    man_v("manifest_duplicate_key", "top-level key 'metadata' twice", "§5.1",
          Pairs([("metadata", {}), ("metadata", {}), ("tensors", tv)]), "BAD_MANIFEST")
    man_v("metadata_duplicate_key", "a metadata key twice", "§5.1",
          {"metadata": Pairs([("a", 1), ("a", 1)]), "tensors": tv}, "BAD_MANIFEST")
    man_v("metadata_nested_map_unsorted", "a map nested in metadata with keys out of order", "§5.1",
          {"metadata": {"cfg": Pairs([("b", 1), ("a", 2)])}, "tensors": tv}, "BAD_MANIFEST")
    tv_unsorted = deepcopy(tv)
    tv_unsorted[B] = Pairs([(k, tv[B][k]) for k in ("name", "dtype", "mode", "params", "shape")])
    man_v("record_keys_unsorted", "a tensor record with its keys out of order (name first)", "§5.1",
          {"metadata": {}, "tensors": tv_unsorted}, "BAD_MANIFEST")
    man_v("tensors_count_past_end", "'tensors' as an array 32 declaring 2^20 + 1 records with 7 present (the "
          "declared length exceeds the bytes left: §5.1 before the §12 count)", "§5.1 §10.1",
          {"metadata": {}, "tensors": Raw(b"\xdd" + struct.pack(">I", (1 << 20) + 1) + b"".join(mp(r) for r in tv))},
          "BAD_MANIFEST")
    man_v("metadata_keys_utf16_order", "metadata keys sorted by UTF-16 code units (U+1F600 before U+FFFF), "
          "not by UTF-8 bytes", "§5.1",
          {"metadata": Pairs([("\U0001F600", 1), ("\uffff", 2)]), "tensors": tv}, "BAD_MANIFEST")
    for label, raw_bytes, what in (
            ("int_not_shortest", b"\xcd\x00\x05", "integer 5 as uint 16"),
            ("neg_int_not_shortest", b"\xd0\xff", "integer -1 as int 8"),
            ("uint_for_negative_range", b"\xd1\x00\x05", "integer 5 as int 16"),
            ("float32", b"\xca\x3f\x80\x00\x00", "a float 32"),
            ("str8_short", b"\xd9\x02ab", "a 2-byte string as str 8"),
            ("bin16_short", b"\xc5\x00\x02ab", "2 bytes as bin 16"),
            ("array16_short", b"\xdc\x00\x01\x01", "a 1-element array as array 16"),
            ("map16_short", b"\xde\x00\x01\xa1a\x01", "a 1-entry map as map 16"),
            ("ext_type", b"\xd4\x01\x00", "an extension type (fixext 1)"),
            ("timestamp_ext", b"\xd6\xff\x00\x00\x00\x00", "the timestamp extension"),
            ("invalid_utf8", b"\xa2\xc3\x28", "a string that is not UTF-8"),
            ("surrogate_utf8", b"\xa3\xed\xa0\x80", "a string holding a UTF-8-encoded surrogate"),
            ("str_past_end", b"\xdb\xff\xff\xff\xff", "a str 32 declaring 2^32-1 bytes (more than remain)"),
            ("array_past_end", b"\xdd\xff\xff\xff\xff", "an array 32 declaring 2^32-1 elements (more than remain)"),
            ("map_past_end", b"\xdf\x7f\xff\xff\xff", "a map 32 declaring 2^31-1 entries (more than remain)"),
            ("bin_past_end", b"\xc6\x10\x00\x00\x00", "a bin 32 declaring 2^28 bytes (more than remain)")):
        man_v(f"msgpack_{label}", f"metadata value is {what}", "§5.1",
              {"metadata": {"k": Raw(raw_bytes)}, "tensors": tv}, "BAD_MANIFEST")
    man_v("msgpack_int_key", "a metadata key that is an integer", "§5.1",
          {"metadata": Pairs([(1, 1)]), "tensors": tv}, "BAD_MANIFEST")
    man_v("msgpack_bin_key", "a metadata key that is binary", "§5.1",
          {"metadata": Pairs([(b"k", 1)]), "tensors": tv}, "BAD_MANIFEST")
    deep = "leaf"
    for _ in range(14):
        deep = [deep]
    man_v("msgpack_depth_17", "nesting depth 17 (manifest 1, metadata 2, 14 arrays, leaf 17)",
          "§5.1 §12", {"metadata": {"deep": deep}, "tensors": tv}, "BAD_MANIFEST")
    deep = Raw(b"\x91" * 2000 + b"\x00")
    man_v("msgpack_depth_2000", "nesting depth 2000 (stack exhaustion in naive decoders)", "§5.1",
          {"metadata": {"deep": deep}, "tensors": tv}, "BAD_MANIFEST")
    man_v("manifest_not_map", "manifest is an array", "§5.2", [{}, tv], "BAD_MANIFEST")
    man_v("manifest_no_metadata", "manifest without 'metadata'", "§5.2", {"tensors": tv}, "BAD_MANIFEST")
    man_v("manifest_no_tensors", "manifest without 'tensors'", "§5.2", {"metadata": {}}, "BAD_MANIFEST",
          tensor_count=0, keep_chunks=False)

    # --- compressed manifest (§4 ZSTD_MANIFEST, §5.0; format 1.3): the base file, its manifest stored as given
    import zstandard

    def zman(name, what, stored, code, required=1, **fields):
        f = good()
        f.manifest, f.required, f.minor = stored, required, 3
        for k, v in fields.items():
            setattr(f, k, v)
        X(name, what, "§5.0", f.build(), code)

    plain = f0.manifest
    zs = zstd_manifest(plain)
    raw_blocks = zstd_blocks(plain)
    zmagic = b"\x28\xb5\x2f\xfd"
    zman("manifest_zstd_plain", "ZSTD_MANIFEST set over a plain (MessagePack) manifest", plain, "BAD_MANIFEST")
    zman("manifest_zstd_bit_clear", "a compressed manifest with ZSTD_MANIFEST clear: read as MessagePack, the "
         "frame's first byte (0x28) is a whole value followed by more bytes", zs, "BAD_MANIFEST", required=0)
    zman("manifest_zstd_crc_of_content", "Manifest_CRC32 of the decompressed manifest instead of the stored bytes",
         zs, "CHECKSUM_MISMATCH", manifest_crc=crc32(plain))
    zman("manifest_zstd_magic_only", "a stored manifest of the 4 zstd magic bytes alone", zmagic, "BAD_MANIFEST")
    zman("manifest_zstd_skippable", "a skippable frame followed by the manifest's frame",
         b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + b"skip" + zs, "BAD_MANIFEST")
    zman("manifest_zstd_reserved_bit", "a frame header with the reserved bit set",
         zs[:4] + bytes([zs[4] | 0x08]) + zs[5:], "BAD_MANIFEST")
    zman("manifest_zstd_dictionary", "a frame header naming dictionary 7",
         zmagic + bytes([zstd_frame(plain)[4] | 0x01, 7]) + zstd_frame(plain)[5:], "BAD_MANIFEST")
    zman("manifest_zstd_no_content_size", "a frame without Frame_Content_Size (Raw blocks, window descriptor)",
         zstd_frame(plain, content_size=False), "BAD_MANIFEST")
    zman("manifest_zstd_content_size_0", "a frame declaring (and holding) 0 bytes", zstd_frame(b""), "BAD_MANIFEST")
    zman("manifest_zstd_content_size_over_limit", "a single-segment frame declaring 2^26 + 1 bytes (4-byte field) "
         "over the manifest's Raw blocks: the size limit comes before the blocks",
         zmagic + b"\xa0" + struct.pack("<I", (1 << 26) + 1) + raw_blocks, "LIMIT_EXCEEDED")
    zman("manifest_zstd_content_size_larger", "a frame declaring one byte more than its blocks hold",
         zmagic + b"\xa0" + struct.pack("<I", len(plain) + 1) + raw_blocks, "BAD_MANIFEST")
    window_2e17 = b"\x80" + bytes([(17 - 10) << 3])  # not single-segment: a 2^17 window, a 4-byte content size
    zman("manifest_zstd_content_size_smaller", "a frame (2^17 window) declaring one byte less than its blocks "
         "hold: the output bound rejects it", zmagic + window_2e17 + struct.pack("<I", len(plain) - 1) + raw_blocks,
         "BAD_MANIFEST")
    zman("manifest_zstd_window_over_limit", "a frame with a 2^31-byte Window_Descriptor and the right 4-byte "
         "Frame_Content_Size", zmagic + b"\x80" + bytes([(31 - 10) << 3]) + struct.pack("<I", len(plain))
         + raw_blocks, "LIMIT_EXCEEDED")
    zman("manifest_zstd_trailing_byte", "the manifest's frame followed by one more stored byte", zs + b"\x00",
         "BAD_MANIFEST")
    half = len(plain) // 2
    zman("manifest_zstd_two_frames", "the manifest in two frames, one after the other",
         zstd_manifest(plain[:half]) + zstd_manifest(plain[half:]), "BAD_MANIFEST")
    zman("manifest_zstd_truncated", "the manifest's frame without its last 3 bytes (Manifest_Length matches)",
         zs[:-3], "BAD_MANIFEST")
    reserved_block = bytearray(zstd_frame(plain))
    reserved_block[len(reserved_block) - len(raw_blocks)] |= 0b110  # the first block's Block_Type 3, reserved
    zman("manifest_zstd_reserved_block_type", "a frame whose first block has the reserved Block_Type 3",
         bytes(reserved_block), "BAD_MANIFEST")
    ck = bytearray(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(plain))
    ck[-1] ^= 0xFF
    zman("manifest_zstd_bad_checksum", "a frame whose content checksum does not match", bytes(ck), "BAD_MANIFEST")
    zman("manifest_zstd_bomb", "a frame (2^17 window) declaring the manifest's length whose 128 KiB RLE blocks "
         "expand to 4 MiB: the output bound rejects it",
         zmagic + window_2e17 + struct.pack("<I", len(plain)) + b"".join(
             struct.pack("<I", (1 if i == 31 else 0) | (1 << 1) | ((1 << 17) << 3))[:3] + b"\x00"
             for i in range(32)), "BAD_MANIFEST")
    zman("manifest_zstd_content_trailing_byte", "the frame's content is the manifest followed by one more byte "
         "(§5.1 after §5.0)", zstd_manifest(plain + b"\xc0"), "BAD_MANIFEST")
    zman("manifest_zstd_content_keys_unsorted", "the frame's content has its top-level keys in the wrong order "
         "(§5.1 after §5.0)", zstd_manifest(mp(Pairs([("tensors", tv), ("metadata", {})]))), "BAD_MANIFEST")
    man_v("metadata_not_map", "'metadata' is an array", "§5.2", {"metadata": [], "tensors": tv}, "BAD_MANIFEST")
    man_v("tensors_not_array", "'tensors' is a map", "§5.2", {"metadata": {}, "tensors": {"w": tv[0]}},
          "BAD_MANIFEST", tensor_count=0, keep_chunks=False)
    man_v("metadata_too_many_entries", "4097 metadata entries", "§12",
          {"metadata": {f"key{i:05d}": i for i in range(4097)}, "tensors": tv}, "LIMIT_EXCEEDED")
    # 2^20 + 1 tensor records (empty maps, 1 byte each): the count is over the limit before any record
    many = Raw(b"\xdd" + struct.pack(">I", (1 << 20) + 1) + b"\x80" * ((1 << 20) + 1))
    f = good()
    f.manifest = mp({"metadata": {}, "tensors": many})
    f.tensor_count = (1 << 20) + 1
    f.chunks = []
    f.spans = []
    X("too_many_tensors", "2^20 + 1 tensor records (the index is left out: decoding stops at the manifest)",
      "§12", f.build(), "LIMIT_EXCEEDED")

    # --- tensor records (§5.3-§5.5)
    def rec(name, what, spec, code, i, change):
        ts = base()
        change(ts[i].record)
        X(name, what, spec, assemble(ts).build(), code)

    def setk(k, v):
        return lambda r: r.__setitem__(k, v)

    def delk(k):
        return lambda r: r.pop(k)

    man_v("record_not_map", "a tensor record that is an array", "§5.3",
          {"metadata": {}, "tensors": tv[:6] + [["m", "bool"]]}, "BAD_TENSOR_RECORD")
    man_v("record_nil", "a tensor record that is nil (an element of 'tensors' that is not a map is a record "
          "of the wrong type, not a manifest defect)", "§5.2 §5.3",
          {"metadata": {}, "tensors": tv[:6] + [None]}, "BAD_TENSOR_RECORD")
    man_v("record_string", "a tensor record that is the string 'w'", "§5.2 §5.3",
          {"metadata": {}, "tensors": tv[:6] + ["w"]}, "BAD_TENSOR_RECORD")
    for k in ("name", "dtype", "shape", "mode", "params"):
        rec(f"record_missing_{k}", f"a tensor record without '{k}'", "§5.3", "BAD_TENSOR_RECORD", B, delk(k))
    rec("name_not_string", "name is binary", "§5.3", "BAD_TENSOR_RECORD", B, setk("name", b"b"))
    rec("name_empty", "empty name", "§5.4", "BAD_TENSOR_RECORD", B, setk("name", ""))
    rec("name_1025_bytes", "a name of 1025 UTF-8 bytes", "§5.4 §12", "BAD_TENSOR_RECORD", B,
        setk("name", "x" * 1023 + "\u00e9"))
    for label, bad_name in (("nul", "a\x00b"), ("newline", "a\nb"), ("unit_separator", "a\x1fb"),
                            ("del", "a\x7fb"), ("backslash", "a\\b"), ("leading_slash", "/etc/passwd"),
                            ("dot_segment", "a/./b"), ("dotdot_start", "../x"), ("dotdot_end", "a/.."),
                            ("dot", "."), ("dotdot", "..")):
        rec(f"name_{label}", f"name {bad_name!r}", "§5.4", "BAD_TENSOR_RECORD", B, setk("name", bad_name))
    tv_bad = deepcopy(tv)
    tv_bad[B]["name"] = Raw(b"\xa1\xff")
    man_v("name_invalid_utf8", "a tensor name whose bytes are not UTF-8 (ff)", "§5.1 §5.4",
          {"metadata": {}, "tensors": tv_bad}, "BAD_MANIFEST")
    rec("name_duplicate", "two tensors named 'w'", "§5.4", "BAD_TENSOR_RECORD", B, setk("name", "w"))
    rec("dtype_unknown", "dtype 'complex64'", "§5.5", "BAD_TENSOR_RECORD", B, setk("dtype", "complex64"))
    rec("dtype_float8", "dtype 'float8_e4m3fn'", "§5.5", "BAD_TENSOR_RECORD", B, setk("dtype", "float8_e4m3fn"))
    rec("dtype_case", "dtype 'Float32'", "§5.5", "BAD_TENSOR_RECORD", B, setk("dtype", "Float32"))
    rec("dtype_not_string", "dtype is an integer", "§5.3", "BAD_TENSOR_RECORD", B, setk("dtype", 4))
    rec("shape_not_array", "shape is an integer", "§5.3", "BAD_TENSOR_RECORD", B, setk("shape", 8))
    rec("shape_negative", "shape [-8] instead of [8]", "§5.3",
        "BAD_TENSOR_RECORD", B, setk("shape", [-8]))
    rec("shape_negative_pair", "shape [-2, -4] (product 8)", "§5.3", "BAD_TENSOR_RECORD", B, setk("shape", [-2, -4]))
    rec("shape_float", "a dimension that is a float", "§5.3", "BAD_TENSOR_RECORD", B, setk("shape", [8.0]))
    rec("shape_bool", "a dimension that is true", "§5.3", "BAD_TENSOR_RECORD", B, setk("shape", [True] * 8))
    # §5.3 step 4: the shape is typed and signed completely before any limit (the constant tensor c: no chunks)
    rec("shape_9_dims_one_negative", "shape [1, 1, 1, 1, 1, 1, 1, 1, -1]: a negative dimension (checked before "
        "the 8-dimension limit)", "§5.3", "BAD_TENSOR_RECORD", C, setk("shape", [1] * 8 + [-1]))
    rec("shape_9_dims_one_float", "shape [1, 1, 1, 1, 1, 1, 1, 1, 1.0]: a dimension that is a float (checked "
        "before the 8-dimension limit)", "§5.3", "BAD_TENSOR_RECORD", C, setk("shape", [1] * 8 + [1.0]))
    rec("shape_negative_and_over_2e40", "shape [2^41, -1]: a negative dimension after one over §12's 2^40 "
        "(signs before limits)", "§5.3", "BAD_TENSOR_RECORD", C, setk("shape", [1 << 41, -1]))
    rec("ndim_9", "9 dimensions", "§12", "LIMIT_EXCEEDED", B, setk("shape", [1] * 8 + [8]))
    rec("dim_over_limit", "a dimension of 2^40 + 1 (with a 0 dimension: no elements)", "§12", "LIMIT_EXCEEDED", E,
        setk("shape", [(1 << 40) + 1, 0]))
    rec("numel_over_limit", "2^36 + 2 elements (two dimensions within limits)", "§12", "LIMIT_EXCEEDED", C,
        setk("shape", [2, (1 << 35) + 1]))
    rec("numel_wraps_to_0_u64", "shape [2^40, 2^24]: numel 2^64, which is 0 in 64-bit arithmetic", "§12",
        "LIMIT_EXCEEDED", B, setk("shape", [1 << 40, 1 << 24]))
    rec("numel_wraps_negative_i64", "shape [2^32, 2^31]: numel 2^63, negative in signed 64-bit arithmetic", "§12",
        "LIMIT_EXCEEDED", B, setk("shape", [1 << 32, 1 << 31]))
    rec("dim_u64_max", "a dimension of 2^64 - 1", "§12", "LIMIT_EXCEEDED", E, setk("shape", [2**64 - 1, 0]))
    rec("mode_unknown", "mode 'lzma'", "§7", "UNKNOWN_MODE", B, setk("mode", "lzma"))
    rec("mode_unknown_future", "mode 'transform' (a later version's mode)", "§7 §13", "UNKNOWN_MODE", W,
        setk("mode", "transform"))
    rec("mode_not_string", "mode is an integer", "§5.3", "BAD_TENSOR_RECORD", B, setk("mode", 1))
    rec("params_not_map", "params is an array", "§5.3", "BAD_TENSOR_RECORD", B, setk("params", ["none"]))

    def par(name, what, spec, code, i, change):
        rec(name, what, spec, code, i, lambda r: change(r["params"]))

    # raw
    par("raw_codec_missing", "raw params without 'codec'", "§7.2", "BAD_TENSOR_RECORD", B, lambda p: p.pop("codec"))
    par("raw_codec_unknown", "raw codec 'lz4'", "§7.2", "BAD_TENSOR_RECORD", B, lambda p: p.update(codec="lz4"))
    par("raw_codec_case", "raw codec 'ZSTD'", "§7.2", "BAD_TENSOR_RECORD", B, lambda p: p.update(codec="ZSTD"))
    par("raw_codec_not_string", "raw codec is an integer", "§7.2", "BAD_TENSOR_RECORD", B,
        lambda p: p.update(codec=0))
    par("raw_params_extra_key", "raw params with an extra key", "§7.2", "BAD_TENSOR_RECORD", B,
        lambda p: p.update(level=3))
    # uniform
    rec("uniform_int_dtype", "uniform with dtype int32", "§7.3", "BAD_TENSOR_RECORD", W, setk("dtype", "int32"))
    rec("uniform_bool_dtype", "uniform with dtype bool", "§7.3", "BAD_TENSOR_RECORD", C, setk("dtype", "bool"))
    rec("uniform_empty_tensor", "uniform with 0 elements (A = 1, no chunks)", "§7.3", "BAD_TENSOR_RECORD", C,
        setk("shape", [0, 2]))
    rec("uniform_channel_0d", "granularity channel on a 0-d tensor", "§7.3", "BAD_TENSOR_RECORD", C,
        lambda r: (r.update(shape=[]), r["params"].update(granularity="channel")))
    par("uniform_granularity_unknown", "granularity 'row'", "§7.3", "BAD_TENSOR_RECORD", W,
        lambda p: p.update(granularity="row"))
    par("uniform_steps_too_many_tensor", "granularity tensor with 2 step codes", "§7.3", "BAD_TENSOR_RECORD", C,
        lambda p: p.update(steps=[1, 1]))
    par("uniform_steps_empty", "granularity tensor with no step code", "§7.3", "BAD_TENSOR_RECORD", C,
        lambda p: p.update(steps=[]))
    par("uniform_steps_too_few_channel", "granularity channel with shape[0] - 1 step codes", "§7.3",
        "BAD_TENSOR_RECORD", W, lambda p: p.update(steps=p["steps"][:3]))
    par("uniform_steps_too_many_channel", "granularity channel with shape[0] + 1 step codes", "§7.3",
        "BAD_TENSOR_RECORD", W, lambda p: p.update(steps=p["steps"] + [0]))
    par("uniform_step_float", "a step code that is a float (0.5)", "§7.3", "BAD_TENSOR_RECORD", C,
        lambda p: p.update(steps=[0.5]))
    par("uniform_step_nan", "a step given as a float NaN", "§7.3", "BAD_TENSOR_RECORD", C,
        lambda p: p.update(steps=[float("nan")]))
    par("uniform_step_inf", "a step given as a float infinity", "§7.3", "BAD_TENSOR_RECORD", C,
        lambda p: p.update(steps=[float("inf")]))
    par("uniform_step_zero_float", "a step given as float 0.0", "§7.3", "BAD_TENSOR_RECORD", C,
        lambda p: p.update(steps=[0.0]))
    par("uniform_steps_not_array", "steps is an integer", "§7.3", "BAD_TENSOR_RECORD", C,
        lambda p: p.update(steps=1))
    par("uniform_step_code_below", "step code -161", "§7.1", "BAD_STEP", C, lambda p: p.update(steps=[-161]))
    par("uniform_step_code_above", "step code 104", "§7.1", "BAD_STEP", C, lambda p: p.update(steps=[104]))
    par("uniform_step_code_huge", "step code 2^64 - 1", "§7.1", "BAD_STEP", C, lambda p: p.update(steps=[2**64 - 1]))
    par("uniform_step_code_min_i64", "step code -2^63", "§7.1", "BAD_STEP", C, lambda p: p.update(steps=[-2**63]))
    par("uniform_step_codes_mixed_extremes", "per-channel step codes 2^64 - 1 and -1 (one out of range)", "§7.1",
        "BAD_STEP", W, lambda p: p.update(steps=[2**64 - 1, -1, -1, -1]))
    par("uniform_step_bool_among_ints", "per-channel step codes with one 'true' among integers", "§7.3",
        "BAD_TENSOR_RECORD", W, lambda p: p.update(steps=[-8, True, -6, -5]))
    par("uniform_steps_nested", "per-channel step codes as one-element arrays [[-8], [-7], [-6], [-5]]", "§7.3",
        "BAD_TENSOR_RECORD", W, lambda p: p.update(steps=[[c] for c in p["steps"]]))
    par("uniform_step_code_out_channel", "one channel's step code 104, the others valid", "§7.1", "BAD_STEP", W,
        lambda p: p.update(steps=[-8, -7, 104, -5]))
    par("uniform_q_min_bool", "q_min is false (not an integer)", "§7.3", "BAD_TENSOR_RECORD", C,
        lambda p: p.update(q_min=False))
    par("uniform_q_min_float", "q_min is a float", "§7.3", "BAD_TENSOR_RECORD", C, lambda p: p.update(q_min=4.0))
    par("uniform_freqs_not_binary", "freqs is a string", "§7.3", "BAD_TENSOR_RECORD", C,
        lambda p: p.update(freqs="\x80\x80\x80\x08"))
    par("uniform_freqs_array", "freqs is an array of integers", "§7.3", "BAD_TENSOR_RECORD", C,
        lambda p: p.update(freqs=[1 << 24]))
    par("uniform_params_missing_q_min", "uniform params without q_min", "§7.3", "BAD_TENSOR_RECORD", C,
        lambda p: p.pop("q_min"))
    par("uniform_params_extra_key", "uniform params with an extra key", "§7.3", "BAD_TENSOR_RECORD", C,
        lambda p: p.update(extra=1))
    for label, table, what in (
            ("empty", b"", "an empty table"),
            ("varint_5_bytes", b"\x80\x80\x80\x88\x00", "a varint of 5 bytes"),
            ("overlong_zero", b"\x80\x80\x80\x08\x80\x00", "2^24 then an overlong 0 (80 00)"),
            ("overlong_nonzero", leb128([TOTAL - 1]) + b"\x81\x00", "2^24 - 1 then 1 written overlong (81 00)"),
            ("zero", leb128([TOTAL, 0]), "a frequency 0 (after 2^24)"),
            ("zero_first", leb128([0, TOTAL]), "a frequency 0 first"),
            ("sum_low", leb128([TOTAL - 1]), "sum 2^24 - 1"),
            ("sum_high", leb128([TOTAL, 1]), "sum 2^24 + 1"),
            ("sum_high_two", leb128([1 << 23, (1 << 23) + 1]), "sum 2^24 + 1 over two entries"),
            ("sum_overflow_u32", leb128([(1 << 28) - 1] * 16 + [TOTAL + 16]),
             "16 x (2^28 - 1) + 2^24 + 16: sum 2^32 + 2^24, which is 2^24 modulo 2^32"),
            ("truncated_varint", leb128([TOTAL])[:-1], "the last varint cut (high bit set on the last byte)"),
            ("A_65537", leb128([256] * 65535 + [255, 1]), "65537 entries (sum 2^24)")):
        par(f"table_{label}", f"frequency table: {what}", "§7.3.1", "BAD_TABLE", C,
            lambda p, t=table: p.update(freqs=t))
    par("table_varint_5_bytes_value", "frequency table: 2^23 then 2^23 written in 5 bytes (80 80 80 84 00)",
        "§7.3.1", "BAD_TABLE", C, lambda p: p.update(freqs=leb128([1 << 23]) + b"\x80\x80\x80\x84\x00"))
    par("table_varint_4_bytes_over", "frequency table: a 4-byte varint of 2^28 - 1 (fits 4 bytes but sum wrong)",
        "§7.3.1", "BAD_TABLE", C, lambda p: p.update(freqs=b"\xff\xff\xff\x7f"))
    par("q_min_below_limit", "q_min = -2^20 - 1", "§7.3 §12", "LIMIT_EXCEEDED", W,
        lambda p: p.update(q_min=-(1 << 20) - 1))
    par("q_max_above_limit", "q_min + A - 1 = 2^20 + 1 (A = 1, q_min = 2^20 + 1)", "§7.3 §12", "LIMIT_EXCEEDED",
        C, lambda p: p.update(q_min=(1 << 20) + 1))
    par("q_max_above_limit_by_A", "q_min = 2^20 - 9 with A = 11 (top level 2^20 + 1)", "§7.3 §12",
        "LIMIT_EXCEEDED", W, lambda p: p.update(q_min=(1 << 20) - 9))
    par("q_min_u64_max", "q_min = 2^64 - 1", "§7.3 §12", "LIMIT_EXCEEDED", C, lambda p: p.update(q_min=2**64 - 1))
    par("q_min_i64_min", "q_min = -2^63", "§7.3 §12", "LIMIT_EXCEEDED", C, lambda p: p.update(q_min=-2**63))
    # alias
    par("alias_self", "alias of itself", "§7.4", "BAD_TENSOR_RECORD", WT, lambda p: p.update(of=WT))
    par("alias_forward", "alias of a later tensor", "§7.4", "BAD_TENSOR_RECORD", WT, lambda p: p.update(of=E))
    par("alias_negative", "alias of -1", "§7.4", "BAD_TENSOR_RECORD", WT, lambda p: p.update(of=-1))
    par("alias_out_of_range", "alias of 2^32", "§7.4", "BAD_TENSOR_RECORD", WT, lambda p: p.update(of=2**32))
    par("alias_not_int", "alias 'of' is the name 'w'", "§7.4", "BAD_TENSOR_RECORD", WT, lambda p: p.update(of="w"))
    par("alias_of_true", "alias 'of' is true (not an integer)", "§7.4", "BAD_TENSOR_RECORD", WT,
        lambda p: p.update(of=True))
    par("alias_missing_of", "alias params without 'of'", "§7.4", "BAD_TENSOR_RECORD", WT, lambda p: p.pop("of"))
    par("alias_extra_key", "alias params with an extra key", "§7.4", "BAD_TENSOR_RECORD", WT,
        lambda p: p.update(name="w"))
    rec("alias_dtype_differs", "alias with another dtype than its target", "§7.4", "BAD_TENSOR_RECORD", WT,
        setk("dtype", "float16"))
    rec("alias_shape_differs", "alias with another shape than its target", "§7.4", "BAD_TENSOR_RECORD", WT,
        setk("shape", [8, 4]))
    ts = base()
    ts.append(alias_t("tied_tied", WT, ts[WT]))
    X("alias_of_alias", "an alias of an alias", "§7.4", assemble(ts).build(), "BAD_TENSOR_RECORD")

    # --- chunks (§6)
    def chunk(name, what, spec, code, k, **fields):
        f = good()
        c = f.chunks[k]
        for key, v in fields.items():
            setattr(c, key, v)
        X(name, what, spec, f.build(), code)

    # chunk positions in the base: 0,1 = w; 2,3 = b; 4 = z; 5 = m
    chunk("chunk_header_crc", "a chunk's Header_CRC32 wrong", "§6", "CHECKSUM_MISMATCH", 2,
          header_crc=crc32(f0.chunks[2].header()[:28]) ^ 0x10000)
    chunk("chunk_payload_crc_uniform", "a range-coded chunk's Payload_CRC32 wrong", "§6", "CHECKSUM_MISMATCH", 1,
          payload_crc=crc32(f0.chunks[1].payload) ^ 1)
    chunk("chunk_payload_crc_raw", "a raw chunk's payload changed, CRC of the original", "§6", "CHECKSUM_MISMATCH",
          3, payload=b"\x00" * len(f0.chunks[3].payload), payload_crc=crc32(f0.chunks[3].payload))
    chunk("chunk_payload_crc_zstd", "a zstd chunk's Payload_CRC32 wrong", "§6", "CHECKSUM_MISMATCH", 4,
          payload_crc=0)
    chunk("chunk_tag_wrong", "a chunk tag 'TQCk'", "§10.1", "BAD_CHUNK", 2, tag=b"TQCk")
    chunk("chunk_type_0", "Chunk_Type 0", "§6.1", "UNKNOWN_CHUNK", 2, chunk_type=0)
    chunk("chunk_type_2", "Chunk_Type 2 (a critical type of a later version)", "§6.1", "UNKNOWN_CHUNK", 2,
          chunk_type=2)
    chunk("chunk_type_7fff", "Chunk_Type 0x7FFF (critical)", "§6.1", "UNKNOWN_CHUNK", 0, chunk_type=0x7FFF)
    chunk("chunk_tensor_index_out_of_range", "Tensor_Index = Tensor_Count", "§6.2", "BAD_CHUNK", 5, tensor_index=7)
    chunk("chunk_tensor_index_huge", "Tensor_Index 2^32 - 1", "§6.2", "BAD_CHUNK", 0, tensor_index=0xFFFFFFFF)
    chunk("chunk_stream_1", "Stream 1 for a mode with 1 stream", "§6.2", "BAD_CHUNK", 2, stream=1)
    chunk("chunk_item_count_0", "Item_Count 0 (payload empty)", "§6.2", "BAD_CHUNK", 5, item_count=0, payload=b"")
    chunk("chunk_item_count_over_limit", "Item_Count 2^26 + 1", "§6.2 §12", "LIMIT_EXCEEDED", 5,
          item_count=(1 << 26) + 1)
    chunk("chunk_payload_length_over_limit", "Payload_Length 2^28 + 1 (checked before the file's end)",
          "§6.2 §12", "LIMIT_EXCEEDED", 5, payload_length=(1 << 28) + 1)
    chunk("chunk_payload_length_u32_max", "Payload_Length 2^32 - 1", "§6.2 §12", "LIMIT_EXCEEDED", 0,
          payload_length=0xFFFFFFFF)
    chunk("chunk_payload_past_eof", "a zstd chunk's Payload_Length reaches 1 byte past the end of the file",
          "§10.1", "TRUNCATED", 4,
          payload_length=len(f0.chunks[4].payload) + 32 + len(f0.chunks[5].payload) + 4 + 16 * 7 + 32 + 1)
    # §10.1 step 3: the mode's Payload_Length rule, from the header, before TRUNCATED and the payload CRC
    chunk("raw_none_payload_length_past_eof", "the last raw none chunk's Payload_Length (Item_Count 5) set to "
          "1 byte past the end of the file (header CRC updated, payload and its CRC as they were): the mode's "
          "length rule comes before TRUNCATED", "§7.2 §10.1", "BAD_CHUNK", 5,
          payload_length=len(f0.chunks[5].payload) + 4 + 16 * 7 + 32 + 1)
    chunk("raw_none_payload_length_minus_1", "a raw none chunk's Payload_Length one less than its Item_Count "
          "(header CRC updated, payload and its CRC as they were): the mode's length rule comes before the "
          "payload CRC", "§7.2 §10.1", "BAD_CHUNK", 2, payload_length=len(f0.chunks[2].payload) - 1)
    chunk("uniform_payload_length_minus_1", "a range-coded chunk's Payload_Length one less (not a multiple of "
          "4; header CRC updated, payload and its CRC as they were): the mode's length rule comes before the "
          "payload CRC", "§7.3.2 §10.1", "BAD_CHUNK", 0, payload_length=len(f0.chunks[0].payload) - 1)
    chunk("chunk_sequence_starts_at_1", "first chunk of a stream has Sequence 1", "§6.2", "BAD_CHUNK", 2, sequence=1)
    chunk("chunk_sequence_gap", "Sequence 0 then 2", "§6.2", "BAD_CHUNK", 3, sequence=2)
    chunk("chunk_sequence_repeated", "Sequence 0 then 0", "§6.2", "BAD_CHUNK", 3, sequence=0)
    f = good()
    f.chunks[2], f.chunks[3] = f.chunks[3], f.chunks[2]
    X("chunks_swapped_within_stream", "a stream's chunks in the order Sequence 1, 0", "§6.2", f.build(), "BAD_CHUNK")
    f = good()
    f.chunks = f.chunks[2:4] + f.chunks[0:2] + f.chunks[4:]
    X("chunks_tensor_order", "tensor 1's chunks before tensor 0's", "§6.2", f.build(), "BAD_CHUNK")
    f = good()
    f.chunks = f.chunks[:1] + f.chunks[2:3] + f.chunks[1:2] + f.chunks[3:]
    X("chunks_interleaved", "tensor 1's first chunk inside tensor 0's chunks", "§6.2", f.build(), "BAD_CHUNK")
    f = good()
    f.chunks.insert(3, deepcopy(f.chunks[2]))
    f.chunks[3].sequence = 1
    f.chunks[4].sequence = 2
    X("chunk_duplicated", "a chunk repeated (its items counted twice)", "§6.2", f.build(), "BAD_CHUNK")
    f = good()
    del f.chunks[3]
    X("chunk_missing_last_of_stream", "a stream's last chunk missing (items short when the next tensor starts)",
      "§6.2", f.build(), "BAD_CHUNK")
    f = good()
    del f.chunks[5]
    X("chunk_missing_last_of_file", "the last tensor's chunk missing (index starts with the tensor incomplete)",
      "§6.2 §10.1", f.build(), "BAD_CHUNK")
    f = good()
    f.chunks.append(Chunk(b"\x01", tensor_index=M, sequence=1, item_count=1))
    X("chunk_after_complete", "an extra chunk after its tensor is complete", "§6.2", f.build(), "BAD_CHUNK")
    f = good()
    f.chunks.insert(5, Chunk(b"\x00" * 4, tensor_index=E, item_count=4))
    X("chunk_for_empty_tensor", "a chunk for a tensor with 0 elements", "§6.2", f.build(), "BAD_CHUNK")
    f = good()
    f.chunks.insert(5, Chunk(b"\x00" * 4, tensor_index=WT, item_count=1))
    X("chunk_for_alias", "a chunk for an alias (0 streams)", "§6.2 §7.4", f.build(), "BAD_CHUNK")
    f = good()
    f.chunks.insert(5, Chunk(b"\x00" * 4, tensor_index=C, item_count=4))
    X("chunk_for_single_symbol", "a chunk for a uniform tensor with A = 1 (its stream has no chunks)",
      "§7.3.2", f.build(), "BAD_CHUNK")
    chunk("chunk_items_more_than_declared", "a stream's chunks hold 1 item more than numel x itemsize "
          "(raw none, payload matches)", "§6.2", "BAD_CHUNK", 3, payload=f0.chunks[3].payload + b"\x00",
          item_count=21)
    chunk("chunk_items_fewer_raw", "a raw stream's chunks hold 1 byte fewer (index follows)", "§6.2", "BAD_CHUNK",
          5, payload=f0.chunks[5].payload[:-1], item_count=4)
    # each payload the canonical coding of its declared count, so only the stream's count is wrong (§6.2),
    # not the payload (§8.5)
    w_freqs = [int(v) for v in unleb128(base()[W].record["params"]["freqs"])]
    w_syms = rc_decode(np.frombuffer(f0.chunks[1].payload, "<u4").tolist(), w_freqs, f0.chunks[1].item_count)

    def coded(syms):
        return np.asarray(encode_symbols(np.array(syms, dtype=np.int32), np.array(w_freqs, dtype=np.uint32)),
                          "<u4").tobytes()
    chunk("chunk_symbols_more_uniform", "a uniform chunk holds 17 symbols (canonically coded) where its "
          "stream needs 16", "§6.2", "BAD_CHUNK", 1, item_count=17, payload=coded(list(w_syms) + [w_syms[0]]))
    chunk("chunk_symbols_fewer_uniform", "a uniform stream's chunks hold 1 symbol fewer than numel (the "
          "last chunk's 15 symbols canonically coded)", "§6.2", "BAD_CHUNK", 1, item_count=15,
          payload=coded(list(w_syms)[:15]))
    f = good()
    # symbols 16 + 16: declare 15 + 17 (sum right); chunk 0 then decodes 15 symbols from a 16-symbol payload
    f.chunks[0].item_count, f.chunks[1].item_count = 15, 17
    X("chunk_item_counts_shifted", "Item_Counts 15 + 17 for payloads of 16 + 16 symbols (sum right; each "
      "payload is not the coding of its declared count)", "§7.3.2 §8.5", f.build(), "BAD_PAYLOAD")
    f = good()
    f.chunks[2].item_count, f.chunks[3].item_count = 13, 19
    X("raw_none_counts_shifted", "raw none: Item_Counts 13 + 19 for payloads of 12 + 20 bytes (sum right)",
      "§7.2", f.build(), "BAD_CHUNK")
    f = good()
    f.chunks.insert(2, b"\x00" * 8)
    X("garbage_between_chunks", "8 zero bytes between two tensors' chunks", "§10.1", f.build(), "BAD_CHUNK")
    f = good()
    f.chunks.insert(6, b"JUNK")
    X("garbage_before_index", "4 bytes 'JUNK' between the last chunk and the index", "§10.1", f.build(), "BAD_CHUNK")
    # ancillary
    f = good()
    f.chunks.insert(1, Chunk(b"inside", chunk_type=0x8000))
    X("ancillary_inside_tensor", "an ancillary chunk between two chunks of one tensor", "§6.2", f.build(),
      "BAD_CHUNK")
    f = good()
    f.chunks.insert(2, Chunk(b"anc", chunk_type=0x8000, header_crc=0))
    X("ancillary_header_crc", "an ancillary chunk with a wrong Header_CRC32", "§6 §6.1", f.build(),
      "CHECKSUM_MISMATCH")
    f = good()
    f.chunks.insert(2, Chunk(b"anc", chunk_type=0x8000, payload_crc=0))
    X("ancillary_payload_crc", "an ancillary chunk with a wrong Payload_CRC32 (CRCs checked before skipping)",
      "§6.1", f.build(), "CHECKSUM_MISMATCH")
    f = good()
    f.chunks.insert(2, Chunk(b"anc", chunk_type=0x8000, payload_length=(1 << 28) + 1))
    X("ancillary_payload_length_over_limit", "an ancillary chunk with Payload_Length 2^28 + 1", "§12",
      f.build(), "LIMIT_EXCEEDED")
    f = good()
    f.chunks.append(Chunk(b"anc" * 100, chunk_type=0x8000, payload_length=1000))
    X("ancillary_past_eof", "an ancillary chunk whose payload runs past the end of the file", "§10.1",
      f.build(), "TRUNCATED")

    # --- payloads (§7, §8)
    import zstandard
    zdata = np.arange(-20, 20, dtype="<i2").tobytes()

    def zchunk(name, what, payload, code="BAD_PAYLOAD", item_count=None):
        f = good()
        f.chunks[4].payload = payload
        if item_count is not None:
            f.chunks[4].item_count = item_count
        X(name, what, "§7.2", f.build(), code)

    cc = zstandard.ZstdCompressor(level=3, write_content_size=True)
    zchunk("zstd_larger_than_declared", "zstd frame with Frame_Content_Size 81 (and 81 bytes of content) in a chunk declaring 80 items",
           cc.compress(zdata + b"\x00"))
    zchunk("zstd_larger_no_content_size", "zstd frame without content size that decompresses to 81 bytes, "
           "chunk declares 80", zstd_frame(zdata + b"\x00", content_size=False))
    zchunk("zstd_smaller_than_declared", "zstd frame of 79 bytes, chunk declares 80",
           zstd_frame(zdata[:-1], content_size=False))
    zchunk("zstd_content_size_lies", "zstd frame whose Frame_Content_Size says 80 but whose blocks hold 81 bytes",
           zstd_frame(zdata + b"\x00")[:5] + bytes([80]) + zstd_frame(zdata + b"\x00")[6:])
    zchunk("zstd_bomb", "a 40-byte zstd frame (RLE blocks, no content size) that expands to 4 MiB, chunk "
           "declares 80 items", b"\x28\xb5\x2f\xfd\x00\x58" + b"".join(
               struct.pack("<I", (1 if i == 31 else 0) | (1 << 1) | ((1 << 17) << 3))[:3] + b"\x00"
               for i in range(32)))
    zchunk("zstd_trailing_bytes", "a valid frame followed by one more payload byte",
           cc.compress(zdata) + b"\x00")
    zchunk("zstd_two_frames", "two frames of 40 bytes each", cc.compress(zdata[:40]) + cc.compress(zdata[40:]))
    zchunk("zstd_skippable_frame", "a skippable frame followed by the data frame",
           b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + b"skip" + cc.compress(zdata))
    zchunk("zstd_not_a_frame", "the raw bytes, not a zstd frame", zdata)
    fr = bytearray(cc.compress(zdata))
    fr[-2] ^= 0xFF
    zchunk("zstd_corrupt_block", "a frame with a damaged compressed block", bytes(fr))
    ck = bytearray(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(zdata))
    ck[-1] ^= 0xFF
    zchunk("zstd_bad_checksum", "a frame whose content checksum does not match", bytes(ck))
    zchunk("zstd_reserved_bit", "a frame header with the reserved bit set", zstd_frame(zdata)[:4] +
           bytes([zstd_frame(zdata)[4] | 0x08]) + zstd_frame(zdata)[5:])
    zchunk("zstd_needs_dictionary", "a frame whose header names dictionary 7", b"\x28\xb5\x2f\xfd\x21\x07"
           + zstd_frame(zdata)[5:])
    zchunk("zstd_truncated", "a frame cut inside its last block", zstd_frame(zdata)[:-3])
    last_raw_block = struct.pack("<I", 1 | (len(zdata) << 3))[:3] + zdata
    zchunk("zstd_single_segment_content_size_2e28", "a single-segment frame (descriptor E0) whose 8-byte "
           "Frame_Content_Size, so also its Window_Size, is 2^28, with one Raw block of the 80 bytes: the content "
           "size is compared with Item_Count before the window limit",
           b"\x28\xb5\x2f\xfd\xe0" + struct.pack("<Q", 1 << 28) + last_raw_block)
    zchunk("zstd_window_2e31_with_content_size", "a frame declaring a 2^31-byte window and a 4-byte "
           "Frame_Content_Size of 80 (= Item_Count), one Raw block of the 80 bytes: the window limit applies "
           "when the content size is right",
           b"\x28\xb5\x2f\xfd\x80" + bytes([(31 - 10) << 3]) + struct.pack("<I", 80) + last_raw_block,
           "LIMIT_EXCEEDED")
    zchunk("zstd_empty_payload", "a zstd chunk with Item_Count 80 and an empty payload (Payload_CRC32 0): zstd "
           "has no Payload_Length rule, an empty payload is not a frame", b"")
    zchunk("zstd_magic_only", "a zstd payload of the 4 magic bytes alone", b"\x28\xb5\x2f\xfd")
    f = good()
    f.chunks[5].payload = b"\x01\x00\x02\x01\x01"
    X("bool_byte_2", "a bool tensor holding the byte 2 (raw none)", "§5.5", f.build(), "BAD_PAYLOAD")
    ts = base()
    ts[M] = raw_t("m", "bool", np.array([1, 0, 255, 1, 1]), codec="zstd")
    X("bool_byte_255_zstd", "a bool tensor holding the byte 255 (raw zstd)", "§5.5", assemble(ts).build(),
      "BAD_PAYLOAD")

    def uchunk(name, what, spec, payload, code="BAD_PAYLOAD", k=1):
        f = good()
        f.chunks[k].payload = payload
        X(name, what, spec, f.build(), code)

    p1 = f0.chunks[1].payload
    uchunk("rc_append_word", "a range-coded payload with one more word (0)", "§8.5", p1 + b"\x00" * 4)
    uchunk("rc_append_word_ff", "a range-coded payload with one more word (0xFFFFFFFF)", "§8.5", p1 + b"\xff" * 4)
    uchunk("rc_drop_word", "a range-coded payload without its last word", "§8.5", p1[:-4])
    last = struct.unpack("<I", p1[-4:])[0]
    uchunk("rc_last_word_plus_1", "the seal word + 1 (still decodes the same symbols, not canonical)", "§8.5",
           p1[:-4] + struct.pack("<I", (last + 1) & 0xFFFFFFFF))
    uchunk("rc_first_word_changed", "a range-coded payload with its first word changed", "§8.5",
           struct.pack("<I", struct.unpack("<I", p1[:4])[0] ^ 0x00010000) + p1[4:])
    uchunk("rc_quantile_out_of_range", "payload FF FF FF FF FF FF FF FF...: first quantile >= 2^24", "§8.4 §8.5",
           b"\xff" * len(p1))
    uchunk("rc_length_not_multiple_of_4", "a range-coded payload of 4n + 1 bytes", "§7.3.2", p1 + b"\x00",
           "BAD_CHUNK")
    uchunk("rc_length_0", "a range-coded payload of 0 bytes", "§7.3.2", b"", "BAD_CHUNK")
    uchunk("rc_length_3", "a range-coded payload of 3 bytes", "§7.3.2", p1[:3], "BAD_CHUNK")
    ts = base()
    p = ts[W].record["params"]
    A = len([1 for b_ in p["freqs"] if not b_ & 0x80])
    other = frequencies_from_counts(np.arange(1, A + 1)).tolist()
    p["freqs"] = leb128(other)
    X("rc_other_table", "uniform params' table replaced by another valid table of the same length (payloads "
      "coded with the first)", "§8.5", assemble(ts).build(), "BAD_PAYLOAD")
    ts = base()
    f1 = ts[W].chunks[1]
    freqs_w = []
    cur = shift = 0
    for b_ in ts[W].record["params"]["freqs"]:
        cur |= (b_ & 0x7F) << shift
        shift += 7
        if not b_ & 0x80:
            freqs_w.append(cur)
            cur = shift = 0
    sym_w = np.array([1, 2, 3, 4] * 5, dtype=np.int32)
    words = np.asarray(encode_symbols(sym_w, np.array(freqs_w, dtype=np.uint32)), "<u4").tobytes()
    f1.payload = words
    X("rc_payload_for_more_symbols", "a payload coding 20 symbols in a chunk declaring 16", "§8.5",
      assemble(ts).build(), "BAD_PAYLOAD")

    # --- index and footer (§9)
    def foot(name, what, code, **fields):
        f = good()
        for k, v in fields.items():
            setattr(f, k, v)
        X(name, what, "§9", f.build(), code)

    spans = f0.computed_spans()

    def spans_with(i, v):
        s = list(spans)
        s[i] = v
        return s

    foot("index_crc", "Index_CRC32 wrong", "CHECKSUM_MISMATCH", index_crc=0)
    f = good()
    f.index_crc = crc32(b"TQIX" + b"".join(struct.pack("<QQ", *s) for s in spans))
    f.spans = spans_with(B, (spans[B][0] + 1, spans[B][1]))
    X("index_entry_changed_crc_of_original", "an index entry changed, Index_CRC32 of the original", "§9",
      f.build(), "CHECKSUM_MISMATCH")
    foot("index_tag_wrong", "index tag 'TQIY' (front to back it is neither a chunk nor the index)", "BAD_CHUNK",
         index_tag=b"TQIY")
    foot("index_span_offset_wrong", "a span offset off by 32 (CRCs updated)", "BAD_INDEX",
         spans=spans_with(B, (spans[B][0] + 32, spans[B][1])))
    foot("index_span_length_short", "a span length 1 short", "BAD_INDEX", spans=spans_with(B, (spans[B][0],
                                                                                              spans[B][1] - 1)))
    foot("index_span_length_long", "a span length covering the next tensor's chunk too", "BAD_INDEX",
         spans=spans_with(B, (spans[B][0], spans[B][1] + spans[Z][1])))
    foot("index_span_zero_for_tensor_with_chunks", "(0, 0) for a tensor with chunks", "BAD_INDEX",
         spans=spans_with(Z, (0, 0)))
    foot("index_span_for_tensor_without_chunks", "a non-zero span for an alias (no chunks)", "BAD_INDEX",
         spans=spans_with(WT, spans[Z]))
    foot("index_span_offset_nonzero_length_0", "(offset, 0) with a non-zero offset for an empty tensor",
         "BAD_INDEX", spans=spans_with(E, (spans[M][0], 0)))
    foot("index_span_overflow_u64", "a span whose offset + length overflows 64 bits", "BAD_INDEX",
         spans=spans_with(B, (spans[B][0], 2**64 - spans[B][0] + 8)))
    foot("index_span_u64_max", "a span offset of 2^64 - 1", "BAD_INDEX", spans=spans_with(B, (2**64 - 1, spans[B][1])))
    foot("index_spans_swapped", "two tensors' index entries swapped", "BAD_INDEX",
         spans=spans_with(B, spans[Z])[:Z] + [spans[B]] + spans[Z + 1:])
    foot("footer_magic", "Footer_Magic wrong in its last byte", "BAD_INDEX", footer_magic=b"\x89TQZEND\r")
    foot("footer_crc", "Footer_CRC32 wrong", "CHECKSUM_MISMATCH", footer_crc=1)
    foot("footer_index_offset_wrong", "Index_Offset off by 4", "BAD_INDEX", index_offset=index_off - 4)
    foot("footer_index_offset_u64_max", "Index_Offset 2^64 - 1 (offset + index + footer overflow 64 bits)",
         "BAD_INDEX", index_offset=2**64 - 1)
    foot("footer_index_offset_0", "Index_Offset 0", "BAD_INDEX", index_offset=0)
    foot("footer_tensor_count_plus_1", "footer Tensor_Count one more than the manifest's", "BAD_INDEX",
         footer_tensor_count=8)
    foot("footer_tensor_count_minus_1", "footer Tensor_Count one less than the manifest's", "BAD_INDEX",
         footer_tensor_count=6)
    foot("footer_tensor_count_u32_max", "footer Tensor_Count 2^32 - 1", "BAD_INDEX",
         footer_tensor_count=0xFFFFFFFF)
    foot("footer_manifest_length", "footer Manifest_Length differs from the header's", "BAD_INDEX",
         footer_manifest_length=mlen + 1)

    # --- truncation at each structure boundary, and trailing bytes (§10.1)
    cuts = [("after_header", 32), ("inside_manifest", 32 + mlen // 2), ("after_manifest", 32 + mlen)]
    for k, (p, c) in enumerate(chunk_starts):
        cuts += [(f"chunk{k}_inside_tag", p + 2), (f"chunk{k}_inside_header", p + 17),
                 (f"chunk{k}_after_header", p + 32), (f"chunk{k}_inside_payload", p + 32 + len(c.payload) // 2)]
        if k + 1 < len(chunk_starts):
            cuts.append((f"after_chunk{k}", p + 32 + len(c.payload)))
    cuts += [("before_index", index_off), ("inside_index_tag", index_off + 2), ("after_index_tag", index_off + 4),
             ("inside_index", index_off + 4 + 16 * 3 + 5), ("before_footer", footer_off),
             ("inside_footer", footer_off + 16), ("last_byte_missing", len(g) - 1)]
    for label, c in cuts:
        X(f"truncated_{label}", f"the base file cut at byte {c} ({label.replace('_', ' ')})", "§10.1", g[:c],
          "TRUNCATED")
    X("trailing_one_zero_byte", "one 0 byte after the footer", "§10.1", g + b"\x00", "TRAILING_DATA")
    X("trailing_text", "text after the footer", "§10.1", g + b"appended junk\n", "TRAILING_DATA")
    X("trailing_whole_file", "the file twice in a row", "§10.1", g + g, "TRAILING_DATA")
    X("trailing_footer_copy", "a copy of the footer after the footer", "§10.1", g + g[-32:], "TRAILING_DATA")
    # §10.1 step 3: fewer than 4 bytes where a chunk or the index is due is TRUNCATED, whatever they are
    X("tail_3_bytes_not_a_tag", "the base file cut after its last chunk, then the 3 bytes 'XYZ' (no index, no "
      "footer)", "§10.1", g[:index_off] + b"XYZ", "TRUNCATED")
    empty = assemble([]).build()
    X("tail_2_bytes_after_manifest", "valid/no_tensors' header and manifest followed by 2 zero bytes", "§10.1",
      empty[:32 + struct.unpack_from("<I", empty, 20)[0]] + b"\x00\x00", "TRUNCATED")


# --- README ------------------------------------------------------------------------------------------

README_HEAD = """# .tqz conformance vectors

Test files for decoders of the `.tqz` format, spec version {ver} ([`spec/tqz.md`](../spec/tqz.md), its §8
[`spec/range-coder.md`](../spec/range-coder.md), its §7.5 [`spec/mode-tq.md`](../spec/mode-tq.md), mode `tq`,
added in 1.1, and its §7.6-§7.9 [`spec/mode-lineage.md`](../spec/mode-lineage.md), modes `ecsq`, `kmeans`, `pq`
and `dither`, added in 1.2; the compressed manifest, required feature bit 0 `ZSTD_MANIFEST`, spec §5.0, was
added in 1.3; `tq`'s `row_band`, bands that are sets of rows, §7.5.1, in 1.4). Files with a `tq` tensor that has
`row_band` have header Minor_Version 4 (the `tq_row_band*` vectors, `encoder_tq_row_band` and `fixtures/v1.4/`),
other files with a compressed manifest Minor_Version 3 (most files tqcodec's encoder writes since 1.3: the other
`encoder_*` vectors and `fixtures/v1.3/`), other files with a tensor in one of the 1.2 modes Minor_Version 2,
other files with a `tq` tensor Minor_Version 1; every other vector is a 1.0 file.

**Generated file**: this README's tables are written by `conformance/make_vectors.py` from the
`vector.json` files; do not edit them by hand.

## Layout

- `valid/NAME/`: `in.tqz`, `expected.safetensors` (the decoded tensors, each in its own dtype;
  bfloat16 as safetensors `BF16`), `vector.json` (`what`, `spec`, `tolerance`, `dtype notes`).
  Valid vectors are bit-exact (`tolerance` 0: compare dtype, shape and bytes) except those with a
  `tq` tensor with a float16 transform (`tq_transform_*`, `tq_alias`, the `*_transform_work*` vectors):
  spec/mode-tq.md §7.5.3 lets a decoder compute the sums in any way that meets its 2^-20 bound
  (binary64 in any order does; binary32 accumulation does not, see `valid/tq_transform_long_sum`).
  Their `tolerance` is `{{"abs": a, "rel": r, "abs_per_element": "tolerance.safetensors"}}`: an element
  passes when it equals the expected value, or when |got − want| <= a + r·|want| + bound, `bound`
  being that element's entry in `tolerance.safetensors` (float64, same names and shapes as
  `expected.safetensors`: 2^-20 · Σ_r |S[j,r]·C[r,i]|, 0 for tensors without a transform); `r` is one
  ulp of the dtype (plus one of binary32 for float16 and bfloat16), `a` the smallest subnormal of the
  format last rounded to (binary32's 2^-149 for float32 and float64, 2^-24 for float16, 2^-133 for
  bfloat16). Their expected values are the sums correctly rounded in binary64, rounded once to
  binary32, then to the dtype; no float16 element lies within its bound of ±65520 (where the rounding
  to float16 overflows).
- A valid (or `may_reject/`) vector whose output is too large to store has no `expected.safetensors`
  but `expected_compact` in `vector.json`: `{{name: {{"dtype", "shape", "row_hex", "row_elems"}}}}`,
  each tensor its row (`row_elems` elements, `row_hex` their bytes in the safetensors dtype `dtype`)
  repeated; a constant tensor has a 1-element row. With a transform, `tolerance_row_hex` holds the
  row's bounds (float64) and `tolerance` has `abs` and `rel` only. Vectors whose output is 1 GiB or
  more are also marked `"large": true`: `run.py` runs them only with `--large` (and compares the
  decoder's output memory-mapped, block by block).
- `invalid/NAME/`: `in.tqz` and `vector.json` (`what`, `spec`, `expect_error`). Each file is a valid
  base file with exactly one defect (every other CRC and length is correct), so a decoder that follows
  spec §10.1's order of checks reports exactly `expect_error`.
- `may_reject/NAME/`: like `valid/`, plus `may_reject_with` and `level` in `vector.json`: valid files a
  decoder may refuse, as FLAC's test bench has files a decoder may refuse but must refuse cleanly. A
  decoder passes by decoding them exactly or by rejecting them with exactly that code. With
  `LIMIT_EXCEEDED`, `level` is the lowest conformance level of spec §12.1 that must decode the file
  (Level 1, which every decoder meets: files whose largest tensor is at most 2^30 bytes, all tensors
  together at most 2^32 bytes, `tq` transform work Σ n·m·k at most 2^36 and length at most 2^32 bytes;
  Level 2: 2^36, 2^42, 2^46, 2^44): a decoder that claims `level` or more must decode it, others may
  refuse it with exactly `LIMIT_EXCEEDED` (`run.py --level N` states the level claimed, default 1;
  tqcodec claims Level 2). Another `may_reject_with` is allowed at every level (the spec lets the
  decoder choose). Valid vectors are within Level 1 (`level` not written).
- `fixtures/v1.0/NAME/`, `fixtures/v1.1/NAME/`, `fixtures/v1.2/NAME/`: files written once by the encoder
  of that format version (tqcodec 0.1.0; v1.1: `tq` files; v1.2: `ecsq`, `kmeans`, `pq`, `dither` and
  mode `auto` files), with their decoded tensors. They are never regenerated (`make_vectors.py --init-fixtures` refuses to overwrite); every
  later version must decode them identically. `vector.json` holds the SHA-256 of `in.tqz`.
- `craft.py`: field-by-field builder of .tqz files used by `make_vectors.py`; `run.py`: the runner.

## Decoder protocol

An external decoder is a command run as

    DECODER decode IN.tqz OUT.safetensors

- success: exit status 0 and `OUT.safetensors` holds every tensor of the file (names as in the
  file, dtype and shape as in the manifest, bfloat16 as `BF16`);
- rejection: non-zero exit status, and the last line of stderr ends with the spec §11 error code
  in brackets, e.g. `model.tqz: footer CRC32 does not match [CHECKSUM_MISMATCH]`. A non-zero exit
  without a code (a crash, a traceback) never passes.

Tensors are compared by name, so file order is not checked. A tensor named `__metadata__` (a valid
name, spec §5.4, but the key a safetensors header keeps its metadata under) is written under the key
`/__metadata__`, every other tensor under its own name (no valid name starts with `/`: the mapping is
injective); the output's own `__metadata__` header entry is ignored. Each run of an external decoder
has a 120-second limit (1,200 seconds for `large` vectors).

A valid vector passes when the decoder succeeds and every tensor matches `expected.safetensors`
(same names, dtype, shape and bytes). An invalid vector passes when the decoder rejects it with
exactly `expect_error`; accepting the file or naming another code fails.

    .venv/bin/python conformance/run.py                          # every available decoder
    .venv/bin/python conformance/run.py --decoder tqcodec        # in process, several ways (below)
    .venv/bin/python conformance/run.py --decoder refdec         # conformance/refdec/refdec.py
    .venv/bin/python conformance/run.py --decoder "mytool" -v    # any command following the protocol
    .venv/bin/python conformance/run.py --decoder tqz-cli -j 4   # tqcodec's CLI (tqz decode IN -o OUT)
    .venv/bin/python conformance/run.py --level 2 --large        # Level 2 decoders, large vectors included

The built-in `tqcodec` decoder decodes each vector several ways: front to back from the path
(`tqcodec.iter_tensors(path)`, as `tqcodec.load` does), front to back from a non-seekable stream (`tqcodec.iter_tensors` over a pipe-like
object), and by random access (`tqcodec.open(...).get_tensor` for every tensor); valid vectors are
also read by random access from 4 threads sharing one open file, last tensor first. Valid vectors must
pass every way. For invalid vectors the two front-to-back ways must give `expect_error`; random
access must reject the file or may miss a defect it never reads (spec §10.2: a seeking decoder
checks only what it reads), and a different code there is reported as a note, not a failure. Vectors
with `expected_compact` are decoded once, front to back, each tensor compared as it is handed out.

An invalid vector has one defect, but one value can break several rules; then the code is the one
of the rule §10.1 checks first (spec §1): `chunk_item_count_over_limit` is `LIMIT_EXCEEDED` although
its stream then also holds too many items (the §12 limits of a chunk header come before its
`BAD_CHUNK` rules), `chunk_payload_length_u32_max` is `LIMIT_EXCEEDED` although it also runs past the
end of the file, `raw_none_payload_length_past_eof` is `BAD_CHUNK` (the mode's `Payload_Length` rule)
although it runs past the end, and `zstd_single_segment_content_size_2e28` is `BAD_PAYLOAD` (content
size against `Item_Count`) although the same field is a window over 2^27.

## Regenerating

    .venv/bin/python conformance/make_vectors.py

rewrites `valid/`, `invalid/`, `may_reject/` and this README (deterministically: twice gives identical bytes;
`tests/test_conformance.py` checks this). Bytes that depend on a library: zstd frames made by the
`zstandard` package (and `may_reject/zstd_match_beyond_window`'s, patched) and the `tqz.encoder` metadata
(tqcodec's version) of the `encoder_*` vectors,
the whole of `encoder_tq_*` (tqcodec's tq encoder and `tqcodec.calibrate`, float arithmetic in torch), and
the whole of `encoder_ecsq`, `encoder_kmeans`, `encoder_pq`, `encoder_dither` and `encoder_auto_bits3`
(the encoders in `tqcodec.modes.ecsq`, `.kmeans`, `.pq` and `.dither`, float arithmetic in numpy).
A changed vector must be reviewed, never just regenerated to make a test pass. Fixtures are made once
per format version with `--init-fixtures`. To add a vector, add it to `make_valid`, `make_tq_valid`,
`make_lineage_valid`, `make_invalid`, `make_tq_invalid`, `make_lineage_invalid` or `make_resource_limits` in
`make_vectors.py`; the expected tensors of every valid vector are checked against `make_vectors.py`'s own
small spec decoder (plain-Python range decoder of §8.4, §8.6 tables from counts, `tq` transform sums by
`math.fsum`, SplitMix64 and the dither arithmetic of §7.9.3 in Python integers and floats) when written, and a
warning is printed if tqcodec decodes one differently (outside the tolerance, for `tq` transforms).

Not covered by vectors: `RESERVED_NONZERO` (v1.0, 1.1 and 1.2 have no reserved field, see `SPEC_ISSUES.md`);
the file-length measure `L` of spec §12.1 (a file over 4 GiB cannot be stored here); decoding files
beyond Level 2 (`may_reject/over_level2_tensor_bytes` decodes to 512 GiB: only a refusal can be
checked in practice). Open questions found while writing the vectors are in
[`SPEC_ISSUES.md`](SPEC_ISSUES.md).
"""


def write_readme(root: Path, fixtures_root: Path) -> None:
    lines = [README_HEAD.format(ver=SPEC_VERSION, tq=tqcodec.__version__)]
    for group, col in (("valid", None), ("invalid", "expect_error"), ("may_reject", None)):
        rows = []
        for d in (sorted((root / group).iterdir()) if (root / group).is_dir() else []):
            info = json.loads((d / "vector.json").read_text())
            tol = info.get("tolerance", 0)
            where = "`tolerance_row_hex`" if "expected_compact" in info else "`tolerance.safetensors`"
            exp = (f"`{info['expect_error']}`" if col else
                   "decodes bit-exact" if tol == 0 else
                   f"decodes within the §7.5.3 tolerance ({where}, rel {tol['rel']:.3g})"
                   if isinstance(tol, dict) and ("abs_per_element" in tol or "expected_compact" in info)
                   else f"decodes within {tol}")
            if "expected_compact" in info:
                exp += " (`expected_compact`" + (", large)" if info.get("large") else ")")
            if "may_reject_with" in info:
                if info["may_reject_with"] == "LIMIT_EXCEEDED":
                    exp += (f", or `LIMIT_EXCEEDED` by a decoder below Level {info['level']}" if info["level"] > 1 else
                            ", or `LIMIT_EXCEEDED`")
                else:
                    exp += f", or `{info['may_reject_with']}` (any level)"
            rows.append(f"| `{group}/{d.name}` | {info['what'].replace('|', '/')} ({info['spec']}) | {exp} |")
        lines.append(f"\n## {group} ({len(rows)} vectors)\n\n| vector | what it tests | expectation |\n|---|---|---|")
        lines += rows
    fx = sorted(p for p in fixtures_root.glob("v*/*") if p.is_dir()) if fixtures_root.exists() else []
    lines.append(f"\n## fixtures ({len(fx)} files)\n\n| vector | what it tests | expectation |\n|---|---|---|")
    for d in fx:
        info = json.loads((d / "vector.json").read_text())
        lines.append(f"| `fixtures/{d.parent.name}/{d.name}` | {info['what']} | decodes bit-exact, forever |")
    (root / "README.md").write_text("\n".join(lines) + "\n")


# --- fixtures ------------------------------------------------------------------------------------------

def fixtures_v1_0():
    """fixtures/v1.0 as written (kept to document how they were made; never rewritten)."""
    items = [
        ("default", "tqcodec.save defaults on a small model", model_state(10), {}),
        ("uniform_tensor", "mode uniform, granularity tensor, snr_db 30", model_state(11),
         {"mode": "uniform", "granularity": "tensor", "snr_db": 30.0}),
        ("lossless_metadata", "lossless with metadata", model_state(12), {"lossless": True,
                                                                          "metadata": {"fixture": True}}),
    ]
    sd = model_state(13)
    sd["tied"] = sd["fc.weight"]
    items.append(("tied_multichunk", "tied tensors, chunks of 100 symbols / 64 bytes", sd, {"_small": True}))
    return items


def tiny_state(seed: int, stats: bool):
    m = tiny_model(seed)
    st = None
    if stats:
        g = torch.Generator().manual_seed(seed + 1)
        st = tqcodec.calibrate(m, [torch.randn(4, 3, 6, 6, generator=g) for _ in range(3)], seed=0)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}, st


def fixtures_v1_1():
    """fixtures/v1.1: mode tq files written by tqcodec's encoder (format 1.1)."""
    items = []
    sd, _ = tiny_state(20, False)
    items.append(("tq_bits4", "mode tq, bits 4, no calibration statistics, tiny conv+MLP model", sd,
                  {"mode": "tq", "bits": 4.0}))
    sd, st = tiny_state(21, True)
    items.append(("tq_stats_bits3", "mode tq, bits 3, stats from tqcodec.calibrate, tiny conv+MLP model", sd,
                  {"mode": "tq", "bits": 3.0, "stats": st}))
    sd, st = tiny_state(22, True)
    sd["tied.weight"] = sd["3.weight"]
    items.append(("tq_stats_tied_metadata", "mode tq, bits 2.5, stats, a tied tensor (alias of a tq tensor), "
                  "metadata", sd, {"mode": "tq", "bits": 2.5, "stats": st, "metadata": {"fixture": "1.1"}}))
    sd = model_state(23)
    items.append(("tq_mixed_dtypes", "mode tq on a model with float16/bfloat16/float64 and integer tensors, "
                  "bits 5", sd, {"mode": "tq", "bits": 5.0}))
    return items


def fixtures_v1_2():
    """fixtures/v1.2: modes ecsq, kmeans, pq, dither and mode auto files written by tqcodec's encoder
    (format 1.2)."""
    items = []
    for i, (mode, bits) in enumerate((("ecsq", 3.0), ("kmeans", 3.0), ("pq", 2.0), ("dither", 4.0))):
        items.append((f"{mode}_bits{bits:g}", f"mode {mode}, bits {bits:g} per tensor, small model with "
                      "float16/bfloat16/float64 and integer tensors", model_state(40 + i),
                      {"mode": mode, "bits": bits}))
    sd, _ = tiny_state(44, False)
    items.append(("auto_bits2", "mode auto, bits 2 (tq or a lineage mode per tensor by D + lam R), no "
                  "statistics, tiny conv+MLP model", sd, {"mode": "auto", "bits": 2.0}))
    sd, st = tiny_state(45, True)
    items.append(("ecsq_stats_snr30", "mode ecsq with calibration statistics (importance weighting), snr_db "
                  "30, tiny conv+MLP model", sd, {"mode": "ecsq", "snr_db": 30.0, "stats": st}))
    return items


def fixtures_v1_3():
    """fixtures/v1.3: files written by tqcodec's encoder with a compressed manifest (format 1.3): tq with and
    without statistics, a lossless file, mode auto, and a model carrying small files (tqz.files)."""
    items = []
    sd, _ = tiny_state(60, False)
    items.append(("tq_bits3", "mode tq, bits 3, no calibration statistics, tiny conv+MLP model", sd,
                  {"mode": "tq", "bits": 3.0}))
    sd, st = tiny_state(61, True)
    items.append(("tq_stats_bits4", "mode tq, bits 4, stats from tqcodec.calibrate, tiny conv+MLP model", sd,
                  {"mode": "tq", "bits": 4.0, "stats": st}))
    items.append(("lossless_mixed_dtypes", "lossless (raw zstd and none) on a model with float16/bfloat16/"
                  "float64 and integer tensors", model_state(62), {"lossless": True}))
    sd, _ = tiny_state(63, False)
    items.append(("auto_bits4_files", "mode auto, bits 4, with metadata and two carried files", sd,
                  {"mode": "auto", "bits": 4.0, "metadata": {"fixture": "1.3"}, "files": {
                      "config.json": b'{"model_type": "tiny"}', "README.md": b"# tiny\n"}}))
    return items


def fixtures_v1_4():
    """fixtures/v1.4: files written by tqcodec's encoder with tq's row_band (format 1.4): an embedding
    model with statistics at two rates."""
    items = []
    for seed, bits in ((70, 3.0), (71, 5.0)):
        sd, st = embedding_state(seed, vocab=300)
        items.append((f"tq_row_band_bits{bits:g}", f"mode tq, bits {bits:g}, stats from tqcodec.calibrate, an "
                      "embedding (bands of rows by token frequency) and a linear layer", sd,
                      {"mode": "tq", "bits": bits, "stats": st}))
    return items


FIXTURES = {"1.0": fixtures_v1_0, "1.1": fixtures_v1_1, "1.2": fixtures_v1_2, "1.3": fixtures_v1_3,
            "1.4": fixtures_v1_4}


def init_fixtures(root: Path) -> None:
    import hashlib
    vdir = root / "fixtures" / f"v{SPEC_VERSION}"
    if vdir.exists():
        sys.exit(f"{vdir} exists: fixtures are written once and never regenerated")
    tmp = vdir.with_name(vdir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    items = FIXTURES[SPEC_VERSION]()
    for name, what, sd, opts in items:
        d = tmp / name
        d.mkdir(parents=True)
        small = opts.pop("_small", False)
        if small:
            with small_chunks(100, 64):
                data = encode_with_tqcodec(sd, **opts)
        else:
            data = encode_with_tqcodec(sd, **opts)
        (d / "in.tqz").write_bytes(data)
        bounds: dict = {}
        expected = expected_by_spec(data, bounds)
        assert not bounds, f"fixture {name}: a float16 transform (not bit-exact); fixtures must be exact"
        assert expected == expected_from_tqcodec(data), f"fixture {name}: tqcodec and the spec decoder disagree"
        write_safetensors(expected, d / "expected.safetensors")
        spec = {"tq": "§7.5", "ecsq": "§7.6", "kmeans": "§7.7", "pq": "§7.8", "dither": "§7.9",
                "auto": "§7.5-§7.9"}.get(opts.get("mode"), "§7")
        info = {"what": what, "spec": spec, "tolerance": 0, "encoder": f"tqcodec {tqcodec.__version__}",
                "sha256": hashlib.sha256(data).hexdigest(),
                "dtype notes": "expected tensors computed by make_vectors.py's own spec decoder and equal to "
                               "tqcodec's decode when written; bit-exact"}
        (d / "vector.json").write_text(json.dumps(info, indent=1) + "\n")
    tmp.rename(vdir)
    print(f"wrote {len(items)} fixtures to {vdir}")


def constant_t(name, dtype, shape, q: int, code: int) -> T:
    """A constant ``uniform`` tensor (A = 1: no chunks, every element q x step(code)) of any size; its
    expected value is given compactly (``compact_by_spec``)."""
    params = {"granularity": "tensor", "steps": [code], "q_min": q, "freqs": leb128([TOTAL])}
    return T(name, dtype, shape, "uniform", params, [], None)


def tq_ones_t(name, n: int, S) -> T:
    """A float16 ``tq`` tensor [n, m] with a float16 transform S [m, k] and one constant band of k rows
    (q_min 1, step 1: C is all ones, no symbol stream): every row of R is v[j] = sum_r S[j, r]."""
    S = np.asarray(S, dtype="<f2")
    m, k = S.shape
    params = {"band_rows": [k], "steps": [0], "q_min": [1], "counts": [leb128([k * n])], "transform": "float16"}
    data = S.tobytes()
    return T(name, "float16", (n, m), "tq", params, [Chunk(data, stream=0, item_count=len(data))], None)


def ones_row(S) -> dict:
    """The compact expectation of ``tq_ones_t`` (sums by math.fsum, then binary32, then float16)."""
    import math
    S = np.asarray(S, dtype="<f2").astype(np.float64)
    v = np.array([math.fsum(r) for r in S])
    return {"row": round_f32_to("float16", v.astype(np.float32)), "elems": S.shape[0],
            "bound": np.array([2.0 ** -20 * math.fsum(np.abs(r)) for r in S])}


def make_resource_limits(out: Out):
    """Files at the edge of the limits every decoder needs to bound its memory (spec §5.3, §7.2, §12), and
    the conformance levels of spec §12.1.

    The first ones were once "may reject" vectors; spec 1.0's clarifications made each one definite.
    Spec 1.2's levels bring the `may_reject/` group back: valid files beyond Level 1 (a decoder may refuse
    them with exactly `LIMIT_EXCEEDED` unless it claims the level in their vector.json), valid files at
    Level 1's edges (every decoder decodes them), and one zstd frame a decoder may decode or reject
    with `BAD_PAYLOAD` (§7.2). Outputs of a GiB or more are given compactly (`expected_compact`) and
    marked `large`.
    """
    t = T("x", "float32", [1 << 40, 1 << 40, 0], "raw", {"codec": "none"}, [], b"")
    f = assemble([t, raw_t("y", "uint8", np.arange(3))])
    out.invalid("empty_tensor_huge_dims", "shape [2^40, 2^40, 0]: 0 elements, but with the 0 counted as 1 the "
                "shape is over §12's element limit (2^80)", "§5.3 §12", f.build(), "LIMIT_EXCEEDED")
    data = np.arange(1000, dtype="<u2")
    for log in (27, 31):
        def frame(b, log=log):
            return b"\x28\xb5\x2f\xfd\x00" + bytes([(log - 10) << 3]) + zstd_frame(b, False)[6:]
        ts = [raw_t("x", "uint16", data, codec="zstd", frame=frame)]
        if log == 27:
            out.valid("zstd_window_2e27", "a zstd frame (no content size) declaring a 2^27-byte window, §12's "
                      "limit, for 2000 bytes of content", "§7.2 §12", assemble(ts).build(), expected_list(ts))
        else:
            out.invalid("zstd_window_2e31", "a zstd frame (no content size) declaring a 2^31-byte window, over "
                        "§12's limit of 2^27", "§7.2 §12", assemble(ts).build(), "LIMIT_EXCEEDED")

    # §7.2: matches that reach further back than Window_Size (1 KiB declared) but not before the frame
    import zstandard
    data = rng(600).integers(0, 256, 1500, dtype=np.uint8).tobytes() * 2
    params = zstandard.ZstdCompressionParameters(window_log=11, compression_level=3, write_content_size=0,
                                                 write_checksum=0)
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = b"".join(cobj.compress(data[i:i + 1000]) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
                     for i in range(0, len(data), 1000)) + cobj.flush()
    assert frame[4:6] == b"\x00\x08" and len(frame) < 2000, "not the frame the vector needs"
    frame = frame[:5] + b"\x00" + frame[6:]  # Window_Descriptor 2 KiB -> 1 KiB: matches at 1500 exceed it
    assert zstandard.ZstdDecompressor().decompress(frame, max_output_size=len(data)) == data
    ts = [raw_t("x", "uint8", np.frombuffer(data, np.uint8), codec="zstd", frame=lambda b: frame)]
    out.valid("zstd_match_beyond_window", "a zstd frame (blocks of at most 1000 bytes) whose matches reach 1500 "
              "bytes back while its Window_Descriptor declares 1 KiB (the 2 KiB window of the encoder patched): "
              "an encoder must not write it; a decoder decodes it to the 3000 bytes or rejects it with "
              "BAD_PAYLOAD", "§7.2", assemble(ts).build(), expected_list(ts), may_reject_with="BAD_PAYLOAD",
              level=1)

    # §12.1 conformance levels: B1 (one tensor's bytes), BT (all tensors' bytes), W (tq transform work)
    def compact(name, what, ts, expected, **kw):
        out.compact(name, what, "§12.1", assemble(ts).build(), expected, **kw)

    def const(dtype, shape, value):
        return compact_entry(dtype, shape, round_to(dtype, np.array([value])), 1)

    n28 = 1 << 28
    compact("level1_tensor_bytes_at_limit", "a constant float32 [2^28] (uniform, A = 1): exactly Level 1's "
            "2^30 bytes for one tensor", [constant_t("x", "float32", [n28], 5, 1)],
            {"x": const("float32", [n28], 6.25)}, large=True)
    compact("over_level1_tensor_bytes", "a constant float32 [2^28 + 1] (uniform, A = 1, q_min 3, step 1): 2^30 + 4 "
            "bytes of 3.0, over Level 1's one-tensor bytes", [constant_t("x", "float32", [n28 + 1], 3, 0)],
            {"x": const("float32", [n28 + 1], 3.0)}, large=True, level=2, may_reject_with="LIMIT_EXCEEDED")
    w = constant_t("w", "float32", [n28], -1, -4)
    ts = [w, alias_t("w_tied_1", 0, w), alias_t("w_tied_2", 0, w), alias_t("w_tied_3", 0, w),
          raw_t("b", "uint8", np.array([9]))]
    cw = const("float32", [n28], -0.5)
    compact("over_level1_decoded_bytes", "a constant float32 [2^28] (2^30 bytes), three aliases of it and a "
            "uint8 [1]: 2^32 + 1 decoded bytes, over Level 1's total (each tensor within it)", ts,
            {"w": cw, "w_tied_1": cw, "w_tied_2": cw, "w_tied_3": cw,
             "b": compact_entry("uint8", [1], b"\x09", 1)}, large=True, level=2, may_reject_with="LIMIT_EXCEEDED")
    for name, seed, n, label, what in (
            ("level1_transform_work_at_limit", 601, 1 << 16, "2^16", "exactly Level 1's 2^36"),
            ("over_level1_transform_work", 602, (1 << 16) + 1, "2^16 + 1", "(2^16 + 1) x 2^20 = 2^36 + 2^20, over "
             "Level 1's 2^36")):
        S = (rng(seed).standard_normal((1 << 10, 1 << 10)) * 0.5).astype("<f2")
        r = ones_row(S)
        kw = {} if name.startswith("level1") else {"level": 2, "may_reject_with": "LIMIT_EXCEEDED"}
        compact(name, f"tq float16 [{label}, 2^10] with a float16 transform, k = 2^10, all bands constant (C all "
                f"ones: no symbol stream, the file is S): transform work n m k = {what}; every row of the "
                "output is v[j] = sum_r S[j, r]", [tq_ones_t("w", n, S)],
                {"w": compact_entry("float16", [n, 1 << 10], r["row"], r["elems"], r["bound"])}, large=True, **kw)
    compact("over_level2_tensor_bytes", "a constant float64 [2^36] (uniform, A = 1, within §12's element limit): "
            "2^39 bytes, over Level 2's one-tensor bytes (a decoder refusing it answers at once)",
            [constant_t("x", "float64", [1 << 36], 3, 0)], {"x": const("float64", [1 << 36], 3.0)}, large=False,
            level=3, may_reject_with="LIMIT_EXCEEDED")


def generate(root: Path, fixtures_root: Path) -> tuple[int, int, int]:
    for group in ("valid", "invalid", "may_reject"):
        shutil.rmtree(root / group, ignore_errors=True)
    out = Out(root)
    make_valid(out)
    make_tq_valid(out)
    make_invalid(out)
    make_tq_invalid(out)
    make_tq_row_band(out)
    make_lineage_valid(out)
    make_lineage_invalid(out)
    make_resource_limits(out)
    write_readme(root, fixtures_root)
    return tuple(len(list((root / g).iterdir())) if (root / g).is_dir() else 0 for g in ("valid", "invalid", "may_reject"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="root to write valid/, invalid/, README.md under")
    ap.add_argument("--init-fixtures", action="store_true", help="write fixtures/v<version>/ once")
    a = ap.parse_args(argv)
    if a.init_fixtures:
        init_fixtures(HERE)
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    nv, ni, nm = generate(a.out, HERE / "fixtures")
    print(f"wrote {nv} valid, {ni} invalid and {nm} may-reject vectors under {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

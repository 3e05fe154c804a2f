#!/usr/bin/env python3
"""refdec's own checks of format 1.4: mode `tq`'s optional parameter `row_band`
(spec/mode-tq.md §7.5.1-§7.5.3, spec/tqz.md §15 entry 1.4).

Every file here is built from the spec's description alone (header §3, canonical MessagePack
§5.1, chunks §6, index and footer §9, band symbols range-coded by §8 with the table §8.6 builds
from the counts); none comes from the project's vector generator.  The expected values of the
valid files are computed here, element by element in plain Python, from §7.5.1 (which rows a
band holds, in which order its symbols come) and §7.5.3 (levels, coefficients, R = C or
R = (S C)^T, layout, rounding), not by refdec's reconstruction; one of them is also written out
by hand.  The invalid files break one rule of §7.5.1 check 5 each (and some a later rule too,
to pin the order "first failure wins"); each states the code §1 requires.

    python conformance/refdec/selftest_1_4.py       # under a second
"""

import math
import os
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import refdec  # noqa: E402
from selftest_1_2 import (build, byte_chunks, crc, expect, leb, outcome, rec,  # noqa: E402
                          symbol_chunks)

# §7.1: step(s) = (4 + (s & 3)) x 2^((s >> 2) - 2), the codes used here worked out by hand
STEP = {0: 1.0, 1: 1.25, 2: 1.5, 3: 1.75, -1: 0.875, -4: 0.5, -6: 0.375}


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------

def with_minor(data, minor):
    """§3: set Minor_Version (and Header_CRC32).  A 1.4 file with row_band declares 4."""
    d = bytearray(data)
    d[10:12] = struct.pack("<H", minor)
    d[28:32] = struct.pack("<I", crc(bytes(d[:28])))
    return bytes(d)


def tq_tensor(t, name, dtype, shape, bands, row_band=None, layout="out_in", S=None, per=5,
              expected=True):
    """A tq record, its chunks and its expected bytes.

    bands: one (rows, step code, q_min, symbols) a band; symbols None for A_b = 1, else the
    band's symbols in §7.5.1's order (its rows one after another, c values a row), using
    symbol 0 and the last symbol of the band's alphabet.  S: the m x k transform (float16
    values, a list of rows) or None.  The record is built as §7.5.1 says, the chunks as §7.5.2
    says (stream 0 = S, stream 1 + b = band b), the expected bytes by tq_expected (None for a
    record made to be rejected: expected=False)."""
    n = shape[0] if layout == "out_in" else shape[1]
    m = math.prod(shape) // n
    c = m if S is None else n
    params = {"band_rows": [b[0] for b in bands], "steps": [b[1] for b in bands],
              "q_min": [b[2] for b in bands], "counts": []}
    chunks = []
    if S is not None:
        params["transform"] = "float16"
        chunks += byte_chunks(t, 0, b"".join(struct.pack("<e", x) for row in S for x in row))
    for b, (rows, _, _, syms) in enumerate(bands):
        if syms is None:                                   # A_b = 1: one count, no stream
            params["counts"].append(leb([rows * c]))
            continue
        assert len(syms) == rows * c
        A = max(syms) + 1
        counts = [syms.count(a) for a in range(A)]
        assert counts[0] and counts[-1]
        params["counts"].append(leb(counts))
        chunks += symbol_chunks(t, 1 + b, syms, counts, per)
    if layout != "out_in":
        params["layout"] = layout
    if row_band is not None:
        params["row_band"] = bytes(row_band)
    r = rec(name, dtype, shape, "tq", params)
    return r, chunks, (tq_expected(dtype, shape, layout, bands, row_band, S) if expected
                       else None)


def to_f32(v):
    """Round a binary64 value to binary32 (nearest, ties to even; struct does that)."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def enc(v32, dtype):
    """§7.3.2: a binary32 value rounded to the dtype, as stored bytes."""
    if dtype == "float32":
        return struct.pack("<f", v32)
    if dtype == "float64":
        return struct.pack("<d", v32)
    if dtype == "float16":
        return struct.pack("<e", v32)                      # nearest, ties to even
    x = struct.unpack("<I", struct.pack("<f", v32))[0]     # bfloat16: §7.3.2's formula
    return struct.pack("<H", (x + 0x7FFF + ((x >> 16) & 1)) >> 16)


def tq_expected(dtype, shape, layout, bands, row_band, S):
    """§7.5.1 + §7.5.3, element by element."""
    n = shape[0] if layout == "out_in" else shape[1]
    m = math.prod(shape) // n
    k = sum(b[0] for b in bands)
    c = m if S is None else n
    if row_band is None:                                   # runs: band 0 first
        row_band = [b for b, bd in enumerate(bands) for _ in range(bd[0])]
    taken = [0] * len(bands)                               # rows of each band seen so far
    C = []
    for i in range(k):
        b = row_band[i]
        t = taken[b]                                       # row i is the t-th row of band b
        taken[b] += 1
        rows, code, q_min, syms = bands[b]
        C.append([(q_min + (0 if syms is None else syms[t * c + j])) * STEP[code]
                  for j in range(c)])
    if S is None:
        R = C                                              # n x m
    else:                                                  # R[i, j] = sum_r S[j, r] C[r, i]
        R = [[math.fsum(S[j][r] * C[r][i] for r in range(k)) for j in range(m)]
             for i in range(n)]
    if layout == "out_in":
        vals = [R[i][j] for i in range(n) for j in range(m)]
    else:                                                  # the tensor is R^T, shape [m, n]
        vals = [R[i][j] for j in range(m) for i in range(n)]
    return b"".join(enc(to_f32(v), dtype) for v in vals)


def decode_ok(tensors, chunks, minor=4):
    data = with_minor(build({"metadata": {}, "tensors": tensors}, chunks), minor)
    got, r = outcome(data)
    assert got == "OK", (got, r)
    return [bytes(x) for x in r[4]]


def one_file(r, cks):
    """A 1.4 file (Minor_Version 4) holding the one tensor r and its chunks."""
    return with_minor(build({"metadata": {}, "tensors": [r]}, cks), 4)


# ---------------------------------------------------------------------------------------------
# the tensors most cases start from
# ---------------------------------------------------------------------------------------------

# W: float32 [5, 3] (n = 5, m = c = 3), band 0 = rows {1, 4}, band 1 = rows {0, 2, 3}
W_SYMS0 = [0, 3, 1, 2, 0, 3]                    # rows 1, 4 of C; A_0 = 4
W_SYMS1 = [2, 0, 1, 1, 1, 0, 2, 2, 0]           # rows 0, 2, 3; A_1 = 3
W_BANDS = [(2, 0, -2, W_SYMS0), (3, 1, 3, W_SYMS1)]
W_ROW_BAND = [1, 0, 1, 1, 0]


def w_tensor(row_band=W_ROW_BAND, bands=W_BANDS, **kw):
    return tq_tensor(0, "w", "float32", [5, 3], bands, row_band=row_band, **kw)


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

CASES = []


def case(f):
    CASES.append(f)
    return f


@case
def scattered_rows_by_hand():
    """§7.5.1: band b holds the rows whose byte is b, in increasing order; its symbols are
    those rows one after another (§7.5.3 step 1).  The expected values written out by hand:
    row 0 = band 1's 1st row, row 1 = band 0's 1st, row 2 = band 1's 2nd, row 3 = band 1's
    3rd, row 4 = band 0's 2nd; band 0: (-2 + s) x 1, band 1: (3 + s) x 1.25."""
    r, cks, want = w_tensor()
    by_hand = [5 * 1.25, 3 * 1.25, 4 * 1.25,         # row 0: band 1 symbols 2 0 1
               -2.0, 1.0, -1.0,                      # row 1: band 0 symbols 0 3 1
               4 * 1.25, 4 * 1.25, 3 * 1.25,         # row 2: band 1 symbols 1 1 0
               5 * 1.25, 5 * 1.25, 3 * 1.25,         # row 3: band 1 symbols 2 2 0
               0.0, -2.0, 1.0]                       # row 4: band 0 symbols 2 0 3
    assert want == struct.pack("<15f", *by_hand)
    assert r["params"]["row_band"] == b"\x01\x00\x01\x01\x00"
    assert decode_ok([r], cks) == [want]


@case
def layouts_dtypes_constant_bands():
    """row_band with in_out (rows of C are the tensor's columns), float16 / bfloat16 / float64,
    a band with A_b = 1 whose rows are scattered (every level q_min[b], no stream), several
    chunks a band, several tensors in one file."""
    rng = np.random.default_rng(14)
    tensors, chunks, wants = [], [], []

    def add(*a, **kw):
        r, cks, want = tq_tensor(len(tensors), *a, **kw)
        tensors.append(r)
        chunks.extend(cks)
        wants.append(want)

    def syms(count, A):
        s = rng.integers(0, A, count).tolist()
        s[0], s[-1] = 0, A - 1
        return s

    # in_out [3, 7]: n = 7 rows of m = 3; bands of 3, 2, 2 rows, band 1 constant
    rb = [2, 0, 1, 0, 2, 1, 0]
    add("io", "float16", [3, 7], [(3, -4, -5, syms(9, 11)), (2, 2, 7, None),
                                  (2, -1, -1, syms(6, 3))], row_band=rb, layout="in_out")
    # out_in [6, 2, 2] (n = 6, m = 4), bfloat16; band 0 constant and scattered
    rb = [1, 0, 2, 2, 0, 1]
    add("oi", "bfloat16", [6, 2, 2], [(2, 3, 1, None), (2, 0, -9, syms(8, 17)),
                                      (2, -6, 0, syms(8, 2))], row_band=rb)
    # float64 [4, 3], row_band in reverse run order (band 1 first, then band 0)
    add("rv", "float64", [4, 3], [(1, 1, -3, syms(3, 4)), (3, 0, 2, syms(9, 5))],
        row_band=[1, 1, 1, 0])
    # one band only: row_band of k zero bytes (valid; the same as its absence)
    add("one", "float32", [3, 2], [(3, 2, -1, syms(6, 3))], row_band=[0, 0, 0])
    got = decode_ok(tensors, chunks)
    assert got == wants, [t["name"] for t, a, b in zip(tensors, got, wants) if a != b]
    # each map changes the values (a decoder that ignored it would fail here), but the last
    # (the runs of one band)
    for t, want in zip(tensors[:3], wants):
        p = t["params"]
        bands = [(rows, code, q, None) for rows, code, q in
                 zip(p["band_rows"], p["steps"], p["q_min"])]
        assert tq_expected(t["dtype"], t["shape"], p.get("layout", "out_in"), bands,
                           list(p["row_band"]), None) != \
            tq_expected(t["dtype"], t["shape"], p.get("layout", "out_in"), bands, None, None)


@case
def with_transform():
    """row_band with transform = float16: k rows of C (k < n), c = n; R = (S C)^T.  Small
    dyadic values, so every sum is exact and refdec's binary64 sums give the reference values."""
    # out_in [6, 4]: n = 6, m = 4, k = 3 <= min(m, n); band 0 = row 1, band 1 = rows 0 and 2
    S = [[1.0, -0.5, 2.0], [0.0, 1.5, -1.0], [3.0, 0.25, 0.5], [-2.0, 1.0, 1.0]]   # m x k
    bands = [(1, 0, -2, [0, 1, 4, 2, 0, 4]), (2, -4, 1, [1, 0, 0, 2, 1, 1, 0, 2, 2, 1, 0, 2])]
    r1, c1, w1 = tq_tensor(0, "s", "float32", [6, 4], bands, row_band=[1, 0, 1], S=S)
    # in_out [4, 6] with the same streams: the transposed tensor
    r2, c2, w2 = tq_tensor(1, "t", "float32", [4, 6], bands, row_band=[1, 0, 1], S=S,
                           layout="in_out")
    got = decode_ok([r1, r2], c1 + c2)
    for g, w in ((got[0], w1), (got[1], w2)):
        assert np.array_equal(np.frombuffer(g, "<f4"), np.frombuffer(w, "<f4")), (g, w)
    assert np.array_equal(np.frombuffer(w1, "<f4").reshape(6, 4),
                          np.frombuffer(w2, "<f4").reshape(4, 6).T)


@case
def run_map_means_absence():
    """§7.5.1: a row_band whose bands are consecutive runs, band 0 first, means the same as its
    absence (and is valid)."""
    rb = [0, 0, 1, 1, 1]
    r, cks, want_map = w_tensor(row_band=rb)
    a = decode_ok([r], cks)
    r, cks, want = w_tensor(row_band=None)
    b = decode_ok([r], cks)
    assert a == b == [want] == [want_map]


@case
def block_sizes():
    """refdec reconstructs in blocks (refdec.BLOCK); with row_band a block's rows belong to
    scattered bands.  Same bytes for BLOCK = 1, 2, 3, 5, 7 as computed here."""
    rng = np.random.default_rng(3)
    rb = rng.permutation([0] * 4 + [1] * 5 + [2] * 3).tolist()     # n = 12
    bands = []
    for b, rows in enumerate((4, 5, 3)):
        s = rng.integers(0, 6, rows * 5).tolist()
        s[0], s[-1] = 0, 5
        bands.append((rows, b - 1, b - 3, s))
    r, cks, want = tq_tensor(0, "b", "float32", [12, 5], bands, row_band=rb)
    S = rng.integers(-4, 5, (5, 4)).astype(float).tolist()          # k = 4 <= min(5, 12)
    bands2 = [(1, 0, -1, rng.integers(0, 3, 12).tolist()), (3, 2, 0, None)]
    bands2[0][3][0], bands2[0][3][-1] = 0, 2
    r2, cks2, want2 = tq_tensor(1, "x", "float32", [12, 5], bands2, row_band=[1, 1, 0, 1],
                                S=S)
    data = with_minor(build({"metadata": {}, "tensors": [r, r2]}, cks + cks2), 4)
    saved = refdec.BLOCK
    try:
        for block in (1, 2, 3, 5, 7, 1 << 22):
            refdec.BLOCK = block
            got, res = outcome(data)
            assert got == "OK", (block, got, res)
            assert bytes(res[4][0]) == want, block
            assert np.array_equal(res[4][1].view("<f4"), np.frombuffer(want2, "<f4")), block
    finally:
        refdec.BLOCK = saved


@case
def bands_256():
    """B = 256 is allowed with row_band (every byte 0..255 a band): n = 256 rows of m = 2, band
    b one row, all constant (A_b = 1, level q_min[b] = b - 128, step 1), the map a permutation
    (row i in band 7 i mod 256); a 256-byte bin (bin 16 header).  Without row_band B may be
    4096: 257 one-row bands decode; with row_band, 257 bands are BAD_TENSOR_RECORD (check 5)."""
    perm = [(7 * i) % 256 for i in range(256)]
    bands = [(1, 0, b - 128, None) for b in range(256)]
    r, cks, want = tq_tensor(0, "p", "float32", [256, 2], bands, row_band=perm)
    assert want == b"".join(struct.pack("<2f", perm[i] - 128, perm[i] - 128)
                            for i in range(256))
    assert decode_ok([r], cks) == [want]
    bands = [(1, 0, b, None) for b in range(257)]
    r, cks, want = tq_tensor(0, "q", "float32", [257], bands)
    assert decode_ok([r], cks) == [want]
    # 257 bands with a map: its 257 bytes cannot name band 256; BAD_TENSOR_RECORD whatever
    # they are (B <= 256), before the step codes (check 6) are looked at
    for rb in ([b % 256 for b in range(257)], [0] * 257, [255] * 257):
        r, cks, _ = tq_tensor(0, "q", "float32", [257], bands, row_band=rb, expected=False)
        expect(one_file(r, cks), "BAD_TENSOR_RECORD", "257 bands with row_band")
        r["params"]["steps"][3] = 104
        expect(one_file(r, cks), "BAD_TENSOR_RECORD", "257 bands with row_band, step 104")


@case
def minor_version_not_compared():
    """§3, §13: a decoder does not compare what a file uses with its Minor_Version."""
    r, cks, want = w_tensor()
    for minor in (0, 1, 3, 4, 5, 65535):
        assert decode_ok([r], cks, minor=minor) == [want], minor


@case
def check_1_type():
    """§7.5.1 check 1: row_band is a bin; any other type is BAD_TENSOR_RECORD (nil included:
    its default is absence, SPEC_FINDINGS 1.4C-2), before checks 2-7; row_band is a key of mode
    tq only (uniform, kmeans: an unknown key)."""
    r, cks, _ = w_tensor()
    for v in ("\x01\x00\x01\x01\x00", [1, 0, 1, 1, 0], None, 0, True, 1.0, {}):
        r["params"]["row_band"] = v
        expect(one_file(r, cks), "BAD_TENSOR_RECORD", "row_band %r" % (v,))
        r2 = dict(r, params=dict(r["params"], steps=[0, 200]))
        expect(one_file(r2, cks), "BAD_TENSOR_RECORD", "row_band %r and step 200" % (v,))
        r2 = dict(r, dtype="int8")                        # check 2 comes after check 1: same code
        expect(one_file(r2, cks), "BAD_TENSOR_RECORD", "row_band %r, int8" % (v,))
    u = rec("u", "float32", [2], "uniform", {"granularity": "tensor", "steps": [0], "q_min": 0,
                                             "freqs": leb([1 << 24]), "row_band": b"\0\0"})
    expect(with_minor(build({"metadata": {}, "tensors": [u]}), 4), "BAD_TENSOR_RECORD",
           "row_band in a uniform tensor")
    km = rec("k", "float32", [2, 1], "kmeans", {"group_rows": [2], "counts": [leb([2])],
                                               "row_band": b"\0\0"})
    expect(with_minor(build({"metadata": {}, "tensors": [km]}), 4), "BAD_TENSOR_RECORD",
           "row_band in a kmeans tensor")


def expect_check_5(r, cks, why):
    """A row_band defect is BAD_TENSOR_RECORD, also when the file has a defect of check 6
    (BAD_STEP) or check 7 (BAD_TABLE, LIMIT_EXCEEDED) as well: check 5 comes first."""
    expect(one_file(r, cks), "BAD_TENSOR_RECORD", why)
    p = r["params"]
    for key, value, what in (("steps", [104] + p["steps"][1:], "step 104"),
                             ("steps", [-161] + p["steps"][1:], "step -161"),
                             ("counts", [b"\x80"] + p["counts"][1:], "truncated counts"),
                             ("counts", [leb([0, 1])] + p["counts"][1:], "first count 0"),
                             ("q_min", [-(1 << 20) - 1] + p["q_min"][1:], "q_min -2^20 - 1")):
        r2 = dict(r, params=dict(p, **{key: value}))
        expect(one_file(r2, cks), "BAD_TENSOR_RECORD", "%s and %s" % (why, what))


@case
def check_5_length():
    """§7.5.1 check 5: row_band holds exactly k bytes."""
    for rb, why in (([1, 0, 1, 1], "k - 1 bytes"), ([1, 0, 1, 1, 0, 0], "k + 1 bytes"),
                    ([], "no byte"), ([1, 0, 1, 1, 0] * 2, "2k bytes")):
        r, cks, _ = w_tensor(row_band=rb, expected=False)
        expect_check_5(r, cks, why)
    # with a transform: one byte per row of C (k), not per row of R (n)
    S = [[1.0, 2.0], [0.5, -1.0], [1.0, 1.0]]                       # m = 3, k = 2
    bands = [(1, 0, 0, [0, 1, 0, 1]), (1, 0, 0, [1, 0, 0, 1])]
    r, cks, want = tq_tensor(0, "s", "float32", [4, 3], bands, row_band=[1, 0], S=S)
    assert decode_ok([r], cks) == [want]
    r, cks, _ = tq_tensor(0, "s", "float32", [4, 3], bands, row_band=[1, 0, 1, 0], S=S,
                          expected=False)
    expect_check_5(r, cks, "n bytes with a transform (k = 2, n = 4)")


@case
def check_5_byte_not_a_band():
    """§7.5.1 check 5: every byte is below B."""
    for rb, why in (([1, 0, 2, 1, 0], "a byte 2 with B = 2"),
                    ([1, 0, 255, 1, 0], "a byte 255 with B = 2"),
                    ([1, 0, 1, 1, 2], "the last byte 2")):
        r, cks, _ = w_tensor(row_band=rb, expected=False)
        expect_check_5(r, cks, why)


@case
def check_5_rows_per_band():
    """§7.5.1 check 5: for every band b exactly band_rows[b] bytes equal b."""
    for rb, why in (([1, 0, 0, 1, 0], "band 0 with 3 rows, band_rows [2, 3]"),
                    ([1, 1, 1, 1, 1], "band 0 with no row"),
                    ([0, 0, 0, 0, 0], "band 1 with no row")):
        r, cks, _ = w_tensor(row_band=rb, expected=False)
        expect_check_5(r, cks, why)
    # one defect breaking check 5 and check 7: band_rows [2, 3] written [3, 2] (k = n still;
    # band 0's counts then add up to 6, not 3 x 3 = 9: BAD_TABLE by check 7)
    r, cks, _ = w_tensor()
    r["params"]["band_rows"] = [3, 2]
    expect(one_file(r, cks), "BAD_TENSOR_RECORD", "band_rows [3, 2] for a [2, 3] map")
    # the same with a transform, band_rows [1, 1] written [2, 1]: k = 3 <= min(m, n) = 3, so
    # only the map's length (check 5) and the counts' sum (check 7) are broken
    S = [[1.0, 2.0], [0.5, -1.0], [1.0, 1.0]]
    bands = [(1, 0, 0, [0, 1, 0, 1]), (1, 0, 0, [1, 0, 0, 1])]
    r, cks, _ = tq_tensor(0, "s", "float32", [4, 3], bands, row_band=[1, 0], S=S)
    r["params"]["band_rows"] = [2, 1]
    expect(one_file(r, cks), "BAD_TENSOR_RECORD", "band_rows [2, 1] for a 2-byte map")


@case
def later_checks_with_a_valid_map():
    """A valid row_band does not hide checks 6 and 7, nor the chunks' item counts (§7.5.2:
    band b's stream holds band_rows[b] x c symbols, wherever its rows are)."""
    r, cks, _ = w_tensor()
    p = r["params"]
    for key, value, code in (("steps", [0, 104], "BAD_STEP"),
                             ("counts", [p["counts"][0], leb([3, 3, 2, 0])], "BAD_TABLE"),
                             ("counts", [p["counts"][0], leb([3, 4, 3])], "BAD_TABLE"),
                             ("q_min", [-2, (1 << 20) - 1], "LIMIT_EXCEEDED")):
        r2 = dict(r, params=dict(p, **{key: value}))
        expect(one_file(r2, cks), code, "%s %r" % (key, value))
    # band 1's stream one symbol short: its chunk count no longer matches (BAD_CHUNK, §6.2)
    r, cks, _ = w_tensor(per=100)
    bad = symbol_chunks(0, 2, W_SYMS1[:-1], [W_SYMS1.count(a) for a in range(3)], 100)
    expect(with_minor(build({"metadata": {}, "tensors": [r]}, cks[:1] + bad), 4), "BAD_CHUNK",
           "band 1 stream of 8 symbols, 9 due")


def main():
    for f in CASES:
        f()
        print("ok", f.__name__)
    print("all %d cases passed" % len(CASES))


if __name__ == "__main__":
    main()

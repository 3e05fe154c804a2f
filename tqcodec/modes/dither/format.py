"""Mode ``dither`` (spec §7.9, ``spec/mode-lineage.md``): subtractive dithered uniform
quantization on the scalar lattice ``ΔZ`` or the hexagonal lattice A2.

The dither comes from SplitMix64 (§7.S.6) seeded by ``params["seed"]``: one output per element
(scalar) or per pair of elements (hex). Reconstruction is lattice point minus dither, computed
with integers and exact binary64 products, except one correctly rounded binary64 product by the
constant H (√3/2) for the second coordinate of a hex pair (§7.9.3): bit-exact everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ...errors import fail
from ...format.chunks import PayloadKind, StreamSpec
from ...format.dtypes import round_binary64
from ...format.leb128 import pack_counts, unpack_counts
from ...format.manifest import TensorRecord
from ...format.steps import STEP_CODE_MAX, STEP_CODE_MIN, steps_from_codes
from ..base import Chunks, Encoded, check_float, check_keys
from ..streams import check_levels, read_symbols, symbol_chunks, table

LATTICES = {"scalar": 1, "hex": 2}  # lattice -> coordinate streams L
H = float.fromhex("0x1.bb67ae8584caap-1")  # spec §7.9.3: binary64 0x3FEBB67AE8584CAA, nearest to sqrt(3)/2
BLOCK = 1 << 20  # decoder's working block (elements or pairs), bounds temporaries
_REQUIRED = {"step": int, "seed": int, "q_min": list, "counts": list}
_OPTIONAL = {"lattice": str}


@dataclass(frozen=True)
class Params:
    lattice: str
    step: int
    seed: int
    q_min: tuple[int, ...]  # per coordinate stream
    counts: tuple[np.ndarray, ...]
    freqs: tuple[Optional[np.ndarray], ...]
    n: int  # symbols per stream: elements (scalar) or pairs (hex)


def parse(record: TensorRecord) -> Params:
    """Spec §7.9.1's checks, in order."""
    name = record.name
    p = check_keys(record, _REQUIRED, _OPTIONAL, {"q_min": int, "counts": bytes})  # rule 1
    check_float(record, rows=False)  # rule 2
    lattice = p.get("lattice", "scalar")  # rule 3
    if lattice not in LATTICES:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: lattice {lattice!r} not in {tuple(LATTICES)}")
    seed = p["seed"]
    if seed < 0:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: seed {seed} is negative")
    nl = LATTICES[lattice]
    if len(p["q_min"]) != nl or len(p["counts"]) != nl:
        raise fail("BAD_TENSOR_RECORD", f"tensor {name!r}: lattice {lattice} needs {nl} q_min and counts entries")
    step = p["step"]  # rule 4
    if not STEP_CODE_MIN <= step <= STEP_CODE_MAX:
        raise fail("BAD_STEP", f"tensor {name!r}: step code {step} outside [{STEP_CODE_MIN}, {STEP_CODE_MAX}]")
    n = record.numel if nl == 1 else (record.numel + 1) // 2
    counts = tuple(unpack_counts(blob, n, name, "inner") for blob in p["counts"])  # rule 5
    for q0, c in zip(p["q_min"], counts):  # rule 6
        check_levels(q0, len(c), name)
    return Params(lattice, step, seed, tuple(p["q_min"]), counts, tuple(table(c) for c in counts), n)


def stream_items(p: Params, index: int, records: Sequence[TensorRecord]) -> tuple[StreamSpec, ...]:
    """Spec §7.9.2: one symbol stream per coordinate (N symbols, 0 for a one-entry table)."""
    return tuple(StreamSpec(p.n if f is not None else 0, PayloadKind.SYMBOLS) for f in p.freqs)


def symbol_tables(p: Params) -> tuple[Optional[np.ndarray], ...]:
    """The range-coder table of each stream (None: not range-coded): coordinate c's is stream c's."""
    return p.freqs


# --- §7.S.6 dither generator ----------------------------------------------------------------------

GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(seed: int, start: int, count: int) -> np.ndarray:
    """Spec §7.S.6: outputs ``z_start .. z_{start+count-1}`` of SplitMix64 from state ``seed``
    (uint64, arithmetic mod 2^64)."""
    k = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = np.uint64(seed) + k * GAMMA
        x = (x ^ (x >> np.uint64(30))) * MIX1
        x = (x ^ (x >> np.uint64(27))) * MIX2
    return x ^ (x >> np.uint64(31))


def numerators(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spec §7.S.6: the dither numerators ``(t1, t2)`` (int64, odd, |t| < 2^21) of outputs ``z``."""
    r1 = (z >> np.uint64(43)).astype(np.int64)
    r2 = ((z >> np.uint64(22)) & np.uint64((1 << 21) - 1)).astype(np.int64)
    return 2 * r1 + 1 - (1 << 21), 2 * r2 + 1 - (1 << 21)


# --- §7.9.3 reconstruction ------------------------------------------------------------------------

def scalar_values(levels: np.ndarray, step: int, seed: int, start: int = 0) -> np.ndarray:
    """Spec §7.9.3, scalar: binary64 ``r_i = (q_i 2^22 - t_i) Δ 2^-22`` for elements
    ``start .. start + len(levels) - 1`` (exact)."""
    delta = float(steps_from_codes([step])[0])
    t1, _ = numerators(splitmix64(seed, start, len(levels)))
    num = np.asarray(levels, dtype=np.int64) * (1 << 22) - t1  # |N| < 2^43
    return num.astype(np.float64) * delta * 2.0 ** -22  # exact (47 significant bits at most)


def hex_values(a: np.ndarray, b: np.ndarray, step: int, seed: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Spec §7.9.3, hex: binary64 ``(x, y)`` of pairs ``start ..`` from coordinates ``a`` (position
    along the lattice row) and ``b`` (row)."""
    delta = float(steps_from_codes([step])[0])
    t1, t2 = numerators(splitmix64(seed, start, len(a)))
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    nx = a * (1 << 23) + (b & 1) * (1 << 22) - 2 * t1 - t2  # |Nx| < 2^44; P(a, b) = Δ(a + (b&1)/2, b√3/2)
    ny = b * (1 << 22) - t2  # |Ny| < 2^43
    x = nx.astype(np.float64) * delta * 2.0 ** -23  # exact
    e = ny.astype(np.float64) * delta * 2.0 ** -22  # exact
    y = e * H  # the one rounded operation: a single binary64 product (numpy never fuses it)
    return x, y


def values(lattice: str, coords: Sequence[np.ndarray], step: int, seed: int, numel: int) -> np.ndarray:
    """Spec §7.9.3: the tensor's binary64 values (C order) from its coordinate levels."""
    out = np.empty(numel, dtype=np.float64)
    if lattice == "scalar":
        for s in range(0, numel, BLOCK):
            out[s:s + BLOCK] = scalar_values(coords[0][s:s + BLOCK], step, seed, s)
        return out
    pairs = (numel + 1) // 2
    for s in range(0, pairs, BLOCK):
        x, y = hex_values(coords[0][s:s + BLOCK], coords[1][s:s + BLOCK], step, seed, s)
        out[2 * s:2 * s + 2 * len(x):2] = x
        ys = y if 2 * (s + len(y)) <= numel else y[:-1]  # odd numel: the last pair's y is discarded
        out[2 * s + 1:2 * s + 1 + 2 * len(ys):2] = ys
    return out


def parts(p: Params, record: TensorRecord, streams: list[Chunks]) -> dict:
    """``coords``: the integer coordinates per stream (int64; scalar: one array of levels, hex:
    (a, b) per pair), ``lattice``, ``step`` (code), ``seed``, ``q_min``/``q_max`` per stream."""
    coords = [read_symbols(streams[c], f, p.n, record.name) + q0 for c, (f, q0) in enumerate(zip(p.freqs, p.q_min))]
    return {"coords": coords, "lattice": p.lattice, "step": p.step, "seed": p.seed, "q_min": list(p.q_min),
            "q_max": [q0 + len(c) - 1 for q0, c in zip(p.q_min, p.counts)]}


def decode(p: Params, record: TensorRecord, streams: list[Chunks]) -> np.ndarray:
    """Spec §7.9.3: levels -> lattice point minus dither (binary64) -> the dtype (§7.S.5)."""
    coords = parts(p, record, streams)["coords"]
    v = values(p.lattice, coords, p.step, p.seed, record.numel)
    return round_binary64(record.dtype, v).reshape(record.shape)


# --- writer (the numerics are in encoder.py) --------------------------------------------------

def dither_offsets(lattice: str, step: int, seed: int, numel: int) -> np.ndarray:
    """Encoder helper: the dither u (float64) of each element (scalar: [numel]) or pair (hex:
    [P, 2], with √3/2 read as H), as §7.9.3 subtracts it."""
    delta = float(steps_from_codes([step])[0])
    if lattice == "scalar":
        t1, _ = numerators(splitmix64(seed, 0, numel))
        return t1.astype(np.float64) * delta * 2.0 ** -22
    t1, t2 = numerators(splitmix64(seed, 0, (numel + 1) // 2))
    alpha, beta = t1 * 2.0 ** -22, t2 * 2.0 ** -22
    return np.stack([(alpha + 0.5 * beta) * delta, beta * H * delta], axis=1)


def write(coords: Sequence[np.ndarray], *, step: int, seed: int, lattice: str = "scalar") -> Encoded:
    """A ``dither`` tensor from its integer coordinates (scalar: one array of levels, C order;
    hex: ``(a, b)`` per pair)."""
    q_min, blobs, streams = [], [], []
    for c in coords:
        c = np.asarray(c, dtype=np.int64).reshape(-1)
        lo = int(c.min())
        counts = np.bincount(c - lo)
        q_min.append(lo)
        blobs.append(pack_counts(counts))
        streams.append(symbol_chunks(c - lo, counts))
    params = {"step": int(step), "seed": int(seed), "q_min": q_min, "counts": blobs}
    if lattice != "scalar":
        params["lattice"] = lattice
    return Encoded("dither", params, streams)

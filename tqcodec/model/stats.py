"""Calibration statistics as the ``tq`` encoder reads them (:class:`TensorStats`, :class:`Stats`),
their file format (:meth:`Stats.save`, :meth:`Stats.load`, :meth:`Stats.open`) and statistics
from activations of models that are not torch modules (:meth:`Stats.from_activations`).
``tqcodec.model.calibrate`` collects them from a torch module.

Per weight name, :class:`TensorStats` says how an error E of the weight's row view
[n = shape[0], m = numel / n] (``layout`` ``in_out``: [shape[1], shape[0]], the transpose) turns
into output error, the *local distortion* (:func:`local_distortion`); the encoder's distortion is
``gain`` times it:

- ``linear`` / ``conv``: ``h`` [groups, d, d] = E[x x^T] of the input vectors x the rows of row
  group g (rows g*n/G .. (g+1)*n/G) multiply, d = m; distortion ``sum_g tr(E_g H_g E_g^T)``;
  ``mean`` [groups, d] = E[x] (bias correction);
- ``rows`` (weights whose *first* axis is the input channel, e.g. ``ConvTranspose``): ``row_h``
  [n] = E[x_c^2] of the input channel row c multiplies; distortion ``sum_c row_h[c] ||E_c||^2``;
  optionally ``h`` [1, n, n] = E[x x^T] over the input channels (the encoder then weighs the
  columns j of E by ``E_j^T H E_j`` and rounds with error feedback along the input channels);
- ``embedding``: ``counts`` [n] how often each row (token) was used; distortion
  ``sum_c p_c ||E_c||^2`` with p the counts' frequencies; optionally ``h`` [1, d, d] (d = m), the
  second moment of the output gradient a looked-up row receives, scaled to a mean diagonal of 1:
  the distortion is then ``sum_c p_c E_c^T H E_c`` (the same for an error of i.i.d. entries) and
  the encoder rounds each row with error feedback along its columns;
- ``plain``: no statistics but a ``gain`` (biases, norms); distortion ``||E||^2``.

``row_gain`` [n] (optional, any kind): the measured output sensitivity of each row (of each
element of a 1-D parameter), on the scale of ``gain``; the encoder weighs rows by their shares.
An embedding has one only when it is also another module's weight (an output layer tied to it):
each row's squared output gradient, the rows no input used included (output rows still), from
which the encoder takes the output layer's part of the rows' weights.

``rows`` is the number of samples (input vectors, positions, tokens) seen, per row group.

File format (safetensors, no pickle), version 2 (``Stats.save``): one metadata entry
``tqz.stats``, a JSON document ``{"format": "2", "output_power", "tensors": {name: {kind, rows,
layout, gain, "h": {"block", "n_groups", "groups"}, "counts", "row_h", "row_gain"}}, "blocks":
{key: {d, count, encoding, mean}}}``; arrays ``<block>::<part>`` and ``<name>::counts`` /
``<name>::row_h`` / ``<name>::row_gain``.
Each distinct H is stored once, whoever uses it (query/key/value read one input; the three row
groups of a self-attention ``in_proj_weight`` are one matrix), as:

- ``float64``: the upper triangle, exact;
- ``float32`` / ``float16``: ``diag`` (float64) and the upper triangle of the correlation matrix
  C = D^-1/2 H D^-1/2 (entries in [-1, 1], so no scale can overflow) in float32 / float16;
- ``eig``: ``diag`` (float64), the top-r eigenpairs of C (values float64, vectors float16; by
  seeded subspace iteration for d >= 2048, :func:`top_eigenpairs`) and
  the diagonal remainder 1 - sum_k lambda_k v_k^2 implied, so that diag(H) stays exact and the
  approximation stays positive semi-definite.

``Stats.save(path)`` writes the compact default (``precision="compact"``: float16 correlations
for d <= 512, ``eig`` above, rank d/8 at least 64); ``precision="float64"`` is lossless. Files
of the first format (``tqz.stats`` per-tensor entries, ``tqz.output_power``, float64
``<name>::h`` / ``::counts`` / ``::mean`` arrays) are still read.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes
from threadpoolctl import threadpool_limits

from ..errors import fail

LAYOUTS = ("out_in", "in_out")
KINDS = ("linear", "conv", "rows", "embedding", "plain")
FORMAT = "2"
PRECISIONS = ("compact", "float64", "float32", "float16", "eig")

COMPACT_FULL_DIM = 512   # compact files: H of d <= this as float16 correlations, larger ones as eig
COMPACT_MIN_RANK = 64    # eig rank: max(COMPACT_MIN_RANK, d // COMPACT_RANK_DIV), at most d
COMPACT_RANK_DIV = 8


@dataclass
class TensorStats:
    """Statistics of one weight (see the module docstring for the meaning of each kind).

    ``kind`` linear/conv/rows/embedding/plain; ``h`` [groups, d, d] E[x x^T] (linear, conv;
    float64, or float32 as ``calibrate`` makes it for inputs of 1,024 or more dimensions); ``counts`` [n] token counts (embedding); ``rows`` samples seen (per row group);
    ``layout`` how the weight is stored (``out_in`` torch style, ``in_out`` e.g. ONNX MatMul,
    Hugging Face ``Conv1D``); ``gain`` the measured output sensitivity (1.0 when not measured);
    ``mean`` [groups, d] E[x] (linear, conv); ``row_h`` [n] E[x_c^2] (kind rows); ``row_gain``
    [n] the output sensitivity of each row (optional)."""

    kind: str
    h: Optional[np.ndarray] = None
    counts: Optional[np.ndarray] = None
    rows: int = 0
    layout: str = "out_in"
    gain: float = 1.0
    mean: Optional[np.ndarray] = None
    row_h: Optional[np.ndarray] = None
    row_gain: Optional[np.ndarray] = None


def local_distortion(w_err: np.ndarray, s: TensorStats) -> float:
    """The local distortion (without the gain) of an error ``w_err`` in the weight's row view
    [n, m] (see the module docstring; ``plain``: ``||E||^2``)."""
    e = np.asarray(w_err, dtype=np.float64)
    if s.kind == "embedding":
        c = np.asarray(s.counts, dtype=np.float64)
        p = c / max(c.sum(), 1.0)
        e = e.reshape(len(p), -1)
        per_row = np.sum(e ** 2, axis=1) if s.h is None else np.sum((e @ s.h[0]) * e, axis=1)
        return float(np.sum(p * per_row))
    if s.kind == "rows":
        r = np.asarray(s.row_h, dtype=np.float64)
        return float(np.sum(r * np.sum(e.reshape(len(r), -1) ** 2, axis=1)))
    if s.h is None:
        return float(np.sum(e * e))
    g, d, _ = s.h.shape
    e = e.reshape(g, -1, d)
    return float(sum(np.sum((e[i] @ s.h[i]) * e[i]) for i in range(g)))


# --- H blocks: the distinct input second moments of a file --------------------------------------

def _digest(*arrays: Optional[np.ndarray]) -> bytes:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"-")
        else:
            a = np.ascontiguousarray(a, dtype=np.float64)
            h.update(repr(a.shape).encode())
            h.update(a.tobytes())
    return h.digest()


def _encoding_for(precision: str, d: int) -> str:
    if precision != "compact":
        return precision
    return "float16" if d <= COMPACT_FULL_DIM else "eig"


def _rank_for(d: int) -> int:
    return min(d, max(COMPACT_MIN_RANK, d // COMPACT_RANK_DIV))


def _correlation(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(diag H clipped at 0, C = D^-1/2 H D^-1/2 with zero rows for dead inputs and unit diagonal)."""
    diag = np.clip(np.diag(h).astype(np.float64), 0.0, None)
    s = np.sqrt(diag)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
    c = h * inv[:, None] * inv[None, :]
    np.clip(c, -1.0, 1.0, out=c)
    c[np.diag_indices_from(c)] = (diag > 0).astype(np.float64)
    return diag, c


SUBSPACE_MIN_DIM = 2048  # top eigenpairs of a C at least this wide by subspace iteration, not a full eigh
SUBSPACE_OVERSAMPLE = 128  # ... in a subspace of rank + this many directions ...
SUBSPACE_ITERATIONS = 8  # ... refined this many times (float32 products, float64 Rayleigh-Ritz). A
# 4,096-wide C of GELU features, rank 512, one thread: full eigh 15.0 s, this 5.9 s; the stored
# C's relative error (vectors in float16) 0.03974 against 0.03977 (4 iterations: 3.9 s, 0.04013)


def top_eigenpairs(c: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``rank`` largest eigenvalues of the symmetric ``c`` [d, d] (descending) and their
    eigenvectors [d, rank]: a full eigendecomposition, or for d of at least ``SUBSPACE_MIN_DIM``
    (and rank far below d) seeded subspace iteration (Halko, Martinsson and Tropp 2011), whose
    cost grows as d^2 * rank, not d^3 (an 8,192-wide H of a 1B model's MLP took minutes each).
    Deterministic under one BLAS thread."""
    d = c.shape[0]
    k = rank + SUBSPACE_OVERSAMPLE
    if d < SUBSPACE_MIN_DIM or 2 * k > d:
        vals, vecs = np.linalg.eigh(c)
        order = np.argsort(-vals, kind="stable")[:rank]
        return vals[order], vecs[:, order]
    c32 = c.astype(np.float32)
    basis, _ = np.linalg.qr(c32 @ np.random.default_rng(0).standard_normal((d, k)).astype(np.float32))
    for _ in range(SUBSPACE_ITERATIONS):
        basis, _ = np.linalg.qr(c32 @ basis)
    del c32
    basis = basis.astype(np.float64)
    small = basis.T @ c @ basis
    vals, rot = np.linalg.eigh((small + small.T) / 2)
    order = np.argsort(-vals, kind="stable")[:rank]
    return vals[order], basis @ rot[:, order]


def _encode_matrix(h: np.ndarray, enc: str, rank: int) -> dict[str, np.ndarray]:
    """The arrays that store one symmetric PSD matrix ``h`` [d, d] in encoding ``enc``."""
    d = h.shape[0]
    if enc == "float64":
        return {"tri": h[np.triu_indices(d)].astype(np.float64)}
    diag, c = _correlation(h)
    if enc in ("float32", "float16"):
        return {"diag": diag, "corr": c[np.triu_indices(d, 1)].astype(enc)}
    # eig: top-r eigenpairs of C (deterministic: one BLAS thread, fixed sign)
    with threadpool_limits(limits=1, user_api="blas"):
        vals, vecs = top_eigenpairs(c, rank)
    vals = np.clip(vals, 0.0, None)
    big = np.argmax(np.abs(vecs), axis=0)
    vecs = vecs * np.where(vecs[big, np.arange(vecs.shape[1])] < 0, -1.0, 1.0)[None, :]
    return {"diag": diag, "vals": vals.astype(np.float64), "vecs": vecs.astype(np.float16)}


def _decode_matrix(arrays: Mapping[str, np.ndarray], enc: str, d: int) -> np.ndarray:
    """The float64 [d, d] matrix of :func:`_encode_matrix`'s arrays (one matrix's slices)."""
    if enc == "float64":
        out = np.zeros((d, d))
        iu = np.triu_indices(d)
        out[iu] = arrays["tri"]
        out.T[iu] = arrays["tri"]
        return out
    diag = np.asarray(arrays["diag"], dtype=np.float64)
    if enc in ("float32", "float16"):
        c = np.eye(d)
        iu = np.triu_indices(d, 1)
        c[iu] = arrays["corr"].astype(np.float64)
        c.T[iu] = c[iu]
    elif enc == "eig":
        v = arrays["vecs"].astype(np.float64)
        lam = np.asarray(arrays["vals"], dtype=np.float64)
        c = (v * lam[None, :]) @ v.T
        rest = np.clip(1.0 - np.diag(c), 0.0, None)
        c[np.diag_indices(d)] += rest
    else:
        raise ValueError(f"unknown H encoding {enc!r}")
    s = np.sqrt(diag)
    c *= s[:, None]
    c *= s[None, :]
    if enc != "eig":  # exact diagonal (eig keeps it up to float16 rounding, and positive semi-definite)
        c[np.diag_indices(d)] = diag
    return c


class _Blocks:
    """Distinct (H, mean) pairs collected for a file: each tensor's groups map to block matrices."""

    def __init__(self, precision: str):
        self.precision = precision
        self.meta: dict[str, dict] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self._by_digest: dict[bytes, str] = {}

    def add(self, h: np.ndarray, mean: Optional[np.ndarray]) -> dict:
        """Store ``h`` [G, d, d] (and ``mean`` [G, d]) once; returns the tensor's reference."""
        g, d, _ = h.shape
        digests, uniq = [], []
        index: list[int] = []
        for i in range(g):
            dg = _digest(h[i], None if mean is None else mean[i])
            if dg not in digests:
                digests.append(dg)
                uniq.append(i)
            index.append(digests.index(dg))
        whole = hashlib.sha256(b"".join(digests)).digest()
        key = self._by_digest.get(whole)
        if key is None:
            key = f"h{len(self._by_digest)}"
            self._by_digest[whole] = key
            enc = _encoding_for(self.precision, d)
            rank = _rank_for(d) if enc == "eig" else 0
            parts = [_encode_matrix(np.asarray(h[i], dtype=np.float64), enc, rank) for i in uniq]
            for part in parts[0]:
                self.arrays[f"{key}::{part}"] = np.ascontiguousarray(np.stack([p[part] for p in parts]))
            if mean is not None:
                self.arrays[f"{key}::mean"] = np.ascontiguousarray(np.stack([mean[i] for i in uniq]),
                                                                   dtype=np.float64)
            self.meta[key] = {"d": int(d), "count": len(uniq), "encoding": enc, "mean": mean is not None}
        ref: dict[str, Any] = {"block": key}
        if index != list(range(len(uniq))) or len(uniq) != g:
            ref["groups"] = index
        ref["n_groups"] = g
        return ref


def _read_block(get, key: str, bmeta: Mapping) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(matrices [count, d, d], means [count, d] or None) of block ``key`` (``get(name)`` reads an array)."""
    enc, d, count = bmeta["encoding"], int(bmeta["d"]), int(bmeta["count"])
    names = {"float64": ("tri",), "float32": ("diag", "corr"), "float16": ("diag", "corr"),
             "eig": ("diag", "vals", "vecs")}.get(enc)
    if names is None:
        raise ValueError(f"unknown H encoding {enc!r}")
    arrs = {n: get(f"{key}::{n}") for n in names}
    mats = np.stack([_decode_matrix({n: a[i] for n, a in arrs.items()}, enc, d) for i in range(count)])
    mean = get(f"{key}::mean") if bmeta.get("mean") else None
    return mats, None if mean is None else np.asarray(mean, dtype=np.float64)


def _tensor_stats(m: Mapping, get, blocks: Mapping, cache: Optional[dict] = None) -> TensorStats:
    """One tensor's :class:`TensorStats` from its metadata entry ``m`` of a version 2 file."""
    h = mean = None
    ref = m.get("h")
    if ref is not None:
        key = ref["block"]
        hit = cache.get(key) if cache is not None else None
        if hit is None:
            hit = _read_block(get, key, blocks[key])
            if cache is not None:
                cache[key] = hit
        mats, means = hit
        groups = ref.get("groups")
        if groups is None and int(ref.get("n_groups", len(mats))) == len(mats):
            h, mean = mats, means
        else:
            idx = np.asarray(groups if groups is not None else range(int(ref["n_groups"])), dtype=np.intp)
            h = mats[idx]
            mean = None if means is None else means[idx]
    counts = get(f"{m['name']}::counts") if m.get("counts") else None
    row_h = get(f"{m['name']}::row_h") if m.get("row_h") else None
    row_gain = get(f"{m['name']}::row_gain") if m.get("row_gain") else None
    return TensorStats(m["kind"], h, counts, int(m["rows"]), m.get("layout", "out_in"), float(m.get("gain", 1.0)),
                       mean, row_h, row_gain)


def _tensor_stats_v1(name: str, m: Mapping, get, keys: set) -> TensorStats:
    """One tensor's :class:`TensorStats` from a first-format file (float64 arrays per tensor)."""
    arr = {k: get(f"{name}::{k}") if f"{name}::{k}" in keys else None for k in ("h", "counts", "mean", "row_h")}
    return TensorStats(m["kind"], arr["h"], arr["counts"], int(m["rows"]), m.get("layout", "out_in"),
                       float(m.get("gain", 1.0)), arr["mean"], arr["row_h"])


def _read_header(path: str) -> tuple[dict, dict, Optional[str], float, bool]:
    """(per-tensor metadata, blocks, format or None for the first format, output power, synthetic)."""
    with safe_open(str(path), framework="numpy") as f:
        md = f.metadata() or {}
    if "tqz.stats" not in md:
        raise ValueError("not a statistics file (no tqz.stats metadata)")
    doc = json.loads(md["tqz.stats"])
    if isinstance(doc.get("format"), str) and isinstance(doc.get("tensors"), dict):
        if doc["format"] != FORMAT:
            raise ValueError(f"statistics format {doc['format']!r} is not one this tqcodec reads ({FORMAT})")
        return (doc["tensors"], doc.get("blocks", {}), doc["format"], float(doc.get("output_power", 0.0)),
                doc.get("synthetic") is True)
    # the first format: per-tensor entries, the output power in a second key
    return doc, {}, None, float(md.get("tqz.output_power", "0.0")), False


class _StatsFile(Mapping):
    """Read-only ``{weight name: TensorStats}`` over a file written by :meth:`Stats.save`: each
    item's arrays are read when it is looked up (nothing is kept), so an encoder that works
    tensor by tensor holds one layer's statistics at a time."""

    def __init__(self, path: str, meta: dict, blocks: dict, fmt: Optional[str]):
        self._path, self._meta, self._blocks, self._fmt = path, meta, blocks, fmt

    def __getitem__(self, name: str) -> TensorStats:
        m = self._meta[name]
        try:
            with safe_open(self._path, framework="numpy") as f:
                if self._fmt is None:
                    return _tensor_stats_v1(name, m, f.get_tensor, set(f.keys()))
                return _tensor_stats(dict(m, name=name), f.get_tensor, self._blocks)
        except Exception as exc:  # the file changed or is damaged after it was opened
            raise fail("BAD_OPTION", f"cannot read the statistics of {name!r}: {exc}", self._path) from None

    def __iter__(self):
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def gains(self) -> list[float]:
        return [float(m.get("gain", 1.0)) for m in self._meta.values()]

    def gain_items(self) -> list[tuple[str, float]]:
        """(name, gain) of every tensor, from the file's header (no arrays read)."""
        return [(n, float(m.get("gain", 1.0))) for n, m in self._meta.items()]


@dataclass
class Stats:
    """Per weight name: :class:`TensorStats`. Save/load as safetensors (no pickle).

    ``output_power``: mean over samples of the squared output the gains' errors are measured
    against (with calibrate's per-output scaling: the number of output elements counted per
    sample). ``default_gain``: gain for tensors without statistics (None: the largest gain).
    ``synthetic``: measured on inputs the codec made up (``tqz calibrate`` without ``--text``)."""

    tensors: Mapping[str, TensorStats] = field(default_factory=dict)
    output_power: float = 0.0
    default_gain: Optional[float] = None
    synthetic: bool = False

    def gains(self) -> list[float]:
        """Every tensor's gain (without reading the arrays of a lazily opened file)."""
        if isinstance(self.tensors, _StatsFile):
            return self.tensors.gains()
        return [s.gain for s in self.tensors.values()]

    def subset(self, names: Iterable[str]) -> "Stats":
        """The statistics of ``names`` only (read now), with this model's output power and the
        largest gain of the whole model kept as ``default_gain`` for tensors without statistics."""
        default = self.default_gain if self.default_gain is not None else max(self.gains(), default=1.0)
        return Stats({n: self.tensors[n] for n in names if n in self.tensors}, self.output_power, default,
                     self.synthetic)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def get(self, name: str) -> Optional[TensorStats]:
        return self.tensors.get(name)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def save(self, path: str, *, precision: str = "compact") -> None:
        """Write a safetensors file (format 2, see the module docstring). ``precision``:
        ``compact`` (default: float16 correlations for d <= 512, top eigenpairs above),
        ``float64`` (lossless), ``float32``, ``float16`` or ``eig`` for every H. Every distinct H
        is stored once. The same statistics give the same bytes."""
        data = self.to_bytes(precision=precision)
        with open(path, "wb") as f:
            f.write(data)

    def to_bytes(self, *, precision: str = "compact") -> bytes:
        """The bytes :meth:`save` writes."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
        blocks = _Blocks(precision)
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {}
        for name, s in self.tensors.items():
            entry: dict[str, Any] = {"kind": s.kind, "rows": int(s.rows), "layout": s.layout, "gain": float(s.gain)}
            if s.h is not None:
                h = np.asarray(s.h, dtype=np.float64)
                mean = None if s.mean is None else np.asarray(s.mean, dtype=np.float64).reshape(h.shape[0], -1)
                entry["h"] = blocks.add(h, mean)
            if s.counts is not None:
                arrays[f"{name}::counts"] = np.ascontiguousarray(s.counts, dtype=np.float64)
                entry["counts"] = True
            if s.row_h is not None:
                arrays[f"{name}::row_h"] = np.ascontiguousarray(s.row_h, dtype=np.float64)
                entry["row_h"] = True
            if s.row_gain is not None:
                arrays[f"{name}::row_gain"] = np.ascontiguousarray(s.row_gain, dtype=np.float64)
                entry["row_gain"] = True
            meta[name] = entry
        arrays.update(blocks.arrays)
        # one metadata entry: safetensors writes several in no fixed order (same statistics, same bytes)
        doc = {"format": FORMAT, "output_power": float(self.output_power), "tensors": meta, "blocks": blocks.meta}
        if self.synthetic:  # written only when set: other statistics keep their bytes
            doc["synthetic"] = True
        return safetensors_bytes(arrays, metadata={"tqz.stats": json.dumps(doc, sort_keys=True)})

    @classmethod
    def open(cls, path: str) -> "Stats":
        """A file written by :meth:`save` (either format), its arrays read only when a tensor is
        looked up."""
        meta, blocks, fmt, power, synthetic = _read_header(path)
        return cls(_StatsFile(str(path), meta, blocks, fmt), power, synthetic=synthetic)

    @classmethod
    def load(cls, path: str) -> "Stats":
        """Read a file written by :meth:`save` (either format). Weights that share an H share
        one array."""
        meta, blocks, fmt, power, synthetic = _read_header(path)
        out = cls(output_power=power, synthetic=synthetic)
        cache: dict = {}
        with safe_open(str(path), framework="numpy") as f:
            keys = set(f.keys())
            for name, m in meta.items():
                if fmt is None:
                    out.tensors[name] = _tensor_stats_v1(name, m, f.get_tensor, keys)
                else:
                    out.tensors[name] = _tensor_stats(dict(m, name=name), f.get_tensor, blocks, cache)
        return out

    @classmethod
    def from_activations(cls, samples: Mapping[str, Any], layouts: Optional[Mapping[str, str]] = None, *,
                         groups: Optional[Mapping[str, int]] = None,
                         kinds: Optional[Mapping[str, str]] = None) -> "Stats":
        """Statistics from input activations of models that are not torch modules.

        ``samples[name]`` is, for kind ``linear`` (default): an array [..., d] of input vectors
        (every leading axis is samples); with ``groups[name] = G``, an array [..., G, d] (the
        input vectors of the G row groups, sample by sample); or a tuple/list of G arrays
        [..., d], one per row group (their sample counts may differ, ``rows`` is the smallest).
        For ``kinds[name] = "rows"``: an array [..., n], the values of the n input channels
        that the weight's rows multiply, sample by sample (``row_h`` = E[x^2] per channel).
        ``layouts[name]`` is ``out_in`` (weight stored [out, in], default) or ``in_out``
        (stored [in, out], as ONNX MatMul initialisers; one group only)."""
        layouts, groups, kinds = dict(layouts or {}), dict(groups or {}), dict(kinds or {})
        out = cls()
        for name, x in samples.items():
            lay = layouts.get(name, "out_in")
            if lay not in LAYOUTS:
                raise ValueError(f"layout {lay!r} for {name!r} is not one of {LAYOUTS}")
            kind = kinds.get(name, "linear")
            if kind not in ("linear", "conv", "rows"):
                raise ValueError(f"kind {kind!r} for {name!r} is not linear, conv or rows")
            if kind == "rows":
                if lay != "out_in":
                    raise ValueError(f"kind rows for {name!r} needs layout out_in (rows are the first axis)")
                a = _as_array(x, name)
                a = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
                out.tensors[name] = TensorStats("rows", rows=len(a), layout=lay,
                                                row_h=np.mean(a * a, axis=0) if len(a) else np.zeros(a.shape[1]))
                continue
            if isinstance(x, (tuple, list)):
                parts = [_as_array(p, name) for p in x]
            else:
                a = _as_array(x, name)
                g = int(groups.get(name, 1))
                if g < 1 or a.ndim < (2 if g > 1 else 1) or (g > 1 and a.shape[-2] != g):
                    raise ValueError(f"samples of {name!r} of shape {a.shape} do not hold {g} groups [..., {g}, d]")
                parts = [a[..., i, :] for i in range(g)] if g > 1 else [a]
            parts = [p.reshape(-1, p.shape[-1]) for p in parts]
            if len({p.shape[1] for p in parts}) != 1:
                raise ValueError(f"the groups of {name!r} have different input sizes")
            if len(parts) > 1 and lay != "out_in":
                raise ValueError(f"grouped samples of {name!r} need layout out_in")
            h = np.stack([(p.T @ p) / max(len(p), 1) for p in parts])
            mean = np.stack([p.mean(axis=0) if len(p) else np.zeros(p.shape[1]) for p in parts])
            rows = min(len(p) for p in parts)
            out.tensors[name] = TensorStats(kind, h, None, rows, lay, 1.0, mean if rows else None)
        return out


def _as_array(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"samples of {name!r} hold NaN or Inf")
    if a.ndim == 0:
        raise ValueError(f"samples of {name!r} are a scalar")
    return a


def share_identical(stats: Mapping[str, TensorStats]) -> None:
    """Weights whose H (and mean) are equal share one array (memory; e.g. query, key, value)."""
    seen: dict[bytes, tuple[np.ndarray, Optional[np.ndarray]]] = {}
    for s in stats.values():
        if s.h is None:
            continue
        key = _digest(s.h, s.mean)
        if key in seen:
            s.h, s.mean = seen[key]
        else:
            seen[key] = (s.h, s.mean)


def psd_violation(h: np.ndarray) -> float:
    """How far ``h`` [..., d, d] is from symmetric positive semi-definite, relative to its scale:
    max(asymmetry, -smallest eigenvalue) / max(largest |entry|, tiny)."""
    h = np.asarray(h, dtype=np.float64)
    h2 = h.reshape(-1, h.shape[-2], h.shape[-1])
    worst = 0.0
    for m in h2:
        scale = max(float(np.max(np.abs(m))) if m.size else 0.0, 1e-300)
        asym = float(np.max(np.abs(m - m.T))) if m.size else 0.0
        low = float(np.linalg.eigvalsh((m + m.T) / 2).min()) if m.size else 0.0
        worst = max(worst, asym / scale, -low / scale)
    return worst

"""Encoding: what ``tqcodec.save`` does with each tensor, one tensor (or one whole-model tq
allocation) at a time. Tensors in, :class:`~tqcodec.modes.base.Encoded` out; no files, no pools.

- :class:`EncodeOptions`: the options, checked;
- :func:`encode_tensor`: one tensor without a whole-model allocation (``raw``, ``uniform``, a
  classic mode, or tq on its own with ``tq_scope="tensor"``); :func:`encode_entry` also loads
  a lazy tensor and cuts a large one into row blocks;
- :func:`encode_tq`: mode tq (and ``auto``'s per-tensor choice) over many tensors with one
  Lagrange multiplier.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import fail
from ..format.chunks import CHUNK_HEADER_SIZE
from ..format.dtypes import EXACT_IN_FLOAT32, FLOAT_NAMES, peak_abs, storage_to_float32, storage_to_float64
from ..format.steps import MAX_CODED_MAGNITUDE
from ..format.manifest import pack_canonical
from ..modes import raw, uniform
from ..modes.base import Encoded
from ..modes.statistics import check_stats_scalars, check_tensor_stats
from ..modes.tq.encoder import Item, ModelEncoder, encode_model
from .auto import chooser_for
from .classic import CLASSIC_MODES, encode_classic
from .tensors import check_tensor, is_lazy, loaded, name_of_torch, tensor_to_storage, tied_key

ENCODE_MODES = ("auto", "raw", "uniform", "tq") + CLASSIC_MODES
MIN_UNIFORM_ELEMENTS = 256  # smaller float tensors: raw (side data would outweigh the gain)
AUTO_BITS_TOLERANCE = 0.03  # mode auto with bits: a file with other modes in it must land this close, else tq alone
TQ_BLOCK_PARAMS = 1 << 22
"""tq_scope ``tensor`` without statistics: a float tensor of more parameters is encoded in blocks
of output rows of about this many parameters, each on its own to the bits/quality target (its
own bands), and the blocks' bands are joined into the tensor's one tq record. Bounds the working
set by the block, not the tensor, and lets blocks of one tensor run in parallel."""


@dataclass(frozen=True)
class EncodeOptions:
    """What ``save`` does with each tensor.

    mode: None, the default (uniform for float tensors of >= 2 dims and >= 256 elements, raw for
    the rest; with stats, bits or quality: tq); ``auto`` (the same, and with stats, bits or
    quality, per tensor of >= 2 dims and >= 256 elements whichever of tq, ecsq, kmeans, pq, dither
    has the least D + lam R at tq's multiplier: slower, and the file is not always better),
    ``raw`` (everything exact), ``uniform`` (every finite float tensor), ``tq``, or one of
    ``ecsq``, ``kmeans``, ``pq``, ``dither`` (spec §7.6-§7.9: float tensors of >= 2 dims and
    >= 256 elements in that mode, the rest as ``auto`` without statistics; ``bits`` is then each
    tensor's own bits per weight, else ``quality`` or ``snr_db`` a weighted SNR target; stats
    weigh each weight by its input's second moment).
    lossless: everything exact (same as mode ``raw``); refused with any option that asks for loss
    (``bits``, ``quality``, ``stats``, ``snr_db``, ``granularity``, a lossy ``mode``).
    snr_db: weight signal-to-quantization-noise ratio each uniform step aims at (default 40; the
    classic modes' weighted SNR target without ``bits``); refused where tq codes (it has its own
    rate control).
    granularity: ``channel`` (one step per output channel, the default) or ``tensor``; ``uniform``
    only, refused where tq codes.
    stats: ``tqcodec.Stats`` from ``tqcodec.calibrate`` (mode ``tq``; with ``auto`` it selects tq).
    Degenerate statistics (H = 0, rank-deficient, a handful of samples) are handled; NaN or Inf
    in them, or negative gains, counts or channel powers, are refused (``BAD_OPTION`` naming the
    tensor).
    bits: mode ``tq``: whole-file bits per parameter (the file lands within ±3%).
    quality: mode ``tq``: predicted output SNR in dB (output power over the estimated output
    error, spec-free encoder choice); without stats, weight SNR. Default 40 when neither is given.
    tq_scope: mode ``tq``: ``model`` (one allocation over the whole model: every tensor in memory)
    or ``tensor`` (each tensor on its own to ``bits``/``quality``: streams tensor by tensor and
    runs with ``jobs``; ``tqcodec.parallel``).
    """

    mode: Optional[str] = None
    lossless: bool = False
    snr_db: Optional[float] = None
    granularity: Optional[str] = None
    stats: Any = None
    bits: Optional[float] = None
    quality: Optional[float] = None
    tq_scope: str = "model"

    @property
    def uses_tq(self) -> bool:
        """Mode ``tq`` explicitly, or ``auto`` with stats, bits or quality given."""
        if self.lossless or self.mode in ("raw", "uniform") + CLASSIC_MODES:
            return False
        return self.mode == "tq" or any(v is not None for v in (self.stats, self.bits, self.quality))

    @property
    def mode_name(self) -> str:
        """The mode as a user names it (``default`` for None)."""
        return self.mode or "default"

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in ENCODE_MODES:
            raise fail("BAD_OPTION", f"mode {self.mode!r} is not one of {', '.join(ENCODE_MODES)}")
        lossy = [k for k, v in (("bits", self.bits), ("quality", self.quality), ("stats", self.stats),
                                ("snr", self.snr_db), ("granularity", self.granularity)) if v is not None]
        if self.lossless and (lossy or self.mode not in (None, "auto", "raw")):
            asked = ", ".join(lossy + ([f"mode {self.mode}"] if self.mode not in (None, "auto", "raw") else []))
            raise fail("BAD_OPTION", f"lossless stores every tensor exactly: it does not go with {asked}")
        if self.uses_tq and (self.snr_db is not None or self.granularity is not None):
            given = " and ".join(k for k, v in (("snr", self.snr_db), ("granularity", self.granularity)) if v is not None)
            raise fail("BAD_OPTION", f"{given} set the uniform steps; mode tq (chosen by mode, bits, quality or "
                                     "stats) sets its own: give one or the other")
        if self.snr_db is None:
            object.__setattr__(self, "snr_db", 40.0)
        if self.granularity is None:
            object.__setattr__(self, "granularity", "channel")
        if not (isinstance(self.snr_db, (int, float)) and np.isfinite(self.snr_db) and 0 < self.snr_db <= 200):
            raise fail("BAD_OPTION", f"snr_db must be in (0, 200], got {self.snr_db!r}")
        if self.granularity not in uniform.GRANULARITIES:
            raise fail("BAD_OPTION", f"granularity {self.granularity!r} is not one of tensor, channel")
        if self.bits is not None and not (isinstance(self.bits, (int, float)) and 0.05 <= self.bits <= 32):
            raise fail("BAD_OPTION", f"bits must be in [0.05, 32], got {self.bits!r}")
        if self.quality is not None and not (isinstance(self.quality, (int, float)) and 0 < self.quality <= 200):
            raise fail("BAD_OPTION", f"quality must be in (0, 200] dB, got {self.quality!r}")
        if self.bits is not None and self.quality is not None:
            raise fail("BAD_OPTION", "give bits or quality, not both")
        if self.tq_scope not in ("model", "tensor"):
            raise fail("BAD_OPTION", f"tq_scope must be 'model' or 'tensor', got {self.tq_scope!r}")
        if self.stats is not None:
            check_stats_scalars(self.stats)  # BAD_OPTION: a NaN, infinite or negative gain or output power

    def for_tensor(self, name: str) -> "EncodeOptions":
        """These options with the calibration statistics of ``name`` only: a task carries (and a
        worker unpickles) one layer's statistics, read then from a lazily opened file
        (``Stats.open``). Done for every number of jobs, so the bytes do not depend on it."""
        if self.stats is None or not hasattr(self.stats, "subset"):
            return self
        narrowed = copy.copy(self)  # the options were checked; only the statistics change
        object.__setattr__(narrowed, "stats", self.stats.subset([name]))
        return narrowed


# --- one tensor without a whole-model allocation ----------------------------------------------------

def stored_bytes(encoded: Encoded) -> int:
    """The bytes a tensor's encoding adds to a file beside its name, dtype and shape: its mode
    and params in the manifest, its chunks (headers included)."""
    return len(encoded.mode) + len(pack_canonical(encoded.params)) + sum(
        CHUNK_HEADER_SIZE + len(p) for chunks in encoded.streams for _, p in chunks)


def no_larger_than_raw(encoded: Encoded, arr: Union[np.ndarray, Callable[[], np.ndarray]],
                       nbytes: Optional[int] = None) -> Encoded:
    """``encoded``, or the tensor stored exactly (mode raw, the storage array ``arr``) where that
    takes no more bytes: a lossy encoding never costs more than the exact one (tiny tensors, whose
    tables and parameters outweigh their data). ``arr`` may be a function giving the array, with
    ``nbytes`` its size: it is called only when the exact payload could be the smaller."""
    if nbytes is None:
        nbytes = arr.nbytes
    if encoded.mode == "raw" or stored_bytes(encoded) < nbytes:
        return encoded  # the exact payload alone is larger: no need to make it
    exact = raw.encode(arr() if callable(arr) else arr)
    return exact if stored_bytes(exact) <= stored_bytes(encoded) else encoded


def codable(dtype: str, arr: np.ndarray) -> bool:
    """Whether a lossy mode can code a float tensor's storage ``arr``: every value finite and
    within ``MAX_CODED_MAGNITUDE`` (about 1.9e12: even the coarsest step, spec §7.1 code 103, would
    need more than 65536 levels beyond it). Other tensors are stored exactly, with a warning."""
    return peak_abs(dtype, arr) <= MAX_CODED_MAGNITUDE  # False for NaN


def stats_of(opts: EncodeOptions, name: str):
    """The calibration statistics of ``name`` (None without), checked: BAD_OPTION naming the
    tensor for NaN, infinite or negative values (``tqcodec.modes.statistics.check_tensor_stats``)."""
    st = opts.stats.get(name) if opts.stats is not None and hasattr(opts.stats, "get") else None
    if st is not None:
        check_tensor_stats(name, st)
    return st


def classic_takes(opts: EncodeOptions, dtype: str, arr: np.ndarray) -> bool:
    """Whether a forced classic mode codes this tensor (floats of >= 2 dims and >= 256 elements)."""
    return (opts.mode in CLASSIC_MODES and not opts.lossless and dtype in FLOAT_NAMES and arr.ndim >= 2
            and arr.size >= MIN_UNIFORM_ELEMENTS)


def encode_tensor(name: str, t: torch.Tensor, opts: EncodeOptions, bits: Optional[float] = None) -> Encoded:
    """``t`` in the mode ``opts`` gives it when no whole-model tq allocation takes it: a classic
    mode when forced (at ``bits`` per weight, default ``opts.bits``), ``uniform`` for float
    tensors of >= 2 dims and >= 256 elements (every float tensor in mode ``uniform``), else
    ``raw``; never more bytes than ``raw``. Tensors with NaN or infinity, or magnitudes above
    ``MAX_CODED_MAGNITUDE``, stay ``raw`` (with a warning)."""
    dtype, arr = tensor_to_storage(t)
    if classic_takes(opts, dtype, arr):
        if codable(dtype, arr):
            stats_of(opts, name)
            values = storage_to_float64(dtype, arr)
            snr = opts.quality if opts.quality is not None else opts.snr_db
            bits = opts.bits if bits is None else bits
            return no_larger_than_raw(
                encode_classic(opts.mode, name, values, dtype, opts.stats, bits=bits, snr_db=snr).encoded, arr)
    use_uniform = (not opts.lossless and opts.mode != "raw" and dtype in FLOAT_NAMES and arr.size >= 1
                   and (opts.mode == "uniform" or (arr.ndim >= 2 and arr.size >= MIN_UNIFORM_ELEMENTS)))
    if use_uniform:
        peak = peak_abs(dtype, arr)
        if not np.isfinite(peak):
            warnings.warn(f"{name}: NaN or infinite values, stored exactly (raw)", stacklevel=3)
        elif peak > MAX_CODED_MAGNITUDE:
            warnings.warn(f"{name}: values of magnitude {peak:.3g} (above {MAX_CODED_MAGNITUDE:.3g}), "
                          "stored exactly (raw)", stacklevel=3)
        else:  # block by block: bounded memory however large the tensor
            return no_larger_than_raw(uniform.encode_storage(arr, dtype, opts.granularity, opts.snr_db), arr)
    return raw.encode(arr)


CLASSIC_ATTEMPTS = 4  # whole-file bits in a classic mode: trial writes with one figure for every tensor,
CLASSIC_TRIM_STEPS = 6  # then at most this many per tensor moving it alone
CLASSIC_TOLERANCE = 0.015


def encode_classic_file(items: Sequence[tuple[str, torch.Tensor]], opts: EncodeOptions,
                        size_of: Callable[[Mapping[str, Encoded]], int],
                        progress: Optional[Callable[[str, int, int], None]] = None) -> dict[str, Encoded]:
    """A forced classic mode with a whole-file ``bits`` target: every tensor it codes at one
    bits-per-weight figure, corrected by the bytes the rest of the file takes (other tensors,
    manifest, index), until the file lands within ``CLASSIC_TOLERANCE`` of the target (at most
    ``CLASSIC_ATTEMPTS`` trial writes; ``size_of`` measures one); then, where the mode's steps
    jump over the target, tensors moved one at a time. Tied tensors count once."""
    seen: set = set()
    taken: list[tuple[str, torch.Tensor]] = []
    total = 0
    for name, t in items:
        total += t.numel()
        key = tied_key(t)
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        dtype, arr = tensor_to_storage(t)
        if classic_takes(opts, dtype, arr) and codable(dtype, arr):
            taken.append((name, t))
    if not taken or opts.bits is None:
        return {}
    target = opts.bits * total
    cache: dict[tuple[str, float], Encoded] = {}

    def coded(name: str, t: torch.Tensor, bits: float) -> Encoded:
        key = (name, round(bits, 6))
        if key not in cache:
            cache[key] = encode_tensor(name, t, opts, bits=bits)
        return cache[key]

    def measure(bits_of: Mapping[str, float]) -> tuple[float, dict[str, Encoded]]:
        enc = {name: coded(name, t, bits_of[name]) for name, t in taken}
        return 8.0 * size_of(enc) / target - 1.0, enc

    per = {name: float(opts.bits) for name, _ in taken}
    best = None
    for attempt in range(CLASSIC_ATTEMPTS):  # one figure for every tensor, corrected by the rest of the file
        if progress:
            progress(f"rate search: file size {attempt + 1}", attempt, CLASSIC_ATTEMPTS)
        err, enc = measure(per)
        if best is None or abs(err) < abs(best[0]):
            best = (err, enc, dict(per))
        if abs(err) <= CLASSIC_TOLERANCE:
            return enc
        coded_bits = sum(8.0 * stored_bytes(e) for e in enc.values())
        coded_params = sum(t.numel() for _, t in taken)
        rest = (err + 1.0) * target - coded_bits
        scale = max(target - rest, 0.05 * coded_params) / coded_bits
        per = {name: min(32.0, max(0.05, b * scale)) for name, b in per.items()}
    # a mode whose rate moves in steps (codebook sizes) can jump over the target with every tensor
    # at one figure: move the tensors one at a time, largest first, each by bisection on its own bits
    err, enc, per = best
    for name, t in sorted(taken, key=lambda nt: -nt[1].numel()):
        lo, hi = (per[name], min(32.0, per[name] * 2.0)) if err < 0 else (max(0.05, per[name] / 2.0), per[name])
        for _ in range(CLASSIC_TRIM_STEPS):
            mid = 0.5 * (lo + hi)
            e, candidate = measure({**per, name: mid})
            if abs(e) < abs(err):
                err, enc, per = e, candidate, {**per, name: mid}
            if abs(err) <= CLASSIC_TOLERANCE:
                return enc
            lo, hi = (mid, hi) if e < 0 else (lo, mid)
    return enc


# --- mode tq over many tensors ----------------------------------------------------------------------

def tq_items(items: Sequence[tuple[str, Any]], opts: EncodeOptions) -> tuple[list[Item], int]:
    """The tensors mode tq takes from ``items`` (float tensors it can code, :func:`codable`; tied
    tensors once; their statistics checked, :func:`stats_of`), as encoder items whose float64
    values are made when needed, and the parameter count of all of ``items``. A lazy value
    (``tqcodec.io.hf.TensorRef``) is loaded here once to be checked and again each time the
    encoder asks for its values, so no more than a few tensors are in memory at a time."""
    first: dict = {}  # tied key -> the index in out of its first name's item (None: not coded by tq)
    out = []
    total = 0
    for name, value in items:
        t = loaded(name, value) if is_lazy(value) else value  # in memory: checked by the caller
        total += t.numel()
        key = tied_key(t) if value is t else None
        if key is not None and key in first:
            if first[key] is not None:
                out[first[key]].tied += (name,)
            continue
        if key is not None:
            first[key] = None
        dtype, arr = tensor_to_storage(t)
        if dtype in FLOAT_NAMES and arr.size and codable(dtype, arr):
            stats_of(opts, name)
            # the values are made when the encoder needs them (a few tensors at a time)
            storage = (lambda arr=arr: arr) if value is t else (lambda value=value: tensor_to_storage(value.load())[1])
            narrow = (lambda dtype=dtype, storage=storage: storage_to_float32(dtype, storage())) \
                if dtype in EXACT_IN_FLOAT32 else None
            out.append(Item(name, dtype, tuple(arr.shape), lambda dtype=dtype, storage=storage: storage_to_float64(
                dtype, storage()), narrow))
            if key is not None:
                first[key] = len(out) - 1
        del t, arr
    return out, total


def encode_tq(items: Sequence[tuple[str, torch.Tensor]], opts: EncodeOptions,
              size_of: Callable[[Mapping[str, Encoded]], int], transforms: bool = True,
              progress: Optional[Callable[[str, int, int], None]] = None, block: bool = False) -> dict[str, Encoded]:
    """Mode tq (spec §7.5) with one multiplier over ``items`` for the tensors it takes (finite
    float tensors; the rest go to :func:`encode_tensor`); mode ``auto`` also weighs the classic
    modes per tensor (:mod:`tqcodec.pipeline.auto`). ``size_of(encoded)`` gives the file size for
    a candidate result (the bits target is met on the real file). ``transforms``: offer
    transforms (off for row blocks of one tensor, which share no S); ``block``: ``items`` is one row
    block of a tensor (no magnitude bands: the blocks' records are joined). Tied tensors count once.
    ``progress(stage, done, total)``: the encoder's stages (curves, transforms, rate search)."""
    tq, total = tq_items(items, opts)
    if opts.mode == "auto":  # per tensor, tq or a classic mode by D + lam R
        enc = encode_model(tq, opts.stats, bits=opts.bits, quality=opts.quality, total_params=max(total, 1),
                           size_of=size_of, alternatives=chooser_for(tq, opts.stats), transforms=transforms,
                           progress=progress)
        if opts.bits is None or all(e.mode == "tq" for e in enc.values()):
            return enc
        if abs(8.0 * size_of(enc) / (opts.bits * max(total, 1)) - 1.0) <= AUTO_BITS_TOLERANCE:
            return enc
        # the other modes' coarser rate steps kept the file off its bits target: tq alone meets it
    return encode_model(tq, opts.stats, bits=opts.bits, quality=opts.quality, total_params=max(total, 1),
                        size_of=size_of, transforms=transforms, progress=progress, block=block)


def tq_encoder(items: Sequence[tuple[str, torch.Tensor]], opts: EncodeOptions,
               size_of: Callable[[Mapping[str, Encoded]], int],
               progress: Optional[Callable[[str, int, int], None]] = None) -> ModelEncoder:
    """Mode tq's whole-model encoder over ``items``, ready to encode at any bits or quality
    (``ModelEncoder.encode``), its curves made once: the rate search of ``save(evaluate=...)``."""
    tq, total = tq_items(items, opts)
    return ModelEncoder(tq, opts.stats, total_params=max(total, 1), size_of=size_of, progress=progress)


def encode_tq_tensor(name: str, t: torch.Tensor, opts: EncodeOptions, transforms: bool = True,
                     block: bool = False) -> Optional[Encoded]:
    """Mode tq for one tensor, its bits target measured on the tensor's own bytes (chunks and
    manifest record); None if tq does not take the tensor (:func:`encode_tensor` then does)."""

    def size_of(enc: Mapping[str, Encoded]) -> int:
        n = 0
        for mode, params, streams in enc.values():
            n += len(pack_canonical({"mode": mode, "name": name, "params": params, "shape": list(t.shape),
                                     "dtype": "float32"}))
            n += sum(CHUNK_HEADER_SIZE + len(p) for chunks in streams for _, p in chunks) + 16  # + index entry
        return n

    return encode_tq([(name, t)], opts, size_of, transforms, block=block).get(name)


# --- tensors streamed one by one (tq_scope "tensor", lazy inputs, worker processes) ------------------

def tq_blocks(src: Any, opts: EncodeOptions) -> Optional[list[tuple[int, int]]]:
    """Row blocks ``[(r0, r1), ...]`` for a large float tensor under tq_scope ``tensor`` without
    statistics, else None. ``src``: a tensor, or a lazy tensor (``layout() -> (shape, is_float)``)."""
    if not (opts.uses_tq and opts.tq_scope == "tensor" and opts.stats is None):
        return None
    if isinstance(src, torch.Tensor):
        shape, is_float = tuple(src.shape), src.is_floating_point()
    elif is_lazy(src):
        shape, is_float = src.layout()
    else:
        return None
    if len(shape) < 2 or not is_float or shape[0] < 2:
        return None
    m = 1
    for d in shape[1:]:
        m *= d
    if shape[0] * m <= TQ_BLOCK_PARAMS or m == 0:
        return None
    rows = max(1, TQ_BLOCK_PARAMS // m)
    return [(r, min(shape[0], r + rows)) for r in range(0, shape[0], rows)]


def merge_tq_blocks(parts: list[Optional[Encoded]]) -> Optional[Encoded]:
    """One tq record from row blocks' records (spec §7.5: bands are consecutive rows; layout
    ``out_in``, no transform): band lists joined, band streams in order. None if it cannot."""
    keys = ("band_rows", "steps", "q_min", "counts")
    params: dict[str, list] = {k: [] for k in keys}
    streams: list = [[]]
    for part in parts:
        if part is None or part.mode != "tq" or set(part.params) != set(keys) or part.streams[0]:
            return None
        for k in keys:
            params[k] += part.params[k]
        streams += part.streams[1:]
    if len(params["band_rows"]) > 4096:  # spec §7.5.1: at most 4096 bands
        return None
    return Encoded("tq", params, streams)


def encode_entry(name: str, src: Any, opts: EncodeOptions, rows: Optional[tuple[int, int]] = None) -> tuple:
    """Load (a lazy ``src``: ``load(rows=None)``, ``path``), check and encode one tensor:
    ``(dtype, shape, Encoded)``. With ``rows``: only that row block, in mode tq:
    ``(dtype, Encoded or None)``."""
    t = loaded(name, src, rows)
    if rows is not None:
        return name_of_torch(t.dtype), encode_tq_tensor(name, t, opts, transforms=False, block=True)
    if opts.uses_tq:  # tq_scope "tensor": this tensor on its own to the bits/quality target
        done = encode_tq_tensor(name, t, opts)
        if done is not None:
            return name_of_torch(t.dtype), tuple(t.shape), no_larger_than_raw(done, tensor_to_storage(t)[1])
    return name_of_torch(t.dtype), tuple(t.shape), encode_tensor(name, t, opts)


def encode_block(name: str, block: torch.Tensor, opts: EncodeOptions) -> tuple:
    """An in-memory row block already cut from its tensor: ``(dtype, Encoded or None)``."""
    check_tensor(name, block)
    return name_of_torch(block.dtype), encode_tq_tensor(name, block, opts, block=True)

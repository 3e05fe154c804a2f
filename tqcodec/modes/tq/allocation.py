"""Rate-distortion allocation with one Lagrange multiplier across the whole model.

Each *unit* (a weight viewed [out, in], or a bias viewed [n, 1]) has candidate step codes
(spec §7.1). For a code c: levels from error-feedback rounding (or nearest rounding for a first,
coarse curve), distortion ``D = gain * tr(E H E^T)`` (E = W - levels*step) and rate ``R`` = the
entropy-coded bits of the levels plus the side data they need (frequency table, chunk header).
For a multiplier lam every unit takes ``argmin D + lam R``; lam is bisected (on its logarithm)
to meet a bit budget or a distortion target.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from ...format.leb128 import packed_counts_bytes
from ...format.steps import STEP_CODE_MAX, STEP_CODE_MIN, code_at_most, step_from_code
from .pool import each, grouped, run
from .rounding import Prepared, gptq_round, prepare, round_nearest

MAX_LEVEL = 1 << 20
WHOLE_MATRIX_ROUNDING = 1 << 17  # row_band bands of smaller weights round the whole matrix at a code
# (rows round independently, so a band's levels are its rows of it): one Python column loop per code,
# not one per band; larger weights round each band's rows alone (less arithmetic per code)
SUBSAMPLE = 1 << 18  # coarse curves of bigger tensors use about this many weights
ROW_BLOCK = 1 << 20  # a unit without H is rounded and measured this many weights at a time
COUNT_BLOCK = 1 << 22  # levels counted at a time by coded_bits
CHUNK_HEADER_BITS = 32 * 8
BAND_PARAM_BITS = 8 * 8  # band_rows, step, q_min entries and the bytes header in the manifest
KEPT_LEVELS_BYTES = 1 << 30
"""Error-feedback levels kept for writing the file, in all (:class:`KeptLevels`). Each exact
curve point's levels were kept before, a byte a weight for each code of the refine windows: 6.6 GB
of a 600M-parameter Llama's calibrated encode. Levels dropped are rounded again when asked."""


def level_type(largest: float) -> type:
    """The narrowest of int8, int16, int32 that holds levels of magnitude up to ``largest``."""
    for t in (np.int8, np.int16):
        if largest <= np.iinfo(t).max:
            return t
    return np.int32


def narrow(levels: np.ndarray) -> np.ndarray:
    """``levels`` in the narrowest of int8, int16, int32 that holds them (|level| <= 2^20)."""
    if not levels.size:
        return levels.astype(np.int8)
    lo, hi = int(levels.min()), int(levels.max())
    for t in (np.int8, np.int16):
        if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
            return levels.astype(t)
    return levels.astype(np.int32)


def table_bits(counts: np.ndarray) -> int:
    """Bits of a band's LEB128 symbol counts (spec §7.5.1) plus their msgpack bin header."""
    return 8 * (packed_counts_bytes(counts) + 2)


def coded_bits(levels: np.ndarray, scale: float = 1.0) -> float:
    """Estimated stored bits of one band: N * empirical entropy + table + chunk header
    (``scale``: the levels are a subsample of 1/scale of the band). Counted ``COUNT_BLOCK``
    levels at a time (np.bincount widens its input to intp)."""
    flat = np.asarray(levels).reshape(-1)
    lo = int(flat.min())  # levels are whole numbers (float from rint, or integers): exact
    counts = np.zeros(int(flat.max()) - lo + 1, dtype=np.intp)
    for start in range(0, flat.size, COUNT_BLOCK):
        counts += np.bincount(flat[start:start + COUNT_BLOCK].astype(np.intp) - lo, minlength=len(counts))
    counts_nz = counts[counts > 0]
    if len(counts_nz) < 2:
        return float(BAND_PARAM_BITS + 32)
    p = counts_nz / flat.size
    ent = scale * float(-(counts_nz * np.log2(p)).sum())
    return ent + table_bits(counts) + CHUNK_HEADER_BITS + BAND_PARAM_BITS + 32


class Matrices:
    """Matrices made when asked and held a few at a time (least recently used first out),
    so that the encoder's working set is about the largest tensor, not the model: a unit keeps
    curves and a way to remake its rows, not its rows. A weight's matrix is kept as float32 when
    that holds its values exactly (the encoder's Item.narrow_values); whoever reads rows widens
    them (:func:`wide`, :class:`Rows`). Safe to use from several threads (a matrix is made by one
    of them at a time)."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._make: dict[str, Callable[[], np.ndarray]] = {}
        self._held: "OrderedDict[str, np.ndarray]" = OrderedDict()
        # matrices pushed out of _held that someone still uses (a task's pin): found, not made again
        self._alive: "weakref.WeakValueDictionary[str, np.ndarray]" = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def add(self, key: str, make: Callable[[], np.ndarray]) -> None:
        self._make[key] = make

    def get(self, key: str) -> np.ndarray:
        with self._lock:
            arr = self._held.get(key)
            if arr is None:
                while len(self._held) >= self.keep:
                    self._held.popitem(last=False)
                arr = self._alive.get(key)
                if arr is None:
                    arr = self._alive[key] = self._make[key]()
                self._held[key] = arr
            else:
                self._held.move_to_end(key)
            return arr

    def release(self) -> None:
        """Drop every held matrix (each is made again when next asked): between the encoder's
        stages, so that one stage's matrices do not sit beside the next stage's."""
        with self._lock:
            self._held.clear()  # a matrix someone still holds stays findable (_alive)

    def rows(self, key: str, r0: int, r1: int, shape: tuple[int, int],
             index: Optional[np.ndarray] = None) -> "Rows":
        return Rows(self, key, r0, r1, shape, index)


@dataclass(frozen=True)
class Rows:
    """Rows ``r0:r1`` of the matrix ``key`` of a :class:`Matrices` (``shape``: of those rows), or
    the rows ``index`` (increasing) when given."""

    matrices: Matrices
    key: str
    r0: int
    r1: int
    shape: tuple[int, int]
    index: Optional[np.ndarray] = None

    def __call__(self) -> np.ndarray:
        return wide(self.stored())

    def stored(self) -> np.ndarray:
        """The rows as the matrix keeps them (float32 where that is exact), not widened."""
        full = self.matrices.get(self.key)
        return full[self.r0:self.r1] if self.index is None else full[self.index]


def wide(a: np.ndarray) -> np.ndarray:
    """``a`` as float64: itself, or a float64 copy of a matrix that :class:`Matrices` keeps as
    float32 (values float32 holds exactly: the same numbers, so the same results)."""
    return a if a.dtype == np.float64 else a.astype(np.float64)


class KeptLevels:
    """Levels kept by their owners (a :class:`Unit`'s ``levels``, a :class:`SharedRounding`'s),
    at most ``limit`` bytes in all, least recently used dropped first. An owner is held weakly:
    nothing is kept alive for it, and an encode that ends frees its levels. Safe to use from
    several threads (an owner's own thread reads what another's ``put`` may drop: it then
    rounds again, the same levels)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._entries: "OrderedDict[tuple[int, int], tuple[weakref.ref, int]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, owner: Any, code: int, levels: np.ndarray) -> np.ndarray:
        """Keep ``levels`` as ``owner.levels[code]`` (``owner.serial`` names it); returns them."""
        owner.levels[code] = levels
        key = (owner.serial, code)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (weakref.ref(owner), levels.nbytes)
            self._bytes += levels.nbytes
            while self._bytes > self.limit and len(self._entries) > 1:
                (_, dropped), (ref, nbytes) = self._entries.popitem(last=False)
                self._bytes -= nbytes
                holder = ref()
                if holder is not None:
                    holder.levels.pop(dropped, None)
        return levels

    def get(self, owner: Any, code: int) -> Optional[np.ndarray]:
        """``owner.levels[code]`` (now the most recently used), or None when not kept."""
        levels = owner.levels.get(code)
        if levels is not None:
            with self._lock:
                if (owner.serial, code) in self._entries:
                    self._entries.move_to_end((owner.serial, code))
        return levels

    @property
    def nbytes(self) -> int:
        """Bytes of the levels counted as kept (owners freed since included, until dropped)."""
        return self._bytes


KEPT = KeptLevels(KEPT_LEVELS_BYTES)
_SERIALS = itertools.count()


class SharedRounding:
    """What the row bands of one tensor share for error-feedback rounding (rows round
    independently under the tensor's one H): ``w`` the whole [N, m] matrix (or :class:`Rows`
    that make it), the prepared H once made, and the whole matrix's levels by code (kept under
    :data:`KEPT`)."""

    def __init__(self, w: Any):
        self.w = w
        self.prepared: Optional[Prepared] = None
        self.levels: dict[int, np.ndarray] = {}
        self.losses: dict[int, np.ndarray] = {}  # code -> each row's e H e^T (small: kept, unlike the levels)
        self.serial = next(_SERIALS)

    def matrix(self) -> np.ndarray:
        """The whole matrix as kept (float32 where exact: error-feedback rounding widens it)."""
        return self.w.stored() if isinstance(self.w, Rows) else self.w

    def prepared_for(self, h: Any) -> Prepared:
        """The prepared H of the tensor's one group (``h`` [1, d, d], an array or :class:`LazyH`:
        read only the first time)."""
        if self.prepared is None:
            self.prepared = prepare(h[0])
        return self.prepared

    def rounded(self, code: int, h: Any) -> np.ndarray:
        """The whole matrix's levels at ``code`` (narrowest integer type)."""
        levels = KEPT.get(self, code)
        if levels is None:
            w = self.matrix()
            losses = np.empty(w.shape[0])
            levels = KEPT.put(self, code, narrow(gptq_round(w, None, step_from_code(code), -MAX_LEVEL, MAX_LEVEL,
                                                            prepared=self.prepared_for(h), losses=losses)))
            self.losses[code] = losses
        return levels


LAZY_H_DIM = 2048
"""A unit's H at least this wide is a :class:`LazyH`: made again from the statistics when read,
a few held at a time. A 4,096-wide H is 134 MB: a 600M-parameter Llama's twenty down-projections'
were 2.7 GB of its calibrated encode; a 1B Llama's 8,192-wide ones would be 8.6 GB."""


class LazyH:
    """A unit's H [groups, d, d] made when read (``make()``: the same float64 values each time)
    and held by ``held`` (a :class:`Matrices`: a few at a time, found again while someone holds
    one). Reads as the array does where the encoder reads H: ``shape``, ``h[i]``."""

    def __init__(self, make: Callable[[], np.ndarray], shape: tuple[int, ...], held: "Matrices"):
        self.shape = tuple(shape)
        self._held = held
        self._key = f"h\x00{next(_SERIALS)}"
        held.add(self._key, make)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def array(self) -> np.ndarray:
        return self._held.get(self._key)

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.array()[index]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.array()
        return a if dtype is None else a.astype(dtype)


@contextlib.contextmanager
def pinned(units: Sequence["Unit"]) -> Iterator[None]:
    """Hold the lazily made matrices ``units`` read while the caller works on those units:
    :class:`Matrices` finds a matrix someone holds instead of making it again, however often
    other threads' work pushes it out (a thread on an embedding's bands beside one going through
    many small tensors remade the embedding's matrix for every band)."""
    held: dict[tuple[int, str], np.ndarray] = {}
    for u in units:
        d = u.data
        if isinstance(d, Rows) and (id(d.matrices), d.key) not in held:
            held[(id(d.matrices), d.key)] = d.matrices.get(d.key)
        if isinstance(u.h, LazyH) and (id(u.h), "h") not in held:
            held[(id(u.h), "h")] = u.h.array()
    try:
        yield
    finally:
        held.clear()


@dataclass
class Unit:
    """One tensor to allocate: ``data`` its [n, m] float64 rows, or :class:`Rows` that remake them
    (read as ``w``); ``h`` [groups, d, d], an array or a :class:`LazyH` (None: identity);
    ``row_weights`` [n] (embeddings: token frequencies; None: all 1); ``gain`` output sensitivity."""

    name: str
    data: Any
    h: Any = None
    row_weights: Optional[np.ndarray] = None
    gain: float = 1.0
    # filled by the allocator: code -> (D, R bits); code -> levels (GPTQ, when computed; KEPT)
    curve: dict = field(default_factory=dict)
    levels: dict = field(default_factory=dict)
    exact: set = field(default_factory=set)  # codes whose curve point used the final rounding
    _prepared: Optional[list] = None
    _diag: Optional[np.ndarray] = None
    # row bands of one tensor share error-feedback results (rows round independently): rows r0:r1
    # (or row_index) of the whole matrix of ``shared``
    shared: Optional[SharedRounding] = None
    r0: int = 0
    h_mean: Optional[np.ndarray] = None  # E[x] per group [groups, m] (bias correction), with h
    max_code: Optional[int] = None  # coarser step codes are never chosen (BatchNorm running variances)
    slope_floor: bool = False  # never coarser than the step of equal slope on its weight MSE (see choose)
    floor_gain: float = 1.0  # that step as for a weight of this many times the gain (a vector's finer step)
    transposed: bool = False  # ``data`` is the tensor's [n, m] view transposed (one band; tq.encoder)
    row_index: Optional[np.ndarray] = None  # the band's rows of the tensor's view when not r0.. (spec 1.4 row_band)
    curve_version: int = 0  # counts changes of ``curve`` (choose's table is rebuilt when one changes)
    _fed: dict = field(default_factory=dict)  # code -> (levels, row losses) made ahead by refine for one band of many
    _exact_points: dict = field(default_factory=dict)  # code -> exact (D, R) once computed, kept across
    # encodes that start again from the coarse curve (ModelEncoder: each trial of a rate search)
    serial: int = field(default_factory=lambda: next(_SERIALS), init=False)  # unique, unlike id()

    @property
    def w(self) -> np.ndarray:
        return self.data() if isinstance(self.data, Rows) else self.data

    @property
    def w_stored(self) -> np.ndarray:
        """The rows as kept (float32 where exact), for work that widens them itself."""
        return self.data.stored() if isinstance(self.data, Rows) else self.data

    @property
    def group(self) -> object:
        """Units of equal ``group`` share state (one lazily made matrix, one error-feedback cache)
        and are evaluated by one thread at a time (:mod:`.pool`)."""
        if isinstance(self.data, Rows):
            return self.data.key
        return id(self.shared) if self.shared is not None else id(self)

    @w.setter
    def w(self, value: np.ndarray) -> None:
        self.data = value
        self._exact_points.clear()  # they were of the old values (a corrected bias)

    @property
    def shape(self) -> tuple[int, int]:
        """The rows' shape, without making them."""
        return tuple(self.data.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def distortion(self, err: np.ndarray, overwrite: bool = False) -> float:
        """``gain * tr(E H E^T)`` with rows weighted by ``row_weights``; ``overwrite``: ``err``
        may be used as scratch space (the same values: the products are made in place)."""
        e = err
        if self.row_weights is not None:
            e = np.multiply(e, np.sqrt(self.row_weights)[:, None], out=e if overwrite else None)
        if self.h is None:
            return self.gain * float(np.sum(np.multiply(e, e, out=e if overwrite else None)))
        g, d, _ = self.h.shape
        e3 = e.reshape(g, -1, d)
        tot = 0.0
        for i in range(g):
            tot += float(np.sum((e3[i] @ self.h[i]) * e3[i]))
        return self.gain * max(tot, 0.0)  # H is PSD (usable_h): below 0 only by rounding

    def distortion_diag(self, err: np.ndarray, overwrite: bool = False) -> float:
        """Cheap estimate for the coarse curve: ``tr(E diag(H) E^T)`` (errors taken as
        uncorrelated across input columns, as nearest rounding makes them at fine steps).
        ``overwrite``: ``err`` may be used as scratch space."""
        e2 = np.multiply(err, err, out=err if overwrite else None)
        if self.row_weights is not None:
            np.multiply(e2, self.row_weights[:, None], out=e2)
        if self.h is None:
            return self.gain * float(np.sum(e2))
        if self._diag is None:
            self._diag = np.stack([np.diag(self.h[i]) for i in range(self.h.shape[0])])  # [g, d]
        g, d = self._diag.shape
        return self.gain * float(np.sum(e2.reshape(g, -1, d).sum(axis=1) * self._diag))

    def _whole_matrix_rounding(self) -> bool:
        """Whether this band's levels come from the shared rounding of the whole matrix (row_band
        bands of small weights, and runs of rows): then that cache holds them."""
        if self.row_index is None:
            return True
        full = self.shared.w.shape
        return full[0] * full[1] <= WHOLE_MATRIX_ROUNDING

    def _row_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows as float64) of the unit, ``ROW_BLOCK`` weights at a time, so that no
        float64 temporary is the size of the unit (an embedding's or a head's: 49M weights): rows
        of a lazily made matrix are widened a block at a time."""
        d = self.data
        if isinstance(d, Rows):
            full = d.matrices.get(d.key)
            rows = full[d.r0:d.r1] if d.index is None else None
        else:
            full, rows = None, d
        per = max(1, ROW_BLOCK // max(self.shape[1], 1))
        for a in range(0, self.shape[0], per):
            yield a, wide(rows[a:a + per] if rows is not None else full[d.index[a:a + per]])

    def _band_distortion(self, lv: np.ndarray, step: float, losses: Optional[np.ndarray] = None) -> float:
        """:meth:`distortion` of the levels ``lv`` at ``step``. With H: from ``losses``, each
        row's ``e H e^T`` as the error-feedback rounding found it, where given (the products with
        H took 134 of 437 thread-seconds of exact points in a 4-layer Llama-shaped model's
        calibrated encode); else the product. Without H, the error
        is made a block of rows at a time: a row_band band sums its blocks' distortions; any
        other unit fills one error matrix and takes :meth:`distortion` of it in place (the same
        sum, in the same order, as of ``w - lv * step``)."""
        if self.h is not None:
            if losses is not None and np.isfinite(losses).all():
                if self.row_weights is not None:
                    losses = losses * self.row_weights
                return self.gain * float(np.sum(losses))
            return self.distortion(self.w - lv * step)  # the same rows as quantize used (held by Matrices)
        indexed = isinstance(self.data, Rows) and self.data.index is not None
        if not indexed:
            err = np.empty(self.shape, dtype=np.float64)
            for a, rows in self._row_blocks():
                np.subtract(rows, lv[a:a + len(rows)] * step, out=err[a:a + len(rows)])
            return self.distortion(err, overwrite=True)
        total = 0.0
        for a, rows in self._row_blocks():
            e = rows - lv[a:a + len(rows)] * step
            if self.row_weights is not None:
                e *= np.sqrt(self.row_weights[a:a + len(rows)])[:, None]
            total += float(np.sum(e * e))
        return self.gain * total

    def rows_every(self, stride: int) -> np.ndarray:
        """Every ``stride``-th of the unit's rows (of a lazily made matrix: only those rows)."""
        d = self.data
        if isinstance(d, Rows):
            full = d.matrices.get(d.key)
            return wide(full[d.r0:d.r1:stride] if d.index is None else full[d.index[::stride]])
        return d[::stride]

    def quantize(self, code: int, feedback: bool) -> np.ndarray:
        """Levels at step code ``code``: error-feedback rounding when ``feedback`` and H exists."""
        return self._quantize(code, feedback)[0]

    def _quantize(self, code: int, feedback: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """:meth:`quantize`'s levels, with each row's ``e H e^T`` where the error-feedback rounding
        gave it (:func:`gptq_round`'s ``losses``; else None)."""
        step = step_from_code(code)
        if not feedback or self.h is None:
            # rounded a block at a time (no float64 copy of w) into the narrowest integer type that
            # holds the largest level: rint is monotonic, so that is the largest |w| rounded
            peak = max((float(np.max(np.abs(rows))) for _, rows in self._row_blocks() if rows.size), default=0.0)
            out = np.empty(self.shape, dtype=level_type(min(float(np.rint(peak / step)), MAX_LEVEL)))
            for a, rows in self._row_blocks():
                out[a:a + len(rows)] = round_nearest(rows, step, -MAX_LEVEL, MAX_LEVEL)
            return out, None
        if self.shared is not None:
            sh = self.shared
            rows = self.row_index if self.row_index is not None else slice(self.r0, self.r0 + self.shape[0])
            if self.row_index is None or self._whole_matrix_rounding():  # the column loop's overhead dominates: once per code
                levels = sh.rounded(code, self.h)[rows]
                losses = sh.losses.get(code)
                return levels, None if losses is None else losses[rows]
            fed = self._fed.pop(code, None)
            if fed is not None:
                return fed
            losses = np.empty(self.shape[0])
            return gptq_round(self.w_stored, None, step, -MAX_LEVEL, MAX_LEVEL, prepared=sh.prepared_for(self.h),
                              losses=losses), losses
        g, d, _ = self.h.shape
        rows = self.w_stored.reshape(g, -1, d)
        if self._prepared is None:
            self._prepared = [prepare(self.h[i]) for i in range(g)]
        losses = np.empty(rows.shape[1]) if g == 1 else None  # a group's rows are the unit's rows only when g = 1
        out = [gptq_round(rows[i], None, step, -MAX_LEVEL, MAX_LEVEL, prepared=self._prepared[i], losses=losses)
               for i in range(g)]
        return np.concatenate(out, axis=0).reshape(self.shape), losses

    def evaluate(self, code: int, feedback: bool, keep: bool = False) -> tuple[float, float]:
        """Curve point at ``code``. ``feedback``: exact (the rounding the file will hold, full
        distortion); else a coarse estimate by nearest rounding, diagonal distortion and, for
        big tensors, a deterministic subsample of rows scaled up."""
        step = step_from_code(code)
        if not feedback:
            rw, scale = self.row_weights, 1.0
            grouped = self.h is not None and self.h.shape[0] > 1
            if self.size > SUBSAMPLE and not grouped and self.shape[0] > 1:
                stride = -(-self.size // SUBSAMPLE)
                w = self.rows_every(stride)  # only the sampled rows are made (a row_band band's are a copy)
                rw = None if rw is None else rw[::stride]
                scale = self.shape[0] / w.shape[0]
            else:
                w = self.w
            # candidate codes keep a weight's levels within ±2^20, but not a transform's coefficients
            # (an AAT from an H of wide dynamic range): clipped as quantize clips them
            # (in place: the same values as np.clip(np.rint(w * (1 / step)), ...) and w - lv * step)
            lv = np.multiply(w, 1.0 / step)
            np.rint(lv, out=lv)
            np.clip(lv, -MAX_LEVEL, MAX_LEVEL, out=lv)
            err = np.multiply(lv, step)
            np.subtract(w, err, out=err)
            saved = self.row_weights
            self.row_weights = rw
            d = scale * self.distortion_diag(err, overwrite=True)
            self.row_weights = saved
            r = coded_bits(lv, scale)
            self.curve[code] = (d, r)
            self.curve_version += 1
            return d, r
        if self.recall_exact(code):
            return self.curve[code]
        lv, losses = self._quantize(code, True)
        d = self._band_distortion(lv, step, losses)
        r = coded_bits(lv)
        self.curve[code] = (d, r)
        self._exact_points[code] = (d, r)
        self.curve_version += 1
        self.exact.add(code)
        if keep and self.h is not None and (self.shared is None or not self._whole_matrix_rounding()):
            # error-feedback levels are costly to compute again: kept (within KEPT's bytes), in the
            # narrowest integer type (plain rounding, without H, is recomputed when the tensor is written)
            KEPT.put(self, code, narrow(lv))
        return d, r

    def recall_exact(self, code: int) -> bool:
        """Put the exact point at ``code`` back into the curve when an earlier encode computed it."""
        point = self._exact_points.get(code)
        if point is None:
            return False
        if code not in self.exact:
            self.curve[code] = point
            self.exact.add(code)
            self.curve_version += 1
        return True

    def coarse_state(self) -> tuple[dict, frozenset]:
        """The curve and its exact codes as they are now (:meth:`restore`)."""
        return dict(self.curve), frozenset(self.exact)

    def restore(self, state: tuple[dict, frozenset]) -> None:
        """The curve as :meth:`coarse_state` gave it (exact points computed since stay known to
        :meth:`recall_exact`, and come back where an allocation asks for them)."""
        curve, exact = state
        if self.curve != curve or self.exact != exact:
            self.curve, self.exact = dict(curve), set(exact)
            self.curve_version += 1


def candidate_codes(w: np.ndarray, octaves_below: int = 10) -> list[int]:
    """Step codes from about rms*2^-octaves_below up to the first step that rounds every weight
    to zero (2*peak), never so fine that levels leave ±2^20 or the alphabet exceeds 65536."""
    rms = float(np.sqrt(np.mean(w * w))) if w.size else 0.0
    peak = float(np.max(np.abs(w))) if w.size else 0.0
    if rms <= 0:
        return [STEP_CODE_MAX]
    top = int(math.ceil(4 * math.log2(2 * peak))) + 1
    bottom = int(math.floor(4 * math.log2(rms))) - 4 * octaves_below
    floor_step = max(peak / (MAX_LEVEL - 1), 2 * peak / 65000, 2.0 ** -40)
    codes = [c for c in range(bottom, top + 1)
             if STEP_CODE_MIN <= c <= STEP_CODE_MAX and step_from_code(c) >= floor_step]
    return codes or [min(STEP_CODE_MAX, max(STEP_CODE_MIN, top))]


class _CurveTable:
    """Every unit's curve as arrays [units, points], codes coarsest first (padding: code +inf),
    so one choice of every unit is a few array operations. Rebuilt when a curve changes."""

    def __init__(self, units: list[Unit]):
        width = max((len(u.curve) for u in units), default=0)
        self.codes = np.full((len(units), width), np.inf)
        self.d = np.zeros((len(units), width))
        self.r = np.zeros((len(units), width))
        for i, u in enumerate(units):
            codes = sorted(u.curve, reverse=True)
            self.codes[i, :len(codes)] = codes
            self.d[i, :len(codes)] = [u.curve[c][0] for c in codes]
            self.r[i, :len(codes)] = [u.curve[c][1] for c in codes]


_TABLES: "OrderedDict[tuple, _CurveTable]" = OrderedDict()  # a few recent tables (one per unit list)
_TABLES_LOCK = threading.Lock()


def _curve_table(units: list[Unit]) -> _CurveTable:
    key = tuple((u.serial, u.curve_version) for u in units)
    with _TABLES_LOCK:
        table = _TABLES.get(key)
    if table is None:
        table = _CurveTable(units)
        with _TABLES_LOCK:
            _TABLES[key] = table
            while len(_TABLES) > 8:
                _TABLES.popitem(last=False)
    return table


def choose(units: list[Unit], lam: float) -> dict[str, int]:
    """Per unit, the code minimising D + lam * R on its curve (ties: the coarser step), never
    one coarser than the unit's ``max_code``."""
    if not units:
        return {}
    table = _curve_table(units)
    caps = np.full(len(units), np.inf)
    for i, u in enumerate(units):
        cap = u.max_code
        if u.slope_floor:
            cap = equal_slope_code(u, lam) if cap is None else min(cap, equal_slope_code(u, lam))
            cap = max(cap, min(u.curve))  # a unit with no code that fine takes its finest
        if cap is not None:
            caps[i] = cap
    cost = table.d + lam * table.r  # the same float64 sums as one at a time
    allowed = (table.codes <= caps[:, None]) & np.isfinite(table.codes)
    cost[~allowed] = np.inf
    best = np.argmin(cost, axis=1)  # the first (coarsest) of equal costs
    out = {}
    for i, u in enumerate(units):
        out[u.name] = int(table.codes[i, best[i]]) if cost[i, best[i]] < math.inf else None  # inf: none allowed
    return out


def equal_slope_code(u: Unit, lam: float) -> int:
    """The code of the largest step at most ``sqrt(6 lam / (ln 2 * g))``: where, at high rate
    (distortion ``g s^2 / 12`` and rate ``log2(1 / s)`` + const per weight), a weight's slope
    ``-dD/dR = g s^2 ln 2 / 6`` equals ``lam`` (``g``: the unit's gain times its mean row weight).
    One step for every weight of equal ``g``, as NNCodec's one QP: the floor for data-free units,
    whose table and header costs would otherwise make small tensors coarser (or zero) where their
    few bits buy output accuracy the weight MSE does not see."""
    g = u.gain * u.floor_gain * (1.0 if u.row_weights is None else float(np.mean(u.row_weights)))
    if not g > 0:
        return STEP_CODE_MAX
    return code_at_most(math.sqrt(6.0 * lam / (math.log(2.0) * g)))


def totals(units: list[Unit], pick: dict[str, int]) -> tuple[float, float]:
    d = sum(u.curve[pick[u.name]][0] for u in units)
    r = sum(u.curve[pick[u.name]][1] for u in units)
    return d, r


def fill(units: list[Unit], pick: dict[str, int], budget: float) -> dict[str, int]:
    """Spend what ``pick`` leaves of ``budget`` (bits): move units one code finer, best
    distortion saving per added bit first, while the total stays within budget."""
    pick = dict(pick)
    used = totals(units, pick)[1]
    while True:
        moves = []
        for u in units:
            c = pick[u.name]
            finer = [k for k in u.curve if k < c]
            if not finer:
                continue
            k = max(finer)
            if k not in u.exact:
                u.evaluate(k, True, keep=True)
            d0, r0 = u.curve[c]
            d1, r1 = u.curve[k]
            if r1 > r0 and d1 < d0 and used + r1 - r0 <= budget:
                moves.append(((d0 - d1) / (r1 - r0), u.name, k, r1 - r0))
        if not moves:
            return pick
        moves.sort(key=lambda t: (-t[0], t[1]))
        _, name, k, dr = moves[0]
        pick[name] = k
        used += dr


def bisect_lambda(units: list[Unit], measure: Callable[[dict[str, int]], float], target: float,
                  increasing: bool, iters: int = 60) -> tuple[float, dict[str, int]]:
    """Find lam whose choice makes ``measure(choice)`` closest to ``target`` from the safe side.

    ``increasing``: measure grows with lam (distortion); else it falls (rate). Returns the
    choice meeting the target (rate <= target, or distortion <= target) nearest to it, or the
    closest one when none meets it.
    """
    lo, hi = -80.0, 40.0  # log2 lam
    best = None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        pick = choose(units, 2.0 ** mid)
        val = measure(pick)
        ok = val <= target
        if ok:
            best = (mid, pick)
        # rate: ok -> try smaller lam (more bits); distortion: ok -> try larger lam
        if (ok and not increasing) or (not ok and increasing):
            hi = mid
        else:
            lo = mid
    if best is None:
        mid = hi if not increasing else lo
        best = (mid, choose(units, 2.0 ** mid))
    return 2.0 ** best[0], best[1]


def build_curves(units: list[Unit], *, window: int = 3, lam_hint: Optional[float] = None,
                 feedback: bool = True, progress: Optional[Callable[[int, int], None]] = None,
                 threads: int = 1) -> None:
    """Coarse curves by nearest rounding over every candidate code; then, when ``feedback``,
    the codes within ``window`` of the choice at ``lam_hint`` are re-evaluated with
    error-feedback rounding (levels kept for encoding). ``threads``: units of different
    :attr:`Unit.group` evaluated at once (the same curves for every count)."""
    done = 0

    def coarse(group: list[Unit]) -> None:
        with pinned(group):
            for u in group:
                if not u.curve:
                    for c in candidate_codes(u.w):
                        u.evaluate(c, False)

    groups = grouped(units, lambda u: u.group)
    for group, _ in zip(groups, each(coarse, groups, threads)):
        done += len(group)
        if progress:
            progress(done, len(units))
    if feedback and lam_hint is not None:
        refine(units, choose(units, lam_hint), window, threads)


def refine(units: list[Unit], pick: dict[str, int], window: int, threads: int = 1) -> None:
    """Error-feedback rounding for the codes within ``window`` of each unit's pick
    (``threads``: as :func:`build_curves`)."""

    def exact(group: list[Unit]) -> None:
        for u in group:  # the picks' levels are the ones a file written next will read: used last
            KEPT.get(u, pick[u.name])
            if u.shared is not None:
                KEPT.get(u.shared, pick[u.name])
        wanted = {u.name: [c for c in sorted(u.curve) if abs(c - pick[u.name]) <= window and c not in u.exact
                           and not u.recall_exact(c)]
                  for u in group}
        if not any(wanted.values()):
            return
        with pinned(group):
            if len(group) > 1 and all(_banded_feedback(u) for u in group):
                _feed_row_bands(group, wanted)
            for u in group:
                for c in wanted[u.name]:
                    u.evaluate(c, True, keep=True)

    run(exact, grouped(units, lambda u: u.group), threads)


def _banded_feedback(u: Unit) -> bool:
    """Whether ``u`` is a row_band band whose error-feedback rounding runs on its own rows."""
    return u.h is not None and u.shared is not None and u.row_index is not None \
        and not u._whole_matrix_rounding()


def _feed_row_bands(group: list[Unit], wanted: Mapping[str, list[int]]) -> None:
    """The error-feedback levels of a row_band tensor's bands at their ``wanted`` codes, made
    ahead for :meth:`Unit.quantize`: rows round independently of each other under the tensor's
    one H, so the k-th wanted code of every band is one pass over their rows with a step per row,
    and the column loop runs once per k instead of once per band and code. Same levels as
    band by band."""
    sh = group[0].shared
    prepared = sh.prepared_for(group[0].h)
    full = sh.matrix()
    for k in range(max((len(wanted[u.name]) for u in group), default=0)):
        taking = [u for u in group if len(wanted[u.name]) > k]
        if len(taking) < 2:  # one band alone: quantize rounds it as before
            continue
        rows = np.concatenate([u.row_index for u in taking])
        steps = np.concatenate([np.full(len(u.row_index), step_from_code(wanted[u.name][k])) for u in taking])
        losses = np.empty(len(rows))
        levels = gptq_round(full[rows], None, steps, -MAX_LEVEL, MAX_LEVEL, prepared=prepared, losses=losses)
        at = 0
        for u in taking:
            part = slice(at, at + len(u.row_index))
            u._fed[wanted[u.name][k]] = (levels[part], losses[part])
            at += len(u.row_index)

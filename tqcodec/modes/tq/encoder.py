"""The ``tq`` encoder for a whole model: statistics -> units -> one-lambda allocation -> mode
``tq`` tensors (spec §7.5). Arrays in, encoded tensors out; the caller measures the
real container size through ``size_of`` so that a bits target holds for the whole file.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from ...format.steps import MAX_CODED_MAGNITUDE, code_at_most, step_from_code
from ...processes import current_budget
from ..base import Encoded
from . import transforms
from .format import write
from .allocation import (KEPT, LAZY_H_DIM, LazyH, Matrices, Rows, SharedRounding, Unit, bisect_lambda, build_curves,
                         candidate_codes, choose, fill, pinned, refine, totals)
from .pool import each, run
from .tokens import floored_counts

BAND_SHARE = 24  # a tensor holding more than 1/24 of the weights is cut into row bands (own step
MAX_BANDS = 8    # and table each), at most 8: finer rate control and per-band steps
EMBED_BANDS = 64  # embedding tables: up to 64 bands of rows (by token frequency), so rare tokens get coarser steps
ROW_CLASS_OCTAVES = 1.0  # rows with weights (token counts) are banded by this many octaves of weight
MAX_ROW_CLASSES = 16  # a linear layer's rows (measured output sensitivities): at most this many bands
ROW_CLASS_MIN = 1 << 13  # ... a band at least this many weights (or 1/192 of the model: a table and a chunk header cost ~100 bytes)
DATA_FREE_EMBED_GAIN = 1 / 16  # without statistics, an embedding table's weight error counts this much
# (a row's error reaches only the tokens that use it, a projection's error every token): 4x the
# step of the other weights. MiniLM at 4.5 bits/param: mean cos 0.9884 with 1, 0.9955 with 1/16
DATA_FREE_EMBED_MIN_ROWS = 4096  # ... when it has this many rows (a vocabulary): the rows of a small
# table are each used by many inputs (BERT's 2 token types: row 0 by every token, an error there
# moves every embedding alike). MiniLM, 4.4 bits/param: token_type_embeddings took 15.8 dB weight
# SNR when the bits loop spent its rest elsewhere (mean cosine 0.98981), 38.9 dB when not (0.99413)
DATA_FREE_MIN_BAND = 1 << 16  # without statistics a row band holds at least this many weights: the
# bands of a tensor then take about one step (one slope on weight MSE), so a band buys only its own
# table, and its chunk header, table and parameters (~100 bytes) outweighed that on small models


DATA_FREE_VECTOR_GAIN = 256.0  # without statistics a 1-D tensor (bias, norm) of at least
DATA_FREE_VECTOR_MIN = 32      # this many entries is coded at most 1/16 of the weights' step (the step of
# equal slope for a weight of 256x the gain; stored raw before). A bias is a weight on a constant
# input, so one step for both would do on weight MSE, but a norm's scale multiplies a whole channel.
# Digits CNN data-free, 1.5-2.5 bits/param: the vectors' 1,160 raw bytes were 7% of a 16 kB file;
# coded, mean logit SQNR 23.0 -> 23.4 dB (weight SNR 17.8 -> 18.5); MiniLM 4.4 bits/param: 0.99447
# at 12,530,265 B -> 0.99394 at 12,335,350 B (the same curve). Smaller vectors: a table costs more.


LAZY_ELEMENTS = 1 << 16  # tensors of more elements are made when needed (Matrices), not held


@dataclass
class Item:
    """One tensor offered to the tq encoder: its dtype name, shape, and ``load()`` giving its
    float64 values (called when needed: the encoder holds a few tensors' values at a time);
    ``load_narrow()``, when given, the same values as float32 (float32, float16 and bfloat16
    tensors): what the encoder keeps of a large matrix, widened to float64 where it computes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    load_narrow: Optional[Callable[[], np.ndarray]] = None
    tied: tuple[str, ...] = ()  # the other names of the same tensor (e.g. an output layer tied to an embedding)

    @property
    def values(self) -> np.ndarray:
        return self.load()

    @property
    def narrow_values(self) -> np.ndarray:
        """The values in the narrowest float dtype that holds them exactly (float32 or float64)."""
        return self.load() if self.load_narrow is None else self.load_narrow()

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @classmethod
    def of(cls, name: str, dtype: str, values: np.ndarray) -> "Item":
        """An item whose values are already in memory."""
        return cls(name, dtype, tuple(values.shape), lambda: values)


def matrix_view(values: np.ndarray, layout: str) -> np.ndarray:
    """The [n rows, m columns] matrix R of spec §7.5 for a weight stored in ``layout``."""
    return values.T if layout == "in_out" else values.reshape(values.shape[0], -1)


def _h_fits(h: Optional[np.ndarray], n: int, m: int) -> bool:
    return h is not None and h.ndim == 3 and h.shape[1] == h.shape[2] == m and n % h.shape[0] == 0


UNREACHED_SHARE = 0.2  # the directions no sample reached weigh this share of a typical input's energy:
# real inputs hold their energy in few directions, so the unseen ones are weaker than the mean.
# Digits CNN, fc1 (d = 512) from 32 images, calibrated tq at 1 bit/param: logit SQNR 13.5 dB with
# a share of 1 (the data-free encoder gives 16.2 dB, 1024 images 28.7), 23.8 with 0.2, 22.3 with 0.05.
# MiniLM from 32 sentences (579 tokens; the FFN down-projections have d = 1536) at 3.6 bits/param:
# mean cosine 0.9746 with a share of 1, 0.9925 with 0.4, 0.9929 with 0.2 and 0.1, 0.9928 with 0.05
# (128 sentences: 0.9950, every H full rank)


def usable_h(h: np.ndarray, rows: int) -> Optional[np.ndarray]:
    """The input second moments H [groups, d, d] as the encoder weighs errors by them, from
    statistics of ``rows`` input vectors: None when they hold nothing to go by (not finite, or no
    energy in a group: an input that was always zero says nothing of other inputs, so the tensor
    is coded as without statistics); shrunk toward ``e * I`` when fewer vectors than dimensions
    were seen (H is then singular: directions no sample reached would cost nothing), by
    ``UNREACHED_SHARE`` of the share ``1 - rows/d`` of the dimensions no sample can have reached.
    ``e`` is the median of H's diagonal (the mean where the median is 0): a few outlier input
    channels, as large language models have, make the mean many times a typical channel's energy.
    A 256 -> 512 linear layer whose inputs have two channels 60x the others, from 32 samples, at
    3 bits/param: output SNR 18.5 dB toward the mean, 22.9 toward the median (data-free 15.9;
    from 256 samples, no shrinkage, 28.9). Digits CNN from 32 images: logit SQNR 27.98 and 28.35
    dB (0.9-1.3 bits/param, within the noise of one weight's draw)."""
    return _usable_h(h, rows)[0]


def _usable_h(h: np.ndarray, rows: int, psd: bool = False) -> tuple[Optional[np.ndarray], bool]:
    """(:func:`usable_h`, whether every group of H was positive semi-definite as it was).
    ``psd``: known to be (the same H made again), so not checked again."""
    h = np.asarray(h, dtype=np.float64)
    if not np.isfinite(h).all():
        return None, False
    d = h.shape[-1]
    traces = np.trace(h, axis1=1, axis2=2)
    if not (traces > 0).all():
        return None, False
    groups = [(h[g], True) if psd else _psd_checked(h[g], traces[g] / d) for g in range(h.shape[0])]
    clean = all(ok for _, ok in groups)
    h = np.stack([m for m, _ in groups])
    alpha = UNREACHED_SHARE * max(0.0, 1.0 - max(int(rows), 0) / d)
    if alpha == 0.0:
        return h, clean
    eye = np.eye(d)
    typical = [float(np.median(np.diag(h[g]))) for g in range(h.shape[0])]
    typical = [e if e > 0 else float(traces[g]) / d for g, e in enumerate(typical)]
    return np.stack([(1.0 - alpha) * h[g] + alpha * typical[g] * eye for g in range(h.shape[0])]), clean


def usable_h_of(st, usable: dict, remake: Optional[Callable[[], Any]] = None,
                held: Optional[Matrices] = None) -> Any:
    """:func:`usable_h` of ``st``'s H, made once per distinct H and sample count in ``usable``:
    tensors that read one input (query, key and value; an MLP's gate and up projections) share
    one array, however their statistics were read (a lazily opened file reads each tensor's
    statistics anew, and so made a copy per tensor: 1.1 GB of a 600M-parameter Llama's encode).
    With ``remake`` (giving the tensor's statistics again) and ``held``, an H of at least
    ``LAZY_H_DIM`` columns is a :class:`LazyH` that makes it again when read, held by ``held``."""
    h = np.ascontiguousarray(st.h, dtype=np.float64)
    digest = hashlib.blake2b(h.tobytes(), digest_size=20)
    digest.update(repr((h.shape, int(st.rows))).encode())
    key = digest.digest()
    if key not in usable:
        made, clean = _usable_h(h, st.rows)
        if made is not None and remake is not None and held is not None and made.shape[-1] >= LAZY_H_DIM:
            rows = int(st.rows)  # not st: it holds the H read now (a 4,096-wide one: 128 MiB a tensor)
            # made again from the same values: a Cholesky check it passed once is not made again
            made = LazyH(lambda: _usable_h(remake().h, rows, psd=clean)[0], made.shape, held)
        usable[key] = made
    return usable[key]


PSD_SLACK = 1e-9  # an H whose smallest eigenvalue is above -PSD_SLACK * mean(diag) is used as it is


def _psd(h: np.ndarray, mean_diag: float) -> np.ndarray:
    """``h`` where it is positive semi-definite up to ``PSD_SLACK`` (statistics from calibrate,
    rounding included); else its eigenvalues clipped at 0 (statistics whose rounding or making
    left directions of negative second moment: errors there would seem to lower the distortion)."""
    return _psd_checked(h, mean_diag)[0]


def _psd_checked(h: np.ndarray, mean_diag: float) -> tuple[np.ndarray, bool]:
    """(:func:`_psd`, whether ``h`` passed as it was)."""
    try:
        np.linalg.cholesky(h + PSD_SLACK * mean_diag * np.eye(len(h)))
        return h, True
    except np.linalg.LinAlgError:
        pass
    with threadpool_limits(limits=1, user_api="blas"):
        vals, vecs = np.linalg.eigh((h + h.T) / 2)
    return (vecs * np.clip(vals, 0.0, None)[None, :]) @ vecs.T, False


def view_shape(shape: Sequence[int], layout: str) -> tuple[int, int]:
    """The [n, m] shape of :func:`matrix_view` for a tensor of ``shape``."""
    if layout == "in_out":
        return int(shape[1]), int(shape[0])
    return int(shape[0]), int(np.prod(shape[1:], dtype=np.int64))


def make_units(items: list[Item], stats, matrices: Optional[Matrices] = None,
               block: bool = False, usable: Optional[dict] = None) -> tuple[list[Unit], dict[str, str]]:
    """Units for the tensors tq codes, and each unit's layout. Tensors left out (1-D without a
    measured gain, small tensors without statistics, running variances) go to the data-free path.
    ``matrices``: where the [n, m] matrices of large tensors are made when needed (default: a new
    :class:`Matrices`); small tensors are held. ``block``: the items are row blocks of one tensor,
    whose records are joined (``out_in``, bands of consecutive rows): no magnitude bands.
    ``usable``: where each distinct H as the units weigh by it is kept (:func:`usable_h_of`)."""
    matrices = matrices if matrices is not None else Matrices()
    units: list[Unit] = []
    layouts: dict[str, str] = {}
    known = [] if stats is None else [stats.default_gain] if stats.default_gain is not None else stats.gains()
    total = sum(it.size for it in items)
    band_size = max(1, total // BAND_SHARE)
    if stats is None:
        band_size = max(band_size, DATA_FREE_MIN_BAND)
    default_gain = max(known) if known else 1.0
    # a vector's step follows the weights' (the floor of a finer slope at their multiplier): coded
    # alone (tq_scope "tensor") a bits target of its own would zero it, so it stays raw
    matrices_too = any(len(it.shape) >= 2 for it in items)
    by_name = {it.name: it for it in items}
    usable = {} if usable is None else usable
    held_h = Matrices()  # the units' LazyH, made again when read (two held at a time)
    for index, it in enumerate(items):
        st = stats.get(it.name) if stats is not None else None
        if it.name.endswith((".running_mean", ".running_var")) or it.name in ("running_mean", "running_var"):
            unit = batchnorm_unit(it, by_name, stats, default_gain)
            if unit is not None:
                units.append(unit)
                layouts[it.name] = "out_in"
            continue
        if "running_var" in it.name or "running_mean" in it.name or it.size == 0:
            continue
        ndim = len(it.shape)
        if st is not None and st.kind == "plain":
            v = it.values
            v2 = v.reshape(v.shape[0] if v.ndim else 1, -1)
            # a BatchNorm's weight and bias (running statistics beside them) keep equal row weights:
            # its channels' measured gains are noisy and its running statistics are weighed by its scale
            bn = it.name.endswith(("weight", "bias")) and \
                it.name.rsplit(".", 1)[0] + ".running_var" in by_name if "." in it.name else False
            units.append(Unit(band_name(it.name, 0), v2, None, None if bn else relative_row_gains(st, v2.shape[0]),
                              st.gain))
            layouts[it.name] = "out_in"
            continue
        if ndim < 2:
            if st is None and ndim == 1 and DATA_FREE_VECTOR_GAIN > 0 and it.size >= DATA_FREE_VECTOR_MIN and matrices_too:
                units.append(Unit(band_name(it.name, 0), np.asarray(it.values, dtype=np.float64).reshape(-1, 1), None,
                                  None, default_gain, slope_floor=True, floor_gain=DATA_FREE_VECTOR_GAIN))
                layouts[it.name] = "out_in"
            continue
        layout = st.layout if st is not None and ndim == 2 else "out_in"
        view_energy = None  # the mean square of each row of the view, when the layout was chosen by them
        if st is None and ndim == 2 and not block:
            layout, view_energy = magnitude_layout(it.narrow_values)
        n, m = view_shape(it.shape, layout)
        if st is not None and st.kind == "rows" and layout == "out_in" and _h_fits(st.h, m, n) and st.h.shape[0] == 1:
            unit = transposed_unit(it, st, n, m, matrices)
            if unit is not None:
                units.append(unit)
                layouts[it.name] = layout
                continue
        if it.size > LAZY_ELEMENTS:
            matrices.add(it.name, lambda it=it, layout=layout: np.ascontiguousarray(matrix_view(it.narrow_values, layout)))
            w2 = matrices.rows(it.name, 0, n, (n, m))
        else:
            w2 = np.ascontiguousarray(matrix_view(it.values, layout))
        h = rw = None
        gain = default_gain * (DATA_FREE_EMBED_GAIN if stats is None and ndim == 2
                               and it.shape[0] >= DATA_FREE_EMBED_MIN_ROWS and input_only_table(it, items) else 1.0)
        if st is not None:
            gain = st.gain
            if st.kind == "embedding" and st.counts is not None and len(st.counts) == n:
                c = floored_counts(st.counts, matrices.get(it.name) if isinstance(w2, Rows) else w2)
                rw = with_output_rows(c / c.sum(), st.counts, getattr(st, "row_gain", None))
                h = column_metric(st, m)
            elif st.kind == "rows" and getattr(st, "row_h", None) is not None and len(st.row_h) == n:
                rw = np.asarray(st.row_h, dtype=np.float64)  # inputs on the rows (transposed convolutions)
                rw = rw if np.isfinite(rw).all() and rw.sum() > 0 else None
            elif _h_fits(st.h, n, m):
                h = usable_h_of(st, usable, lambda name=it.name: stats.get(name), held_h)
        row_banded = rw is not None
        if rw is None and layout == "out_in" and stats is not None:
            # the gain holds the mean scale, the rows keep their shares. Not without statistics: a
            # following BatchNorm's scale as row weights made data-free dwsep-cnn worse (issue 15:
            # logit SQNR 9.7 -> 7.1 dB at 5 bits/param, 14.0 -> 11.8 dB at 6)
            scale = following_batchnorm_scale(items, index, n)
            if scale is not None:
                rw = scale / scale.mean()
        if rw is None and layout == "out_in" and st is not None:
            rw = relative_row_gains(st, n)  # measured (noisier than a following BatchNorm's exact scale)
        if row_banded:
            for b, index in enumerate(row_classes(rw, m, min(ROW_CLASS_MIN, band_size // 8), EMBED_BANDS)):
                whole = len(index) == n
                units.append(Unit(band_name(it.name, b), _rows_of(w2, index, matrices, it.name), h, rw[index],
                                  gain, r0=int(index[0]), row_index=None if whole else index))
            layouts[it.name] = layout
            continue
        # not from made-up inputs: MiniLM, synthetic statistics, 4.1 bits/param, mean cosine 0.99499
        # with bands by those sensitivities, 0.99531 without (calibrated, 3.4: 0.99451 -> 0.99489 with)
        classes = row_classes(rw, m, ROW_CLASS_MIN, MAX_ROW_CLASSES) \
            if h is not None and h.shape[0] == 1 and rw is not None and not getattr(stats, "synthetic", False) else []
        if len(classes) > 1:  # rows of like output sensitivity share a step and a table (row_band)
            shared = SharedRounding(w2)  # the tensor's error-feedback preparation (and results), one for its classes
            for b, index in enumerate(classes):
                units.append(Unit(band_name(it.name, b), _rows_of(w2, index, matrices, it.name), h, rw[index], gain,
                                  shared=shared, r0=int(index[0]), row_index=index))
                units[-1].h_mean = st.mean
            layouts[it.name] = layout
            continue
        if h is None and rw is None and st is None and not block:
            energy = view_energy if view_energy is not None else \
                row_energy(matrices.get(it.name) if isinstance(w2, Rows) else w2)
            classes = row_classes(energy, m, min(ROW_CLASS_MIN, max(total // 192, 1024)), DATA_FREE_ROW_CLASSES) \
                if magnitude_class_gain(energy) >= MAGNITUDE_CLASS_MIN_GAIN else []
            if len(classes) > 1:  # rows of like magnitude share a step and a table (row_band)
                for b, index in enumerate(classes):
                    units.append(Unit(band_name(it.name, b), _rows_of(w2, index, matrices, it.name), None, None,
                                      gain, r0=int(index[0]), row_index=index, slope_floor=True))
                layouts[it.name] = layout
                continue
        cap, size = MAX_BANDS, band_size
        nb = 1 if h is not None and h.shape[0] > 1 else max(1, min(cap, n, -(-(n * m) // max(size, 1))))
        bounds = [n * i // nb for i in range(nb + 1)]
        shared = SharedRounding(w2) if nb > 1 and h is not None else None
        for b in range(nb):
            r0, r1 = bounds[b], bounds[b + 1]
            rows = matrices.rows(it.name, r0, r1, (r1 - r0, m)) if isinstance(w2, Rows) else w2[r0:r1]
            units.append(Unit(band_name(it.name, b), rows, h, None if rw is None else rw[r0:r1], gain,
                              shared=shared, r0=r0, slope_floor=stats is None))
            units[-1].h_mean = st.mean if (h is not None and st.mean is not None) else None
        layouts[it.name] = layout
    return units, layouts


def with_output_rows(shares: np.ndarray, counts: np.ndarray, row_gain: Optional[np.ndarray]) -> np.ndarray:
    """An embedding's row weights (``shares``, from its token counts, summing to 1) with, where
    the table is also the output layer (calibrate measures ``row_gain`` then: each row's output
    sensitivity), the output layer's part: every row is an output row, so a uniform share
    ``beta / n`` is mixed in. ``beta`` is the output layer's part of the measured sensitivity: the
    mean ``row_gain`` of the rows no input used (their rows reach the output only through the
    output layer; the least sensitive row's when every row was used) times ``n``, over the sum.

    A 4-layer GPT-2 with a tied 4,096-token embedding (benchmarks/zoo/codelm.py), 128 windows of
    128 tokens, 3.75 bits/param: perplexity ratio 0.9824 with the counts alone, 0.9935 with the
    measured beta (0.48); 0.9937 and 0.9951 with beta fixed at 0.3 and 0.7."""
    if row_gain is None or len(row_gain) != len(shares):
        return shares
    g = np.asarray(row_gain, dtype=np.float64)
    if not (np.isfinite(g).all() and (g >= 0).all() and g.sum() > 0):
        return shares
    unseen = np.asarray(counts) == 0
    level = float(g[unseen].mean()) if unseen.any() else float(g.min())
    beta = min(1.0, len(g) * level / float(g.sum()))
    return (1.0 - beta) * shares + beta / len(shares)


def column_metric(st, m: int) -> Optional[np.ndarray]:
    """An embedding's metric over its columns ([1, m, m]: the output gradients' second moment a
    row receives, mean diagonal 1), made positive semi-definite; None when it has none or it does
    not fit. Its rows are then rounded with error feedback along the columns: MiniLM's word
    embedding feeds a LayerNorm and attention, which pass some directions of a row's error on far
    less than others (128 sentences, 3.0 bits/param: mean cosine 0.99441 -> 0.99502)."""
    h = getattr(st, "h", None)
    if h is None or np.shape(h) != (1, m, m) or not np.isfinite(h).all():
        return None
    mean = float(np.trace(h[0])) / m
    if not mean > 0:
        return None
    return _psd(np.asarray(h[0], dtype=np.float64) / mean, 1.0)[None]


def _rows_of(w2: Any, index: np.ndarray, matrices: Matrices, name: str) -> Any:
    """The rows ``index`` (increasing) of a tensor's [n, m] view ``w2``: ``w2`` itself when they
    are all its rows, a lazily made :class:`Rows` when ``w2`` is one, else a copy."""
    n, m = w2.shape
    if len(index) == n:
        return w2
    if isinstance(w2, Rows):
        return matrices.rows(name, int(index[0]), int(index[-1]) + 1, (len(index), m), index)
    return w2[index]


def row_classes(rw: np.ndarray, m: int, min_size: int, cap: int) -> list[np.ndarray]:
    """Rows grouped by the octave (``ROW_CLASS_OCTAVES``) of their weight ``rw`` [n], heaviest
    first, each group's rows increasing (spec §7.5.1 ``row_band``: a band is any set of rows, so
    rows of like weight share a step and a table, wherever they are). Neighbouring octaves are
    merged until a group holds at least ``min_size`` weights (each band costs a table and a
    chunk), at most ``cap`` groups."""
    n = len(rw)
    level = np.floor(np.log2(np.maximum(rw, np.finfo(np.float64).tiny) / float(rw.max())) / ROW_CLASS_OCTAVES)
    order = np.argsort(-level, kind="stable")  # heaviest octave first, rows increasing within one
    keys = level[order]
    cuts = np.flatnonzero(np.diff(keys)) + 1  # where the octave changes
    per = max(1, -(-min_size // max(m, 1)))  # rows a group needs
    groups, start = [], 0
    for c in list(cuts) + [n]:
        if c - start >= per and n - c >= per:
            groups.append(order[start:c])
            start = c
    groups.append(order[start:])
    while len(groups) > cap:  # the lightest merged first
        groups[-2:] = [np.concatenate(groups[-2:])]
    return [np.sort(g) for g in groups]


MAGNITUDE_CLASS_MIN_GAIN = 0.3  # without statistics, rows are coded in classes of like magnitude only
# when that saves about this many bits per weight (magnitude_class_gain). Digits CNN: fc1 3.65 (a
# quarter of its rows dead), fc2's columns 3.69; data-free logit SQNR at 1.5-2.5 bits/param 21.5 ->
# 23.0 dB on average; the LSTM's gate rows 0.38 and 0.49. MiniLM: every tensor <= 0.23; at 4.4
# bits/param mean cosine 0.99517 with this threshold, 0.99535 with 0.1 (9 tensors banded), 0.99513
# with 0.05 (22).
DATA_FREE_ROW_CLASSES = 4  # ... in at most this many bands (digits data-free, weight SNR at 1.5-2.5
# bits/param: 18.44 / 18.61 / 18.58 / 18.54 / 18.53 dB with 3 / 4 / 6 / 8 / 16: each band's row list
# and table cost manifest and chunk bytes)
MAGNITUDE_COLUMNS_OVER_ROWS = 1.1  # columns become the coded rows when their magnitudes spread this much more


def magnitude_class_gain(energy: np.ndarray) -> float:
    """About the bits per weight that coding rows of the mean squares ``energy`` [n] in classes
    of like magnitude saves over one step and table for all (at high rate a row of variance v
    costs 1/2 log2 v + const per weight): the log of the mean over the mean of the logs."""
    if not len(energy) or not energy.mean() > 0:
        return 0.0
    e = np.maximum(energy, 1e-6 * energy.mean())
    return float(0.5 * np.log2(e.mean()) - 0.5 * np.mean(np.log2(e)))


def magnitude_layout(values: np.ndarray) -> tuple[str, np.ndarray]:
    """The layout of a 2-D weight coded without statistics, and the mean square of each row of
    its view in that layout: ``in_out`` (its columns become the view's rows, spec §7.5) when its
    columns' magnitudes spread more than its rows' (inputs that were dead in training leave zero
    columns), else ``out_in``."""
    w = np.asarray(values)
    rows, cols = row_energy(w), row_energy(w.T)
    spread = magnitude_class_gain(cols)
    if spread >= MAGNITUDE_CLASS_MIN_GAIN and spread > MAGNITUDE_COLUMNS_OVER_ROWS * magnitude_class_gain(rows):
        return "in_out", cols
    return "out_in", rows


def row_energy(w2: np.ndarray) -> np.ndarray:
    """The mean square of each row of ``w2`` [n, m] (float64 sums, in slices of rows)."""
    n = w2.shape[0]
    step = max(1, (1 << 20) // max(w2.shape[1], 1))
    return np.concatenate([np.mean(np.square(w2[r:r + step], dtype=np.float64), axis=1)
                           for r in range(0, n, step)]) if n else np.zeros(0)


def is_embedding_name(name: str) -> bool:
    """Whether a tensor's name says it is an embedding table (a lookup, rows picked by token ids):
    its module's name holds ``embed`` (``word_embeddings``, ``embed_tokens``, ``tok_embeddings``) or
    is GPT-2's ``wte``/``wpe``. Without statistics this is all that tells a lookup from a projection."""
    parts = name.lower().split(".")
    module = parts[-2] if len(parts) > 1 else parts[0]
    return "embed" in module or module in ("wte", "wpe")


def input_only_table(item: Item, items: Sequence[Item]) -> bool:
    """Whether, without statistics, ``item`` is to be taken for a lookup table that only feeds the
    model (its rows' errors reach only the tokens that use them: :data:`DATA_FREE_EMBED_GAIN`) and
    not also for the output layer over the vocabulary (whose every row's error reaches every
    position's logits). An embedding by its name (:func:`is_embedding_name`) is input-only when
    no other name of it is a projection's (a state dict's ``lm_head.weight`` tied to it) and
    either another tensor of its shape or its transpose is the output layer (an untied head), or
    it is an encoder's ``embeddings.word_embeddings`` (BERT and its kin, whose files hold no head
    over the vocabulary, or a head of its own). A generative model's table (``wte``,
    ``embed_tokens``) with no head of its own in the file is the head: Hugging Face writes a tied
    ``lm_head.weight`` only once.

    A 4-layer GPT-2 with a tied 4,096 x 128 embedding (benchmarks/zoo/codelm.py), data-free at 5
    bits/param: perplexity ratio 0.9883 with the table at 1/16 the gain, 0.9937 at 1."""
    if not is_embedding_name(item.name) or any(not is_embedding_name(t) for t in item.tied):
        return False
    rows, cols = item.shape[0], int(np.prod(item.shape[1:], dtype=np.int64))
    if any(it is not item and len(it.shape) == 2 and tuple(it.shape) in ((rows, cols), (cols, rows))
           and not is_embedding_name(it.name) for it in items):
        return True
    parts = item.name.lower().split(".")
    return len(parts) >= 3 and parts[-3] == "embeddings"


ROW_GAIN_FLOOR = 0.05  # a row whose output sensitivity was not seen still weighs this share of the mean


def relative_row_gains(st, n: int) -> Optional[np.ndarray]:
    """The statistics' per-row output sensitivities (``row_gain``, measured by calibrate's probes)
    over their mean, each at least ``ROW_GAIN_FLOOR``: [n] row weights, the gain holding the
    scale. None when there are none for ``n`` rows (or they are not finite and positive)."""
    rg = getattr(st, "row_gain", None)
    if rg is None or len(rg) != n:
        return None
    rg = np.asarray(rg, dtype=np.float64)
    mean = float(rg.mean()) if rg.size else 0.0
    if not (np.isfinite(rg).all() and (rg >= 0).all() and mean > 0):
        return None
    return np.maximum(rg / mean, ROW_GAIN_FLOOR)


def transposed_unit(it: Item, st, n: int, m: int, matrices: Matrices) -> Optional[Unit]:
    """One band over the transpose [m, n] of a kind ``rows`` weight (a transposed convolution,
    its rows the n input channels) with ``st.h`` [1, n, n] = E[x x^T] over those channels: output
    error ``sum_j E_j^T H E_j`` over the columns j (output channel and kernel tap) of the
    [n, m] view, spatial correlations between taps left out. Error-feedback rounding then runs
    along the input channels as it does for a linear layer. None when H is unusable."""
    h = usable_h(st.h, st.rows)
    if h is None:
        return None
    if it.size > LAZY_ELEMENTS:
        matrices.add(it.name, lambda it=it: np.ascontiguousarray(matrix_view(it.narrow_values, "out_in").T))
        data = matrices.rows(it.name, 0, m, (m, n))
    else:
        data = np.ascontiguousarray(matrix_view(it.values, "out_in").T)
    return Unit(band_name(it.name, 0), data, h, None, st.gain, transposed=True)


def following_batchnorm_scale(items: Sequence[Item], index: int, n: int) -> Optional[np.ndarray]:
    """``g_c^2 / (var_c + eps)`` [n] when the weight ``items[index]`` (n output rows) is followed
    in the state dict, after its own bias, by a BatchNorm of n channels (``P.weight``,
    ``P.running_var``; torch registers a Sequential's modules in order): in eval mode that
    BatchNorm multiplies output channel c, and so its error, by ``g_c / sqrt(var_c + eps)``.
    None otherwise (or when the scale is not finite and positive somewhere)."""
    name = items[index].name
    j = index + 1
    if j < len(items) and name.endswith("weight") and items[j].name == name[:-len("weight")] + "bias":
        j += 1
    if j >= len(items) or not items[j].name.endswith("weight") or items[j].shape != (n,):
        return None
    prefix = items[j].name[:-len("weight")]
    var_item = next((x for x in items[j + 1:j + 4] if x.name == prefix + "running_var"), None)
    if var_item is None or var_item.shape != (n,):
        return None
    gamma = np.asarray(items[j].values, dtype=np.float64).reshape(-1)
    var = np.asarray(var_item.values, dtype=np.float64).reshape(-1)
    scale = gamma * gamma / (var + BN_EPS)
    if not np.isfinite(scale).all() or not (var >= 0).all() or scale.sum() <= 0:
        return None
    return scale


BN_EPS = 1e-5  # BatchNorm's default eps: the state dict does not hold it (a larger eps only lowers the weights)


def batchnorm_unit(it: Item, by_name: Mapping[str, Item], stats, default_gain: float) -> Optional[Unit]:
    """A unit for a BatchNorm running mean or variance (``P.running_mean`` / ``P.running_var``
    beside ``P.running_var``, and ``P.weight`` / ``P.bias`` when affine), or None (stored exactly).

    In eval mode BN computes ``y = g (x - mean) / sqrt(var + eps) + b``: an error ``d`` of
    channel c's mean moves y by ``g_c d / sqrt(var_c + eps)``, a bias error of ``s_c d``; an error
    ``d`` of its variance by ``g_c (x - mean) d / (2 (var_c + eps)^1.5)``, of mean square
    ``g_c^2 var_c d^2 / (4 (var_c + eps)^3)``. Each channel's error is weighed by that factor
    (row weights) at the bias's gain (statistics of ``P.bias``, else ``P.weight``, else the
    default gain), so the statistics are coded as finely as their effect needs, from the state
    dict alone. A variance is never coded with a step coarser than its smallest positive value,
    so every decoded variance stays at least half its value (never negative); when no candidate
    step is that fine the variance is stored exactly."""
    prefix = it.name[:-len("running_mean")] if it.name.endswith("running_mean") else it.name[:-len("running_var")]
    var_item = by_name.get(prefix + "running_var")
    if len(it.shape) != 1 or it.size == 0 or var_item is None or var_item.shape != it.shape:
        return None
    var = np.asarray(var_item.values, dtype=np.float64).reshape(-1)
    if not np.isfinite(var).all() or var.min() < 0:
        return None
    gamma_item = by_name.get(prefix + "weight")
    gamma = np.ones_like(var)
    if gamma_item is not None and gamma_item.shape == it.shape:
        gamma = np.asarray(gamma_item.values, dtype=np.float64).reshape(-1)
    v = it.values.astype(np.float64).reshape(-1, 1)
    if it.name.endswith("running_mean"):
        rw = gamma * gamma / (var + BN_EPS)
        max_code = None
    else:
        rw = gamma * gamma * var / (4.0 * (var + BN_EPS) ** 3)
        positive = var[var > 0]
        if positive.size == 0:
            return None
        max_code = code_at_most(float(positive.min()))
        if min(candidate_codes(v)) > max_code:
            return None
    if not np.isfinite(rw).all():
        return None
    gain = default_gain
    # A mean error shifts the channel by a constant, as a bias error does; a variance error scales
    # the centred activation, as an error of the BatchNorm weight does: each takes that partner's
    # measured output gain first.
    partners = (prefix + "bias", prefix + "weight")
    for partner in (partners if it.name.endswith("running_mean") else partners[::-1]):
        pst = stats.get(partner) if stats is not None else None
        if pst is not None:
            gain = pst.gain
            break
    unit = Unit(band_name(it.name, 0), v, None, rw, gain)
    unit.max_code = max_code
    return unit


def band_name(name: str, b: int) -> str:
    return f"{name}\x00{b}"


def parent(unit_name: str) -> str:
    return unit_name.split("\x00", 1)[0]


def by_tensor(units: Sequence[Unit]) -> dict[str, list[Unit]]:
    """Units grouped by the tensor they belong to, tensors and bands in order."""
    out: dict[str, list[Unit]] = {}
    for u in units:
        out.setdefault(parent(u.name), []).append(u)
    return out


def _levels(u: Unit, code: int) -> np.ndarray:
    lv = KEPT.get(u, code)
    return u.quantize(code, True) if lv is None else lv


def _stored_levels(u: Unit, code: int) -> np.ndarray:
    """The band's levels as the file holds them (rows of the tensor's [n, m] view)."""
    lv = _levels(u, code)
    return lv.T if u.transposed else lv


def encode_tensor(bands: list[Unit], codes: list[int], layout: str) -> Encoded:
    """One tensor from its row bands (no transform); bands that are sets of rows are named by
    ``row_band`` (spec 1.4)."""
    row_band = None
    if any(u.row_index is not None for u in bands):
        row_band = np.empty(sum(u.shape[0] for u in bands), dtype=np.uint8)
        for b, u in enumerate(bands):
            row_band[u.row_index] = b
    return write((_stored_levels(u, c) for u, c in zip(bands, codes)), codes, layout=layout, row_band=row_band)


def encode_transformed(bands: list[Unit], codes: list[int], layout: str, synthesis: np.ndarray) -> Encoded:
    """A tensor coded in its transform domain: trailing coefficient bands that quantize to zero
    are left out, and so are their columns of S (k < m). Every band zero: the tensor is coded
    as zeros without a transform (an S then would rebuild nothing)."""
    k = kept_components(bands, codes)
    if k == 0:
        zeros = np.zeros((bands[0].shape[1], synthesis.shape[0]), dtype=np.int64)  # the [n, m] view
        return write([zeros], [codes[0]], layout=layout)
    kept = [(u, c) for u, c in zip(bands, codes) if u.r0 < k]
    return write((_levels(u, c) for u, c in kept), [c for _, c in kept], layout=layout,
                          transform=synthesis[:, :k])


def reconstruction(u: Unit, code: int) -> np.ndarray:
    """What the decoder rebuilds for a band (float64, in the unit's [rows, m] view)."""
    return _levels(u, code) * step_from_code(code)


def _bias_pairs(units: list[Unit], stats, layouts: Mapping[str, str]) -> list:
    """(weight bands, bias bands) of weights whose input mean is known and whose bias is a unit."""
    by_parent = by_tensor(units)
    pairs = []
    if stats is None:
        return pairs
    for name, bands in by_parent.items():
        mu = bands[0].h_mean
        if not name.endswith("weight") or mu is None or layouts.get(name) != "out_in":
            continue
        bias = by_parent.get(name[:-len("weight")] + "bias")
        n = sum(b.shape[0] for b in bands)
        if bias and sum(b.size for b in bias) == n and mu.shape[1] == bands[0].shape[1] \
                and n % mu.shape[0] == 0:
            pairs.append((bands, bias))
    return pairs


def _correct_biases(pairs: list, originals: Mapping[int, np.ndarray], pick: Mapping[str, int]) -> None:
    """Bias correction: b' = b - (W_hat - W) E[x] removes the mean output error each quantized
    weight causes (encoder-only; the corrected bias is then quantized as usual)."""
    for bands, bias in pairs:
        st_mean = bands[0].h_mean
        err = np.empty((sum(u.shape[0] for u in bands), bands[0].shape[1]))  # [n, m]
        for u in bands:
            rows = u.row_index if u.row_index is not None else slice(u.r0, u.r0 + u.shape[0])
            err[rows] = reconstruction(u, pick[u.name]) - u.w
        g = st_mean.shape[0]
        shift = np.einsum("gij,gj->gi", err.reshape(g, -1, err.shape[1]), st_mean).reshape(-1)
        r0 = 0
        for b in bias:
            k = b.w.shape[0]
            b.w = originals[id(b)] - shift[r0:r0 + k].reshape(b.w.shape)
            b.levels.clear()
            r0 += k


# --- transforms (spec §7.5: stream 0, R = (S C)^T) ---------------------------------------------

ATTEMPTS = 5  # the bits loop: the file is written at most this many times to land on the target

TRANSFORM_MIN_SAMPLES = 4  # an activation-aware transform needs statistics of at least 4 m input vectors
TRANSFORM_MIN_RATIO = 2  # offered only when n >= 2m: the 16 m k bits of S need many coefficients
TRANSFORM_BANDS = 16     # coefficient rows (components, strongest first) cut into at most 16 bands
TRANSFORM_SCREEN_SHARE = 0.5  # a weight KLT is coded (to weigh it exactly) only when the Gaussian model
# saves more than this share of its S's bits (:func:`worth_weighing`). The model's saving was above the
# exact one for every option of MiniLM (4.4 and 3.0 bits/param), seqrnn-lstm (2.75, 1.5) and dwsep-cnn
# (4.56): at most 0.87 of S's bits where the exact saving was 0.23; none of them was chosen
TRANSFORM_WINDOW = 2     # a transform's cost takes exact points within this many codes of each band's pick
TRANSFORM_ROUNDS = 3     # at a rate target: the choice made again at most this often (see _encode)


@dataclass
class TransformOption:
    """A tensor coded in a transform domain: ``stored`` S [m, m] as float16 (``synthesis``: its
    values as float64), ``bands`` the coefficient row bands (Units over rows of C [m, n]),
    ``kind`` klt or aat; ``coarse`` the bands' coarse curves once made (:meth:`Unit.coarse_state`),
    where each encode starts from. A weight KLT has its ``spectrum`` (see :func:`worth_weighing`)
    and ``gain`` from the start and is made (``make``: S and the bands, or None where they cannot
    be coded) only when first weighed (:meth:`ready`): most are never weighed."""

    name: str
    kind: str
    stored: Optional[np.ndarray]
    bands: Optional[list[Unit]]
    coarse: Optional[list] = None
    spectrum: Optional[tuple[np.ndarray, np.ndarray, int]] = None  # klt: (var_j, lambda_i, n)
    gain: float = 1.0
    make: Optional[Callable[[], Optional[tuple[np.ndarray, list[Unit]]]]] = None

    def ready(self) -> bool:
        """Whether the option can be coded, made now if it was not yet."""
        if self.make is not None:
            made, self.make = self.make(), None
            if made is not None:
                self.stored, self.bands = made
        return self.bands is not None

    @property
    def synthesis(self) -> np.ndarray:
        return self.stored.astype(np.float64)


def transform_options(items: list[Item], stats, layouts: Mapping[str, str],
                      matrices: Optional[Matrices] = None, usable: Optional[dict] = None) -> dict[str, TransformOption]:
    """The transform each eligible tensor could use: the activation-aware transform (AAT) where
    the tensor has input statistics, the weight KLT where it has none (its spectrum now, itself
    when first weighed: :meth:`TransformOption.ready`). Eligible: coded by tq as one [n, m]
    matrix (no groups, no embedding row weights), ``n >= TRANSFORM_MIN_RATIO * m``. The
    coefficient matrix of a large tensor is made when needed (``matrices``), not held.
    ``usable``: the H the units weigh by (:func:`make_units`'s), which an AAT's metric shares."""
    matrices = matrices if matrices is not None else Matrices()
    usable = {} if usable is None else usable
    out: dict[str, TransformOption] = {}
    identity: dict[int, np.ndarray] = {}  # the KLT's error metric, one (read-only) per size for every option
    roots: dict[int, tuple] = {}  # the AAT's (L, L^-1) of the last H, by the id of its usable array (held)
    for it in items:
        layout = layouts.get(it.name)
        if layout is None or len(it.shape) < 2:
            continue
        st = stats.get(it.name) if stats is not None else None
        if st is not None and st.kind not in ("linear", "conv"):
            continue
        n, m = view_shape(it.shape, layout)
        if m < 4 or n < TRANSFORM_MIN_RATIO * m:
            continue
        gain = st.gain if st is not None else 1.0
        if st is None:
            # in float32: the spectrum only screens (a float64 M and product took 4-layer Llama's 10 of 34 s)
            mat = np.ascontiguousarray(matrix_view(it.narrow_values, layout).T, dtype=np.float32)  # M [m, n]
            gram = (mat @ mat.T).astype(np.float64)
            del mat
            with threadpool_limits(limits=1, user_api="blas"):
                eig = np.linalg.eigvalsh((gram + gram.T) / 2)
            spectrum = (np.diag(gram) / n, np.maximum(eig[::-1], 0.0) / n, n)
            del gram
            if m not in identity:
                identity[m] = np.eye(m)
                identity[m].flags.writeable = False
            out[it.name] = TransformOption(it.name, "klt", None, None, spectrum=spectrum, gain=gain, make=(
                lambda it=it, layout=layout, metric=identity[m], gain=gain: _option_of(it, layout, None, metric, gain,
                                                                             stats, matrices, None)))
            continue
        # a transform fitted to statistics of few samples fits those samples, not the layer's inputs
        if not _h_fits(st.h, n, m) or st.h.shape[0] != 1 or st.rows < TRANSFORM_MIN_SAMPLES * m:
            continue
        full = usable_h_of(st, usable)
        if full is None:
            continue
        if id(full) not in roots:  # tensors of one input come one after another: one entry kept
            roots.clear()
            roots[id(full)] = transforms.activation_roots(full[0])
        made = _option_of(it, layout, roots[id(full)], full[0], gain, stats, matrices, full)
        if made is not None:
            out[it.name] = TransformOption(it.name, "aat", made[0], made[1], gain=gain)
    return out


def _option_of(it: Item, layout: str, roots: Optional[tuple], metric: np.ndarray, gain: float, stats,
               matrices: Matrices, full: Any) -> Optional[tuple[np.ndarray, list[Unit]]]:
    """(S as float16, the coefficient row bands) of ``it``'s transform: the weight KLT (``roots``
    None; ``metric`` the identity) or the AAT of the H whose :func:`transforms.activation_roots`
    are ``roots`` (``metric`` that H, ``full`` the units' H it is a group of); None where S or the
    coefficients cannot be coded."""
    n, m = view_shape(it.shape, layout)
    mat = np.ascontiguousarray(matrix_view(it.narrow_values, layout).T, dtype=np.float64)  # M [m, n]
    if roots is None:
        _, s, _ = transforms.klt(mat)
    else:
        _, s, _ = transforms.aat(mat, None, roots=roots)
    stored = s.astype(np.float16)
    s16 = stored.astype(np.float64)
    if not np.isfinite(s16).all():
        return None
    # coefficients that are best for the stored (float16) synthesis, in the error metric
    g = s16.T @ metric @ s16
    weights = np.maximum(np.diag(g), 0.0)  # distortion of coefficient row i: g_ii ||dC_i||^2
    nb = min(TRANSFORM_BANDS, m)
    bounds = [m * i // nb for i in range(nb + 1)]
    del s, s16, g

    if it.size > LAZY_ELEMENTS:
        key = "coefficients\x00" + it.name
        # a LazyH metric is read again when the coefficients are made, not held by the option
        source = full if isinstance(full, LazyH) else metric
        matrices.add(key, lambda it=it, layout=layout, stored=stored, source=source: coefficients(
            matrix_view(it.narrow_values, layout), stored, source[0] if isinstance(source, LazyH) else source))
        rows = [matrices.rows(key, bounds[b], bounds[b + 1], (bounds[b + 1] - bounds[b], n)) for b in range(nb)]
    else:
        coef = coefficients(mat.T, stored, metric)
        if not np.abs(coef).max(initial=0.0) <= MAX_CODED_MAGNITUDE:
            return None  # coefficients no step can code (H of a wide dynamic range; NaN): no transform
        rows = [coef[bounds[b]:bounds[b + 1]] for b in range(nb)]
    del mat
    bands = [Unit(band_name(it.name, b), rows[b], None, weights[bounds[b]:bounds[b + 1]], gain, r0=bounds[b],
                  slope_floor=stats is None) for b in range(nb)]
    return stored, bands


def worth_weighing(opt: TransformOption, identity_gain: float, lam: float) -> bool:
    """Whether a weight KLT could pay at ``lam``, by the Gaussian model of both codings: the
    identity codes input j's weights of variance var_j (over the n outputs), the transform its
    components of variance lambda_i, each at its best rate for ``lam`` (reverse water-filling:
    a variance x weighed by the gain costs t (1 + ln(x / t)) a weight above t = lam / (2 ln 2),
    x below, where it is dropped), plus 16 m bits a kept component for S. It is weighed exactly
    when the model's saving is above ``TRANSFORM_SCREEN_SHARE`` of those bits: for equal gains
    the model's saving bounds the real one (the components' variances majorize the inputs'),
    which non-Gaussian weights lower further. Options without a spectrum (activation-aware:
    the identity's error-feedback rounding is not that model) are always weighed."""
    if opt.spectrum is None:
        return True
    var, eig, n = opt.spectrum
    t = lam / (2.0 * math.log(2.0))
    if not t > 0:
        return True

    def cost(x: np.ndarray) -> float:
        above = x > t
        return float(np.sum(x[~above]) + np.sum(t * (1.0 + np.log(x[above] / t))))

    x = opt.gain * eig
    saving = n * (cost(identity_gain * var) - cost(x))
    side = lam * transforms.cost_bits(len(var), int(np.count_nonzero(x > t)))
    return saving > TRANSFORM_SCREEN_SHARE * side


COEFFICIENT_COLUMNS = 2048
"""Columns of C solved at a time: a multiple of the BLAS kernels' widths, so the same bits as one
solve over all columns (checked: tests/modes/test_tq_encoder.py), without temporaries of C's size."""


def coefficients(view: np.ndarray, stored: np.ndarray, metric: np.ndarray) -> np.ndarray:
    """The coefficients C [m, n] that are best for the stored (float16) synthesis S [m, m] in
    the error metric: C = (G + ridge I)^-1 S^T metric M with G = S^T metric S and M = ``view``^T
    (``view``: the weight's [n, m] matrix, float32 or float64). S and G are made again from the
    float16 S (the same products, so the same bits) rather than held: three m x m float64
    matrices per option were 2.4 GB of a 600M-parameter model's encode (42 options of m = 1536)."""
    n, m = view.shape
    s16 = stored.astype(np.float64)
    p = s16.T @ metric
    g = p @ s16
    ridge = 1e-12 * np.trace(g) / m if np.trace(g) > 0 else 1.0
    a = g + ridge * np.eye(m)
    out = np.empty((m, n))
    # The last block takes the remainder (COEFFICIENT_COLUMNS to twice that wide): a narrow tail
    # block can take another BLAS kernel (OpenBLAS's small-matrix kernels on AVX-512 machines)
    # whose last bits differ from one product over every column.
    starts = list(range(0, max(n - COEFFICIENT_COLUMNS, 0) + 1, COEFFICIENT_COLUMNS))
    for j, k in zip(starts, starts[1:] + [n]):
        block = np.ascontiguousarray(view[j:k].T, dtype=np.float64)  # M's columns j..k-1
        out[:, j:k] = np.linalg.solve(a, p @ block)
    return out


def kept_components(bands: list[Unit], codes: Sequence[int], nonzero: Optional[dict] = None) -> int:
    """Coefficient rows kept: up to the last band with a nonzero level (0 when none has one).
    ``nonzero``: a memo of (band serial, code) -> whether its levels are nonzero, for callers that
    ask again and again (the rate of a bisection)."""
    k = 0
    for u, c in zip(bands, codes):
        if nonzero is None:
            coded = bool(np.any(_levels(u, c)))
        else:
            coded = nonzero.get((u.serial, c))
            if coded is None:
                coded = nonzero[(u.serial, c)] = bool(np.any(_levels(u, c)))
        if coded:
            k = u.r0 + u.shape[0]
    return k


def transformed_cost(bands: Sequence[Unit], pick: Mapping[str, int], lam: float, m: int) -> float:
    """D + lam R of a tensor coded in its transform domain at ``pick``: R of the kept bands and
    of the stored S (m x k); D of every band, for a trailing band left out costs no bits but
    loses its coefficients (counting only the kept bands' D made a transform that drops most of
    its components look far better than it is)."""
    k = kept_components(list(bands), [pick[u.name] for u in bands])
    kept_bits = sum(u.curve[pick[u.name]][1] for u in bands if u.r0 < k)
    return sum(u.curve[pick[u.name]][0] for u in bands) + lam * (kept_bits + transforms.cost_bits(m, k))


def _cost(bands: Sequence[Unit], pick: Mapping[str, int], lam: float) -> float:
    """Sum of D + lam R of ``bands`` at their picked codes."""
    return sum(u.curve[pick[u.name]][0] + lam * u.curve[pick[u.name]][1] for u in bands)


def with_bands_replaced(units: list[Unit], replacement: Mapping[str, list[Unit]]) -> list[Unit]:
    """``units`` with the bands of each tensor named in ``replacement`` replaced, where its first
    band stood, by the units given for it (a transform's coefficient bands, another cut)."""
    by_parent = by_tensor(units)
    out = []
    for u in units:
        name = parent(u.name)
        if name in replacement:
            if u is by_parent[name][0]:
                out.extend(replacement[name])
        else:
            out.append(u)
    return out


def choose_transforms(units: list[Unit], options: Mapping[str, TransformOption], lam: float,
                      threads: int = 1) -> tuple[list[Unit], set]:
    """Per tensor with an option: the transform when its cost D + lam R, with the stored S's
    ``16 m k`` bits counted, is below the identity's at the same multiplier. Returns the units
    with the chosen tensors' row bands replaced by their coefficient bands, and their names.
    ``threads``: options whose curves are made at once (the same choice for every count)."""
    by_parent = by_tensor(units)
    chosen = set()

    def coded_cost(opt: TransformOption) -> float:
        """The option's curves and its D + lam R, its coefficient matrix made once for both: coarse
        points at every code, exact ones within ``TRANSFORM_WINDOW`` of each band's pick, until
        every pick is exact (exact points at every code cost a 32,000-row head's option 50 passes
        over its 49M coefficients)."""
        with pinned(opt.bands):
            if opt.coarse is None:
                for u in opt.bands:
                    for c in candidate_codes(u.w):
                        u.evaluate(c, False)
                opt.coarse = [u.coarse_state() for u in opt.bands]
            pick = choose(opt.bands, lam)
            while True:
                refine(opt.bands, pick, TRANSFORM_WINDOW)
                again = choose(opt.bands, lam)
                if again == pick:
                    return transformed_cost(opt.bands, pick, lam, opt.stored.shape[0])
                pick = again

    offered = [name for name in options if name in by_parent
               and worth_weighing(options[name], by_parent[name][0].gain, lam) and options[name].ready()]
    for name, coded in zip(offered, each(coded_cost, [options[name] for name in offered], threads)):
        # the two alternatives' bands share names: each is chosen on its own
        identity = _cost(by_parent[name], choose(by_parent[name], lam), lam)
        if coded < identity:
            chosen.add(name)
    return with_bands_replaced(units, {name: options[name].bands for name in chosen}), chosen


# --- band partitions: fewer bands where their tables and chunk headers cost more than they save ----

PARTITION_MAX_ELEMENTS = LAZY_ELEMENTS  # only tensors held in memory are offered coarser cuts
PARTITION_WINDOW = 2  # exact (error-feedback) curve points within this many codes of each cut's pick


def coarser_partitions(units: list[Unit]) -> dict[str, list[list[Unit]]]:
    """Per tensor of several row bands (at most ``PARTITION_MAX_ELEMENTS`` weights, held in
    memory): its rows cut into 1, 2, 4, ... bands (fewer than it has), as units with coarse
    curves. Each band keeps the tensor's H, gain, row weights, bias-correction mean and shared
    error-feedback results. A band costs a table, a chunk header and manifest entries: on a small
    model at a high rate these can cost more than a step per band saves."""
    out: dict[str, list[list[Unit]]] = {}
    for name, bands in by_tensor(units).items():
        if len(bands) < 2 or any(isinstance(u.data, Rows) or u.row_index is not None for u in bands):
            continue
        if sum(u.size for u in bands) > PARTITION_MAX_ELEMENTS or any(u.max_code is not None for u in bands):
            continue
        first = bands[0]
        w = first.shared.w if first.shared is not None else np.concatenate([u.w for u in bands])
        rw = None if first.row_weights is None else np.concatenate([u.row_weights for u in bands])
        n = w.shape[0]
        alts = []
        k = 1
        while k < len(bands):
            bounds = [n * i // k for i in range(k + 1)]
            alt = []
            for b in range(k):
                r0, r1 = bounds[b], bounds[b + 1]
                u = Unit(band_name(name, b), w[r0:r1], first.h, None if rw is None else rw[r0:r1], first.gain,
                         shared=first.shared, r0=r0)
                u.h_mean = first.h_mean
                for c in candidate_codes(u.w):
                    u.evaluate(c, False)
                alt.append(u)
            alts.append(alt)
            k *= 2
        out[name] = alts
    return out


def _best_cost(bands: list[Unit], lam: float) -> float:
    """D + lam R of ``bands`` at their best codes for ``lam``, exact within PARTITION_WINDOW."""
    refine(bands, choose(bands, lam), PARTITION_WINDOW)
    return _cost(bands, choose(bands, lam), lam)


def choose_partitions(units: list[Unit], partitions: Mapping[str, list[list[Unit]]], lam: float,
                      threads: int = 1) -> list[Unit]:
    """``units`` with each tensor of ``partitions`` cut as the alternative (or its own bands) of
    least D + lam R (ties: its own bands, then the fewest bands). ``threads``: tensors weighed at
    once (their cuts share error-feedback results: one tensor is one task)."""
    by_parent = by_tensor(units)
    chosen: dict[str, list[Unit]] = {}

    def weigh(name: str) -> None:
        own = by_parent[name]
        best, best_cost = own, _best_cost(own, lam)
        for alt in partitions[name]:
            cost = _best_cost(alt, lam)
            if cost < best_cost:
                best, best_cost = alt, cost
        if best is not own:
            chosen[name] = best

    run(weigh, [name for name in partitions if name in by_parent], threads)
    return with_bands_replaced(units, {name: chosen[name] for name in partitions if name in chosen})


def encode_model(items: list[Item], stats, *, bits: Optional[float] = None, quality: Optional[float] = None,
                 total_params: int, size_of: Callable[[dict], int], tolerance: float = 0.015,
                 progress: Optional[Callable[[str, int, int], None]] = None,
                 alternatives: Optional[Callable] = None, transforms: bool = True,
                 block: bool = False) -> dict[str, Encoded]:
    """Encode ``items``: returns ``{name: ("tq", params, streams)}`` for the tensors tq codes.
    ``transforms``: offer each eligible tensor a transform (:func:`choose_transforms`); ``block``:
    the items are row blocks of one tensor (:func:`make_units`).

    ``bits``: whole-file bits per parameter (``size_of(encoded)`` gives the real file bytes for a
    candidate result; the budget is corrected by the measured overhead until the file lands within
    ``tolerance``). ``quality``: predicted output SNR in dB (output power over the summed
    distortion estimate; without statistics, weight SNR). Neither: quality 40 dB.
    ``alternatives``: see :func:`with_alternatives` (mode ``auto``: other modes per tensor).
    """
    encoder = ModelEncoder(items, stats, total_params=total_params, size_of=size_of, tolerance=tolerance,
                           progress=progress, alternatives=alternatives, transforms=transforms, block=block)
    return encoder.encode(bits=bits, quality=quality)


class ModelEncoder:
    """The whole-model tq encoder for one set of tensors: the units with their rate-distortion
    curves and the transform options are made once (here); :meth:`encode` then allocates and codes
    at a bits or quality target, as often as asked, reusing them (a rate search over trials costs
    each trial its allocation and coding, not the curves). Arguments as :func:`encode_model`.

    numpy's BLAS runs single-threaded meanwhile: the encoder's matrices are small, and a
    multi-threaded OpenBLAS beside torch's OpenMP pool was measured 20x slower on its Cholesky
    factorisations (and one thread makes the float64 results independent of the core count).
    The run's thread budget (``tqcodec.threads``; ``threads`` overrides it) goes to evaluating
    tensors at once instead (:mod:`.pool`: the same bytes for every count)."""

    def __init__(self, items: list[Item], stats, *, total_params: int, size_of: Callable[[dict], int],
                 tolerance: float = 0.015, progress: Optional[Callable[[str, int, int], None]] = None,
                 alternatives: Optional[Callable] = None, transforms: bool = True, threads: Optional[int] = None,
                 block: bool = False):
        self.stats = stats
        self.threads = current_budget() if threads is None else max(1, int(threads))
        self.total_params = total_params
        self.size_of = size_of
        self.tolerance = tolerance
        self.alternatives = alternatives
        self.tell = progress or (lambda what, done, total: None)
        self.feedback = stats is not None
        self.matrices = Matrices()  # the large tensors' matrices, made when needed, two at a time
        usable: dict = {}  # each distinct H once, for the units and the transforms' metrics
        with threadpool_limits(limits=1, user_api="blas"):
            self.units, self.layouts = make_units(items, stats, self.matrices, block=block, usable=usable)
            self.options: dict[str, TransformOption] = {}
            self.partitions: dict[str, list[list[Unit]]] = {}
            if self.units:
                build_curves(self.units, feedback=False, threads=self.threads,
                             progress=lambda done, total: self.tell("curves", done, total))
                self.matrices.release()
                if transforms:
                    self.options = transform_options(items, stats, self.layouts, self.matrices, usable)
                if stats is not None:
                    self.partitions = coarser_partitions(self.units)
        # Each encode starts from these curves, as a fresh encoder would: an allocation over curves
        # that still hold the exact points of an earlier target's picks favours those codes (an
        # exact point is error-feedback rounded, a coarse one is not). MiniLM from 32 sentences at
        # 3.044 bits/param after a search's three trials: 8,579,463 B and mean cosine 0.99497
        # against a fresh encode's 8,666,784 B and 0.99595. Exact points once computed are kept
        # (Unit.recall_exact), so a trial recomputes none.
        self._coarse = [(u, u.coarse_state()) for u in self.units]
        self._coarse += [(u, u.coarse_state()) for cuts in self.partitions.values() for cut in cuts for u in cut]
        self.bias_originals: dict[int, np.ndarray] = {}  # bias bands' values before any correction
        self.predicted_snr_db: Optional[float] = None  # of the last encode: power over estimated distortion

    def encode(self, *, bits: Optional[float] = None, quality: Optional[float] = None) -> dict[str, Encoded]:
        """The tq tensors at whole-file ``bits`` per parameter, or at ``quality`` dB (neither: 40)."""
        if not self.units:
            return {}
        for u, state in self._coarse:
            u.restore(state)
            original = self.bias_originals.get(id(u))
            if original is not None and u.w is not original:  # the bias an earlier encode corrected
                u.w = original
                u.levels.clear()
        for opt in self.options.values():  # made by the first choose_transforms that weighed the option
            for u, state in zip(opt.bands or (), opt.coarse or ()):
                u.restore(state)
        with threadpool_limits(limits=1, user_api="blas"):
            return self._encode(bits, quality)

    def _power(self) -> float:
        """Output power (from the statistics), else the gain-weighted weight power: the reference
        of ``quality`` and of :attr:`predicted_snr_db`."""
        stats = self.stats
        if stats is not None and stats.output_power > 0:
            return float(stats.output_power)
        # without the vectors coded at a finer floor (floor_gain > 1): a norm's ones would outweigh the weights
        return sum(u.gain * float(np.sum(u.w * u.w)) for u in self.units if u.floor_gain == 1.0)

    def _encode(self, bits, quality):
        units, stats, feedback, tell = self.units, self.stats, self.feedback, self.tell
        options, layouts, alternatives = self.options, self.layouts, self.alternatives
        threads = self.threads
        synthesis: dict[str, np.ndarray] = {}

        nonzero: dict[tuple[int, int], bool] = {}

        def synthesis_bits(pick: Mapping[str, int], among: Optional[list[Unit]] = None) -> float:
            """Bits of the chosen transforms' stored S at ``pick`` (spec §7.5.2: m x k float16).
            Counted in the rate: an S can cost more than the budget of its tensor (m = 256, n =
            512 at 2 bits/param: S 1.05 Mbit, the whole file 263 kbit), and a budget that left it
            to the measured overhead swung between attempts, one of which coded every
            coefficient as zero and was the file written. ``among``: the units (default: the
            encode's)."""
            if not synthesis:
                return 0.0
            by_parent = by_tensor(units if among is None else among)
            return float(sum(transforms.cost_bits(s.shape[0], kept_components(
                by_parent[name], [pick[u.name] for u in by_parent[name]], nonzero)) for name, s in synthesis.items()))

        def rate(pick: Mapping[str, int], among: Optional[list[Unit]] = None) -> float:
            """Bits of ``pick``: the units' (``among``, default the encode's) and their S."""
            among = units if among is None else among
            return totals(among, dict(pick))[1] + synthesis_bits(pick, among)

        def dist(pick: Mapping[str, int]) -> float:
            return totals(units, dict(pick))[0]

        def with_partitions(measure: Callable, target: float, increasing: bool) -> list[Unit]:
            """Each small tensor's row bands, or a coarser cut of them (fewer bands: fewer tables
            and chunk headers), whichever costs less D + lam R at the multiplier meeting ``target``."""
            if not self.partitions:
                return units
            lam, _ = bisect_lambda(units, measure, target, increasing=increasing)
            return choose_partitions(units, self.partitions, lam, self.threads)

        def with_transforms(measure: Callable, target: float, increasing: bool) -> list[Unit]:
            """The transform choice (spec §7.5 stream 0) at the multiplier that meets ``target``
            with exact (error-feedback) points around the identity's pick."""
            if not options:
                return units
            lam, pick = bisect_lambda(units, measure, target, increasing=increasing)
            if feedback:
                refine(units, pick, 1, threads)
                lam, pick = bisect_lambda(units, measure, target, increasing=increasing)
            tell("transforms", 0, len(options))
            chosen, names = choose_transforms(units, options, lam, threads)
            synthesis.update({n: options[n].synthesis for n in names})
            # At a rate target the stored S's bits raise the multiplier the target needs, and at
            # that one a transform may no longer pay: chosen again there until the choice holds.
            # A 192 x 96 layer before a LayerNorm, 1 bit/param: kept at the first multiplier, its
            # S starved the next layer and the output SNR was 5.6 dB (16.6 without the transform).
            for _ in range(TRANSFORM_ROUNDS if names and not increasing else 0):
                lam, _ = bisect_lambda(chosen, lambda p: rate(p, chosen), target, increasing=False)
                again, again_names = choose_transforms(units, options, lam, threads)
                if again_names == names:
                    break
                chosen, names = again, again_names
                synthesis.clear()
                synthesis.update({n: options[n].synthesis for n in names})
            tell("transforms", len(options), len(options))
            return chosen

        def corrections_of(chosen: list[Unit]) -> tuple[list, dict[int, np.ndarray]]:
            pairs = _bias_pairs(chosen, stats, layouts)
            originals = {id(b): self.bias_originals.setdefault(id(b), b.w) for _, bands in pairs for b in bands}
            return pairs, originals

        def result(pick: Mapping[str, int]) -> dict[str, Encoded]:
            d = dist(pick)
            self.predicted_snr_db = 10.0 * float(np.log10(self._power() / d)) if d > 0 else float("inf")
            _correct_biases(corrections, originals, pick)
            out = {}
            by_parent = by_tensor(units)
            for i, (name, bands) in enumerate(by_parent.items()):
                codes = [pick[u.name] for u in bands]
                if name in synthesis:
                    out[name] = encode_transformed(bands, codes, layouts[name], synthesis[name])
                else:
                    out[name] = encode_tensor(bands, codes, layouts[name])
                tell(f"rate search: coding {name}", i + 1, len(by_parent))
            return out

        if bits is None:
            q = 40.0 if quality is None else float(quality)
            target = self._power() * 10.0 ** (-q / 10.0)
            tell("rate search", 0, 1)
            units = with_partitions(dist, target, True)
            units = with_transforms(dist, target, True)
            corrections, originals = corrections_of(units)
            lam, pick = bisect_lambda(units, dist, target, increasing=True)
            if feedback:
                refine(units, pick, 3, threads)
                lam, pick = bisect_lambda(units, dist, target, increasing=True)
                refine(units, pick, 0, threads)
            return with_alternatives(alternatives, lam, units, pick, result(pick))

        target_bits = float(bits) * self.total_params
        units = with_partitions(rate, target_bits, False)
        units = with_transforms(rate, target_bits, False)
        corrections, originals = corrections_of(units)
        budget = target_bits  # the units' bits: the target less what the file holds besides them
        below = above = None  # the largest budget whose file came out smaller, the smallest whose came out larger
        best = None  # (relative size error, multiplier, allocation) of the attempt closest to the target
        best_enc = None  # its coded tensors while no later attempt is being coded
        for attempt in range(ATTEMPTS):
            tell(f"rate search: file size {attempt + 1} of at most {ATTEMPTS}", attempt, ATTEMPTS)
            lam, pick = bisect_lambda(units, rate, budget, increasing=False)
            if feedback:
                refine(units, pick, 2, threads)
                lam, pick = bisect_lambda(units, rate, budget, increasing=False)
                refine(units, pick, 0, threads)  # the chosen points themselves are exact
                pick = choose(units, lam)
                refine(units, pick, 0, threads)
            pick = fill(units, pick, budget - synthesis_bits(pick))
            best_enc = None  # one model's coded tensors at a time (a 600M model's: 300 MB)
            enc = with_alternatives(alternatives, lam, units, pick, result(pick))
            actual = 8.0 * self.size_of(enc)
            err = actual / target_bits - 1.0
            if best is None or abs(err) < abs(best[0]):
                best, best_enc = (err, lam, dict(pick)), enc
            del enc
            if abs(err) <= self.tolerance:
                break
            if actual > target_bits:
                above = budget if above is None else min(above, budget)
            else:
                below = budget if below is None else max(below, budget)
            # the measured overhead (header, manifest, tensors outside the units) moves with the
            # allocation: a 14,600-parameter model's swung by 1,000 bits between two budgets,
            # and the attempts alternated between them, 3% off. Between a budget that came out
            # too small and one too large, the next is halfway when the overhead points outside.
            budget = max(target_bits - (actual - rate(pick)), 1.0)
            if below is not None and above is not None and not below < budget < above:
                budget = 0.5 * (below + above)
        tell("rate search", ATTEMPTS, ATTEMPTS)
        if best_enc is None:  # an earlier attempt was closer: coded again (the same tensors)
            _, lam, pick = best
            best_enc = with_alternatives(alternatives, lam, units, pick, result(pick))
        return best_enc


# --- hook for other coding modes (mode auto; tqcodec.pipeline.auto) ------------------------------

def with_alternatives(alternatives: Optional[Callable], lam: float, units: list[Unit], pick: Mapping[str, int],
                      enc: dict[str, Encoded]) -> dict[str, Encoded]:
    """``enc`` with tensors the ``alternatives`` callback recodes in another mode at the same
    multiplier: ``alternatives(lam, bands_by_tensor, pick, enc) -> enc'`` where
    ``bands_by_tensor[name]`` are the tensor's units in row order. ``None``: ``enc`` unchanged.
    Called after every allocation whose result encode_model may return (so the bits loop
    measures the file with the alternatives in it)."""
    if alternatives is None:
        return enc
    by_parent = by_tensor(units)
    return alternatives(lam, by_parent, pick, enc)

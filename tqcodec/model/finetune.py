"""Fine-tuning a model on the grid of its own ``.tqz`` file (quantization-aware training).

    stats = tqcodec.calibrate(model, calibration_batches)
    tqcodec.save(model.state_dict(), "model.tqz", stats=stats, bits=2)
    tqcodec.finetune(model, "model.tqz", train_batches,
                     lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                     out="model-ft.tqz", steps=1000, stats=stats)

:func:`finetune` decodes the file into the module, then trains it on CPU. Each tensor is
trained through a small per-mode *adapter* (:data:`ADAPTERS`) that says what the file's coding
mode lets training change:

- ``tq`` and ``uniform``: latent full-precision weights, fake-quantized in every forward pass on
  the file's own grid (the step of each band / output channel / tensor, spec §7.1; levels
  ``round(w / step)`` clipped to the file's level range); the backward pass goes straight
  through the rounding (straight-through estimator). ``tq`` also learns each band's step
  (LSQ: a log-step parameter) in every round but the last (below); a single round snaps them
  to §7.1 step codes before its last ``1 - SNAP_AT`` of the steps, so training ends on a grid a
  file can hold. With a float16 synthesis transform the latent is the coefficient matrix, the
  transform stays fixed.
- ``ecsq`` with a grid and ``dither`` (scalar lattice): the same with the file's one step kept
  (``dither``: rounding ``(w + u) / step`` with the file's dither u, as its encoder does).
- ``kmeans``, ``pq`` and ``ecsq`` with stored values: the codebooks (seen at their stored
  precision), with every index fixed.
- ``raw`` (exact in the file: biases, norms, anything stored losslessly): trained in full
  precision.
- ``alias``: the tensor it refers to (tied weights train as one).
- any other mode (and ``dither``'s hex lattice): frozen at its decoded value (``UserWarning``),
  copied unchanged into the output.

The output has the same whole-file rate as the input. A file with ``tq`` tensors is stored
within ±3% of its size: the trained weights encoded again by ``tqcodec.save(..., stats=stats,
bits=<input bits/param>)`` (the encoder picks bands, steps and levels again) or kept on the
file's own grids (each tensor's mode, bands, indices and step codes with the trained levels or
codebooks), whichever of those within the rate, or the input itself, has the lowest loss on the
first batches. Other files keep their grids, step codes and indices: their size moves only with
the entropy of the trained levels (codebook modes: not at all). Training spreads the levels, so
at the same rate the encoder must coarsen some bands, which undoes part of the gain; hence the
steps run in ``rounds`` (default 2): between rounds the weights are stored that way in memory
and the next round trains on the chosen grid, so the last round ends on a grid the final
encode nearly reproduces.

A mode plugs in with an entry in :data:`ADAPTERS`: a function building the tensor's
:class:`Trainable` (its latent parts, its forward value, how it is stored again) from the file.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Sequence as _SequenceABC
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..api import TqzFile, encode_bytes, load
from ..errors import fail
from ..format.manifest import TensorRecord
from ..format.steps import STEP_CODE_MAX, code_at_most, steps_from_codes
from ..format.writer import ContainerWriter
from ..io.files import atomic_output, same_file
from ..modes import dither, ecsq, kmeans, pq, raw, tq, uniform
from ..modes.base import Encoded
from ..modes.dither.format import numerators, splitmix64
from ..pipeline.tensors import name_of_torch, plan_entries, tensor_to_storage

PathLike = Union[str, os.PathLike]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""loss_fn(module, batch) -> scalar tensor: runs ``module`` on one batch and returns the loss."""
Progress = Optional[Callable[[int, int, float], None]]
"""progress(step, total, loss): called after each optimizer step."""

REENCODE = ("auto", "encoder", "grid")
SNAP_AT = 0.75  # fraction of the steps after which learned steps are snapped to §7.1 codes and frozen
STEP_LR = 0.1  # learning rate of the log-steps, relative to ``lr``
MIN_FP_SCALE = 1e-3  # the lr unit of an all-zero full-precision tensor
RATE_TOLERANCE = 0.03  # the output's size within this fraction of the input's (reencode="encoder")
RATE_TRIES = 3  # encodes at most, the bits target corrected by the size missed
EVAL_BATCHES = 8  # batches that judge the re-encoded candidates (mode auto against tq)


# --- trainable parts (one per tensor) ----------------------------------------------------------

def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward (ties to even, as the encoders round), identity backward."""
    return x + (torch.round(x) - x).detach()


def nearest_code(step: float) -> int:
    """The §7.1 step code nearest to ``step`` on a log scale (clamped to the allowed range)."""
    lo = code_at_most(step)
    hi = min(lo + 1, STEP_CODE_MAX)
    s_lo, s_hi = steps_from_codes([lo, hi])
    if step <= 0 or not math.isfinite(step):
        return lo
    return hi if abs(math.log(s_hi / step)) < abs(math.log(step / s_lo)) else lo


class Trainable(nn.Module):
    """What training may change in one tensor, and how the trained tensor is stored again.

    Subclasses hold their latent values as ``nn.Parameter``s and implement :meth:`value` (the
    tensor the forward pass uses, differentiable in the latents) and :meth:`encode` (the
    tensor's :class:`~tqcodec.modes.base.Encoded` for ``reencode="grid"``, from the trained value).
    ``lr_scale``: the unit of the latents (Adam moves each latent by about ``lr`` units per
    step). :meth:`snap` moves continuous side values (steps) onto values the file can hold.
    """

    lr_scale: float = 1.0

    def value(self) -> torch.Tensor:
        raise NotImplementedError

    def snap(self) -> None:
        """Put learned side values on what the mode can store, and stop learning them."""

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr * self.lr_scale}]

    def encode(self, value: torch.Tensor) -> Encoded:
        raise NotImplementedError


class FullPrecision(Trainable):
    """A tensor stored exactly (mode ``raw``): trained as is (float16/bfloat16 in float32);
    stored ``raw`` again."""

    def __init__(self, decoded: torch.Tensor):
        super().__init__()
        self.dtype = decoded.dtype
        self.latent = nn.Parameter(decoded.detach().to(torch.promote_types(decoded.dtype, torch.float32)).clone())
        rms = float(self.latent.detach().double().pow(2).mean().sqrt()) if decoded.numel() else 0.0
        self.lr_scale = rms if rms > 0 else MIN_FP_SCALE

    def value(self) -> torch.Tensor:
        return self.latent.to(self.dtype)

    def encode(self, value: torch.Tensor) -> Encoded:
        _, arr = tensor_to_storage(value.detach().to(self.dtype))
        return raw.encode(arr)


class GridQuant(Trainable):
    """Latent weights fake-quantized on a grid of rows (the tensor viewed as R [n, m]).

    Row ``i`` has step ``s0[i] * exp(t[g(i)])`` and levels clipped to ``[lo[i], hi[i]]``;
    ``g`` maps rows to step groups (a ``tq`` band, a ``uniform`` channel, or the whole tensor).
    The latent is kept in units of ``s0`` (``latent = w / s0``), so one unit is one level of the
    file's grid. ``t`` (log-step offsets) is learned only when ``learn_step``.
    ``transform`` [m, k] (``tq`` with float16 synthesis): the grid is on the k x n coefficients
    C and R = (S C)^T.
    """

    def __init__(self, levels: np.ndarray, row_steps: np.ndarray, groups: np.ndarray, lo: np.ndarray,
                 hi: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype, *, layout: str = "out_in",
                 transform: Optional[np.ndarray] = None, learn_step: bool = False,
                 offset: Optional[np.ndarray] = None):
        super().__init__()
        self.shape, self.dtype, self.layout = tuple(shape), dtype, layout
        rows = len(row_steps)
        self.latent = nn.Parameter(torch.from_numpy(np.asarray(levels, dtype=np.float32).reshape(rows, -1).copy()))
        self.register_buffer("s0", torch.from_numpy(np.asarray(row_steps, dtype=np.float64)).reshape(-1, 1))
        self.register_buffer("lo", torch.from_numpy(np.asarray(lo, dtype=np.float32)).reshape(-1, 1))
        self.register_buffer("hi", torch.from_numpy(np.asarray(hi, dtype=np.float32)).reshape(-1, 1))
        self.register_buffer("group", torch.from_numpy(np.asarray(groups, dtype=np.int64)))
        n_groups = int(self.group.max()) + 1 if rows else 0
        self.log_step = nn.Parameter(torch.zeros(n_groups), requires_grad=learn_step)
        self.register_buffer("transform", None if transform is None else
                             torch.from_numpy(np.asarray(transform, dtype=np.float32).copy()))
        # a fixed offset in level units added before rounding and taken off after (subtractive dither)
        self.register_buffer("offset", None if offset is None else
                             torch.from_numpy(np.asarray(offset, dtype=np.float32).copy()))

    def group_steps(self) -> np.ndarray:
        """The current step of each group (float64)."""
        _, first = np.unique(self.group.numpy(), return_index=True)  # first row of each group
        return self.s0[first, 0].numpy() * np.exp(self.log_step.detach().double().numpy())

    def snap(self) -> None:
        if not self.log_step.requires_grad:
            return
        _, first = np.unique(self.group.numpy(), return_index=True)
        base = self.s0[first, 0].numpy()
        with torch.no_grad():
            for j, step in enumerate(self.group_steps()):
                code = nearest_code(float(step))
                self.log_step[j] = math.log(float(steps_from_codes([code])[0]) / base[j])
        self.log_step.requires_grad_(False)

    def param_groups(self, lr: float) -> list[dict]:
        out = [{"params": [self.latent], "lr": lr}]
        if self.log_step.requires_grad:
            out.append({"params": [self.log_step], "lr": lr * STEP_LR})
        return out

    def _coefficients(self) -> torch.Tensor:
        scale = torch.exp(self.log_step.to(torch.float32))[self.group].reshape(-1, 1)
        x = self.latent / scale
        if self.offset is None:
            return torch.clamp(_round_ste(x), self.lo, self.hi) * (scale * self.s0.to(torch.float32))
        q = torch.clamp(_round_ste(x + self.offset), self.lo, self.hi)
        return (q - self.offset) * (scale * self.s0.to(torch.float32))

    def _to_tensor(self, r: torch.Tensor) -> torch.Tensor:
        """R [n, m] (or C [k, n] with a transform) -> the tensor's shape and dtype."""
        if self.transform is not None:
            r = (self.transform @ r).T
        if self.layout == "in_out":
            r = r.T
        return r.reshape(self.shape).to(self.dtype)

    def value(self) -> torch.Tensor:
        return self._to_tensor(self._coefficients())

    def levels(self) -> np.ndarray:
        """The current integer levels [rows, cols] (the grid of the latent, no gradient)."""
        with torch.no_grad():
            scale = torch.exp(self.log_step.to(torch.float32))[self.group].reshape(-1, 1)
            x = self.latent / scale + (0 if self.offset is None else self.offset)
            return torch.clamp(torch.round(x), self.lo, self.hi).numpy().astype(np.int64)


class TqGrid(GridQuant):
    """Mode ``tq`` (spec §7.5): one step per band of rows, levels within each band's range."""

    def __init__(self, parts: dict, shape: tuple[int, ...], dtype: torch.dtype, learn_step: bool):
        rows = np.asarray(parts["band_rows"], dtype=np.int64)
        levels = np.concatenate([np.asarray(lv, dtype=np.int64) for lv in parts["levels"]], axis=0)
        groups = np.repeat(np.arange(len(rows)), rows)  # band after band
        self.row_band = parts.get("row_band")
        if self.row_band is not None:  # spec 1.4: bands are sets of rows; here C in row order
            groups = self.row_band.astype(np.int64)
            order = np.argsort(groups, kind="stable")
            in_rows = np.empty_like(levels)
            in_rows[order] = levels
            levels = in_rows
        lo = np.array([int(lv.min()) for lv in parts["levels"]])[groups]
        hi = np.array([int(lv.max()) for lv in parts["levels"]])[groups]
        row_steps = np.asarray(parts["steps"], dtype=np.float64)[groups]
        transform = parts["transform"]
        super().__init__(levels, row_steps, groups, lo, hi, shape, dtype, layout=parts["layout"],
                         transform=None if transform is None else np.asarray(transform, dtype=np.float32),
                         learn_step=learn_step)
        self.band_rows = [int(r) for r in rows]
        self.transform_f16 = None if transform is None else np.asarray(transform, dtype=np.float16)

    def encode(self, value: torch.Tensor) -> Encoded:
        codes = [nearest_code(float(s)) for s in self.group_steps()]
        lv = self.levels()
        group = self.group.numpy()  # each row's band (runs, or sets of rows by row_band)
        bands = [lv[group == b] for b in range(len(self.band_rows))]
        return tq.write(bands, codes, layout=self.layout, transform=self.transform_f16, row_band=self.row_band)


class UniformGrid(GridQuant):
    """Mode ``uniform`` (spec §7.3): one step per output channel or per tensor, levels within the
    tensor's range; the steps stay the file's (they set its rate)."""

    def __init__(self, parts: Mapping[str, Any], decoded: torch.Tensor):
        gran = parts["granularity"]
        rows = decoded.shape[0] if gran == "channel" else 1
        per_row = parts["steps"] if gran == "channel" else parts["steps"][:1]
        levels = np.asarray(parts["levels"]).reshape(rows, -1)
        q_min, q_max = parts["q_min"], parts["q_max"]
        super().__init__(levels, per_row, np.arange(rows), np.full(rows, q_min), np.full(rows, q_max),
                         tuple(decoded.shape), decoded.dtype, learn_step=False)
        self.granularity, self.codes = gran, np.asarray(parts["codes"], dtype=np.int64)

    def encode(self, value: torch.Tensor) -> Encoded:
        lv = self.levels().reshape(self.shape)  # the file's steps: only the levels are new
        return uniform.encode(lv.astype(np.float64), name_of_torch(self.dtype), self.granularity,
                              codes=self.codes, levels=lv)


class ScalarGrid(GridQuant):
    """One step for the whole tensor (modes ``ecsq`` with a grid, ``dither``): latent weights in
    units of the step, levels within the file's range, optional dither ``offset``; ``store(levels)``
    writes the trained levels in the tensor's mode (the step stays the file's)."""

    def __init__(self, levels: np.ndarray, step: float, lo: int, hi: int, shape: tuple[int, ...],
                 dtype: torch.dtype, offset: Optional[np.ndarray] = None):
        super().__init__(levels, np.array([step]), np.zeros(1), np.array([lo]), np.array([hi]), shape, dtype,
                         offset=offset)
        self.store: Callable[[np.ndarray], Encoded]

    def encode(self, value: torch.Tensor) -> Encoded:
        return self.store(self.levels().reshape(-1))


def _stored(x: torch.Tensor, precision: str) -> torch.Tensor:
    """``x`` as a value stream stores it (spec §7.S.3: float16 or float32), straight-through."""
    if precision == "float16":
        return x + (x.to(torch.float16).to(x.dtype) - x).detach()
    return x


class Codebook(Trainable):
    """Codebook values with fixed assignments (modes ``kmeans``, ``pq``, ``ecsq`` with stored
    values): the codebook [K, d] is trained (seen at its stored precision), the indices stay.
    The tensor viewed [n, m] is ``codebook[indices]`` as [n, s * d] cut to m columns (d = 1:
    scalar codebooks, s = m). ``encoder(codebook, indices)`` stores it again in its mode."""

    def __init__(self, codebook: np.ndarray, indices: np.ndarray, n: int, shape: tuple[int, ...],
                 dtype: torch.dtype, precision: str,
                 encoder: Callable[[np.ndarray, np.ndarray], tuple[str, dict, list]]):
        super().__init__()
        cb = np.asarray(codebook, dtype=np.float32)
        self.codebook = nn.Parameter(torch.from_numpy(cb.reshape(cb.shape[0], -1).copy()))
        self.register_buffer("indices", torch.from_numpy(np.asarray(indices, dtype=np.int64).reshape(-1)))
        self.n, self.m = n, math.prod(shape) // n
        self.shape, self.dtype, self.precision, self._encoder = tuple(shape), dtype, precision, encoder
        rms = float(np.sqrt(np.mean(cb.astype(np.float64) ** 2))) if cb.size else 0.0
        self.lr_scale = rms if rms > 0 else MIN_FP_SCALE

    def value(self) -> torch.Tensor:
        rows = _stored(self.codebook, self.precision)[self.indices].reshape(self.n, -1)[:, :self.m]
        return rows.reshape(self.shape).to(self.dtype)

    def encode(self, value: torch.Tensor) -> Encoded:
        with torch.no_grad():
            book = _stored(self.codebook, self.precision).double().numpy()
        return self._encoder(book, self.indices.numpy())


def _sorted_book(book: np.ndarray, sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A scalar codebook made strictly increasing (training may reorder or merge values, §7.S.3)
    and the indices remapped to it."""
    uniq, inverse = np.unique(book.reshape(-1), return_inverse=True)
    return uniq, inverse.reshape(-1)[sym]


def _adapt_kmeans(f: TqzFile, name: str, decoded: torch.Tensor, learn_steps: bool) -> Optional[Trainable]:
    """``kmeans`` (spec §7.7): every group's codebook trained, the indices fixed."""
    q = f.parts(name)
    rows, precision = q["group_rows"], q["precision"]
    sizes = [len(b) for b in q["codebooks"]]
    offsets = np.cumsum([0] + sizes[:-1])
    n = sum(rows)
    m = decoded.numel() // n
    book = np.concatenate(q["codebooks"])
    sym = np.concatenate([s_.reshape(-1) + offsets[g] for g, s_ in enumerate(q["symbols"])])

    def encoder(values: np.ndarray, indices: np.ndarray) -> Encoded:
        groups, books, e0 = [], [], 0
        for g, r in enumerate(rows):
            b, s_ = _sorted_book(values[offsets[g]:offsets[g] + sizes[g]], indices[e0:e0 + r * m] - offsets[g])
            groups.append(s_.reshape(r, m))
            books.append(b)
            e0 += r * m
        return kmeans.write(groups, books, precision=precision)
    return Codebook(book, sym, n, tuple(decoded.shape), decoded.dtype, precision, encoder)


def _adapt_pq(f: TqzFile, name: str, decoded: torch.Tensor, learn_steps: bool) -> Optional[Trainable]:
    """``pq`` (spec §7.8): the codewords trained, the sub-vectors' indices fixed."""
    q = f.parts(name)
    sym, precision = q["symbols"], q["precision"]

    def encoder(values: np.ndarray, indices: np.ndarray) -> Encoded:
        return pq.write(indices.reshape(sym.shape), values, precision=precision)
    return Codebook(q["codebook"], sym, sym.shape[0], tuple(decoded.shape), decoded.dtype, precision, encoder)


def _adapt_ecsq(f: TqzFile, name: str, decoded: torch.Tensor, learn_steps: bool) -> Optional[Trainable]:
    """``ecsq`` (spec §7.6): stored values trained with the indices fixed (``recon`` codebook), or
    a grid of one step (``recon`` grid, as ``uniform`` per tensor: latent weights, the step kept)."""
    q = f.parts(name)
    sym = q["symbols"]
    shape, n = tuple(decoded.shape), (decoded.shape[0] if decoded.dim() else 1)
    if q["recon"] == "codebook":
        precision = q["precision"]

        def encoder(values: np.ndarray, indices: np.ndarray) -> Encoded:
            b, s_ = _sorted_book(values, indices)
            return ecsq.write(s_, recon="codebook", values=b, precision=precision)
        return Codebook(q["values"], sym, n, shape, decoded.dtype, precision, encoder)
    step_code = q["step"]
    step = float(steps_from_codes([step_code])[0])
    tr = ScalarGrid((sym + q["q_min"]).reshape(1, -1), step, q["q_min"], q["q_max"], shape, decoded.dtype)

    def grid_encoder(levels: np.ndarray) -> Encoded:
        q0 = int(levels.min())
        return ecsq.write(levels - q0, recon="grid", step=step_code, q_min=q0)
    tr.store = grid_encoder
    return tr


def _adapt_dither(f: TqzFile, name: str, decoded: torch.Tensor, learn_steps: bool) -> Optional[Trainable]:
    """``dither`` (spec §7.9), scalar lattice: latent weights quantized as the encoder does,
    ``q = round((w + u) / step)`` with the file's dither u and step; the hex lattice stays frozen."""
    q = f.parts(name)
    if q["lattice"] != "scalar":
        return None
    levels = q["coords"][0]
    step_code, seed = q["step"], q["seed"]
    step = float(steps_from_codes([step_code])[0])
    t1, _ = numerators(splitmix64(seed, 0, len(levels)))
    offset = t1.astype(np.float64) * 2.0 ** -22  # u / step, exact
    tr = ScalarGrid(levels.reshape(1, -1) - offset, step, q["q_min"][0], q["q_max"][0],
                    tuple(decoded.shape), decoded.dtype, offset=offset.reshape(1, -1))

    def encoder(lv: np.ndarray) -> Encoded:
        return dither.write([lv.reshape(-1)], step=step_code, seed=seed)
    tr.store = encoder
    return tr


Adapter = Callable[[TqzFile, str, torch.Tensor, bool], Optional[Trainable]]
"""adapter(file, name, decoded, learn_steps) -> the tensor's Trainable, or None (frozen)."""


def _adapt_raw(f: TqzFile, name: str, decoded: torch.Tensor, learn_steps: bool) -> Optional[Trainable]:
    return FullPrecision(decoded) if decoded.dtype.is_floating_point and decoded.numel() else None


def _adapt_tq(f: TqzFile, name: str, decoded: torch.Tensor, learn_steps: bool) -> Optional[Trainable]:
    return TqGrid(f.parts(name), tuple(decoded.shape), decoded.dtype, learn_steps)


def _adapt_uniform(f: TqzFile, name: str, decoded: torch.Tensor, learn_steps: bool) -> Optional[Trainable]:
    return UniformGrid(f.parts(name), decoded)


ADAPTERS: dict[str, Adapter] = {"raw": _adapt_raw, "tq": _adapt_tq, "uniform": _adapt_uniform,
                                "kmeans": _adapt_kmeans, "pq": _adapt_pq, "ecsq": _adapt_ecsq,
                                "dither": _adapt_dither}
"""Coding mode -> adapter. Modes absent here (and a ``dither`` hex lattice) are frozen during
fine-tuning (``alias`` is resolved to its target first)."""


# --- checks -------------------------------------------------------------------------------------

def _check_options(tqz_path: PathLike, out: PathLike, steps: int, lr: float, reencode: str,
                   overwrite: bool) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise fail("BAD_OPTION", f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (math.isfinite(lr) and lr > 0):
        raise fail("BAD_OPTION", f"lr must be a finite number > 0, got {lr!r}")
    if reencode not in REENCODE:
        raise fail("BAD_OPTION", f"reencode must be one of {', '.join(REENCODE)}, got {reencode!r}")
    if not isinstance(tqz_path, (str, os.PathLike)) or not os.path.isfile(tqz_path):
        raise fail("BAD_OPTION", "no such .tqz file", tqz_path if isinstance(tqz_path, (str, os.PathLike)) else None)
    if same_file(out, tqz_path):
        raise fail("BAD_OPTION", "output would overwrite the input", out)
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise fail("BAD_OPTION", "the output's folder does not exist", out)
    if not overwrite and os.path.lexists(out):  # checked before training, not after
        raise fail("OUTPUT_EXISTS", "output exists (use overwrite=True)", out)


def _match(module: nn.Module, f: TqzFile) -> dict[str, torch.Tensor]:
    """The module's state_dict, checked against the file's tensors (names and shapes)."""
    sd = module.state_dict(keep_vars=True)
    names = set(f.keys())
    missing = [k for k in sd if k not in names]
    extra = [k for k in f.keys() if k not in sd]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"not in the file: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"not in the module: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise fail("BAD_OPTION", "the file's tensors do not match the module's state_dict (" + "; ".join(parts) + ")",
                   f.path)
    for k, v in sd.items():
        shape = tuple(f.info(k).shape)
        if tuple(v.shape) != shape:
            raise fail("BAD_OPTION", f"tensor {k!r} has shape {list(shape)} in the file, "
                                     f"{list(v.shape)} in the module", f.path)
    for k, p in module.named_parameters():
        if p.device.type != "cpu":
            raise fail("BAD_OPTION", f"parameter {k!r} is on {p.device}: finetune trains on the CPU")
    return sd


def _target(f: TqzFile, name: str) -> str:
    """The name whose record holds the data (an alias's target)."""
    info = f.info(name)
    if info.mode == "alias":
        return f.keys()[info.params["of"]]
    return name


# --- training -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded CPU RNG and deterministic algorithms; the caller's settings restored after."""
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(det, warn_only=warn_only)


@contextlib.contextmanager
def _swapped(owners: Sequence[tuple[nn.Module, str]], value: torch.Tensor) -> Iterator[None]:
    """Every (submodule, attribute) holding one parameter sees ``value`` instead (tied weights:
    all owners see the same tensor)."""
    saved = [(m, a, m._parameters[a]) for m, a in owners]
    try:
        for m, a in owners:
            m._parameters[a] = value  # a non-leaf tensor: what torch.func.functional_call does
        yield
    finally:
        for m, a, p in saved:
            m._parameters[a] = p


def _batch_order(n: int, steps: int, seed: int, shuffle: bool) -> list[int]:
    """Batch indices for ``steps`` steps: passes over the batches, each a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps:
        order.extend(torch.randperm(n, generator=g).tolist() if shuffle else range(n))
    return order[:steps]


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


# --- writing ------------------------------------------------------------------------------------

def _bits_per_param(f: TqzFile) -> float:
    params = sum(f.info(k).numel for k in f.keys())
    return 8.0 * f.file_size / max(params, 1)


def _grid_bytes(f: TqzFile, sd: Mapping[str, torch.Tensor], decoded: Mapping[str, torch.Tensor],
                trainables: Mapping[str, Trainable]) -> bytes:
    """The file ``f`` with every tensor in its own mode on its own grid: trained tensors through
    their Trainable's ``encode``, the others copied when unchanged."""
    meta = dict(f.metadata)
    meta["tqz.encoder"] = f"tqcodec {__version__}"
    buf = io.BytesIO()
    writer = ContainerWriter(buf)
    for i, name in enumerate(f.keys()):
        info = f.info(name)
        record = TensorRecord(name, info.dtype, tuple(info.shape), info.mode, dict(info.params))
        value = sd[name].detach()
        if info.mode == "alias":
            writer.add_tensor(record, [])
            continue
        if name in trainables:
            tr: Optional[Trainable] = trainables[name]
        elif torch.equal(value.to(decoded[name].dtype), decoded[name]):
            writer.add_tensor(record, f.encoded(name).streams)
            continue
        else:  # a buffer the forward passes changed (train_mode: e.g. BatchNorm statistics)
            adapter = ADAPTERS.get(info.mode)
            tr = adapter(f, name, decoded[name], False) if adapter else None
            if tr is None:
                raise fail("BAD_OPTION", f"tensor {name!r} changed during training but its mode "
                                         f"{info.mode!r} cannot be encoded again here")
        mode, params, streams = tr.encode(value)
        writer.add_tensor(TensorRecord(name, info.dtype, tuple(info.shape), mode, params), streams)
    writer.finish(meta)
    return buf.getvalue()


def finetune(module: nn.Module, tqz_path: PathLike, batches: Iterable[Any], loss_fn: LossFn, *,
             out: PathLike, steps: int = 1000, lr: float = 1e-2, seed: int = 0, stats: Any = None,
             progress: Progress = None, learn_steps: bool = True, reencode: str = "auto", rounds: int = 2,
             train_mode: bool = False, shuffle: bool = True, overwrite: bool = True) -> Path:
    """Fine-tune ``module`` on the grid of the ``.tqz`` file ``tqz_path``; write the result to
    ``out`` at the same rate. Returns ``Path(out)``; ``module`` then holds the output's decoded
    weights.

    ``module``: a CPU module whose ``state_dict()`` has exactly the file's tensor names and shapes
    (else ``BAD_OPTION``). ``batches``: a sequence of batches (any iterable is read once into a
    list); step ``i`` uses one batch, passes over them in a seeded order (``shuffle``) or in the
    given order. ``loss_fn(module, batch)`` returns the scalar loss (labels, or distillation
    against a teacher's outputs). ``steps`` optimizer steps of Adam with a cosine-decayed
    learning rate ``lr`` in units of each tensor's scale: a latent on a grid moves by about
    ``lr`` quantization steps per step, a full-precision tensor by ``lr`` times its RMS.
    ``learn_steps``: also learn the ``tq`` band steps (LSQ). ``train_mode``: run the module in
    train mode (dropout, BatchNorm statistics updated); default eval mode. The same ``seed`` and
    inputs give the same output bytes (torch's RNG is seeded inside and restored after;
    deterministic algorithms are on while training).

    Storing the result at the input's rate (``reencode``): training spreads the levels, so the
    trained grid usually needs a little more than the input's size. The candidates are the
    trained weights encoded again with ``tqcodec.save(..., stats=stats, bits=<input
    bits/param>)`` (``stats``: the ``tqcodec.Stats`` to encode with, None: the data-free
    encoder; mode ``tq``, and also mode ``auto`` when the file holds ``ecsq``/``kmeans``/``pq``/
    ``dither`` tensors; a size more than ``RATE_TOLERANCE`` off is encoded again with a corrected
    target), the file's own grids with the trained levels or codebooks (each tensor in its mode,
    bands/channels, indices and step codes; learned ``tq`` steps snapped to the nearest §7.1
    code at ``SNAP_AT`` of the steps) when that file is within ``RATE_TOLERANCE`` of the input's
    size, and the input itself; the output is the candidate with the lowest loss on the first
    ``EVAL_BATCHES`` batches (a warning says so when that is the input). ``encoder``: the
    encoder and the input; ``grid``: the grid (whatever its size) and the input; ``auto``:
    ``encoder`` plus the grid for files with ``tq`` tensors, else ``grid``. With the encoder the
    steps run in ``rounds``: after each round but the last the weights are stored that way (in
    memory) and the next round trains on the chosen file's grid, so the last round ends on a grid
    the final encode nearly reproduces (the learning-rate schedule runs on across rounds; Adam
    restarts).
    ``progress(step, total, loss)`` is called after each step. ``overwrite`` as in ``save``.
    """
    _check_options(tqz_path, out, steps, lr, reencode, overwrite)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or not 1 <= rounds <= steps:
        raise fail("BAD_OPTION", f"rounds must be an integer in [1, steps], got {rounds!r}")
    batch_list = list(batches) if not isinstance(batches, _SequenceABC) else batches
    if len(batch_list) == 0:
        raise fail("BAD_OPTION", "batches is empty")
    decoded = load(tqz_path)
    with TqzFile(tqz_path) as f:
        sd = _match(module, f)
        modes_in = {f.info(k).mode for k in f.keys()}
        use_encoder = reencode == "encoder" or (reencode == "auto" and "tq" in modes_in)
        use_grid = reencode == "grid" or (reencode == "auto" and "tq" not in modes_in)
        # tq and the data-free modes only: mode tq; with other lossy modes, auto (picks again) too
        save_modes = ("tq",) if modes_in <= {"tq", "raw", "uniform", "alias"} else ("auto", "tq")
        bits = _bits_per_param(f)
        user_meta = {k: v for k, v in f.metadata.items() if not str(k).startswith("tqz.")} or None
        files = f.metadata.get("tqz.files")
        module.load_state_dict(decoded, strict=True)
        params, owners, names_of = _parameters(module, sd)
        if not use_encoder:
            rounds = 1
        ctx = _Run(batch_list, loss_fn, steps, lr, seed, shuffle, progress)

        def encode_as(state: Mapping[str, torch.Tensor], mode: str) -> bytes:
            """``state`` encoded in ``mode`` at the input's size (±RATE_TOLERANCE: the encoder's own
            rate control is tried again with a corrected target when it misses)."""
            best: Optional[tuple[float, bytes]] = None
            target = bits
            for _ in range(RATE_TRIES):
                data = encode_bytes(state, stats=stats, bits=target, mode=mode, metadata=user_meta, files=files)
                err = len(data) / f.file_size - 1.0
                if best is None or abs(err) < abs(best[0]):
                    best = (err, data)
                if abs(err) <= RATE_TOLERANCE:
                    break
                target = min(32.0, max(0.05, target * f.file_size / len(data)))
            return best[1]

        def store(source: TqzFile, source_decoded: Mapping[str, torch.Tensor],
                  trainables: Mapping[str, Trainable], final: bool) -> bytes:
            """The trained module as a file: of the candidates ``reencode`` allows (the file's own
            grids, if within RATE_TOLERANCE of the input's size or asked for; the encoder in each
            of ``save_modes``) and, at the end, the input itself, the one with the lowest loss on
            the first EVAL_BATCHES batches."""
            state = _snapshot(module.state_dict())
            found: list[bytes] = [Path(tqz_path).read_bytes()] if final else []
            if use_grid or use_encoder:
                grid = _grid_bytes(source, state, source_decoded, trainables)
                if use_grid or abs(len(grid) / f.file_size - 1.0) <= RATE_TOLERANCE:
                    found.append(grid)
            if use_encoder:
                found.extend(encode_as(state, m) for m in save_modes)
            if len(found) == 1:
                return found[0]
            scored = []
            for data in found:
                module.load_state_dict(load(data), strict=True)
                scored.append(ctx.evaluate(module))
            module.load_state_dict(state, strict=True)
            best = scored.index(min(scored))
            if final and best == 0:
                warnings.warn("finetune: no trained candidate at the input's rate has a lower loss on the first "
                              f"{EVAL_BATCHES} batches than the input; the output holds the input's tensors "
                              "(try a lower lr, more steps or reencode='grid')", stacklevel=3)
            return found[best]

        was_training = module.training
        flags = {pid: p.requires_grad for pid, p in params.items()}
        source: TqzFile = f
        try:
            for p in params.values():
                p.requires_grad_(False)
            module.train(train_mode)
            cur_decoded = decoded
            for r in range(rounds):
                first, last = steps * r // rounds, steps * (r + 1) // rounds
                # steps are learned in every round but the last; a single round snaps them to
                # step codes at SNAP_AT (later rounds train on the grid the encoder picked)
                learn = learn_steps and (r < rounds - 1 or rounds == 1)
                trainables, by_param = _trainables(source, cur_decoded, names_of, learn, warn=r == 0)
                snap = int(SNAP_AT * steps) if learn and r == rounds - 1 else None
                ctx.run(module, by_param, owners, first, last, snap)
                with torch.no_grad():
                    for pid, tr in by_param:
                        params[pid].copy_(tr.value().detach())
                module.eval()  # candidates are judged in eval mode
                data = store(source, cur_decoded, trainables, final=r == rounds - 1)
                module.train(train_mode)
                if r < rounds - 1:  # the next round trains on the grid just chosen
                    if source is not f:
                        source.close()
                    source = TqzFile(data)
                    cur_decoded = load(data)
                    module.load_state_dict(cur_decoded, strict=True)
        finally:
            for pid, p in params.items():
                p.requires_grad_(flags[pid])
            module.train(was_training)
            if source is not f:
                source.close()
        with atomic_output(out, overwrite) as fh:
            fh.write(data)
    module.load_state_dict(load(out), strict=True)
    return Path(out)


def _snapshot(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a state_dict whose tied tensors stay one tensor (so they are stored as alias)."""
    entries = plan_entries((k, v.detach()) for k, v in sd.items())
    out: dict[str, torch.Tensor] = {}
    for name, v, target in entries:
        out[name] = out[entries[target][0]] if target is not None else v.clone()
    return out


def _parameters(module: nn.Module, sd: Mapping[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """For each distinct parameter (by id): the Parameter, every (submodule, attribute) holding it
    and its state_dict names (tied weights: several)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    names_of: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for mname, sub in module.named_modules(remove_duplicate=False):
        for attr, p in sub._parameters.items():
            if p is None:
                continue
            full = f"{mname}.{attr}" if mname else attr
            if (sub, attr) not in owners.setdefault(id(p), []):
                owners[id(p)].append((sub, attr))
            if full in sd and full not in names_of.setdefault(id(p), []):
                names_of[id(p)].append(full)
            params[id(p)] = p
    return params, owners, names_of


def _trainables(f: TqzFile, decoded: Mapping[str, torch.Tensor], names_of: Mapping[int, list[str]],
                learn_steps: bool, warn: bool) -> tuple[dict[str, Trainable], list[tuple[int, Trainable]]]:
    """One Trainable per distinct parameter, built from its record by the mode's adapter
    (by the name holding the data; and by parameter id)."""
    trainables: dict[str, Trainable] = {}
    by_param: list[tuple[int, Trainable]] = []
    frozen: list[str] = []
    for pid, names in names_of.items():
        if not names:
            continue
        target = _target(f, names[0])
        adapter = ADAPTERS.get(f.info(target).mode)
        tr = adapter(f, target, decoded[target], learn_steps) if adapter else None
        if tr is None:
            frozen.append(target)
            continue
        trainables[target] = tr
        by_param.append((pid, tr))
    if frozen and warn:
        warnings.warn(f"finetune: {len(frozen)} tensors have no trainable form in their coding mode and stay "
                      f"as decoded: {', '.join(frozen[:5])}{' ...' if len(frozen) > 5 else ''}", stacklevel=3)
    return trainables, by_param


class _Run:
    """The training loop over all rounds: Adam (fresh each round), one cosine learning-rate
    schedule over all steps, one batch per step, fake-quantized weights swapped into the module
    for each forward pass."""

    def __init__(self, batches: Sequence[Any], loss_fn: LossFn, steps: int, lr: float, seed: int,
                 shuffle: bool, progress: Progress):
        self.batches, self.loss_fn, self.steps, self.lr, self.seed = batches, loss_fn, steps, lr, seed
        self.progress = progress
        self.order = _batch_order(len(batches), steps, seed, shuffle)

    def evaluate(self, module: nn.Module) -> float:
        """Mean loss over the first EVAL_BATCHES batches (no gradient; NaN counts as infinite)."""
        with torch.no_grad():
            losses = [float(self.loss_fn(module, b)) for b in self.batches[:EVAL_BATCHES]]
        mean = sum(losses) / len(losses)
        return mean if math.isfinite(mean) else math.inf

    def run(self, module: nn.Module, by_param: Sequence[tuple[int, Trainable]],
            owners: Mapping[int, Sequence[tuple[nn.Module, str]]], first: int, last: int,
            snap: Optional[int]) -> None:
        groups = [g for _, tr in by_param for g in tr.param_groups(self.lr)]
        groups = [g for g in groups if g["params"]]
        with _deterministic(self.seed + first):
            opt = torch.optim.Adam(groups) if groups else None
            base = [g["lr"] for g in opt.param_groups] if opt else []
            for i in range(first, last):
                if i == snap:
                    for _, tr in by_param:
                        tr.snap()
                with contextlib.ExitStack() as stack:
                    for pid, tr in by_param:
                        stack.enter_context(_swapped(owners[pid], tr.value()))
                    loss = self.loss_fn(module, self.batches[self.order[i]])
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise fail("BAD_OPTION", f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise fail("BAD_OPTION", f"the loss is {value} at step {i + 1} (lower lr?)")
                if opt is not None:
                    for g, b in zip(opt.param_groups, base):
                        g["lr"] = b * _cosine(i, self.steps)
                    opt.zero_grad(set_to_none=True)
                    if loss.requires_grad:
                        loss.backward()
                    opt.step()
                if self.progress:
                    self.progress(i + 1, self.steps, value)

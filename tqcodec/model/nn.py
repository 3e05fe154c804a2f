"""Transform-domain inference layers: run a ``tq`` weight (spec §7.5) from its integer stage.

A swapped layer holds the weight's integer levels (per band, the narrowest of int8/int16/int32
that fits; neighbouring bands of one integer type stored as one tensor), the exact steps as a
float32 tensor (the step, or, when the bands' steps differ, one per row of C: 4 bytes a row) and,
if the tensor has one, the float16 synthesis transform S. It never holds the dense weight. With C the [k, c] coefficient
matrix (band b: rows ``r_b ..``, ``C = step_b * L_b``) and R = C (no transform) or R = (S C)^T the
[n, m] matrix of the weight, a forward first widens C to the compute dtype into a **scratch
buffer** (one vectorised integer-to-float copy per run of same-type bands, then one in-place
multiply by the step or the per-row step column: exact, spec §7.5.3 step 2) and then makes one call:

- Linear, ``out_in`` (W = R), no transform: ``F.linear(x, C, bias)`` (what the dense layer does,
  bit for bit);
- Linear, ``out_in``, transform (W = C^T S^T): ``z = x S`` (project onto the k kept basis
  vectors), then ``y = z C (+ bias)``;
- Linear, ``in_out`` (W = R^T): ``y = x C`` (no transform) or ``y = (x C^T) S^T``;
- Conv (``out_in``: row i of R is output channel i's filter), no transform: one convolution
  with the buffer as its weight; with a transform: ``z = conv(x, S^T as k filters per group)``
  then ``y[:, group j] = C_j^T z[:, group j]``;
- Embedding (row i of the weight: token i): the looked-up rows of C (no transform) or
  ``C[:, ids]^T S^T``; only those are widened to floats (no scratch buffer).

The scratch buffer is shared by every layer of a thread (one per compute dtype and device, and
one for S), sized to the largest C met so far (at most ``BLOCK_ELEMENTS`` elements: a larger
layer is widened and computed in row blocks of that size; 64 MiB in float32) and overwritten by
the next layer; ``scratch_bytes()`` reports it and ``release_scratch()`` frees it. It is not a
buffer of any module, so ``resident_bytes`` does not count it. When autograd could save the
widened weight (grad mode on and the input or the bias requiring grad) a forward widens into a
fresh tensor instead, so no saved tensor is ever overwritten. Outputs equal a dense layer with the
decoded weight within float rounding (no transform: exactly what the dense layer computes; with
a transform, within spec §7.5.3's tolerance). ``state_dict()`` of a swapped layer gives the
dense ``weight`` (built on demand, bit-identical to ``tqcodec.load``), so it loads into the
original, dense model.

    model = build_model()
    tqcodec.load_module(model, "model.tqz")          # tq layers swapped, the rest loaded densely
    tqcodec.load_module(model, "model.tqz", transform_domain=False)   # everything dense
"""
from __future__ import annotations

import os
import threading
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..api import open as tqz_open
from ..errors import fail
from ..format.dtypes import round_binary32
from ..limits import DEFAULT_LIMITS
from ..pipeline.tensors import storage_to_tensor
from ..modes.tq.format import consecutive_bands

__all__ = ["TQLinear", "TQConv1d", "TQConv2d", "TQEmbedding", "load_module", "resident_bytes", "scratch_bytes",
           "release_scratch", "ELIGIBLE"]

BLOCK_ELEMENTS = 1 << 24  # most coefficients widened at a time (64 MiB in float32): larger layers go in row blocks


class _Scratch(threading.local):
    """Per-thread scratch buffers: ``(slot, dtype, device, inference mode) -> flat tensor``, and
    the views of each handed out so far (``shape -> view``: no view is rebuilt per forward)."""

    def __init__(self) -> None:
        self.bufs: dict = {}
        self.views: dict = {}


_SCRATCH = _Scratch()


def _scratch(slot: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``shape`` in this thread's shared buffer for ``slot`` (grown, never shrunk;
    inference-mode and normal tensors kept apart, as torch does not mix them)."""
    key = (slot, dtype, device, torch.is_inference_mode_enabled())
    views = _SCRATCH.views.get(key)
    if views is not None:
        v = views.get(shape)
        if v is not None:
            return v
    numel = 1
    for d in shape:
        numel *= d
    buf = _SCRATCH.bufs.get(key)
    if buf is None or buf.numel() < numel:
        _SCRATCH.bufs.pop(key, None)  # free the smaller one (and its views) first
        _SCRATCH.views.pop(key, None)
        buf = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH.bufs[key] = buf
        views = _SCRATCH.views[key] = {}
    v = views[shape] = buf[:numel].view(shape)
    return v


def scratch_bytes() -> int:
    """Bytes of this thread's scratch buffers (the widened coefficients of the largest layer run)."""
    return sum(b.numel() * b.element_size() for b in _SCRATCH.bufs.values())


def release_scratch() -> None:
    """Free this thread's scratch buffers (the next forward allocates them again)."""
    _SCRATCH.bufs.clear()
    _SCRATCH.views.clear()


def _fresh_needed(x: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether autograd could keep the widened weight: then it must not live in a shared buffer."""
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


class _TQBase(nn.Module):
    """The integer stage of one ``tq`` weight: levels (``levels_<s>``: runs of neighbouring bands
    of one integer type), steps, the per-row step column, transform."""

    def _init_tq(self, parts: dict, dtype: str, shape: tuple) -> None:
        parts = consecutive_bands(parts)  # a row_band tensor (spec 1.4) as runs of consecutive rows
        self.weight_dtype = dtype  # the stored tensor's dtype (spec §5.5 name)
        self.weight_shape = tuple(int(d) for d in shape)
        self.layout = parts["layout"]
        self.n, self.m, self.k = int(parts["n"]), int(parts["m"]), int(parts["k"])
        self.band_rows = [int(r) for r in parts["band_rows"]]
        self.band_steps = [float(s) for s in parts["steps"]]  # exact dyadic steps, as Python floats
        self.num_bands = len(self.band_rows)
        levels = [np.ascontiguousarray(lv) for lv in parts["levels"]]
        self.cols = int(levels[0].shape[1]) if levels else 0
        # runs of neighbouring bands with one integer type -> one tensor each (one cast per run)
        runs: list[list[int]] = []
        for b, lv in enumerate(levels):
            if runs and levels[runs[-1][-1]].dtype == lv.dtype:
                runs[-1].append(b)
            else:
                runs.append([b])
        self._run_names = [f"levels_{s}" for s in range(len(runs))]
        self._band_at: list[tuple[int, int]] = []  # band -> (run, first row within the run)
        self._runs: list[tuple[int, int]] = []  # run -> (first row, end row) in C
        r0 = 0
        for s, bands in enumerate(runs):
            arr = levels[bands[0]] if len(bands) == 1 else np.concatenate([levels[b] for b in bands])
            self.register_buffer(f"levels_{s}", torch.from_numpy(arr), persistent=False)
            off = 0
            for b in bands:
                self._band_at.append((s, off))
                off += self.band_rows[b]
            self._runs.append((r0, r0 + off))
            r0 += off
        self.register_buffer("steps", self._step_tensor(), persistent=False)
        s = parts["transform"]
        self.register_buffer("transform", None if s is None else torch.from_numpy(np.array(s, copy=True)),
                             persistent=False)

    def _step_tensor(self, device: Any = None) -> torch.Tensor:
        """The steps as float32 (every step is exact in binary32, spec §7.1): one per row of C
        ([k, 1]) or, when every band has the same step, that step (a 0-dim tensor: multiplying by
        it is faster than by a Python float, which torch applies in double)."""
        if len(set(self.band_steps)) > 1:
            t = torch.from_numpy(np.repeat(np.array(self.band_steps, dtype=np.float32), self.band_rows).reshape(-1, 1))
        else:
            t = torch.tensor(self.band_steps[0] if self.band_steps else 1.0, dtype=torch.float32)
        return t.to(device)

    def _apply(self, fn, *args, **kwargs):
        """``.half()``/``.bfloat16()`` would round the steps: they are rebuilt exact instead."""
        super()._apply(fn, *args, **kwargs)
        st = self._buffers.get("steps")
        if st is not None and st.dtype not in (torch.float32, torch.float64):
            self._buffers["steps"] = self._step_tensor(st.device)
        return self

    def _run(self, s: int) -> torch.Tensor:
        return self._buffers[self._run_names[s]]

    def _levels(self, b: int) -> torch.Tensor:
        """Band b's levels [band_rows[b], c] (a view of its run)."""
        s, off = self._band_at[b]
        return self._run(s)[off:off + self.band_rows[b]]

    # --- C widened to floats ----------------------------------------------------------------
    def _row_blocks(self, cut: Any = None):
        """(a, e) row ranges of C of at most ``BLOCK_ELEMENTS`` coefficients (one range for all
        but huge layers; ``cut(a, k, rows)`` may end a range elsewhere: conv group boundaries)."""
        per = max(1, BLOCK_ELEMENTS // max(self.cols, 1))
        a = 0
        while a < self.k:
            e = min(self.k, a + per) if cut is None else cut(a, self.k, per)
            yield a, e
            a = e

    def _coeffs(self, a: int, e: int, dtype: torch.dtype, fresh: bool) -> torch.Tensor:
        """Rows a..e of C in ``dtype`` ([e - a, c]), in the shared scratch buffer unless ``fresh``:
        one integer-to-float copy per run, one multiply by the step (column). Exact (spec §7.5.3
        step 2: every level times its step is exact in binary32)."""
        bufs = self._buffers
        first = bufs[self._run_names[0]]
        shape = (e - a, self.cols)
        out = torch.empty(shape, dtype=dtype, device=first.device) if fresh else \
            _scratch("C", shape, dtype, first.device)
        st = bufs["steps"]
        if a == 0 and e == self.k:  # the whole of C (all but huge layers): no slicing
            if len(self._runs) == 1:
                out.copy_(first)
            else:
                for name, (r0, r1) in zip(self._run_names, self._runs):
                    out[r0:r1].copy_(bufs[name])
            return out.mul_(st)
        for name, (r0, r1) in zip(self._run_names, self._runs):
            lo, hi = max(a, r0), min(e, r1)
            if lo < hi:
                out[lo - a:hi - a].copy_(bufs[name][lo - r0:hi - r0])
        return out.mul_(st[a:e] if st.dim() else st)

    def _whole(self) -> bool:
        """C is widened at once (not in row blocks)."""
        return self.k * self.cols <= BLOCK_ELEMENTS

    def _s(self, dtype: torch.dtype, fresh: bool) -> torch.Tensor:
        """S [m, k] in ``dtype`` (float16 -> wider: exact)."""
        s = self.transform
        if fresh:
            return s.to(dtype)
        return _scratch("S", tuple(s.shape), dtype, s.device).copy_(s)

    # --- the two contractions with C --------------------------------------------------------
    def _x_ct(self, x2: torch.Tensor, bias: Optional[torch.Tensor], fresh: bool) -> torch.Tensor:
        """x2 [N, c] -> x2 @ C^T (+ bias) [N, k]: one F.linear (row blocks for huge layers)."""
        if self._whole():
            return F.linear(x2, self._coeffs(0, self.k, x2.dtype, fresh), bias)
        out = None
        for a, e in self._row_blocks():
            c = self._coeffs(a, e, x2.dtype, fresh)
            b = None if bias is None else bias[a:e]
            if out is None:
                out = x2.new_empty(x2.shape[0], self.k)
            out[:, a:e] = F.linear(x2, c, b)
        return out

    def _z_c(self, z: torch.Tensor, bias: Optional[torch.Tensor], fresh: bool) -> torch.Tensor:
        """z [N, k] -> z @ C (+ bias) [N, c]: one matmul (row blocks for huge layers)."""
        if self._whole():
            c = self._coeffs(0, self.k, z.dtype, fresh)
            return torch.mm(z, c) if bias is None else torch.addmm(bias, z, c)
        out = None
        for a, e in self._row_blocks():
            c = self._coeffs(a, e, z.dtype, fresh)
            if out is None:
                out = torch.mm(z[:, a:e], c) if bias is None else torch.addmm(bias, z[:, a:e], c)
            else:
                out.addmm_(z[:, a:e], c)
        return out

    # --- the dense weight, on demand ------------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        """The decoded weight, computed now as ``tqcodec.load`` does (bit-identical)."""
        coeff = np.concatenate([self._levels(b).cpu().numpy().astype(np.float64) * self.band_steps[b]
                                for b in range(self.num_bands)])
        if self.transform is None:
            mat = coeff.astype(np.float32)
        else:
            s = self.transform.cpu().numpy().astype(np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                mat = (s @ coeff).T.astype(np.float32)
        if self.layout == "in_out":
            mat = mat.T
        arr = round_binary32(self.weight_dtype, np.ascontiguousarray(mat)).reshape(self.weight_shape)
        return storage_to_tensor(self.weight_dtype, arr).to(self._levels(0).device)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, built on demand (not held: prefer the layer's forward)."""
        return self.dense_weight()

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: D401 - torch hook
        destination[prefix + "weight"] = self.dense_weight()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:  # the dense weight this layer gives out: accept it only unchanged
            w = state_dict[key]
            if not (isinstance(w, torch.Tensor) and tuple(w.shape) == self.weight_shape
                    and torch.equal(w.detach().cpu().to(torch.float64),
                                    self.dense_weight().cpu().to(torch.float64))):
                error_msgs.append(f"{key}: a transform-domain layer ({type(self).__name__}) holds a "
                                  "compressed weight and cannot load a different dense one; load it into "
                                  "the dense model (tqcodec.load_module(..., transform_domain=False))")
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        dts = sorted({str(self._levels(b).dtype).replace("torch.", "") for b in range(self.num_bands)})
        tr = f", transform k={self.k}" if self.transform is not None else ""
        return (f"{self._shape_repr()}, bands={self.num_bands}, levels={'/'.join(dts)}{tr}, "
                f"layout={self.layout}, bias={self.bias is not None}")

    def _shape_repr(self) -> str:
        return ""


def _compute(x: torch.Tensor) -> torch.Tensor:
    """Inputs in float32 or float64 compute in their dtype; narrower ones in float32 (levels beyond
    2^8 or 2^11 are not exact in bfloat16/float16), the output cast back."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _bias(b: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
    """The dense layer's bias parameter itself (shared, so loaders that hold it still fill it)."""
    if b is None or isinstance(b, nn.Parameter):
        return b
    return nn.Parameter(b.detach(), requires_grad=False)


def _parts_check(name: str, parts: dict, shape: tuple, want: tuple) -> None:
    if tuple(shape) != tuple(want):
        raise fail("BAD_OPTION", f"{name}: the file's weight has shape {list(shape)}, the layer needs {list(want)}")


class TQLinear(_TQBase):
    """``nn.Linear`` computing from a ``tq`` weight's integer stage (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, parts: dict, dtype: str = "float32",
                 bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        _parts_check("TQLinear", parts, (parts["m"], parts["n"]) if parts["layout"] == "in_out"
                     else (parts["n"], parts["m"]), (out_features, in_features))
        self._init_tq(parts, dtype, (out_features, in_features))
        self.bias = _bias(bias)

    @classmethod
    def from_linear(cls, mod: nn.Linear, parts: dict, dtype: str = "float32") -> "TQLinear":
        return cls(mod.in_features, mod.out_features, parts, dtype, mod.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x2 = _compute(x)
        if x2.dim() != 2:
            x2 = x2.reshape(-1, x.shape[-1])
        b = self._parameters.get("bias")
        if b is not None and b.dtype != x2.dtype:
            b = b.to(x2.dtype)
        fresh = _fresh_needed(x2, b)
        if self._buffers["transform"] is None:
            y = self._x_ct(x2, b, fresh) if self.layout == "out_in" else self._z_c(x2, b, fresh)
        elif self.layout == "out_in":
            y = self._z_c(torch.mm(x2, self._s(x2.dtype, fresh)), b, fresh)
        else:
            y = F.linear(self._x_ct(x2, None, fresh), self._s(x2.dtype, fresh), b)
        if x.dim() != 2:
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if y.dtype == dtype else y.to(dtype)

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class _TQConvNd(_TQBase):
    _dims = 0

    def __init__(self, conv: nn.Module, parts: dict, dtype: str = "float32"):
        super().__init__()
        for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                  "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, a, getattr(conv, a))
        shape = tuple(conv.weight.shape)
        if parts["layout"] != "out_in":
            raise fail("BAD_OPTION", f"{type(self).__name__}: a convolution weight is stored out_in")
        _parts_check(type(self).__name__, parts, (parts["n"], parts["m"]), (shape[0], int(np.prod(shape[1:]))))
        self._init_tq(parts, dtype, shape)
        self.bias = _bias(conv.bias)

    def _conv(self, x, w, groups, padding, bias=None):
        f = F.conv1d if self._dims == 1 else F.conv2d
        return f(x, w, None if bias is None else bias.to(x.dtype), self.stride, padding, self.dilation, groups)

    def _group_cut(self, r0: int, end: int, per: int) -> int:
        """End of a block starting at output channel r0 (band ends at ``end``): within one group,
        or whole groups."""
        opg = self.out_channels // self.groups
        nxt = (r0 // opg + 1) * opg
        if per < opg or r0 % opg or end - r0 < opg:
            return min(end, r0 + per, nxt)
        return r0 + min((end - r0) // opg, per // opg) * opg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        x = _compute(x)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        g = self.groups
        ipg, opg = self.in_channels // g, self.out_channels // g
        ks = tuple(self.weight_shape[2:])
        dt = x.dtype
        fresh = _fresh_needed(x, self.bias)
        if self.transform is None:
            pieces = []
            for a, e in self._row_blocks(self._group_cut):
                w = self._coeffs(a, e, dt, fresh).view(e - a, ipg, *ks)
                if a == 0 and e == self.k:  # the whole weight: the dense layer's own call
                    return self._conv(x, w, g, padding, self.bias).to(out_dtype)
                ga, gb = a // opg, (e - 1) // opg
                pieces.append(self._conv(x[:, ga * ipg:(gb + 1) * ipg], w, gb - ga + 1, padding))
            y = torch.cat(pieces, 1)
        else:
            k = self.k
            filt = self._s(dt, fresh).T.reshape(k, ipg, *ks)  # basis vector r as a filter
            if g > 1:
                filt = filt.repeat(g, *([1] * (1 + len(ks))))
            z = self._conv(x, filt, g, padding)  # [N, g*k, *out]
            sp = z.shape[2:]
            z = z.reshape(z.shape[0], g, k, -1)
            y = None
            for a, e in self._row_blocks():
                t = torch.einsum("ngrp,rgo->ngop", z[:, :, a:e], self._coeffs(a, e, dt, fresh).view(e - a, g, opg))
                y = t if y is None else y.add_(t)
            y = y.reshape(y.shape[0], self.out_channels, *sp)
        if self.bias is not None:
            y = y.add_(self.bias.to(dt).reshape(1, -1, *([1] * self._dims)))
        return y.to(out_dtype)

    def _shape_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}")


class TQConv1d(_TQConvNd):
    """``nn.Conv1d`` (groups, any padding mode) computing from a ``tq`` weight's integer stage."""
    _dims = 1


class TQConv2d(_TQConvNd):
    """``nn.Conv2d`` (groups, any padding mode) computing from a ``tq`` weight's integer stage."""
    _dims = 2


class TQEmbedding(_TQBase):
    """``nn.Embedding`` (no ``max_norm``) looking rows up in a ``tq`` weight's integer stage:
    only the looked-up rows (or coefficient columns) are ever widened to floats."""

    def __init__(self, emb: nn.Embedding, parts: dict, dtype: str = "float32"):
        super().__init__()
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx = emb.padding_idx
        shape = (emb.num_embeddings, emb.embedding_dim)
        _parts_check("TQEmbedding", parts, (parts["m"], parts["n"]) if parts["layout"] == "in_out"
                     else (parts["n"], parts["m"]), shape)
        self._init_tq(parts, dtype, shape)
        self.bias = None

    def _scale(self, out: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
        """``out`` (levels of C's rows ``rows``, or of every row if None, along dim 0) times the steps."""
        st = self.steps
        return out.mul_(st if rows is None or not st.dim() else st.index_select(0, rows))

    def _c_rows(self, ids: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of C, [N, c]: one gather per run of same-type bands, one multiply."""
        if len(self._runs) == 1:
            out = self._run(0).index_select(0, ids).to(dt)
        else:
            srt, order = torch.sort(ids)  # ids grouped by run: one contiguous stretch per run
            starts = torch.tensor([r0 for r0, _ in self._runs] + [self.k], device=ids.device)
            cuts = torch.searchsorted(srt, starts).tolist()
            out = torch.empty(ids.numel(), self.cols, dtype=dt, device=ids.device)
            for s, (r0, _) in enumerate(self._runs):
                a, e = cuts[s], cuts[s + 1]
                if e > a:
                    out.index_copy_(0, order[a:e], self._run(s).index_select(0, srt[a:e] - r0).to(dt))
        return self._scale(out, ids)

    def _c_cols(self, ids: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """Columns ``ids`` of C, [k, N]."""
        out = torch.empty(self.k, ids.numel(), dtype=dt, device=ids.device)
        for s, (r0, r1) in enumerate(self._runs):
            out[r0:r1] = self._run(s).index_select(1, ids)
        return self._scale(out, None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"index out of range in self (num_embeddings={self.num_embeddings})")
        dt = torch.float32 if self.weight_dtype != "float64" else torch.float64
        if self.layout == "out_in":
            e = self._c_rows(flat, dt) if self.transform is None else self._c_cols(flat, dt).T @ self.transform.to(dt).T
        else:
            e = self._c_cols(flat, dt).T if self.transform is None else \
                self._z_c(self.transform.index_select(0, flat).to(dt), None, torch.is_grad_enabled())
        e = e.reshape(*ids.shape, self.embedding_dim)
        return e if self.weight_dtype in ("float32", "float64") else e.to(self.dense_weight_dtype())

    def dense_weight_dtype(self) -> torch.dtype:
        return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(self.weight_dtype, torch.float32)

    def _shape_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"


ELIGIBLE = {nn.Linear: TQLinear, nn.Conv1d: TQConv1d, nn.Conv2d: TQConv2d,  # exact types only
            nn.Embedding: TQEmbedding}


def _eligible(mod: nn.Module) -> bool:
    return type(mod) in ELIGIBLE and not (type(mod) is nn.Embedding and mod.max_norm is not None)


def _swap(mod: nn.Module, parts: dict, dtype: str) -> nn.Module:
    cls = ELIGIBLE[type(mod)]
    new = cls.from_linear(mod, parts, dtype) if cls is TQLinear else cls(mod, parts, dtype)
    dev = mod.weight.device
    return new.to(dev) if dev.type != "cpu" else new


def resident_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers a module holds (each storage once)."""
    seen = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def load_module(module: nn.Module, path: Union[str, os.PathLike, bytes], *, transform_domain: bool = True,
                strict: bool = True, limits: Any = None) -> nn.Module:
    """Load a .tqz file into ``module`` in place and return it.

    With ``transform_domain`` every ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``/``nn.Embedding``
    (exact type, not subclasses; embeddings without ``max_norm``) whose weight is a ``tq`` tensor
    is replaced by a :class:`TQLinear` / :class:`TQConv1d` / :class:`TQConv2d` /
    :class:`TQEmbedding` holding the weight's integer stage; every other tensor
    of the module's ``state_dict`` is decoded and copied in densely (one at a time). Without it,
    everything is loaded densely (as ``module.load_state_dict(tqcodec.load(path))``).
    ``strict``: every key of the module's state_dict must be in the file and the file must hold
    no other tensor (``BAD_OPTION`` otherwise); shapes must match either way.
    ``path``: a path, bytes or URL (random access: only the module's tensors are read).
    """
    targets = module.state_dict(keep_vars=True)  # name -> the module's own tensor (no copies)
    with tqz_open(path, limits=limits or DEFAULT_LIMITS) as f:
        names = set(f.keys())
        missing = [k for k in targets if k not in names]
        extra = [k for k in f.keys() if k not in targets]
        if strict and (missing or extra):
            raise fail("BAD_OPTION", f"the file and the module differ: missing from the file {missing[:5]}"
                                     f"{'...' if len(missing) > 5 else ''}, not in the module {extra[:5]}"
                                     f"{'...' if len(extra) > 5 else ''}")
        swapped: dict[int, nn.Module] = {}
        done: set = set()
        if transform_domain:
            for mname, mod in module.named_modules():
                if not _eligible(mod) or id(mod) in swapped or mod is module:  # a bare layer: dense
                    continue
                wname = f"{mname}.weight" if mname else "weight"
                if wname not in names or wname not in targets:
                    continue
                info = f.info(wname)
                if info.mode not in ("tq", "alias"):
                    continue
                parts = f.get_parts(wname)
                if parts is None:
                    continue
                if tuple(info.shape) != tuple(mod.weight.shape):
                    raise fail("BAD_OPTION", f"{wname}: shape {list(info.shape)} in the file, "
                                             f"{list(mod.weight.shape)} in the module")
                dtype = f.info(wname).dtype
                swapped[id(mod)] = _swap(mod, parts, dtype)
                done.add(wname)
            if swapped:
                for _, parent in module.named_modules(remove_duplicate=False):
                    for cname, child in list(parent._modules.items()):
                        if child is not None and id(child) in swapped:
                            parent._modules[cname] = swapped[id(child)]
            for key in done:  # drop the dense weights replaced (swapped layers keep the bias parameters)
                targets.pop(key, None)
            swapped.clear()
        with torch.no_grad():
            for key, dst in targets.items():
                if key in done or key not in names or not isinstance(dst, torch.Tensor):
                    continue
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(dst.shape):
                    raise fail("BAD_OPTION", f"{key}: shape {list(t.shape)} in the file, {list(dst.shape)} "
                                             "in the module")
                dst.copy_(t)
    return module

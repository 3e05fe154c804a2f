"""Transform-domain inference layers: run a ``tq`` weight (spec §7.5) from its integer stage.

A swapped layer holds the weight's integer levels (per band, the narrowest of int8/int16/int32
that fits), one step per band and, if the tensor has one, the float16 synthesis transform S.
It never holds (or builds) the dense weight: with C the [k, c] coefficient matrix (band b: rows
``r_b ..``, ``C = step_b * L_b``) and R = C (no transform) or R = (S C)^T the [n, m] matrix of
the weight,

- Linear, ``out_in`` (W = R), no transform: ``y = x C^T``, band by band
  (``y[:, band] = step_b * (x @ L_b^T)``);
- Linear, ``out_in``, transform (W = C^T S^T): ``z = x S`` (project onto the k kept basis
  vectors), then ``y = z C = sum_b step_b * (z[:, band] @ L_b)``;
- Linear, ``in_out`` (W = R^T): ``y = x C`` (no transform) or ``y = (x C^T) S^T``;
- Embedding (row i of the weight: token i): the looked-up rows of C (no transform) or
  ``C[:, ids]^T S^T``; only those are widened to floats;
- Conv (``out_in``: row i of R is output channel i's filter), no transform: the convolution
  run on blocks of output channels whose filters are ``step_b * L`` (blocks whole groups or
  within one group); with a transform: ``z = conv(x, S^T as k filters per group)`` then the
  coefficients as a grouped 1x1 convolution (``y[:, group j] = C_j^T z[:, group j]``).

Levels are cast to the compute dtype in blocks of at most ``BLOCK_ELEMENTS`` while a forward
runs (transient; ``resident_bytes`` counts only what is held). Outputs equal a dense layer with
the decoded weight within float rounding (the transform case within spec §7.5.3's tolerance).
``state_dict()`` of a swapped layer gives the dense ``weight`` (built on demand, bit-identical
to ``tqcodec.load``), so it loads into the original, dense model.

    model = build_model()
    tqcodec.load_module(model, "model.tqz")          # tq layers swapped, the rest loaded densely
    tqcodec.load_module(model, "model.tqz", transform_domain=False)   # everything dense
"""
from __future__ import annotations

import os
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

__all__ = ["TQLinear", "TQConv1d", "TQConv2d", "TQEmbedding", "load_module", "resident_bytes", "ELIGIBLE"]

BLOCK_ELEMENTS = 1 << 20  # levels cast to the compute dtype at a time (4 MiB in float32)


class _TQBase(nn.Module):
    """The integer stage of one ``tq`` weight: ``levels_<b>`` buffers, steps, transform."""

    def _init_tq(self, parts: dict, dtype: str, shape: tuple) -> None:
        self.weight_dtype = dtype  # the stored tensor's dtype (spec §5.5 name)
        self.weight_shape = tuple(int(d) for d in shape)
        self.layout = parts["layout"]
        self.n, self.m, self.k = int(parts["n"]), int(parts["m"]), int(parts["k"])
        self.band_rows = [int(r) for r in parts["band_rows"]]
        self.band_steps = [float(s) for s in parts["steps"]]  # exact dyadic steps, as Python floats
        self.num_bands = len(self.band_rows)
        for b, lv in enumerate(parts["levels"]):
            self.register_buffer(f"levels_{b}", torch.from_numpy(np.ascontiguousarray(lv)), persistent=False)
        s = parts["transform"]
        self.register_buffer("transform", None if s is None else torch.from_numpy(np.array(s, copy=True)),
                             persistent=False)

    def _levels(self, b: int) -> torch.Tensor:
        return getattr(self, f"levels_{b}")

    def _blocks(self, max_rows_for: Any = None):
        """(row0, row1, step, levels block) over every band, blocks of <= BLOCK_ELEMENTS levels
        (``max_rows_for(r0, r1, rows)`` may cut differently: conv group boundaries)."""
        r0 = 0
        for b, rows in enumerate(self.band_rows):
            lv = self._levels(b)
            cols = lv.shape[1]
            per = max(1, BLOCK_ELEMENTS // max(cols, 1))
            a = 0
            while a < rows:
                e = min(rows, a + per) if max_rows_for is None else max_rows_for(r0 + a, r0 + rows, per) - r0
                yield r0 + a, r0 + e, self.band_steps[b], lv[a:e]
                a = e
            r0 += rows

    # --- the two contractions with C --------------------------------------------------------
    def _x_ct(self, x2: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x2 [N, c] -> x2 @ C^T (+ bias) [N, k]. Each block of C = step * levels is exact in the
        compute dtype (spec §7.5.3 step 2), so a layer in one block computes as F.linear does."""
        out = None
        for a, e, step, blk in self._blocks():
            c = _scaled(blk, step, x2.dtype)
            b = None if bias is None else bias[a:e]
            if a == 0 and e == self.k:
                return F.linear(x2, c, b)
            if out is None:
                out = x2.new_empty(x2.shape[0], self.k)
            out[:, a:e] = F.linear(x2, c, b)
        return out

    def _z_c(self, z: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z [N, k] -> z @ C (+ bias) [N, c]."""
        out = None
        for a, e, step, blk in self._blocks():
            c = _scaled(blk, step, z.dtype)
            if out is None:
                out = torch.mm(z[:, a:e], c) if bias is None else torch.addmm(bias, z[:, a:e], c)
            else:
                out.addmm_(z[:, a:e], c)
        return out

    def _s(self, dtype: torch.dtype) -> torch.Tensor:
        return self.transform.to(dtype)  # float16 -> wider: exact

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


def _scaled(levels: torch.Tensor, step: float, dtype: torch.dtype) -> torch.Tensor:
    """step * levels in ``dtype``, one pass (exact: spec §7.5.3 step 2)."""
    return levels.to(dtype).mul_(step)


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
        lead, dtype = x.shape[:-1], x.dtype
        x2 = _compute(x).reshape(-1, x.shape[-1])
        b = None if self.bias is None else self.bias.to(x2.dtype)
        if self.layout == "out_in":
            y = self._x_ct(x2, b) if self.transform is None else self._z_c(torch.mm(x2, self._s(x2.dtype)), b)
        else:
            y = self._z_c(x2, b) if self.transform is None else F.linear(self._x_ct(x2), self._s(x2.dtype), b)
        return y.reshape(*lead, self.out_features).to(dtype)

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

    def _conv(self, x, w, groups, padding):
        f = F.conv1d if self._dims == 1 else F.conv2d
        return f(x, w, None, self.stride, padding, self.dilation, groups)

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
        if self.transform is None:
            pieces = []
            for a, e, step, blk in self._blocks(self._group_cut):
                ga, gb = a // opg, (e - 1) // opg
                w = _scaled(blk, step, dt).reshape(e - a, ipg, *ks)
                pieces.append(self._conv(x[:, ga * ipg:(gb + 1) * ipg], w, gb - ga + 1, padding))
            y = torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0]
        else:
            k = self.k
            filt = self._s(dt).T.reshape(k, ipg, *ks)  # basis vector r as a filter
            if g > 1:
                filt = filt.repeat(g, *([1] * (1 + len(ks))))
            z = self._conv(x, filt, g, padding)  # [N, g*k, *out]
            sp = z.shape[2:]
            z = z.reshape(z.shape[0], g, k, -1)
            y = None
            for a, e, step, blk in self._blocks():
                t = torch.einsum("ngrp,rgo->ngop", z[:, :, a:e], _scaled(blk, step, dt).reshape(e - a, g, opg))
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
        starts = np.cumsum([0] + self.band_rows)
        self._starts = [int(v) for v in starts]

    def _c_rows(self, ids: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of C, [N, c]."""
        if self.num_bands == 1:
            return _scaled(self._levels(0).index_select(0, ids), self.band_steps[0], dt)
        srt, order = torch.sort(ids)  # ids grouped by band: one contiguous run per band
        cuts = torch.searchsorted(srt, torch.tensor(self._starts, device=ids.device)).tolist()
        out = torch.empty(ids.numel(), self._levels(0).shape[1], dtype=dt, device=ids.device)
        for b in range(self.num_bands):
            a, e = cuts[b], cuts[b + 1]
            if e > a:
                rows = self._levels(b).index_select(0, srt[a:e] - self._starts[b])
                out.index_copy_(0, order[a:e], _scaled(rows, self.band_steps[b], dt))
        return out

    def _c_cols(self, ids: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """Columns ``ids`` of C, [k, N]."""
        return torch.cat([_scaled(self._levels(b).index_select(1, ids), self.band_steps[b], dt) for b in range(self.num_bands)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"index out of range in self (num_embeddings={self.num_embeddings})")
        dt = torch.float32 if self.weight_dtype != "float64" else torch.float64
        if self.layout == "out_in":
            e = self._c_rows(flat, dt) if self.transform is None else self._c_cols(flat, dt).T @ self._s(dt).T
        else:
            e = self._c_cols(flat, dt).T if self.transform is None else self._z_c(self.transform.index_select(0, flat).to(dt))
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

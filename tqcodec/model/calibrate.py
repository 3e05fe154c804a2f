"""Calibration statistics for the ``tq`` encoder (spec §7.5 is the mode; this is encoder-only).

``calibrate(module, batches)`` runs the module on calibration inputs with forward hooks and
collects, per weight name of ``module.state_dict()``, the :class:`~tqcodec.model.stats.TensorStats`
the encoder reads (their meaning and file format: ``tqcodec.model.stats``):

- ``nn.Linear`` (and Hugging Face ``Conv1D``, layout ``in_out``): kind ``linear``, H = E[x x^T]
  of the input vectors, [1, in, in];
- ``nn.Conv1d/2d/3d``: kind ``conv``, H over im2col rows (padding modes, ``same``, strides and
  dilations as the conv applies them), matching the weight flattened as [out, in/groups * k...];
  grouped and depthwise convs keep one H per group ([groups, d, d]);
- ``nn.ConvTranspose1d/2d/3d`` (weight [in, out/groups, k...]: its rows are input channels):
  kind ``rows``, ``row_h`` [in] = E[x_c^2] of each input channel, and when ``groups == 1``
  ``h`` [1, in, in] = E[x x^T] over the input channels (x: one input position's channels);
- ``nn.LSTM``, ``nn.GRU``, ``nn.RNN``: ``weight_ih_l{k}[_reverse]`` kind ``linear`` with H of
  layer k's input sequence; ``weight_hh_l{k}[_reverse]`` with H of that direction's previous
  hidden states h_{t-1} (the initial state included); the gates share it. The layer inputs and
  hidden sequences are recomputed in a forward hook from the module's own weights (uni- and
  bidirectional, batch_first or not, unbatched, packed sequences). LSTM projections
  (``weight_hr``) get no H;
- ``nn.MultiheadAttention``: ``in_proj_weight`` [3E, E] kind ``linear`` with h [3, E, E] (the
  query, key and value inputs; identical for self-attention); separate ``q/k/v_proj_weight``
  each their own input; ``out_proj.weight`` the attention output before ``out_proj``
  (recomputed: MHA never calls ``out_proj``'s forward). Keys masked by ``key_padding_mask``
  are left out of the key and value groups (and, for self-attention, of all of them);
- ``nn.Embedding``: kind ``embedding``, token counts (how often each row was used); with the
  ``probe`` gains also ``h`` [1, d, d], the second moment of the output gradient its looked-up
  rows receive, scaled to a mean diagonal of 1 (which directions of a row's error the rest of the
  model passes on: a LayerNorm after it, for one, drops the row's mean).

Other tensors get no statistics (the encoder decides). With ``sensitivity=True`` every float
parameter also gets a *gain* (see :func:`calibrate`). A small set of images or token sequences is
followed by views of it, shifted or spliced (``tqcodec.model.views``), whose tokens are not counted.

Degenerate inputs: all-zero inputs give H = 0, dead channels zero rows and columns, a single
sample a rank-one H. NaN or Inf in a layer's input or in the module's output is refused with a
``TqzError`` (``BAD_INPUT``) naming the layer and the batch; so is a forward that fails.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ..errors import TqzError, fail
from ..processes import trim_malloc
from .stats import LAYOUTS, Stats, TensorStats, local_distortion, share_identical
from .views import with_views

__all__ = ["calibrate", "calibrate_folder", "output_tensors", "conv_rows", "Stats", "TensorStats",
           "local_distortion", "LAYOUTS", "SENSITIVITY_METHODS"]

SENSITIVITY_METHODS = ("probe", "perturb")
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
RNN_FUNCTIONS = {"LSTM": torch.lstm, "GRU": torch.gru, "RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu}


# --- accumulators ---------------------------------------------------------------------------------

PRODUCTS_KEPT = 4  # a batch's products kept for layers that read the same input, the latest ones: those
# layers run one after another (query, key and value; gate and up). Keeping every product of the batch
# held another copy of the statistics until the next batch: 3.8 GB of a 604M-parameter Llama's.
FLOAT32_PRODUCT_DIM = 1024  # a batch's x^T x over inputs of at least this many dimensions is taken in
FLOAT32_PRODUCT_MAX = 1e15  # float32 when every |x| is below this (squares summed over a batch stay far
# from float32's 3.4e38), else in float64, and summed over batches in float32 too (until a float64
# product comes). Its cost is d^2 a token, the forward pass's d a token and weight: for wide inputs the
# products outweigh the model, and the sums held through the batches are most of calibration's memory
# (3.9 GB of a 604M-parameter Llama's in float64). The file keeps H as float16 correlations or float16
# eigenvectors: float32's 1e-7 a sum is far below that. Smaller inputs keep exact float64 products and
# sums. Their H stays float32 (``_Acc.result``).


def _product_dtype(rows: torch.Tensor, d: int) -> torch.dtype:
    """float32 for a batch's second moments of ``rows`` (float32 or narrower) of inputs of ``d``
    dimensions, d at least ``FLOAT32_PRODUCT_DIM`` and every entry below ``FLOAT32_PRODUCT_MAX`` in
    magnitude (NaN and Inf are refused after, either way), else float64."""
    if rows.dtype == torch.float64 or not rows.numel() or d < FLOAT32_PRODUCT_DIM:
        return torch.float64
    return torch.float32 if not bool(rows.abs().max() > FLOAT32_PRODUCT_MAX) else torch.float64


SYMMETRIZE_BLOCK = 512  # rows and columns of H averaged with their transpose at a time


def symmetrize(h: np.ndarray) -> None:
    """``h`` [d, d] made exactly symmetric in place, ``(h + h.T) / 2`` block by block (the same
    values as that expression, without its two d x d temporaries)."""
    d, step = h.shape[0], SYMMETRIZE_BLOCK
    for i in range(0, d, step):
        for j in range(i, d, step):
            mean = (h[i:i + step, j:j + step] + h[j:j + step, i:i + step].T) / 2
            h[i:i + step, j:j + step] = mean
            h[j:j + step, i:i + step] = mean.T


class _Sums:
    """Sums of x x^T (float64; float32 for inputs of ``FLOAT32_PRODUCT_DIM`` or more dimensions) and
    of x (float64) per row group that ``members`` accumulators hold in common:
    layers that read one input (query, key and value; gate and up) take the same products in the
    same order, so they keep one array, not one each (1.1 of the 5.0 GB of a 604M-parameter
    Llama's). An accumulator that takes a product the others do not gets its own copy first."""

    def __init__(self, groups: int, d: int, members: int, dtype: np.dtype):
        self.h, self.sum = np.zeros((groups, d, d), dtype=dtype), np.zeros((groups, d))
        self.members = members
        self.made: Optional[tuple[np.ndarray, np.ndarray]] = None  # (H, mean), once divided

    def split(self, takers: int) -> "_Sums":
        """Sums for ``takers`` of the members that are about to take a product the rest do not:
        these sums when all take it, else a copy for them."""
        if takers == self.members:
            return self
        self.members -= takers
        copy = _Sums.__new__(_Sums)
        copy.h, copy.sum, copy.members, copy.made = self.h.copy(), self.sum.copy(), takers, None
        return copy


def _take_product(part: tuple[np.ndarray, np.ndarray], takers: list["_Acc"], group: Optional[int]) -> None:
    """Add one product (x^T x and x summed, per group) to the sums of each of ``takers`` (each at
    most once), once per distinct sums: accumulators whose sums are shared all take it or get
    their own copy; those with none yet start one sums in common."""
    hh, ss = part
    fresh = [a for a in takers if a.sums is None]
    if fresh:
        start = _Sums(len(fresh[0].n), hh.shape[-1], 0, hh.dtype)
        for a in fresh:
            a.sums = start
            start.members += 1
    by_sums: dict[int, list[_Acc]] = {}
    for a in takers:
        by_sums.setdefault(id(a.sums), []).append(a)
    for accs in by_sums.values():
        sums = accs[0].sums.split(len(accs))
        for a in accs:
            a.sums = sums
        if sums.h.dtype != hh.dtype and hh.dtype == np.float64:
            sums.h = sums.h.astype(np.float64)  # an input of float32-sized squares no more
        if group is None:
            sums.h += hh
            sums.sum += ss
        else:
            sums.h[group] += hh[0]
            sums.sum[group] += ss[0]


class _Acc:
    """Sums of x x^T and x per row group (:class:`_Sums`), at most ``cap`` samples per
    group; ``label`` names what the samples are in an error (NaN or Inf in them)."""

    def __init__(self, kind: str, groups: int, cap: int, label: str, batch: "_Batch", layout: str = "out_in"):
        self.kind, self.groups, self.cap, self.layout = kind, groups, cap, layout
        self.label, self.batch = label, batch
        self.sums: Optional[_Sums] = None
        self.pending = False  # a product taken but not yet added (``_Batch.flush``)
        self.n = [0] * groups

    def add(self, rows: torch.Tensor, group: Optional[int] = None, cache: Optional[dict] = None,
            source: Optional[torch.Tensor] = None) -> None:
        """Add ``rows`` [N, groups*d] to every group, or [N, d] to ``group`` only. ``cache`` (one
        per batch) shares the products between layers whose rows come from the same input tensor
        ``source`` (e.g. query, key and value); it holds ``source`` so that its memory cannot be
        reused meanwhile. Such a product is added when it leaves the cache or the batch ends
        (``_Batch.flush``), once for the layers that share their sums."""
        take = min(len(rows), self.cap - self.n[0 if group is None else group])
        if take <= 0:
            return
        parts = self.groups if group is None else 1
        key = None
        if cache is not None and source is not None:
            key = (source.data_ptr(), tuple(source.shape), tuple(source.stride()), source._version,
                   take, parts, rows.shape[-1])
        hit = cache.get(key) if key is not None else None
        entry = hit if hit is not None and hit[0] is source else None
        if entry is None:
            r = rows[:take].detach()
            r = r.to(_product_dtype(r, r.shape[-1] // parts))
            rg = r.reshape(take, parts, -1).transpose(0, 1)  # [parts, N, d]
            part = (torch.bmm(rg.transpose(1, 2), rg).numpy(), rg.sum(dim=1, dtype=torch.float64).numpy())
            entry = [source, part, []]
        hh, ss = entry[1]
        if not (np.isfinite(ss).all() and np.isfinite(np.diagonal(hh, axis1=1, axis2=2)).all()):
            _refuse(self.batch, self.label)  # x finite <=> every x_i^2 in diag(x^T x) finite
        if self.pending:
            self.batch.flush()  # this accumulator's products are added in the order it took them
        if group is None:
            self.n = [c + take for c in self.n]
        else:
            self.n[group] += take
        if key is not None and entry is not hit:  # a new product, kept for the layers after
            if hit is not None:
                self.batch.flush_entry(hit)  # of a tensor whose memory ``source`` now holds
            cache[key] = entry
            while len(cache) > PRODUCTS_KEPT:
                self.batch.flush_entry(cache.pop(next(iter(cache))))  # the oldest (dicts keep insertion order)
        if key is None or group is not None:
            _take_product(entry[1], [self], group)
        else:
            entry[2].append(self)
            self.pending = True

    def result(self) -> Optional[TensorStats]:
        """The statistics, made in the sums' own memory (once for accumulators that share them):
        the accumulator is spent (a second copy of every H, 5 GB of a 604M-parameter Llama's, is
        what calibrating such a model peaked on). H summed in float32 stays float32: each group
        divided and symmetrized in float64, then rounded (the statistics of a 604M-parameter
        Llama held 3.9 GB of float64 H after its batches, the file keeps float16)."""
        sums, self.sums = self.sums, None
        if sums is None or max(self.n) == 0:
            return None
        if sums.made is None:
            n = np.maximum(np.asarray(self.n, dtype=np.float64), 1.0)
            h, mean = sums.h, sums.sum / n[:, None]
            sums.h = sums.sum = None
            for g in range(h.shape[0]):
                if h.dtype == np.float64:
                    h[g] /= n[g]
                    symmetrize(h[g])
                else:
                    made = h[g] / n[g]  # float64 (n is), one group at a time
                    symmetrize(made)
                    h[g] = made
            sums.made = (h, mean)
        h, mean = sums.made
        return TensorStats(self.kind, h, None, min(self.n), self.layout, mean=mean)


class _RowAcc:
    """Sums of x_c^2 per input channel (kind ``rows``), at most ``cap`` samples; with ``full``
    also of x x^T over the channels (``h`` [1, channels, channels]: the error-feedback rounding
    of a transposed convolution's weight along its input channels, tq.encoder)."""

    def __init__(self, channels: int, cap: int, label: str, batch: "_Batch", full: bool = False):
        self.sq = np.zeros(channels)
        self.xx = np.zeros((channels, channels)) if full else None
        self.sum = np.zeros(channels)
        self.n, self.cap = 0, cap
        self.label, self.batch = label, batch

    def add(self, x: torch.Tensor) -> None:
        """``x`` [samples, channels]."""
        take = min(len(x), self.cap - self.n)
        if take <= 0:
            return
        r = x[:take].detach().to(torch.float64)
        part = r.pow(2).sum(dim=0).numpy()
        if not np.isfinite(part).all():
            _refuse(self.batch, self.label)
        self.sq += part
        if self.xx is not None:
            self.xx += (r.T @ r).numpy()
            self.sum += r.sum(dim=0).numpy()
        self.n += take

    def result(self) -> Optional[TensorStats]:
        if self.n == 0:
            return None
        h = mean = None
        if self.xx is not None:
            h = self.xx / self.n
            symmetrize(h)
            h = h[None]
            mean = (self.sum / self.n)[None]
        return TensorStats("rows", h=h, rows=self.n, mean=mean, row_h=self.sq / self.n)


class _CountAcc:
    """Token counts of an embedding."""

    def __init__(self, num: int):
        self.counts = np.zeros(num, dtype=np.float64)
        self.n = 0

    def add(self, idx: torch.Tensor) -> None:
        i = idx.reshape(-1).cpu().numpy().astype(np.int64)
        self.counts += np.bincount(i, minlength=len(self.counts))[:len(self.counts)]
        self.n += i.size

    def result(self) -> Optional[TensorStats]:
        return TensorStats("embedding", None, self.counts, self.n)


# --- hooks ------------------------------------------------------------------------------------

class _Batch:
    """What the hooks need to know about the current batch (and ``looked_up``: what they saw of
    it, each embedding's outputs on a probe batch)."""

    def __init__(self) -> None:
        self.index = 0
        self.mask: Optional[torch.Tensor] = None
        self.cache: dict = {}
        self.looked_up: dict[str, list[torch.Tensor]] = {}
        self.view = False  # a view of the calibration inputs (``tqcodec.model.views``), not one of them

    def flush_entry(self, entry: list) -> None:
        """Add a cached product ``[source, part, takers]`` to the sums of the accumulators that
        took it since it was last added."""
        takers, entry[2] = entry[2], []
        for acc in takers:
            acc.pending = False
        if takers:
            _take_product(entry[1], takers, None)

    def flush(self) -> None:
        """Add every product taken and not yet added (each accumulator waits on at most one)."""
        for entry in self.cache.values():
            self.flush_entry(entry)

    def start(self, index: int, mask: Optional[torch.Tensor], view: bool) -> None:
        """The next batch: the last one's products added, its cache and lookups dropped."""
        self.flush()
        self.index, self.mask, self.view = index, mask, view
        self.cache, self.looked_up = {}, {}


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _check(x: Any, batch: _Batch, what: str) -> None:
    """Refuse NaN or Inf anywhere in ``x`` (also where the samples cap leaves it unread): one
    float64 sum, which no finite float32 values overflow and any NaN or Inf makes non-finite."""
    if isinstance(x, PackedSequence):
        x = x.data
    if isinstance(x, (tuple, list)):  # an LSTM's (h0, c0)
        for t in x:
            _check(t, batch, what)
    elif isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
        if not math.isfinite(float(x.detach().sum(dtype=torch.float64))):
            _refuse(batch, what)


def _refuse(batch: _Batch, what: str) -> None:
    raise fail("BAD_INPUT", f"calibration batch {batch.index}: {what} holds NaN or Inf "
                            "(statistics need finite activations)")


def _layer(mname: str, mod: nn.Module) -> str:
    return f"the input of {mname or 'the module'} ({type(mod).__name__})"


def _select(x: torch.Tensor, mask: Optional[torch.Tensor], min_dim: int = 3) -> torch.Tensor:
    """Rows of ``x`` [batch, tokens, ...] at unmasked positions (all rows when the shapes differ;
    ``min_dim`` 3 for features, 2 for token ids)."""
    if mask is not None and x.dim() >= min_dim and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    return x


def _conv_padding(mod: nn.Module, nd: int) -> list[int]:
    """F.pad's padding (last spatial dim first, left then right) the conv applies, ``same`` included."""
    k, d = mod.kernel_size, mod.dilation
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            pads = [(0, 0)] * nd
        else:  # same: as torch splits it (the extra pixel on the right)
            pads = [(dd * (kk - 1) // 2, dd * (kk - 1) - dd * (kk - 1) // 2) for dd, kk in zip(d, k)]
    else:
        pads = [(p, p) for p in mod.padding]
    out: list[int] = []
    for lo, hi in reversed(pads):
        out += [lo, hi]
    return out


def conv_rows(mod: nn.Module, x: torch.Tensor, items: Optional[int] = None) -> torch.Tensor:
    """im2col rows [N * positions, in * prod(kernel)] of a Conv1d/2d/3d input (channel-major, as
    the weight flattens), for the first ``items`` batch items (all when None)."""
    nd = len(mod.kernel_size)
    if x.dim() == nd + 1:  # unbatched
        x = x.unsqueeze(0)
    if items is not None:
        x = x[:items]
    pad = _conv_padding(mod, nd)
    if any(pad):
        x = F.pad(x, pad, mode="constant" if mod.padding_mode == "zeros" else mod.padding_mode)
    for i in range(nd):
        k, s, d = mod.kernel_size[i], mod.stride[i], mod.dilation[i]
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
    b, c = x.shape[:2]
    perm = [0] + list(range(2, 2 + nd)) + [1] + list(range(2 + nd, 2 + 2 * nd))
    return x.permute(perm).reshape(-1, c * math.prod(mod.kernel_size))


def _rnn_layers(mod: nn.RNNBase, args: tuple, kwargs: dict) -> Iterator[tuple[int, torch.Tensor, dict]]:
    """Per layer k of an RNN module's call: (k, the layer's input rows [N, in_k], {direction:
    previous hidden states [N, H]}), recomputed with torch's own RNN functions, one layer at a time."""
    x, hx = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "hx")
    dirs = 2 if mod.bidirectional else 1
    proj = getattr(mod, "proj_size", 0) or 0
    hout = proj if proj > 0 else mod.hidden_size
    lstm = mod.mode == "LSTM"
    packed = isinstance(x, PackedSequence)
    if packed:
        data, batch_sizes, sorted_idx = x.data, x.batch_sizes, x.sorted_indices
        b = int(batch_sizes[0])
        if hx is not None and sorted_idx is not None:
            hx = tuple(h.index_select(1, sorted_idx) for h in hx) if lstm else hx.index_select(1, sorted_idx)
        lengths = (batch_sizes[None, :] > torch.arange(b)[:, None]).sum(dim=1)  # [b], sorted order
        seq, steps = data, int(len(batch_sizes))
    else:
        if x.dim() == 2:  # unbatched [T, F]
            x = x.unsqueeze(1)
            if hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
        elif mod.batch_first:
            x = x.transpose(0, 1)
        seq, steps, b = x, x.shape[0], x.shape[1]
        lengths = torch.full((b,), steps)
    if hx is None:
        h0 = torch.zeros(mod.num_layers * dirs, b, hout, dtype=seq.dtype, device=seq.device)
        c0 = torch.zeros(mod.num_layers * dirs, b, mod.hidden_size, dtype=seq.dtype, device=seq.device)
    else:
        h0, c0 = hx if lstm else (hx, None)
    fn = RNN_FUNCTIONS[mod.mode]
    t = torch.arange(steps)[:, None]
    for k in range(mod.num_layers):
        params = []
        for d in range(dirs):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            params += [getattr(mod, f"weight_ih{sfx}"), getattr(mod, f"weight_hh{sfx}")]
            if mod.bias:
                params += [getattr(mod, f"bias_ih{sfx}"), getattr(mod, f"bias_hh{sfx}")]
            if proj > 0:
                params.append(getattr(mod, f"weight_hr{sfx}"))
        hk = h0[k * dirs:(k + 1) * dirs]
        state = (hk, c0[k * dirs:(k + 1) * dirs]) if lstm else hk
        if packed:
            out = fn(seq, batch_sizes, state, params, mod.bias, 1, 0.0, False, dirs == 2)[0]
            padded, _ = pad_packed_sequence(PackedSequence(out, batch_sizes))  # [T, b, dirs*hout]
        else:
            out = fn(seq, state, params, mod.bias, 1, 0.0, False, dirs == 2, False)[0]
            padded = out
        prev = {}
        for d in range(dirs):
            o = padded[..., d * hout:(d + 1) * hout]
            # forward: the states after steps 0..len-2 precede steps 1..len-1; reverse: 1..len-1
            keep = (t < lengths[None, :] - 1) if d == 0 else ((t >= 1) & (t < lengths[None, :]))
            prev[d] = torch.cat([hk[d], o[keep]])
        yield k, seq.reshape(-1, seq.shape[-1]), prev
        seq = out


def _key_keep(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Positions a key_padding_mask [B, S] keeps (bool True or float -inf: ignored)."""
    if mask is None:
        return None
    return ~mask if mask.dtype == torch.bool else ~torch.isneginf(mask)


def _mha_inputs(m: nn.MultiheadAttention, args: tuple, kwargs: dict):
    """(query, key, value [L, B, E] time-major, bound arguments, keep masks [S, B] or None)."""
    bound = inspect.signature(m.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    q, k, v = a["query"], a["key"], a["value"]
    self_attention = q is k and k is v
    if q.dim() == 3 and m.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    keep = _key_keep(a.get("key_padding_mask"))
    if keep is not None:
        keep = keep.T if keep.dim() == 2 else keep[:, None]  # [S, B]
    return q, k, v, a, keep, self_attention


def _rows_of(t: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows [N, E] of a time-major [S, B, E] (or unbatched [S, E]) tensor at kept positions."""
    if keep is not None:
        t3 = t if t.dim() == 3 else t[:, None]
        if tuple(t3.shape[:2]) == tuple(keep.shape):
            return t3[keep]
    return t.reshape(-1, t.shape[-1])


def _mha_pre_out(m: nn.MultiheadAttention, q, k, v, a: Mapping) -> torch.Tensor:
    """The attention output before ``out_proj`` (the same call with an identity out_proj)."""
    e = m.embed_dim
    eye = torch.eye(e, dtype=q.dtype, device=q.device)
    separate = m.in_proj_weight is None
    out, _ = F.multi_head_attention_forward(
        q, k, v, e, m.num_heads, m.in_proj_weight, m.in_proj_bias, m.bias_k, m.bias_v, m.add_zero_attn, 0.0,
        eye, None, training=False, key_padding_mask=a.get("key_padding_mask"), need_weights=False,
        attn_mask=a.get("attn_mask"), use_separate_proj_weight=separate,
        q_proj_weight=m.q_proj_weight if separate else None, k_proj_weight=m.k_proj_weight if separate else None,
        v_proj_weight=m.v_proj_weight if separate else None, is_causal=bool(a.get("is_causal", False)))
    return out


def _is_hf_conv1d(mod: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is stored [in, out]."""
    w = getattr(mod, "weight", None)
    return (type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and isinstance(w, torch.Tensor)
            and w.dim() == 2 and w.shape[1] == mod.nf)


class _Collector:
    """Hooks on every supported layer of a module; ``accs`` maps weight names to accumulators."""

    def __init__(self, module: nn.Module, cap: int):
        self.batch = _Batch()
        self.accs: dict[str, Any] = {}
        self.hooks: list = []
        self.cap = cap
        self.sd = sd = set(module.state_dict(keep_vars=True).keys())
        claimed: set[int] = set()
        for mname, mod in module.named_modules():
            prefix = f"{mname}." if mname else ""

            def name(p: str) -> Optional[str]:
                w = getattr(mod, p, None)
                if not isinstance(w, torch.Tensor) or isinstance(w, nn.parameter.UninitializedParameter):
                    return None
                n = prefix + p
                return n if n in sd and n not in self.accs else None
            if id(mod) in claimed:
                continue
            if isinstance(mod, nn.MultiheadAttention):
                claimed.add(id(mod.out_proj))
                self._mha(mname, mod, name, prefix)
            elif isinstance(mod, nn.RNNBase) and mod.mode in RNN_FUNCTIONS:
                self._rnn(mname, mod, name)
            elif isinstance(mod, nn.Linear) and name("weight"):
                self._linear(mname, mod, name("weight"), "out_in")
            elif _is_hf_conv1d(mod) and name("weight"):
                self._linear(mname, mod, name("weight"), "in_out")
            elif isinstance(mod, CONVS) and name("weight"):
                self._conv(mname, mod, name("weight"))
            elif isinstance(mod, TRANSPOSED) and name("weight"):
                self._transposed(mname, mod, name("weight"))
            elif isinstance(mod, nn.Embedding) and name("weight"):
                self._embedding(mname, mod, name("weight"))

    def _hook(self, mod: nn.Module, fn: Callable) -> None:
        self.hooks.append(mod.register_forward_hook(fn, with_kwargs=True))

    def _linear(self, mname: str, mod: nn.Module, wname: str, layout: str) -> None:
        b = self.batch
        acc = self.accs[wname] = _Acc("linear", 1, self.cap, _layer(mname, mod), b, layout)

        def hook(m, args, kwargs, out):
            x = _arg(args, kwargs, 0, "input")
            _check(x, b, acc.label)
            rows = _select(x.detach(), b.mask).reshape(-1, x.shape[-1])
            acc.add(rows, cache=b.cache, source=x)
        self._hook(mod, hook)

    def _conv(self, mname: str, mod: nn.Module, wname: str) -> None:
        acc = self.accs[wname] = _Acc("conv", mod.groups, self.cap, _layer(mname, mod), self.batch)
        nd = len(mod.kernel_size)

        def hook(m, args, kwargs, out):
            x = _arg(args, kwargs, 0, "input")
            _check(x, acc.batch, acc.label)
            positions = math.prod(out.shape[-nd:])
            left = self.cap - acc.n[0]
            if left <= 0 or positions == 0:
                return
            with torch.no_grad():
                acc.add(conv_rows(m, x.detach(), -(-left // positions)))
        self._hook(mod, hook)

    def _transposed(self, mname: str, mod: nn.Module, wname: str) -> None:
        acc = self.accs[wname] = _RowAcc(mod.in_channels, self.cap, _layer(mname, mod), self.batch,
                                         full=mod.groups == 1)
        nd = len(mod.kernel_size)

        def hook(m, args, kwargs, out):
            x = _arg(args, kwargs, 0, "input")
            _check(x, acc.batch, acc.label)
            if x.dim() == nd + 1:
                x = x.unsqueeze(0)
            acc.add(x.detach().transpose(0, 1).reshape(x.shape[1], -1).T)  # [B * positions, in]
        self._hook(mod, hook)

    def _embedding(self, mname: str, mod: nn.Module, wname: str) -> None:
        acc = self.accs[wname] = _CountAcc(mod.num_embeddings)
        b = self.batch

        def hook(m, args, kwargs, out):
            if not b.view:  # a view's tokens are the sample's again: the counts say how often text uses each
                acc.add(_select(_arg(args, kwargs, 0, "input"), b.mask, 2))
            if isinstance(out, torch.Tensor) and out.requires_grad:  # a probe batch: its column metric
                b.looked_up.setdefault(wname, []).append(out)
        self._hook(mod, hook)

    def _rnn(self, mname: str, mod: nn.RNNBase, name: Callable) -> None:
        dirs = 2 if mod.bidirectional else 1
        ih: dict[int, _Acc] = {}
        hh: dict[tuple[int, int], _Acc] = {}
        for k in range(mod.num_layers):
            where = f"of layer {k} of {mname or 'the module'} ({type(mod).__name__})"
            acc = _Acc("linear", 1, self.cap, f"the input {where}", self.batch)  # both directions read it
            for d in range(dirs):
                sfx = f"_l{k}" + ("_reverse" if d else "")
                wi, wh = name(f"weight_ih{sfx}"), name(f"weight_hh{sfx}")
                if wi:
                    self.accs[wi] = ih[k] = acc
                if wh:
                    self.accs[wh] = hh[(k, d)] = _Acc("linear", 1, self.cap, f"a hidden state {where}", self.batch)
        if not ih and not hh:
            return

        label = _layer(mname, mod)

        def hook(m, args, kwargs, out):
            _check(_arg(args, kwargs, 0, "input"), self.batch, label)
            _check(_arg(args, kwargs, 1, "hx"), self.batch, f"the initial state of {label[len('the input of '):]}")
            with torch.no_grad():
                for k, rows, prev in _rnn_layers(m, args, kwargs):
                    if k in ih:
                        ih[k].add(rows)
                    for d, states in prev.items():
                        if (k, d) in hh:
                            hh[(k, d)].add(states)
        self._hook(mod, hook)

    def _mha(self, mname: str, mod: nn.MultiheadAttention, name: Callable, prefix: str) -> None:
        packed = name("in_proj_weight")
        qkv = [name(p) for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight")] if not packed else []
        out_w = prefix + "out_proj.weight"
        where = f"{mname or 'the module'} ({type(mod).__name__})"
        b = self.batch
        out_acc = None
        if out_w in self.sd and out_w not in self.accs:
            out_acc = self.accs[out_w] = _Acc("linear", 1, self.cap, f"the attention output of {where}", b)
        in_acc = _Acc("linear", 3, self.cap, f"the query, key or value of {where}", b) if packed else None
        if packed:
            self.accs[packed] = in_acc
        sep = [None if n is None else _Acc("linear", 1, self.cap, f"the {role} of {where}", b)
               for n, role in zip(qkv, ("query", "key", "value"))]
        for n, acc in zip(qkv, sep):
            if n is not None:
                self.accs[n] = acc

        def hook(m, args, kwargs, out):
            q, k, v, a, keep, self_attention = _mha_inputs(m, args, kwargs)
            for t, role in ((q, "query"), (k, "key"), (v, "value")):
                _check(t, b, f"the {role} of {where}")
            qkeep = keep if self_attention else None
            rows = [_rows_of(q.detach(), qkeep), _rows_of(k.detach(), keep), _rows_of(v.detach(), keep)]
            src = [q, k, v]
            for g in range(3):
                if in_acc is not None:
                    in_acc.add(rows[g], group=g, cache=b.cache, source=src[g])
                elif sep[g] is not None:
                    sep[g].add(rows[g])
            if out_acc is not None:
                with torch.no_grad():
                    pre = _mha_pre_out(m, q.detach(), k.detach(), v.detach(), a)
                out_acc.add(_rows_of(pre, qkeep))
        self._hook(mod, hook)

    def remove(self) -> None:
        self.batch.flush()
        self.batch.cache, self.batch.looked_up = {}, {}
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def stats(self) -> dict[str, TensorStats]:
        """Each weight's statistics; the accumulators are spent. Weights that one accumulator
        serves (an RNN layer's input weights of both directions) get their own record of its arrays."""
        self.batch.flush()  # the last products taken, not yet added
        out: dict[str, TensorStats] = {}
        made: dict[int, Optional[TensorStats]] = {}
        for wname, acc in self.accs.items():
            first = id(acc) not in made
            if first:
                made[id(acc)] = acc.result()
            st = made[id(acc)]
            if st is not None:
                out[wname] = st if first else dataclasses.replace(st)
        share_identical(out)
        return out


# --- outputs ----------------------------------------------------------------------------------------

MAX_OUTPUT_DEPTH = 32


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every floating tensor in a module's output, in order: nested tuples, lists, dicts,
    dataclasses and ``transformers`` ``ModelOutput`` objects are walked; other objects (and
    non-float tensors) are left out, and a tensor met twice counts once."""
    found: list[torch.Tensor] = []
    seen: set = set()

    def walk(o: Any, depth: int) -> None:
        if depth > MAX_OUTPUT_DEPTH:
            return
        if isinstance(o, torch.Tensor):
            if o.is_floating_point() and o.numel():
                key = (o.data_ptr(), tuple(o.shape), tuple(o.stride()), o.dtype)
                if key not in seen:
                    seen.add(key)
                    found.append(o)
            return
        if isinstance(o, Mapping):
            items = list(o.values())
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            items = [getattr(o, f.name, None) for f in dataclasses.fields(o)]
        elif isinstance(o, (tuple, list)):
            items = list(o)
        else:
            return
        for i in items:
            walk(i, depth + 1)
    walk(out, 0)
    return found


class _Counted:
    """One output tensor whose error counts: its rows (``keep``: unmasked positions), its weight
    1 / (its mean square on this batch) and the batch size it is divided by."""

    def __init__(self, index: int, y: torch.Tensor, keep: Optional[torch.Tensor], weight: float, items: int):
        self.index, self.y, self.keep, self.weight, self.items = index, y, keep, weight, items

    def sq_error(self, y: torch.Tensor) -> float:
        e = y.detach().to(torch.float64) - self.y.detach().to(torch.float64)
        if self.keep is not None:
            e = e[self.keep]
        return self.weight * float(e.pow(2).sum()) / self.items


def _counted(out: Any, mask: Optional[torch.Tensor], batch: int, need_grad: bool) -> tuple[list, float]:
    """(the counted outputs, their power: sum of weight * ||y||^2 / items). Each output is
    scaled by its own mean square, so a small head counts as much as a big one; an output that
    is zero on this batch, or does not depend on the parameters, does not count."""
    counted, power = [], 0.0
    for j, y in enumerate(output_tensors(out)):
        keep = mask if mask is not None and y.dim() >= 2 and tuple(y.shape[:2]) == tuple(mask.shape) else None
        yd = y.detach().to(torch.float64)
        sel = yd if keep is None else yd[keep]
        if not bool(torch.isfinite(sel).all()):
            raise fail("BAD_INPUT", f"calibration batch {batch}: the module's output holds NaN or Inf")
        if need_grad and not y.requires_grad:
            continue
        ms = float(sel.pow(2).mean()) if sel.numel() else 0.0
        if not (ms > 0 and math.isfinite(ms)):
            continue
        items = max(int(y.shape[0]) if y.dim() else 1, 1)
        counted.append(_Counted(j, y, keep, 1.0 / ms, items))
        power += float(sel.numel()) / items
    return counted, power


# --- calibrate --------------------------------------------------------------------------------------

def _head(x: Any, k: int) -> Any:
    """The first ``k`` items of a batch (tensor, tuple/list or dict of tensors)."""
    if isinstance(x, torch.Tensor):
        return x if len(x) <= k else x[:k]
    if isinstance(x, Mapping):
        return {key: _head(v, k) if isinstance(v, torch.Tensor) and v.dim() else v for key, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_head(v, k) if isinstance(v, torch.Tensor) and v.dim() else v for v in x)
    return x


def _call(module: nn.Module, x: Any, batch: int) -> Any:
    try:
        if isinstance(x, Mapping):
            return module(**x)
        if isinstance(x, (tuple, list)):
            return module(*x)
        return module(x)
    except TqzError:
        raise
    except Exception as exc:
        msg = " ".join(str(exc).split())[:300]
        raise fail("BAD_INPUT", f"calibration batch {batch}: the module's forward failed: "
                                f"{type(exc).__name__}: {msg}") from exc


def _mask_of(x: Any) -> Optional[torch.Tensor]:
    """The ``attention_mask`` [batch, tokens] of a dict batch (Hugging Face convention), if any:
    padded positions then count neither in H nor in the output error."""
    if isinstance(x, Mapping):
        m = x.get("attention_mask")
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            return m != 0
    return None


@contextlib.contextmanager
def _calibrating(module: nn.Module) -> Iterator[None]:
    """Eval mode and no fused attention fast path (it bypasses submodules' hooks) meanwhile;
    both restored after."""
    modes = [(m, m.training) for m in module.modules()]
    fast = torch.backends.mha.get_fastpath_enabled()
    module.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for m, t in modes:
            m.training = t


@contextlib.contextmanager
def _grads(params: list) -> Iterator[None]:
    saved = [p.requires_grad for _, p in params]
    for _, p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for (_, p), rg in zip(params, saved):
            p.requires_grad_(rg)


def calibrate(module: nn.Module, batches: Iterable[Any], *, max_samples: int = 65536,
              sensitivity: bool = True, sensitivity_method: str = "probe", sensitivity_batches: int = 8,
              sensitivity_samples: int = 64, output_fn: Optional[Callable[[Any], Any]] = None,
              progress: Optional[Callable[[str, int, int], None]] = None, seed: int = 0,
              views: bool = True) -> Stats:
    """Collect :class:`Stats` for ``module`` over ``batches`` (items: tensor, tuple or dict:
    ``module(x)``, ``module(*x)``, ``module(**x)``).

    ``views``: a set of fewer than 256 images (float tensors [batch, channels, height, width]) is
    followed by the eight one-pixel shifts of every batch, and a set of fewer than 256 token
    sequences (dict batches of ``input_ids``, ``attention_mask``, ``token_type_ids``) by about 256
    sequences spliced from them (at most 8 each), as more calibration batches whose tokens are not counted
    (``tqcodec.model.views``: the benchmark's digits CNN from 32 images gains 4-6 dB of logit
    SQNR at the same size). Other inputs get none.

    ``max_samples`` caps the samples (tokens, pixels, time steps) accumulated per layer. A dict
    batch with an ``attention_mask`` [batch, tokens] leaves padded tokens out of H and of the
    output error. The module runs in eval mode (its modes are restored after).

    With ``sensitivity`` every float parameter gets a *gain*: end-output squared error per unit
    of its local error (``tr(E H E^T)`` for linear and conv weights, ``sum_c row_h[c] ||E_c||^2``
    for kind rows, token frequencies for embeddings, ``||E||^2`` for the rest, kind ``plain``;
    a linear or conv layer's bias takes its weight's gain, since a bias error e is a local error
    of ||e||^2 exactly as a weight error E with ||E x|| = ||e||). A parameter with no effect on
    the counted outputs over the calibration batches gets gain 0. With the ``probe`` method,
    linear and conv weights stored out_in and 1-D parameters also get ``row_gain``: the same
    per output row (per element), each row's squared gradient over its own local error per unit
    variance (a bias takes its weight's), so rows the rest of the model amplifies weigh more.

    The output error counts every floating tensor of the module's output (nested tuples, lists,
    dicts, dataclasses, ``transformers`` ``ModelOutput``), each scaled by its own mean square on
    the batch, so a small head counts as much as a big one; outputs that are zero or do not
    depend on the parameters are left out. ``output_fn(output)`` picks what counts instead (a
    tensor or any such structure), e.g. ``lambda out: out.logits``. ``output_power`` is then the
    number of output elements counted per sample.

    ``sensitivity_method``:

    - ``probe`` (default): on each of the first ``sensitivity_batches`` batches, one backward
      pass of a seeded random sign probe v through the output gives every parameter's gradient
      g of <v, output> at once; for an i.i.d. weight error of variance s^2 the expected output
      error is s^2 E||g||^2 (Hutchinson), so gain = E||g||^2 / (local error per s^2). Costs one
      backward per batch, whatever the number of parameters; a module with an ``nn.Embedding``
      takes ``COLUMN_PROBES - 1`` more per batch for the embeddings' ``h`` (the sum of g g^T over
      the output gradient g of every row looked up, over all probes), each a backward pass to the
      embeddings' outputs only.
    - ``perturb``: each parameter perturbed once (seeded Gaussian noise) and the end-output
      error over the first ``sensitivity_batches`` batches (at most ``sensitivity_samples``
      items each) compared with the predicted local error; one forward per parameter and batch.

    Errors (``TqzError`` ``BAD_INPUT``, naming the batch): no batches; NaN or Inf in a layer's
    input (naming the layer) or in the output; a forward that fails. The same module and batches
    give the same statistics.
    """
    if sensitivity_method not in SENSITIVITY_METHODS:
        raise ValueError(f"sensitivity_method {sensitivity_method!r} is not one of {SENSITIVITY_METHODS}")
    if max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, not {max_samples}")
    fn = output_fn or (lambda out: out)
    params = _float_params(module)
    probing = sensitivity and sensitivity_method == "probe"
    kept: list[Any] = []
    power: list[float] = []
    seen = 0
    with _calibrating(module):
        col = _Collector(module, max_samples)
        embeddings = {n: int(p.shape[1]) for n, p in params
                      if isinstance(col.accs.get(n), _CountAcc) and p.dim() == 2}
        probe = _Probe(params, seed, embeddings) if probing else None
        try:
            for i, (x, view) in enumerate(with_views(batches, seed) if views else ((x, False) for x in batches)):
                seen += 1
                col.batch.start(i, _mask_of(x), view)
                measuring = sensitivity and i < sensitivity_batches
                with torch.set_grad_enabled(measuring), (_grads(params) if measuring else contextlib.nullcontext()):
                    out = _call(module, x, i)
                    if measuring:
                        counted, pw = _counted(fn(out), col.batch.mask, i, need_grad=True)
                        power.append(pw)
                        if probe is not None:
                            probe.add(counted, col.batch.looked_up)
                        else:
                            kept.append(_head(x, sensitivity_samples))
                        del counted
                del out
                # what the batch freed goes back to the OS: glibc's arenas kept it (a 604M-parameter
                # Llama's batches held 6.4-6.7 GiB resident, 4.8 with this: its model and sums)
                trim_malloc()
        finally:
            col.remove()
        if seen == 0:
            raise fail("BAD_INPUT", "no calibration batches")
        stats = Stats(col.stats())
        if power:
            stats.output_power = sum(power) / len(power)
        hooked = {n for n, s in stats.tensors.items() if s.kind in ("linear", "conv")}
        if probe is not None and probe.batches:
            _gains_from_probes(stats, probe, hooked, progress, _tied_tables(module))
        elif sensitivity and kept:
            _measure_gains(module, stats, kept, fn, seed, progress, hooked, params)
    return stats


def _float_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters a gain is measured for: float, non-empty, as the state dict names them."""
    return [(n, p) for n, p in module.named_parameters()
            if p.dtype.is_floating_point and not isinstance(p, nn.parameter.UninitializedParameter) and p.numel()]


SQUARES_CHUNK = 1 << 22  # elements of a probe gradient squared in float64 at once (not a whole table's)
COLUMN_PROBES = 8  # probes per sensitivity batch for an embedding's column metric (one also gives the gains)


class _Probe:
    """Sums, per float parameter, ||grad of sum_j <v_j, y_j>||^2 over probe batches (v_j: seeded
    random signs scaled by sqrt(weight_j / items_j), zero at padded positions). For the embedding
    tables in ``columns`` (name: width d), also the sum of g g^T over the output gradient g of
    every row looked up (K-FAC's output-side factor), over ``COLUMN_PROBES`` probes a batch."""

    def __init__(self, params: list, seed: int, columns: Optional[Mapping[str, int]] = None):
        self.params = params
        self.gen = torch.Generator().manual_seed(seed)
        self.sq = np.zeros(len(params))
        self.row_sq = [np.zeros(p.shape[0] if p.dim() else 1) for _, p in params]  # the same per first-axis row
        self.outer = {name: np.zeros((d, d)) for name, d in (columns or {}).items()}
        self.batches = 0

    def _probes(self, counted: list) -> list:
        vs = []
        for c in counted:
            v = torch.randint(0, 2, c.y.shape, generator=self.gen).to(c.y.dtype) * 2 - 1
            if c.keep is not None:
                v = v * c.keep.reshape(*c.keep.shape, *([1] * (c.y.dim() - c.keep.dim()))).to(c.y.dtype)
            vs.append(v * math.sqrt(c.weight / c.items))
        return vs

    def _take(self, j: int, p: torch.Tensor) -> None:
        """Parameter ``j``'s gradient, as soon as the backward pass has it: its squares summed per
        row, then dropped (so that at most a few parameters' gradients are held at a time, not
        the whole model's: 2.4 GB for a 604M-parameter Llama)."""
        g = p.grad.detach().reshape(len(self.row_sq[j]), -1)
        p.grad = None
        step = max(1, SQUARES_CHUNK // max(g.shape[1], 1))  # rows squared in float64 a chunk at a time
        rows = torch.cat([g[i:i + step].to(torch.float64).pow(2).sum(dim=1)
                          for i in range(0, len(g), step)]).numpy()
        self.row_sq[j] += rows
        self.sq[j] += float(rows.sum())

    def _backward(self, ys: list, vs: list, outputs: list, retain: bool) -> list:
        """One backward pass of the probes ``vs`` through ``ys``: every parameter's gradient taken
        by :meth:`_take`; returns the gradients of ``outputs`` (None where unused). Gradients the
        parameters held before are put back after."""
        held = [p.grad for _, p in self.params]
        for _, p in self.params:
            p.grad = None
        got: dict[int, torch.Tensor] = {}
        hooks = [o.register_hook(lambda g, k=k: got.__setitem__(k, g.detach())) for k, o in enumerate(outputs)]
        hooks += [p.register_post_accumulate_grad_hook(lambda p, j=j: self._take(j, p))
                  for j, (_, p) in enumerate(self.params)]
        try:  # (every counted output depends on the parameters: _counted keeps only those)
            torch.autograd.backward(ys, grad_tensors=vs, inputs=[p for _, p in self.params], retain_graph=retain)
        finally:
            for h in hooks:
                h.remove()
            for (_, p), g in zip(self.params, held):
                p.grad = g
        return [got.get(k) for k in range(len(outputs))]

    def _add_outer(self, names: list, grads: Sequence) -> None:
        for name, g in zip(names, grads):
            if g is not None:
                rows = g.detach().to(torch.float64).reshape(-1, g.shape[-1])
                self.outer[name] += (rows.T @ rows).numpy()

    def add(self, counted: list, looked_up: Optional[Mapping[str, list]] = None) -> None:
        """One probe batch: ``counted`` outputs; ``looked_up`` each embedding's outputs on it."""
        if not counted:
            return
        ys = [c.y for c in counted]
        pairs = [(n, o) for n, outs in (looked_up or {}).items() if n in self.outer for o in outs]
        names, outputs = [n for n, _ in pairs], [o for _, o in pairs]
        more = COLUMN_PROBES - 1 if outputs else 0
        self._add_outer(names, self._backward(ys, self._probes(counted), outputs, retain=more > 0))
        # an embedding's column metric from one probe per batch is too noisy to round by (MiniLM,
        # 128 sentences, 3.0 bits/param: mean cosine 0.99379 from 1 probe, 0.99505 from 8): more
        # probes, each a backward pass to the embeddings' outputs only
        for k in range(more):
            trim_malloc()  # the last pass's freed memory (the 604M Llama's first batch: 6.7-6.9 -> 6.1-6.2 GiB)
            self._add_outer(names, torch.autograd.grad(ys, outputs, grad_outputs=self._probes(counted),
                                                       allow_unused=True, retain_graph=k + 1 < more))
        self.batches += 1


def _owner(wname: str, stats: Stats, hooked: set) -> Optional[str]:
    """The linear or conv weight whose gain a bias takes (None: the parameter is measured itself)."""
    owner = wname[:-len("bias")] + "weight" if wname.endswith("bias") else None
    return owner if owner in hooked else None


def _biases_take_weight_gains(stats: Stats, params: list, hooked: set) -> None:
    for wname, _ in params:
        owner = _owner(wname, stats, hooked)
        if owner:
            o = stats.tensors[owner]
            stats.tensors[wname] = TensorStats("plain", gain=o.gain, row_gain=o.row_gain)


def _row_gains(st: TensorStats, row_sq: np.ndarray, shape: tuple, tied: bool = False) -> Optional[np.ndarray]:
    """Per output row (first axis) of a linear or conv weight stored out_in, or per element of a
    1-D plain parameter: the output error per unit of the row's local error (its share of
    :func:`_gain`; a bias takes its weight's). An embedding that is also another module's weight
    (``tied``: an output layer) gets each row's squared output gradient: every row is an output
    row too, the rows no input used included. None for other kinds and layouts, or when not finite."""
    if (st.kind == "plain" and len(shape) == 1) or (st.kind == "embedding" and tied):
        per = np.ones(len(row_sq))
    elif st.kind in ("linear", "conv") and st.layout == "out_in" and st.h is not None \
            and len(row_sq) % st.h.shape[0] == 0:
        per = np.repeat(np.trace(st.h, axis1=1, axis2=2, dtype=np.float64), len(row_sq) // st.h.shape[0])
    else:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(per > 0, row_sq / per, 0.0)
    return out if np.isfinite(out).all() and out.sum() > 0 else None


def _local_per_variance(st: TensorStats, shape: tuple) -> float:
    """Local error per unit variance of an i.i.d. error on a parameter of ``shape``."""
    numel = int(np.prod(shape))
    if st.kind == "plain":
        return float(numel)
    if st.kind == "embedding":
        c = np.asarray(st.counts, dtype=np.float64)
        return float(numel // max(shape[0], 1) if c.sum() > 0 else numel)
    if st.kind == "rows":
        return float(numel // max(shape[0], 1) * np.sum(st.row_h))
    g = st.h.shape[0]
    n = shape[1] if st.layout == "in_out" and len(shape) == 2 else shape[0]
    return float(n // g * sum(np.trace(st.h[i], dtype=np.float64) for i in range(g)))


def _settle_gains(stats: Stats, names: list[str]) -> None:
    """Gains that could not be measured (not finite: overflow) take the largest finite gain."""
    bad = [n for n in names if not math.isfinite(stats.tensors[n].gain)]
    if bad:
        finite = [s.gain for s in stats.tensors.values() if math.isfinite(s.gain)]
        fallback = max(finite, default=1.0)
        for n in bad:
            stats.tensors[n].gain = fallback
        warnings.warn(f"calibrate: the gains of {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''} are not "
                      f"finite (overflow): they take the largest measured gain", stacklevel=3)


def _column_metric(outer: np.ndarray) -> Optional[np.ndarray]:
    """An embedding's ``h`` [1, d, d]: the output gradients' second moment scaled to a mean
    diagonal of 1 (the gain keeps the scale), exactly symmetric; None when it holds nothing."""
    mean = float(np.mean(np.diag(outer)))
    if not (mean > 0 and math.isfinite(mean) and np.isfinite(outer).all()):
        return None
    h = outer / mean
    return ((h + h.T) / 2)[None]


def _gain(out: float, per_var: float) -> float:
    if not math.isfinite(out) or not math.isfinite(per_var):
        return math.inf
    if per_var <= 0:
        return 1.0  # no local error possible (H = 0): the gain does not matter
    return max(out, 0.0) / per_var


def _tied_tables(module: nn.Module) -> set[str]:
    """Names (as ``named_parameters`` gives them) of the ``nn.Embedding`` weights that are also
    the weight of another module: a language model's output layer tied to its token embedding."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    tables = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    return {name_of[id(m.weight)] for m in module.modules()
            if not isinstance(m, nn.Embedding) and isinstance(getattr(m, "weight", None), nn.Parameter)
            and id(m.weight) in tables and id(m.weight) in name_of}


def _gains_from_probes(stats: Stats, probe: _Probe, hooked: set,
                       progress: Optional[Callable[[str, int, int], None]], tied: set = frozenset()) -> None:
    measured = []
    for j, (wname, w) in enumerate(probe.params):
        if _owner(wname, stats, hooked):
            continue
        if wname not in stats.tensors:
            stats.tensors[wname] = TensorStats("plain")
        st = stats.tensors[wname]
        st.gain = _gain(probe.sq[j] / probe.batches, _local_per_variance(st, tuple(w.shape)))
        st.row_gain = _row_gains(st, probe.row_sq[j] / probe.batches, tuple(w.shape), wname in tied)
        if wname in probe.outer and st.kind == "embedding":
            st.h = _column_metric(probe.outer[wname])
        measured.append(wname)
        if progress:
            progress(wname, j + 1, len(probe.params))
    _settle_gains(stats, measured)
    _biases_take_weight_gains(stats, probe.params, hooked)


def _measure_gains(module: nn.Module, stats: Stats, kept: list, fn: Callable, seed: int,
                   progress: Optional[Callable[[str, int, int], None]], hooked: set, params: list) -> None:
    """Gain of every float parameter: hooked weights against their local distortion, the others
    (biases, norms) against ||E||^2 (they get kind ``plain``)."""
    refs = []
    with torch.enable_grad(), _grads(params):  # which outputs depend on the parameters
        for i, xs in enumerate(kept):
            counted, _ = _counted(fn(_call(module, xs, i)), _mask_of(xs), i, need_grad=True)
            for c in counted:
                c.y = c.y.detach()
            refs.append((xs, counted))
    gen = torch.Generator().manual_seed(seed)
    measured = []
    with torch.no_grad():
        for j, (wname, w) in enumerate(params):
            if _owner(wname, stats, hooked):
                continue  # takes its weight's gain, below
            orig = w.detach().clone()
            rms = float(orig.double().pow(2).mean().sqrt()) or 1.0
            noise = torch.randn(orig.shape, generator=gen, dtype=torch.float64) * (1e-2 * rms)
            if wname not in stats.tensors:
                stats.tensors[wname] = TensorStats("plain")
            st = stats.tensors[wname]
            view = noise.T if st.layout == "in_out" and noise.dim() == 2 else noise.reshape(orig.shape[0], -1)
            pred = float(noise.pow(2).sum()) if st.kind == "plain" else local_distortion(view.numpy(), st)
            try:
                w.copy_((orig.double() + noise).to(orig.dtype))
                err = 0.0
                for i, (xs, counted) in enumerate(refs):
                    ys = output_tensors(fn(_call(module, xs, i)))
                    err += sum(c.sq_error(ys[c.index]) for c in counted)
                err /= len(refs)
            finally:
                w.copy_(orig)
            st.gain = _gain(err, pred)
            measured.append(wname)
            if progress:
                progress(wname, j + 1, len(params))
    _settle_gains(stats, measured)
    _biases_take_weight_gains(stats, params, hooked)


# --- Hugging Face folders (tqz calibrate) ------------------------------------------------------------

FOLDER_BATCH = 16          # sequences per batch, at most ...
OUTPUT_ELEMENTS = 1 << 25  # ... as many as keep a batch's logits over the vocabulary under this many values: a
# Llama with a 128,256-token vocabulary (2 layers of width 64, tied), 3 windows of 512 tokens in one
# batch, peaked at 9.6 GB in tqz calibrate (the logits, their probes and gradients, 788 MB a copy)
FOLDER_SAMPLES = 128       # sequences by default: lines of text
COUNTED_LINES = 1_000_000  # lines of the text whose tokens are counted, run through the model or not.
# An embedding's rows are weighed by how often text uses their tokens, and few sentences miss most of
# the vocabulary new text uses: MiniLM from 32 sentences (579 tokens, 270 distinct) meets 38% of the
# evaluation sentences' tokens never seen (1024 sentences: 6%). Tokenizing costs little next to a
# forward pass: tq at 3.1 bits/param from 32 sentences, mean cosine 0.99282, with the token counts of
# 1024 sentences 0.99553 (128 sentences run: 0.99551)
SYNTHETIC_SAMPLES = 512    # synthetic sequences by default. MiniLM, tq at 4.0 (4.3) bits/param, mean
# cosine: 128 sequences 0.9934 (0.9958), 512 0.9945 (0.9963), 2048 0.9948 (0.9967); calibration
# 17 s for 512 and 56 s for 2048 on 2 cores
SYNTHETIC_MEDIAN = 20      # synthetic sequences: log-normal lengths around 20 tokens, like sentences
SYNTHETIC_SIGMA = 0.5
SYNTHETIC_MIN = 4
SYNTHETIC_ZIPF = 1.2       # token ids drawn with probability ~ 1/rank**this, rank = place in id order
# (subword vocabularies list frequent tokens first: BPE merges, WordPiece, SentencePiece scores).
# MiniLM, tq at 4 bits/param from 128 synthetic sequences, mean cosine on real sentences: uniform
# ids 0.9882, exponent 1.0 0.9922, 1.2 0.9935, 1.5 0.9941, 2.0 0.9763 (a few punctuation tokens
# crowd out the rest): 1.2 keeps clear of that edge. Real sentences: 0.9972
PLACEHOLDER = re.compile(r"\[[^\]]*\]|<[^>]*>")  # vocabulary entries that stand for no text
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the folder is all there is: never the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers
    except ImportError:
        raise fail("BAD_OPTION", "calibrating a folder needs transformers: pip install transformers") from None
    transformers.logging.set_verbosity_error()
    with contextlib.suppress(AttributeError):
        transformers.utils.logging.disable_progress_bar()
    return transformers


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def load_folder_model(folder: Path) -> tuple[nn.Module, Any, Any]:
    """(module in float32, its config, its tokenizer or None) of a Hugging Face folder, offline:
    the class config.json's ``architectures`` names (so the checkpoint's head is part of the
    module and its outputs count), or ``AutoModel`` when it names none transformers has."""
    folder = Path(folder)
    if not (folder.is_dir() and (folder / "config.json").is_file()):
        raise fail("BAD_INPUT", "no model definition: calibrating needs a Hugging Face folder with config.json and "
                                "its safetensors weights (a weights file alone cannot be run)", folder)
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        cls = next((getattr(tf, a) for a in (getattr(config, "architectures", None) or [])
                    if isinstance(getattr(tf, a, None), type) and hasattr(getattr(tf, a), "from_pretrained")),
                   tf.AutoModel)
        model = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise fail("BAD_INPUT", f"transformers cannot build the model of this folder: {_one_line(exc)}", folder) from None
    model.float()
    model.eval()
    tokenizer = None
    if any((folder / n).is_file() for n in TOKENIZER_FILES):  # (transformers makes an empty one from nothing)
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception:
            tokenizer = None
    return model, config, tokenizer


def _max_length(config: Any, tokenizer: Any) -> int:
    limits = [getattr(tokenizer, "model_max_length", None), getattr(config, "max_position_embeddings", None), 512]
    return min(x for x in limits if isinstance(x, int) and x > 0)


def _accepted(model: nn.Module) -> set:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {"input_ids", "attention_mask"}


def _finish(batch: dict, accepted: set) -> dict:
    out = {k: v for k, v in batch.items() if k in accepted}
    if "use_cache" in accepted:
        out["use_cache"] = False  # no key/value caches among the outputs
    return out


def text_batches(lines: list[str], model: nn.Module, config: Any, tokenizer: Any,
                 batch_size: int = FOLDER_BATCH) -> list[dict]:
    """Tokenized batches (padded to the longest, ``attention_mask`` marking the padding, truncated
    to the model's length) of ``lines``; for a model that generates text from its own context
    (:func:`reads_a_stream`), the lines joined by newlines and cut into windows of the model's
    length instead (:func:`packed_windows`). Batches as :func:`fill_batches` makes them."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            batch_size = 1  # nothing to pad with: one sequence per batch
        else:
            tokenizer.pad_token = tokenizer.eos_token
    accepted, max_len = _accepted(model), _max_length(config, tokenizer)
    if reads_a_stream(model, config):
        encoded = {"input_ids": packed_windows(lines, tokenizer, max_len)}
    else:
        encoded = dict(tokenizer(list(lines), truncation=True, max_length=max_len))
    ids = encoded["input_ids"]
    out = []
    for group in fill_batches([len(s) for s in ids], batch_size, logits_per_token(model, config)):
        part = {k: [v[i] for i in group] for k, v in encoded.items()}
        if len(group) == 1:  # nothing to pad (a tokenizer without a padding token runs one at a time)
            enc = {k: torch.tensor(v) for k, v in part.items()}
            enc.setdefault("attention_mask", torch.ones_like(enc["input_ids"]))
        else:
            enc = dict(tokenizer.pad(part, padding=True, return_tensors="pt"))
        out.append(_finish(enc, accepted))
    return out


def _text_through(raw: str, nonempty: int) -> list[str]:
    """The lines of ``raw`` (trailing blanks cut, empty ones kept) up to its ``nonempty``-th
    non-empty line."""
    out, seen = [], 0
    for ln in raw.splitlines():
        if seen == nonempty:
            break
        out.append(ln.rstrip())
        seen += bool(ln.strip())
    return out


def logits_per_token(model: nn.Module, config: Any) -> int:
    """How many values the model's output layer gives each token: the vocabulary's size where it
    scores every token (``get_output_embeddings()`` is a head), else 0."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except Exception:  # a model class whose accessor needs what this one lacks
        head = None
    return int(getattr(config, "vocab_size", 0) or 0) if head is not None else 0


def fill_batches(lengths: Sequence[int], batch_size: int, per_token: int = 0) -> list[list[int]]:
    """The sequences of ``lengths`` (token counts) in order, grouped into batches: at most
    ``batch_size`` sequences a batch and, with ``per_token`` output values a token (the logits over
    a vocabulary), at most ``OUTPUT_ELEMENTS`` output values for the batch padded to its longest
    sequence; at least one sequence each. The limit follows the batch's own length: 16 synthetic
    sequences of about 20 tokens fit where 16 windows of 512 would not (a 604M-parameter Llama of
    32,000 tokens took 256 batches of 2 for 512 synthetic sequences when every sequence was
    counted at the model's length)."""
    groups: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        wider = max(longest, int(n))
        if groups and len(groups[-1]) < batch_size and \
                (per_token <= 0 or wider * (len(groups[-1]) + 1) * per_token <= OUTPUT_ELEMENTS):
            groups[-1].append(i)
            longest = wider
        else:
            groups.append([i])
            longest = int(n)
    return groups


PROBE_BATCHES = 8      # the sensitivity probes run on the first batches: at most this many, and ...
PROBE_WORK = 1 << 37   # ... no more than these tokens x parameters beyond the first batch. A probe batch
# is eight backward passes, so on large models the probes outweigh every forward pass: a 604M-parameter
# Llama, 16 synthetic sequences a batch, took 75 s a probe batch against 12 s a batch without. MiniLM
# (128 sentences, 22.7M parameters: 6e10) and the benchmark's GPT-2 (128 windows of 128 tokens, 1.3M)
# keep all eight


def _tokens(batch: dict) -> int:
    """The tokens of a tokenized batch: its ``attention_mask``'s ones, else every position."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())


def probe_batches(batches: Sequence[dict], model: nn.Module) -> int:
    """How many of the first ``batches`` the sensitivity probes run on (``calibrate``'s
    ``sensitivity_batches``): ``PROBE_BATCHES``, or fewer where their tokens (``attention_mask``'s
    ones, else every position) times the model's parameters pass ``PROBE_WORK``, at least one."""
    params = sum(p.numel() for p in model.parameters())
    work = 0
    for n, b in enumerate(batches[:PROBE_BATCHES]):
        work += _tokens(b) * params
        if n and work > PROBE_WORK:
            return n
    return PROBE_BATCHES  # (calibrate's views of a small set fill the batches the set lacks)


def reads_a_stream(model: nn.Module, config: Any) -> bool:
    """Whether the model is a decoder-only generator (``can_generate()``, not encoder-decoder):
    it reads running text, each position after all before it, so a line alone would show it only
    the first positions of a context. A 4-layer GPT-2 of Python source (benchmarks/zoo/codelm.py),
    ``tqz calibrate`` on 1,024 lines of code, then ``tqz encode`` of its folder at 3.75 bits/param:
    perplexity ratio 0.9866 one stripped line a sequence (10,439 tokens), 0.9890 in windows of 128
    tokens of the lines as they are (11,406 tokens)."""
    can = getattr(model, "can_generate", None)
    try:
        generates = bool(can()) if callable(can) else False
    except Exception:  # a model class whose check needs what this one lacks
        generates = False
    return generates and not bool(getattr(config, "is_encoder_decoder", False))


def packed_windows(lines: Sequence[str], tokenizer: Any, max_len: int) -> list[list[int]]:
    """``lines`` joined by newlines, tokenized once, cut into windows of ``max_len`` tokens, each
    led by the special tokens the tokenizer puts before a text (a beginning-of-text token, or
    none); the last window may be shorter."""
    lead = list(tokenizer("", add_special_tokens=True)["input_ids"])
    ids = list(tokenizer("\n".join(lines), add_special_tokens=False, verbose=False)["input_ids"])
    step = max(1, max_len - len(lead))
    return [lead + ids[i:i + step] for i in range(0, len(ids), step)]


def _real_tokens(ids: np.ndarray, tokenizer: Any) -> np.ndarray:
    """``ids`` without the vocabulary's placeholders (``[unused7]``, ``<extra_id_3>``: tokens no text
    holds); all of ``ids`` when the tokenizer cannot name its tokens."""
    to_tokens = getattr(tokenizer, "convert_ids_to_tokens", None)
    if to_tokens is None:
        return ids
    try:
        names = to_tokens([int(i) for i in ids])
    except Exception:  # a tokenizer that cannot name some id: keep every id
        return ids
    keep = np.array([not (isinstance(t, str) and PLACEHOLDER.fullmatch(t)) for t in names], dtype=bool)
    return ids[keep]


def synthetic_token_law(config: Any, tokenizer: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """(the ids synthetic sequences draw from, the probability of each, the padding id): every id
    of the vocabulary but the special tokens and placeholders, with Zipf's law over their order."""
    vocab = int(getattr(config, "vocab_size", 0) or (len(tokenizer) if tokenizer is not None else 0))
    if vocab < 1:
        raise fail("BAD_INPUT", "the model's config has no vocab_size to draw synthetic tokens from")
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
    pad = next((p for p in (getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None), 0)
                if isinstance(p, int)), 0)
    special.add(pad)
    allowed = np.setdiff1d(np.arange(vocab), np.fromiter(special, dtype=np.int64, count=len(special)))
    allowed = _real_tokens(allowed, tokenizer)
    if not len(allowed):
        allowed = np.arange(vocab)
    frequency = np.arange(1, len(allowed) + 1, dtype=np.float64) ** -SYNTHETIC_ZIPF
    return allowed, frequency / frequency.sum(), pad


def expected_token_counts(stats: Stats, config: Any, tokenizer: Any) -> Stats:
    """``stats`` of synthetic sequences with the token counts of every embedding indexed by the
    drawn ids replaced, for those ids, by their expected counts under the law they were drawn
    from: a sample's counts would say that the tokens it missed are rare, which the law already
    says better (and the encoder's floor for missed tokens would read the sample's many
    singletons as missing mass)."""
    allowed, frequency, _ = synthetic_token_law(config, tokenizer)
    out = Stats(dict(stats.tensors), stats.output_power, stats.default_gain, synthetic=True)
    for name, st in stats.tensors.items():
        if st.kind != "embedding" or st.counts is None or len(st.counts) <= int(allowed.max()):
            continue
        counts = np.asarray(st.counts, dtype=np.float64).copy()
        drawn = float(counts[allowed].sum())
        counts[allowed] = drawn * frequency
        out.tensors[name] = dataclasses.replace(st, counts=counts)
    return out


def synthetic_batches(n: int, model: nn.Module, config: Any, tokenizer: Any, seed: int = 0,
                      batch_size: int = FOLDER_BATCH) -> list[dict]:
    """``n`` random token sequences the codec makes itself: ids drawn from the vocabulary (special
    tokens and placeholders left out) with Zipf's law over their order (:func:`synthetic_token_law`),
    log-normal lengths around ``SYNTHETIC_MEDIAN`` tokens, between the tokenizer's special tokens
    (``[CLS] ... [SEP]``, or ``<s> ...``), padded per batch with an ``attention_mask``. Seeded: the
    same ``seed`` gives the same batches."""
    allowed, frequency, pad = synthetic_token_law(config, tokenizer)
    first = [t for t in (getattr(tokenizer, "cls_token_id", None) or getattr(tokenizer, "bos_token_id", None),)
             if isinstance(t, int)]
    last = [t for t in (getattr(tokenizer, "sep_token_id", None),) if isinstance(t, int)]
    longest = max(1, _max_length(config, tokenizer) - len(first) - len(last))
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(np.exp(rng.normal(math.log(SYNTHETIC_MEDIAN), SYNTHETIC_SIGMA, size=n))),
                      min(SYNTHETIC_MIN, longest), longest).astype(int)
    seqs = [first + [int(t) for t in rng.choice(allowed, size=k, p=frequency)] + last for k in lengths]
    accepted = _accepted(model)
    out = []
    for group in fill_batches([len(s) for s in seqs], batch_size, logits_per_token(model, config)):
        part = [seqs[i] for i in group]
        width = max(len(s) for s in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for j, s in enumerate(part):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
        out.append(_finish({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)},
                           accepted))
    return out


def checkpoint_names(stats: Stats, model: nn.Module, names: Iterable[str]) -> Stats:
    """``stats`` under the names the folder's weights use: the module's state-dict names, or with
    the base model prefix added or removed where the checkpoint was saved that way (a checkpoint of
    ``BertForMaskedLM`` read as ``BertModel``). Statistics of tensors the checkpoint lacks are dropped."""
    names = set(names)
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = Stats(output_power=stats.output_power, default_gain=stats.default_gain, synthetic=stats.synthetic)
    for n, s in stats.tensors.items():
        for cand in (n, f"{prefix}.{n}" if prefix else None,
                     n[len(prefix) + 1:] if prefix and n.startswith(prefix + ".") else None):
            if cand is not None and cand in names and cand not in out.tensors:
                out.tensors[cand] = s
                break
    return out


def calibrate_folder(folder: Any, text: Optional[Any] = None, *, samples: Optional[int] = None, seed: int = 0,
                     batch_size: int = FOLDER_BATCH,
                     progress: Optional[Callable[[str, int, int], None]] = None) -> tuple[Stats, dict]:
    """Statistics of a Hugging Face folder's model (see :func:`load_folder_model`), named as its
    weights are: on the first ``samples`` lines of the text file ``text`` (empty lines skipped;
    needs the folder's tokenizer; default ``FOLDER_SAMPLES``), or on ``samples`` synthetic
    sequences (:func:`synthetic_batches`; default ``SYNTHETIC_SAMPLES``). The input embedding's
    token counts come from every line of the text (at most ``COUNTED_LINES``), run or not: a
    tokenizer reads far more text than the model can run. Returns (stats, a summary: sequences
    and tokens run, counted_lines and counted_tokens, tensors, weights, synthetic)."""
    if samples is None:
        samples = FOLDER_SAMPLES if text is not None else SYNTHETIC_SAMPLES
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise fail("BAD_OPTION", f"samples must be a positive integer, got {samples!r}")
    folder = Path(folder)
    lines = None
    if text is not None:
        try:
            raw = Path(text).read_text("utf-8", errors="replace")
        except OSError as exc:
            raise fail("IO_ERROR", f"cannot read the text: {exc.strerror or exc}", text, exc.errno) from None
        counted = [ln.strip() for ln in raw.splitlines() if ln.strip()][:COUNTED_LINES]
        if not counted:
            raise fail("BAD_INPUT", "the text file holds no line of text", text)
        lines = counted[:samples]
    model, config, tokenizer = load_folder_model(folder)
    from ..io.hf import read_folder  # the names the folder's weights carry
    weights, _ = read_folder(folder)
    stream = lines is not None and reads_a_stream(model, config)
    if stream:  # running text as it is (indentation, empty lines), up to the last line counted or run
        counted = _text_through(raw, len(counted))
        lines = _text_through(raw, len(lines))
    if lines is not None:
        if tokenizer is None:
            raise fail("BAD_INPUT", "the folder has no tokenizer to read the text with (give no --text for "
                                    "synthetic inputs)", folder)
        batches = text_batches(lines, model, config, tokenizer, batch_size)
    else:
        batches = synthetic_batches(samples, model, config, tokenizer, seed, batch_size)
    tell = progress or (lambda what, done, total: None)

    def fed() -> Iterator[dict]:
        for i, b in enumerate(batches):
            tell("batches", i, len(batches))
            yield b
        tell("batches", len(batches), len(batches))
    stats = calibrate(model, fed(), seed=seed, sensitivity_batches=probe_batches(batches, model),
                      progress=lambda w, d, t: tell(f"sensitivity: {w}", d, t))
    tokens = sum(_tokens(b) for b in batches)
    run_lines = sum(1 for ln in lines if ln.strip()) if lines is not None else 0
    summary = {"sequences": sum(len(b["input_ids"]) for b in batches), "tokens": tokens,
               "lines": run_lines, "packed": stream, "counted_lines": run_lines, "counted_tokens": tokens}
    if lines is None:
        stats = expected_token_counts(stats, config, tokenizer)
    elif len(counted) > len(lines):
        if stream:
            ids = [t for w in packed_windows(counted, tokenizer, _max_length(config, tokenizer)) for t in w]
            counts = np.bincount(np.asarray(ids, dtype=np.int64)).astype(np.float64)
        else:
            counts = text_token_counts(counted, tokenizer, _max_length(config, tokenizer),
                                       progress=lambda done, total: tell("counting tokens", done, total))
        stats = with_token_counts(stats, model, counts)
        summary.update(counted_lines=sum(1 for ln in counted if ln.strip()), counted_tokens=int(counts.sum()))
    named = checkpoint_names(stats, model, weights.keys())
    return named, {**summary, "tensors": len(named.tensors), "weights": len(weights), "synthetic": lines is None}


def text_token_counts(lines: Sequence[str], tokenizer: Any, max_length: int, chunk: int = 4096,
                      progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """How often each token id occurs in ``lines`` as the model reads them (special tokens added,
    truncated to ``max_length``), [the largest id + 1] float64."""
    counts = np.zeros(0, dtype=np.float64)
    for i in range(0, len(lines), chunk):
        if progress is not None:
            progress(i, len(lines))
        ids = tokenizer(list(lines[i:i + chunk]), truncation=True, max_length=max_length)["input_ids"]
        flat = np.fromiter((t for seq in ids for t in seq), dtype=np.int64)
        part = np.bincount(flat).astype(np.float64) if len(flat) else counts[:0]
        if len(part) > len(counts):
            counts = np.concatenate([counts, np.zeros(len(part) - len(counts))])
        counts[:len(part)] += part
    return counts


def with_token_counts(stats: Stats, model: nn.Module, counts: np.ndarray) -> Stats:
    """``stats`` with the token counts of the model's input embedding (``get_input_embeddings()``,
    a Hugging Face model's) replaced by ``counts`` (ids past the table's rows left out); unchanged
    when the model names no input embedding or it has no statistics."""
    get = getattr(model, "get_input_embeddings", None)
    table = get() if callable(get) else None
    name = next((f"{n}.weight" for n, m in model.named_modules() if m is table), None) if table is not None else None
    st = stats.tensors.get(name) if name else None
    if st is None or st.kind != "embedding" or st.counts is None:
        return stats
    rows = len(st.counts)
    replaced = np.zeros(rows, dtype=np.float64)
    replaced[:min(rows, len(counts))] = counts[:rows]
    out = Stats(dict(stats.tensors), stats.output_power, stats.default_gain, synthetic=stats.synthetic)
    out.tensors[name] = dataclasses.replace(st, counts=replaced)
    return out

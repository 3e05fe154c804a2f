"""Calibration statistics for the ``tq`` encoder (spec §7.5 is the mode; this is encoder-only).

``calibrate(module, batches)`` runs the module on calibration inputs with forward hooks and
collects, per weight name of ``module.state_dict()``:

- ``nn.Linear``: the input second moment H = E[x x^T] (float64, [1, in, in]);
- ``nn.Conv1d/2d``: the same over im2col rows, matching the weight flattened as
  ``[out, in/groups * kh * kw]``; grouped and depthwise convs keep one H per group ([groups, d, d]);
- ``nn.Embedding``: token counts (how often each row was used).

Optionally (``sensitivity=True``) a per-tensor *gain*: how much end-output squared error one unit
of local error ``tr(E H E^T)`` causes, measured by perturbing each weight once with Gaussian noise.
The encoder's distortion for a tensor is then ``gain * tr(E H E^T)`` (one Lagrange multiplier
across the model works on these comparable units).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LAYOUTS = ("out_in", "in_out")


@dataclass
class TensorStats:
    """Statistics of one weight: ``kind`` is linear/conv/embedding; ``h`` [groups, d, d] is
    E[x x^T] (None for embeddings); ``counts`` token counts (embeddings); ``rows`` samples seen;
    ``layout`` how the weight is stored (``out_in`` torch style, ``in_out`` e.g. ONNX MatMul);
    ``gain`` the measured output sensitivity (1.0 when not measured)."""

    kind: str
    h: Optional[np.ndarray] = None
    counts: Optional[np.ndarray] = None
    rows: int = 0
    layout: str = "out_in"
    gain: float = 1.0
    mean: Optional[np.ndarray] = None  # E[x] per group, [groups, d] (bias correction)


@dataclass
class Stats:
    """Per weight name: :class:`TensorStats`. Save/load as safetensors (no pickle)."""

    tensors: dict[str, TensorStats] = field(default_factory=dict)
    output_power: float = 0.0  # mean over samples of ||output||^2 (the unit of the gains' errors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def get(self, name: str) -> Optional[TensorStats]:
        return self.tensors.get(name)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def save(self, path: str) -> None:
        """Write a safetensors file: arrays ``<name>::h`` / ``<name>::counts``, the rest as JSON
        in the metadata key ``tqz.stats``."""
        from safetensors.numpy import save_file

        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {}
        for name, s in self.tensors.items():
            meta[name] = {"kind": s.kind, "rows": int(s.rows), "layout": s.layout, "gain": float(s.gain)}
            if s.h is not None:
                arrays[f"{name}::h"] = np.ascontiguousarray(s.h, dtype=np.float64)
            if s.counts is not None:
                arrays[f"{name}::counts"] = np.ascontiguousarray(s.counts, dtype=np.float64)
            if s.mean is not None:
                arrays[f"{name}::mean"] = np.ascontiguousarray(s.mean, dtype=np.float64)
        save_file(arrays, str(path), metadata={"tqz.stats": json.dumps(meta, sort_keys=True),
                                               "tqz.output_power": repr(float(self.output_power))})

    @classmethod
    def load(cls, path: str) -> "Stats":
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        out = cls()
        with safe_open(str(path), framework="numpy") as f:
            md = f.metadata() or {}
            meta = json.loads(md.get("tqz.stats", "{}"))
            out.output_power = float(md.get("tqz.output_power", "0.0"))
            keys = set(f.keys())
            for name, m in meta.items():
                h = f.get_tensor(f"{name}::h") if f"{name}::h" in keys else None
                c = f.get_tensor(f"{name}::counts") if f"{name}::counts" in keys else None
                mu = f.get_tensor(f"{name}::mean") if f"{name}::mean" in keys else None
                out.tensors[name] = TensorStats(m["kind"], h, c, int(m["rows"]), m.get("layout", "out_in"),
                                                float(m.get("gain", 1.0)), mu)
        return out

    @classmethod
    def from_activations(cls, samples: Mapping[str, Any], layouts: Optional[Mapping[str, str]] = None) -> "Stats":
        """Statistics from input activations ``{weight_name: [N, in] samples}`` of models that are
        not torch modules. ``layouts[name]`` is ``out_in`` (weight stored [out, in], default) or
        ``in_out`` (stored [in, out], as ONNX MatMul initialisers)."""
        layouts = dict(layouts or {})
        out = cls()
        for name, x in samples.items():
            a = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
            a = a.reshape(-1, a.shape[-1])
            lay = layouts.get(name, "out_in")
            if lay not in LAYOUTS:
                raise ValueError(f"layout {lay!r} for {name!r} is not one of {LAYOUTS}")
            h = (a.T @ a) / max(len(a), 1)
            out.tensors[name] = TensorStats("linear", h[None], None, len(a), lay, 1.0,
                                            a.mean(axis=0)[None] if len(a) else None)
        return out


# --- hooks ----------------------------------------------------------------------------------

def _conv_rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """im2col rows [N*L, in*kh*kw] of a Conv1d/2d input (channel-major, as the weight flattens)."""
    if isinstance(mod, nn.Conv1d):
        x = x.unsqueeze(2)
        k, s, d = (1, mod.kernel_size[0]), (1, mod.stride[0]), (1, mod.dilation[0])
        pad = mod.padding
        pad = pad if isinstance(pad, str) else (0, pad[0])
    else:
        k, s, d, pad = mod.kernel_size, mod.stride, mod.dilation, mod.padding
    if isinstance(pad, str):  # 'same' / 'valid'
        if pad == "valid":
            pad = (0, 0)
        else:
            tot = [dd * (kk - 1) for dd, kk in zip(d, k)]
            x = F.pad(x, (tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2))
            pad = (0, 0)
    cols = F.unfold(x, k, dilation=d, padding=pad, stride=s)  # [B, C*kh*kw, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class _Acc:
    def __init__(self, kind: str, groups: int = 1):
        self.kind, self.groups = kind, groups
        self.h: Optional[np.ndarray] = None
        self.sum: Optional[np.ndarray] = None
        self.counts: Optional[np.ndarray] = None
        self.rows = 0

    def add_rows(self, rows: torch.Tensor, cap: int) -> None:
        take = min(len(rows), cap - self.rows)
        if take <= 0:
            return
        r = rows[:take].detach().to(torch.float64).cpu().numpy()
        g = self.groups
        d = r.shape[1] // g
        rg = r.reshape(len(r), g, d).transpose(1, 0, 2)  # [g, N, d]
        part = np.matmul(rg.transpose(0, 2, 1), rg)  # BLAS, float64
        self.h = part if self.h is None else self.h + part
        s1 = rg.sum(axis=1)
        self.sum = s1 if self.sum is None else self.sum + s1
        self.rows += take


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        out = list(out.values())
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    for o in out:
        if isinstance(o, torch.Tensor):
            return o
    raise TypeError("the module's output holds no tensor")


def _head(x: Any, k: int) -> Any:
    """The first ``k`` items of a batch (tensor, tuple/list or dict of tensors)."""
    if isinstance(x, torch.Tensor):
        return x if len(x) <= k else x[:k]
    if isinstance(x, Mapping):
        return {key: _head(v, k) if isinstance(v, torch.Tensor) and v.dim() else v for key, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_head(v, k) if isinstance(v, torch.Tensor) and v.dim() else v for v in x)
    return x


def _call(module: nn.Module, x: Any) -> Any:
    if isinstance(x, Mapping):
        return module(**x)
    if isinstance(x, (tuple, list)):
        return module(*x)
    return module(x)


def calibrate(module: nn.Module, batches: Iterable[Any], *, max_samples: int = 65536,
              sensitivity: bool = True, sensitivity_batches: int = 4, sensitivity_samples: int = 64,
              output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
              progress: Optional[Callable[[str, int, int], None]] = None, seed: int = 0) -> Stats:
    """Collect :class:`Stats` for ``module`` over ``batches`` (items: tensor, tuple or dict).

    ``max_samples`` caps the rows (tokens, pixels) accumulated per layer. With ``sensitivity``
    each weight is perturbed once (seeded Gaussian noise) and the end-output squared error over
    the first ``sensitivity_batches`` batches is compared with the predicted local error
    ``tr(E H E^T)`` to get its gain (at most ``sensitivity_samples`` items of each of those
    batches are rerun; the bias of a hooked layer takes its weight's gain, since a bias error e
    is a local error of ||e||^2 exactly as a weight error E with ||E x|| = ||e||). ``output_fn`` maps the module's output to the tensor whose
    error counts (default: the first tensor of the output).
    """
    module.eval()
    sd_names = set(module.state_dict(keep_vars=True).keys())
    accs: dict[str, tuple[nn.Module, _Acc]] = {}
    hooks = []
    for mname, mod in module.named_modules():
        wname = f"{mname}.weight" if mname else "weight"
        if wname not in sd_names or getattr(mod, "weight", None) is None:
            continue
        if isinstance(mod, nn.Linear):
            acc = _Acc("linear")

            def hook(m, inp, acc=acc):
                x = inp[0]
                acc.add_rows(x.reshape(-1, x.shape[-1]), max_samples)
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            acc = _Acc("conv", mod.groups)

            def hook(m, inp, acc=acc):
                acc.add_rows(_conv_rows(m, inp[0]), max_samples)
        elif isinstance(mod, nn.Embedding):
            acc = _Acc("embedding")
            acc.counts = np.zeros(mod.num_embeddings, dtype=np.float64)

            def hook(m, inp, acc=acc):
                idx = inp[0].reshape(-1).cpu().numpy()
                acc.counts += np.bincount(idx, minlength=len(acc.counts))
                acc.rows += idx.size
        else:
            continue
        if wname in accs:  # the same module reached twice by name: keep the first
            continue
        accs[wname] = (mod, acc)
        hooks.append(mod.register_forward_pre_hook(hook))
    kept: list[Any] = []
    fn = output_fn or _first_tensor
    try:
        with torch.no_grad():
            for i, x in enumerate(batches):
                out = _call(module, x)
                if sensitivity and i < sensitivity_batches:
                    kept.append(_head(x, sensitivity_samples))
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():  # reference outputs of the (sliced) sensitivity batches, hooks removed
        kept = [(xs, fn(_call(module, xs)).detach().to(torch.float64)) for xs in kept]
    stats = Stats()
    for wname, (mod, acc) in accs.items():
        n = max(acc.rows, 1)
        if acc.kind == "embedding":
            stats.tensors[wname] = TensorStats("embedding", None, acc.counts, acc.rows)
        elif acc.h is not None:
            stats.tensors[wname] = TensorStats(acc.kind, acc.h / n, None, acc.rows, mean=acc.sum / n)
    if kept:
        stats.output_power = sum(float(r.pow(2).sum()) / max(r.shape[0], 1) for _, r in kept) / len(kept)
    if sensitivity and kept:
        _measure_gains(module, stats, kept, fn, seed, progress, set(accs))
    return stats


def local_distortion(w_err: np.ndarray, s: TensorStats) -> float:
    """tr(E H E^T) for an error ``w_err`` shaped like the weight viewed [out, in] (embeddings:
    [rows, dim] weighted by token frequency)."""
    e = np.asarray(w_err, dtype=np.float64)
    if s.kind == "embedding":
        c = np.asarray(s.counts, dtype=np.float64)
        p = c / max(c.sum(), 1.0)
        return float(np.sum(p * np.sum(e.reshape(len(p), -1) ** 2, axis=1)))
    g, d, _ = s.h.shape
    e = e.reshape(g, -1, d)
    return float(sum(np.sum((e[i] @ s.h[i]) * e[i]) for i in range(g)))


def _measure_gains(module: nn.Module, stats: Stats, kept: list, fn: Callable,
                   seed: int, progress: Optional[Callable[[str, int, int], None]], hooked: set) -> None:
    """Gain of every float parameter: hooked weights against tr(E H E^T), the others (biases,
    norms) against ||E||^2 (they get kind ``plain``)."""
    gen = torch.Generator().manual_seed(seed)
    params = [(n, p) for n, p in module.named_parameters() if p.dtype.is_floating_point and p.numel()]
    with torch.no_grad():
        for j, (wname, w) in enumerate(params):
            owner = wname[:-len("bias")] + "weight" if wname.endswith("bias") else None
            if owner in hooked and owner in stats.tensors and stats.tensors[owner].kind != "embedding":
                continue  # takes its weight's gain, below
            orig = w.detach().clone()
            rms = float(orig.double().pow(2).mean().sqrt()) or 1.0
            noise = torch.randn(orig.shape, generator=gen, dtype=torch.float64) * (1e-2 * rms)
            if wname not in stats.tensors:
                stats.tensors[wname] = TensorStats("plain")
            st = stats.tensors[wname]
            if st.kind == "plain":
                pred = float(noise.pow(2).sum())
            else:
                pred = local_distortion(noise.reshape(orig.shape[0], -1).numpy(), st)
            try:
                w.copy_((orig.double() + noise).to(orig.dtype))
                err = 0.0
                for x, ref in kept:
                    y = fn(_call(module, x)).detach().to(torch.float64)
                    err += float((y - ref).pow(2).sum()) / max(ref.shape[0], 1)
                err /= len(kept)
            finally:
                w.copy_(orig)
            st.gain = err / pred if pred > 0 and math.isfinite(err) else 1.0
            if progress:
                progress(wname, j + 1, len(params))
        for wname, w in params:
            owner = wname[:-len("bias")] + "weight" if wname.endswith("bias") else None
            if owner in hooked and owner in stats.tensors and stats.tensors[owner].kind != "embedding":
                stats.tensors[wname] = TensorStats("plain", gain=stats.tensors[owner].gain)

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
from safetensors import safe_open
from safetensors.numpy import save_file

from ..errors import fail

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


class _StatsFile(Mapping):
    """Read-only ``{weight name: TensorStats}`` over a file written by :meth:`Stats.save`: each
    item's arrays are read when it is looked up (nothing is kept), so an encoder that works
    tensor by tensor holds one layer's statistics at a time."""

    def __init__(self, path: str, meta: dict):
        self._path, self._meta = path, meta

    def __getitem__(self, name: str) -> TensorStats:

        m = self._meta[name]
        try:
            with safe_open(self._path, framework="numpy") as f:
                keys = set(f.keys())
                arr = {k: f.get_tensor(f"{name}::{k}") if f"{name}::{k}" in keys else None
                       for k in ("h", "counts", "mean")}
            kind, rows, layout, gain = m["kind"], int(m["rows"]), m.get("layout", "out_in"), float(m.get("gain", 1.0))
        except Exception as exc:  # the file changed or is damaged after it was opened
            raise fail("BAD_OPTION", f"cannot read the statistics of {name!r}: {exc}", self._path) from None
        return TensorStats(kind, arr["h"], arr["counts"], rows, layout, gain, arr["mean"])

    def __iter__(self):
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def gains(self) -> list[float]:
        return [float(m.get("gain", 1.0)) for m in self._meta.values()]


@dataclass
class Stats:
    """Per weight name: :class:`TensorStats`. Save/load as safetensors (no pickle)."""

    tensors: Mapping[str, TensorStats] = field(default_factory=dict)
    output_power: float = 0.0  # mean over samples of ||output||^2 (the unit of the gains' errors)
    default_gain: Optional[float] = None  # gain for tensors without statistics (None: the largest gain)

    def gains(self) -> list[float]:
        """Every tensor's gain (without reading the arrays of a lazily opened file)."""
        if isinstance(self.tensors, _StatsFile):
            return self.tensors.gains()
        return [s.gain for s in self.tensors.values()]

    def subset(self, names: Iterable[str]) -> "Stats":
        """The statistics of ``names`` only (read now), with this model's output power and the
        largest gain of the whole model kept as ``default_gain`` for tensors without statistics."""
        default = self.default_gain if self.default_gain is not None else max(self.gains(), default=1.0)
        return Stats({n: self.tensors[n] for n in names if n in self.tensors}, self.output_power, default)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def get(self, name: str) -> Optional[TensorStats]:
        return self.tensors.get(name)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def save(self, path: str) -> None:
        """Write a safetensors file: arrays ``<name>::h`` / ``<name>::counts``, the rest as JSON
        in the metadata key ``tqz.stats``."""

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
    def open(cls, path: str) -> "Stats":
        """A file written by :meth:`save`, its arrays read only when a tensor is looked up."""

        with safe_open(str(path), framework="numpy") as f:
            md = f.metadata() or {}
        return cls(_StatsFile(str(path), json.loads(md.get("tqz.stats", "{}"))),
                   float(md.get("tqz.output_power", "0.0")))

    @classmethod
    def load(cls, path: str) -> "Stats":
        """Read a file written by :meth:`save`."""

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

    def add_rows(self, rows: torch.Tensor, cap: int, cache: Optional[dict] = None,
                 source: Optional[torch.Tensor] = None) -> None:
        """Add ``rows`` [N, in] (up to ``cap`` rows in all), products in float64. ``cache`` (one per batch) shares
        them between layers whose rows come from the same input tensor ``source`` (e.g. query,
        key and value); it holds ``source`` so that its memory cannot be reused meanwhile."""
        take = min(len(rows), cap - self.rows)
        if take <= 0:
            return
        key = None
        if cache is not None and source is not None:
            key = (source.data_ptr(), tuple(source.shape), tuple(source.stride()), source._version,
                   take, self.groups)
        hit = cache.get(key) if key is not None else None
        part = hit[1] if hit is not None and hit[0] is source else None
        if part is None:
            r = rows[:take].detach().to(torch.float64)
            g = self.groups
            rg = r.reshape(take, g, -1).transpose(0, 1)  # [g, N, d]
            part = (torch.bmm(rg.transpose(1, 2), rg).numpy(), rg.sum(dim=1).numpy())
            if key is not None:
                cache[key] = (source, part)
        self.h = part[0].copy() if self.h is None else self.h + part[0]
        self.sum = part[1].copy() if self.sum is None else self.sum + part[1]
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


def _mask_of(x: Any) -> Optional[torch.Tensor]:
    """The ``attention_mask`` [batch, tokens] of a dict batch (Hugging Face convention), if any:
    padded positions then count neither in H nor in the output error."""
    if isinstance(x, Mapping):
        m = x.get("attention_mask")
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            return m != 0
    return None


def _select(x: torch.Tensor, mask: Optional[torch.Tensor], min_dim: int = 3) -> torch.Tensor:
    """Rows of ``x`` [batch, tokens, ...] at unmasked positions (all rows when the shapes differ;
    ``min_dim`` 3 for features, 2 for token ids)."""
    if mask is not None and x.dim() >= min_dim and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    return x


SENSITIVITY_METHODS = ("probe", "perturb")


def calibrate(module: nn.Module, batches: Iterable[Any], *, max_samples: int = 65536,
              sensitivity: bool = True, sensitivity_method: str = "probe", sensitivity_batches: int = 8,
              sensitivity_samples: int = 64, output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
              progress: Optional[Callable[[str, int, int], None]] = None, seed: int = 0) -> Stats:
    """Collect :class:`Stats` for ``module`` over ``batches`` (items: tensor, tuple or dict).

    ``max_samples`` caps the rows (tokens, pixels) accumulated per layer. A dict batch with an
    ``attention_mask`` [batch, tokens] leaves padded tokens out of H and of the output error.

    With ``sensitivity`` every float parameter gets a *gain*: end-output squared error per unit
    of its local error (``tr(E H E^T)`` for hooked weights, ``||E||^2`` for the rest, kind
    ``plain``; a hooked layer's bias takes its weight's gain, since a bias error e is a local
    error of ||e||^2 exactly as a weight error E with ||E x|| = ||e||). ``sensitivity_method``:

    - ``probe`` (default): on each of the first ``sensitivity_batches`` batches, one backward
      pass of a seeded random sign probe v through the output gives every parameter's gradient
      g of <v, output> at once; for an i.i.d. weight error of variance s^2 the expected output
      error is s^2 E||g||^2 (Hutchinson), so gain = E||g||^2 / (local error per s^2). Costs one
      backward per batch, whatever the number of parameters.
    - ``perturb``: each parameter perturbed once (seeded Gaussian noise) and the end-output
      error over the first ``sensitivity_batches`` batches (at most ``sensitivity_samples``
      items each) compared with the predicted local error; one forward per parameter and batch.

    ``output_fn`` maps the module's output to the tensor whose error counts (default: the first
    tensor of the output).
    """
    if sensitivity_method not in SENSITIVITY_METHODS:
        raise ValueError(f"sensitivity_method {sensitivity_method!r} is not one of {SENSITIVITY_METHODS}")
    module.eval()
    sd_names = set(module.state_dict(keep_vars=True).keys())
    accs: dict[str, tuple[nn.Module, _Acc]] = {}
    hooks = []
    current: dict[str, Any] = {"mask": None, "cache": {}}
    for mname, mod in module.named_modules():
        wname = f"{mname}.weight" if mname else "weight"
        if wname not in sd_names or getattr(mod, "weight", None) is None:
            continue
        if isinstance(mod, nn.Linear):
            acc = _Acc("linear")

            def hook(m, inp, acc=acc):
                x = inp[0]
                rows = _select(x.detach(), current["mask"]).reshape(-1, x.shape[-1])
                acc.add_rows(rows, max_samples, current["cache"], x)
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            acc = _Acc("conv", mod.groups)

            def hook(m, inp, acc=acc):
                acc.add_rows(_conv_rows(m, inp[0].detach()), max_samples)
        elif isinstance(mod, nn.Embedding):
            acc = _Acc("embedding")
            acc.counts = np.zeros(mod.num_embeddings, dtype=np.float64)

            def hook(m, inp, acc=acc):
                idx = _select(inp[0], current["mask"], 2).reshape(-1).cpu().numpy()
                acc.counts += np.bincount(idx, minlength=len(acc.counts))
                acc.rows += idx.size
        else:
            continue
        if wname in accs:  # the same module reached twice by name: keep the first
            continue
        accs[wname] = (mod, acc)
        hooks.append(mod.register_forward_pre_hook(hook))
    fn = output_fn or _first_tensor
    probing = sensitivity and sensitivity_method == "probe"
    probe = _Probe(module, seed) if probing else None
    kept: list[Any] = []
    power: list[float] = []
    try:
        for i, x in enumerate(batches):
            current["mask"], current["cache"] = _mask_of(x), {}
            with_grad = probe is not None and i < sensitivity_batches
            with torch.set_grad_enabled(with_grad):
                out = _call(module, x)
            if sensitivity and i < sensitivity_batches:
                y = fn(out)
                mask = current["mask"]
                keep = mask if mask is not None and tuple(y.shape[:2]) == tuple(mask.shape) else None
                yy = y.detach().double() if keep is None else y.detach().double()[keep]
                power.append(float(yy.pow(2).sum()) / max(y.shape[0], 1))
                if probe is not None:
                    probe.add(y, keep)
                else:
                    kept.append(_head(x, sensitivity_samples))
            del out
    finally:
        current["cache"] = {}
        for h in hooks:
            h.remove()
        if probe is not None:
            probe.close()
    stats = Stats()
    for wname, (mod, acc) in accs.items():
        n = max(acc.rows, 1)
        if acc.kind == "embedding":
            stats.tensors[wname] = TensorStats("embedding", None, acc.counts, acc.rows)
        elif acc.h is not None:
            stats.tensors[wname] = TensorStats(acc.kind, acc.h / n, None, acc.rows, mean=acc.sum / n)
    if power:
        stats.output_power = sum(power) / len(power)
    if probe is not None and probe.batches:
        _gains_from_probes(module, stats, probe, set(accs), progress)
    elif sensitivity and kept:
        with torch.no_grad():  # reference outputs of the (sliced) sensitivity batches, hooks removed
            kept = [(xs, fn(_call(module, xs)).detach().to(torch.float64)) for xs in kept]
        _measure_gains(module, stats, kept, fn, seed, progress, set(accs))
    return stats


class _Probe:
    """Sums, per float parameter, E||grad of <v, output>||^2 / batch items over probe batches
    (v: seeded random signs, zero at padded positions)."""

    def __init__(self, module: nn.Module, seed: int):
        self.params = _float_params(module)
        self.saved = [p.requires_grad for _, p in self.params]
        for _, p in self.params:
            p.requires_grad_(True)
        self.gen = torch.Generator().manual_seed(seed)
        self.sq = np.zeros(len(self.params))
        self.batches = 0

    def add(self, y: torch.Tensor, keep: Optional[torch.Tensor]) -> None:
        if not y.requires_grad:
            return
        v = torch.randint(0, 2, y.shape, generator=self.gen).to(y.dtype) * 2 - 1
        if keep is not None:
            v = v * keep.reshape(*keep.shape, *([1] * (y.dim() - keep.dim()))).to(y.dtype)
        grads = torch.autograd.grad(y, [p for _, p in self.params], grad_outputs=v, allow_unused=True)
        for j, g in enumerate(grads):
            if g is not None:
                self.sq[j] += float(g.double().pow(2).sum()) / max(y.shape[0], 1)
        self.batches += 1

    def close(self) -> None:
        for (_, p), rg in zip(self.params, self.saved):
            p.requires_grad_(rg)


def _owner(wname: str, stats: Stats, hooked: set) -> Optional[str]:
    """The hooked weight whose gain a bias takes (None: the parameter is measured itself)."""
    owner = wname[:-len("bias")] + "weight" if wname.endswith("bias") else None
    if owner in hooked and owner in stats.tensors and stats.tensors[owner].kind != "embedding":
        return owner
    return None


def _float_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters a gain is measured for: float, non-empty."""
    return [(n, p) for n, p in module.named_parameters() if p.dtype.is_floating_point and p.numel()]


def _biases_take_weight_gains(stats: Stats, params: list, hooked: set) -> None:
    """Each hooked layer's bias gets its weight's gain (kind ``plain``)."""
    for wname, _ in params:
        owner = _owner(wname, stats, hooked)
        if owner:
            stats.tensors[wname] = TensorStats("plain", gain=stats.tensors[owner].gain)


def _local_per_variance(st: TensorStats, shape: tuple) -> float:
    """Local error per unit variance of an i.i.d. error on a parameter of ``shape``."""
    numel = int(np.prod(shape))
    if st.kind == "plain":
        return float(numel)
    if st.kind == "embedding":
        c = np.asarray(st.counts, dtype=np.float64)
        return float(shape[-1] if c.sum() > 0 else numel)
    g = st.h.shape[0]
    rows_per_group = shape[0] // g
    return float(rows_per_group * sum(np.trace(st.h[i]) for i in range(g)))


def _gains_from_probes(module: nn.Module, stats: Stats, probe: _Probe, hooked: set,
                       progress: Optional[Callable[[str, int, int], None]]) -> None:
    for j, (wname, w) in enumerate(probe.params):
        if _owner(wname, stats, hooked):
            continue
        if wname not in stats.tensors:
            stats.tensors[wname] = TensorStats("plain")
        st = stats.tensors[wname]
        per_var = _local_per_variance(st, tuple(w.shape))
        out = probe.sq[j] / probe.batches
        st.gain = out / per_var if per_var > 0 and math.isfinite(out) and out > 0 else 1.0
        if progress:
            progress(wname, j + 1, len(probe.params))
    _biases_take_weight_gains(stats, probe.params, hooked)


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
    params = _float_params(module)
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
    _biases_take_weight_gains(stats, params, hooked)

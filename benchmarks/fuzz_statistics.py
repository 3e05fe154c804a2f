"""Long fuzz runs of the encoder on degenerate calibration statistics (issue 19).

    python benchmarks/fuzz_statistics.py --cases 100000 [--seed 1] [--paths units,classic,...]
        [--timeout 60] [--mem-mb 1024] [--out results.json]
    python benchmarks/fuzz_statistics.py --replay CASE [--seed S]     # one case here, with its traceback
    python benchmarks/fuzz_statistics.py --self-check                 # the harness's own test

The claim checked: whatever the statistics, no exception escapes ``tqcodec.calibrate`` or
``tqcodec.save`` other than ``TqzError`` or a ``ValueError`` whose message names the tensor.

Case ``i`` of seed ``S`` is built from ``numpy.random.default_rng([S, i])`` alone (no hypothesis,
no shrinking), so ``--replay i`` rebuilds it exactly. Each case first draws its *path*:

- ``units``: ``make_units`` of mode tq (row bands, per-group H, embedding and ``rows`` row
  weights) and curve points with and without error-feedback rounding (as
  ``tests/modes/test_degenerate_statistics.py``);
- ``transforms``: tq's transform options (AAT from H, KLT without) on tall tensors;
- ``classic``: ``encode_classic`` in ecsq, kmeans, pq or dither with the statistics' importance,
  at a bits target or a weighted SNR;
- ``save``: whole files, ``tqcodec.save(..., stats=..., bits=... or quality=...)`` in mode
  default (tq), tq, ecsq, kmeans, pq or dither, one to four tensors, sometimes with the
  statistics first written to a statistics file and read back (``Stats.save`` / ``Stats.load``);
  the file is then decoded and every tensor that was finite must come back finite;
- ``auto``: the same with ``mode="auto"``;
- ``calibrate``: ``tqcodec.calibrate`` on the random sequence and convolutional modules of
  ``tests/model/test_calibrate_properties.py`` with degenerate inputs (zeros, dead channels, 1e12
  and 1e-30 scales, constants, one sample, NaN, Inf, a failing forward), then (half the cases)
  ``tqcodec.save`` of the module's state dict with those statistics.

Statistics (``tests/fuzzing.py``'s ``degenerate_statistics`` and more): H = 0, rank-deficient H
(1-12 samples, dead channels), 1e12 between columns, H of order 1e-300, NaN or Inf, H slightly
indefinite (as a compact statistics file gives back), H of the wrong size, grouped H; for kinds
linear, conv, rows (``row_h``), embedding (token ``counts``) and plain (gain only), gains 0,
1e-30, 1e30 or NaN/Inf, output power 0 or huge; weights from 1e-30 to 1e30 in scale, zero or
constant, float32/float16/bfloat16, tensors of one element, at most 64x64.

Outcomes: ``ok``; ``TqzError:<CODE>``; ``ValueError:named`` (the message names the tensor: an
accepted refusal). Failures: ``uncaught:<Type>`` (any other exception), ``ValueError:unnamed``,
``invalid:<what>`` (a result that breaks the path's own checks: a non-finite curve point,
transform or reconstruction, a file that does not decode to finite tensors, NaN/Inf calibration
input not refused with ``BAD_INPUT``), ``hang`` (over ``--timeout``), ``over-memory``
(MemoryError under the worker's ``RLIMIT_AS`` cap of its start-up size plus ``--mem-mb``),
``died`` (the worker process died). The counts per path, cases/s, the load average and every
failure with its case number and traceback go to stdout and to
``benchmarks/results/fuzz_statistics-<cases>-seed<S>.json`` (or ``--out``).

One worker process (``--workers`` for more), replaced after a hang or a death.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FAILURES = ("uncaught", "ValueError:unnamed", "invalid", "hang", "over-memory", "died")
# relative frequency of each path: whole files and calibration cost 10-50x a unit case
PATHS = {"units": 40, "transforms": 30, "classic": 10, "save": 2, "auto": 0.5, "calibrate": 1.5}
BITS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)


class Invalid(Exception):
    """A result that breaks a path's own checks (a failure, like an uncaught exception)."""


def check(cond, what: str, detail: str = "") -> None:
    """``Invalid`` unless ``cond``: ``what`` is the outcome label's category, ``detail`` goes to
    the traceback."""
    if not cond:
        raise Invalid(what, detail)


# --- generators (numpy only: case i of seed S is always the same) --------------------------------

def h_kinds():
    from tests.fuzzing import STATISTICS_KINDS
    return STATISTICS_KINDS + ("indefinite", "mismatch", "lowrank")


def gen_h(rng, groups: int, d: int, kind: str, rows: int):
    """(h [groups, d', d'], mean [groups, d'] or None): degenerate second moments (d' = d except
    for kind ``mismatch``)."""
    import numpy as np
    from tests.fuzzing import STATISTICS_KINDS, degenerate_statistics
    if kind == "mismatch":
        d = max(1, d + int(rng.choice([-1, 1, 3])))
    base = kind if kind in STATISTICS_KINDS else "plain"
    if kind == "lowrank":
        base, rows = "dead", int(rng.integers(1, 4))
    same = rng.random() < 0.5  # groups sharing one H (self-attention's query/key/value)
    hs = []
    for g in range(groups):
        s = int(rng.integers(2**32)) if (g == 0 or not same) else None
        hs.append(hs[0] if s is None else degenerate_statistics(rows, s, base, d)[0][0])
    h = np.stack(hs)
    if kind == "indefinite":  # the rounding of a compact statistics file: eigenvalues slightly below 0
        scale = max(float(np.abs(h).max()), 1e-300)
        noise = rng.normal(size=h.shape) * scale * float(rng.choice([1e-7, 1e-3]))
        h = h + (noise + np.swapaxes(noise, 1, 2)) / 2
    mean = None
    r = rng.random()
    if r < 0.6:
        mean = rng.normal(size=(groups, d)) * np.sqrt(np.abs(np.diagonal(h, axis1=1, axis2=2)))
    elif r < 0.7:
        mean = np.zeros((groups, d))
    if mean is not None and kind == "nonfinite" and rng.random() < 0.3:
        mean[0, int(rng.integers(d))] = rng.choice([np.nan, np.inf])
    return h, mean


def gen_vector(rng, n: int, kind: str, counts: bool):
    """Row weights (``row_h``) or token ``counts`` [n'] made degenerate by ``kind``."""
    import numpy as np
    if kind == "mismatch":
        n = max(1, n + int(rng.choice([-1, 1])))
    if counts:
        v = rng.integers(0, 50, size=n).astype(np.float64) * (rng.random(n) < rng.random())
    else:
        v = rng.normal(size=n) ** 2 * rng.choice([1e-6, 1.0, 1e3])
    if kind == "zero":
        v[:] = 0
    elif kind in ("dead", "lowrank"):
        v[rng.random(n) < 0.5] = 0
    elif kind == "range":
        v *= 10.0 ** rng.uniform(-6, 6, size=n)
    elif kind == "one":
        v[:] = 0
        v[int(rng.integers(n))] = 1.0
    elif kind == "tiny":
        v *= 1e-300
    elif kind == "nonfinite":
        v[int(rng.integers(n))] = rng.choice([np.nan, np.inf])
    elif kind == "indefinite" and not counts:
        v[int(rng.integers(n))] = -abs(float(v.max())) * 1e-7
    if counts and rng.random() < 0.1:
        v *= 1e15  # huge token counts
    return v


def gen_gain(rng, kind: str) -> float:
    r = rng.random()
    if kind == "nonfinite" and r < 0.3:
        return float(rng.choice([float("nan"), float("inf")]))
    if r < 0.55:
        return 1.0
    if r < 0.65:
        return 0.0
    if r < 0.75:
        return float(rng.choice([1e-30, 1e30]))
    return float(10.0 ** rng.uniform(-4, 4))


def gen_rows(rng, d: int) -> int:
    """Samples seen: mostly a handful (1-12), sometimes none, sometimes plenty."""
    r = rng.random()
    if r < 0.55:
        return int(rng.integers(1, 13))
    if r < 0.65:
        return 0
    return int(rng.integers(1, 6 * max(d, 1) + 2))


def gen_weight(rng, shape: tuple, huge: bool = True):
    """Weights of a scale from 1e-30 to 1e30 (``huge``: else at most 1e3, outliers 1e9: what
    save hands its lossy modes, MAX_CODED_MAGNITUDE)."""
    import numpy as np
    scale = float(rng.choice([1e-30, 1e-6, 1e-3, 0.1, 1.0, 10.0, 1e3] + ([1e30] if huge else [1e3])))
    r = rng.random()
    if r < 0.06:
        w = np.zeros(shape)
    elif r < 0.12:
        w = np.full(shape, scale)
    else:
        w = rng.normal(size=shape) * scale
        if rng.random() < 0.15:  # one outlier
            w.reshape(-1)[int(rng.integers(w.size))] *= 1e6
        if rng.random() < 0.15:  # dead rows
            w.reshape(shape[0] if shape else 1, -1)[rng.random(shape[0] if shape else 1) < 0.5] = 0
    return w


def gen_tensor(rng, kind: str, name: str, small: bool = False, huge: bool = True):
    """(weight float64 array, TensorStats or None, h-kind) of tensor kind ``kind``."""
    import numpy as np
    from tqcodec.model.stats import TensorStats
    hk = str(rng.choice(h_kinds()))
    top = 16 if small else 64
    if rng.random() < 0.08:
        top = 1  # tensors of one element (or one row / one column)
    if kind == "linear":
        n, m = int(rng.integers(1, top + 1)), int(rng.integers(1, top + 1))
        if rng.random() < 0.3:
            n = m * int(rng.integers(2, 5))  # tall: transforms are offered
            n = min(n, 64)
        groups = int(rng.choice([g for g in (1, 1, 1, 2, 3, 4) if n % g == 0]))
        layout = "in_out" if groups == 1 and rng.random() < 0.2 else "out_in"
        rows = gen_rows(rng, m)
        h, mean = gen_h(rng, groups, m, hk, rows)
        st = TensorStats("linear", h, None, rows, layout, gen_gain(rng, hk), mean)
        w = gen_weight(rng, (n, m) if layout == "out_in" else (m, n), huge)
    elif kind == "conv":
        groups = int(rng.choice([1, 1, 2, 4]))
        cin = groups * int(rng.integers(1, 5))
        out = groups * int(rng.integers(1, (top // groups) + 1 if top > 1 else 2))
        ks = tuple(int(rng.integers(1, 4)) for _ in range(int(rng.integers(1, 3))))
        d = (cin // groups) * int(np.prod(ks))
        rows = gen_rows(rng, d)
        h, mean = gen_h(rng, groups, d, hk, rows)
        st = TensorStats("conv", h, None, rows, "out_in", gen_gain(rng, hk), mean)
        w = gen_weight(rng, (out, cin // groups) + ks, huge)
    elif kind == "rows":
        cin, cout, k = int(rng.integers(1, top + 1)), int(rng.integers(1, 9)), int(rng.integers(1, 4))
        st = TensorStats("rows", None, None, gen_rows(rng, cin), "out_in", gen_gain(rng, hk),
                         None, gen_vector(rng, cin, hk, counts=False))
        w = gen_weight(rng, (cin, cout, k), huge)
    elif kind == "embedding":
        vocab, dim = int(rng.integers(1, top + 1)), int(rng.integers(1, min(top, 32) + 1))
        counts = gen_vector(rng, vocab, hk, counts=True)
        st = TensorStats("embedding", None, counts, int(max(np.nansum(counts), 0)) if np.isfinite(counts).all() else 0,
                         "out_in", gen_gain(rng, hk))
        w = gen_weight(rng, (vocab, dim), huge)
    else:  # plain: biases, norms
        n = int(rng.integers(1, top + 1))
        st = TensorStats("plain", None, None, 0, "out_in", gen_gain(rng, hk))
        w = gen_weight(rng, (n,) if rng.random() < 0.8 else (), huge)
    if rng.random() < 0.1:
        st = None  # no statistics for this tensor
    return w, st, hk


def gen_stats(rng, tensors: dict, hks: list):
    import numpy as np
    from tqcodec.model.stats import Stats
    power = float(rng.choice([0.0, 1.0, 1.0, 1e-30, 1e30, 10.0 ** rng.uniform(-3, 3)]))
    if "nonfinite" in hks and rng.random() < 0.2:
        power = float(rng.choice([np.nan, np.inf]))
    return Stats({k: v for k, v in tensors.items() if v is not None}, power)


KINDS = ("linear", "linear", "conv", "rows", "embedding", "plain")


def checked(stats, name: str) -> None:
    """What save checks before an encoder reads the statistics (BAD_OPTION for NaN, Inf, negative)."""
    from tqcodec.modes.statistics import check_stats_scalars, check_tensor_stats
    check_stats_scalars(stats)
    if stats.get(name) is not None:
        check_tensor_stats(name, stats.get(name))


# --- the paths ------------------------------------------------------------------------------------

def path_units(rng, desc: dict, transforms: bool = False) -> None:
    import numpy as np
    from tqcodec.modes.tq.allocation import candidate_codes
    from tqcodec.modes.tq.encoder import Item, make_units, transform_options
    kind = str(rng.choice(("linear", "linear", "conv") if transforms else KINDS))
    w, st, hk = gen_tensor(rng, kind, "w", huge=False)
    if transforms and st is not None and kind == "linear" and rng.random() < 0.5:
        st.rows = int(rng.integers(4 * w.shape[1], 8 * w.shape[1] + 1))  # enough samples for an AAT
        st.h, st.mean = gen_h(rng, st.h.shape[0], st.h.shape[-1], hk, st.rows)
    stats = gen_stats(rng, {"w": st}, [hk])
    desc.update(kind=kind, shape=list(w.shape), h=hk, stats=st is not None, scale=float(abs(w).max()) if w.size else 0)
    checked(stats, "w")
    item = Item.of("w", "float32", w)
    units, layouts = make_units([item], stats)
    if transforms:
        for opt in transform_options([item], stats, layouts).values():
            check(np.isfinite(opt.synthesis).all(), "transform synthesis not finite")
            for u in opt.bands:
                check(np.isfinite(u.w).all(), "transform coefficients not finite")
                codes = candidate_codes(u.w)
                for code in (codes[0], codes[-1]):
                    dd, r = u.evaluate(code, bool(rng.random() < 0.5))
                    check(np.isfinite(dd) and dd >= 0 and np.isfinite(r) and r > 0, "transform curve point", f"{dd}, {r}")
        return
    for u in units:
        check(u.h is None or np.isfinite(u.h).all(), "unit H not finite")
        codes = candidate_codes(u.w)
        for code in (codes[0], codes[len(codes) // 2], codes[-1]):
            for fb in (False, True):
                dd, r = u.evaluate(code, fb)
                check(np.isfinite(dd) and dd >= 0 and np.isfinite(r) and r > 0, "curve point",
                      f"D {dd}, R {r} (feedback {fb})")


def path_classic(rng, desc: dict) -> None:
    import numpy as np
    from tqcodec.modes.importance import importance
    from tqcodec.pipeline.classic import encode_classic
    mode = str(rng.choice(["ecsq", "kmeans", "pq", "dither"]))
    kind = str(rng.choice(KINDS[:-1]))
    w, st, hk = gen_tensor(rng, kind, "w", huge=False)
    while w.ndim < 2 or min(w.shape) < 2:  # what save gives a classic mode: >= 2 dims
        w, st, hk = gen_tensor(rng, kind, "w", huge=False)
    stats = gen_stats(rng, {"w": st}, [hk])
    bits = float(rng.choice(BITS)) if rng.random() < 0.8 else None
    snr = float(rng.uniform(1, 80))
    desc.update(mode=mode, kind=kind, shape=list(w.shape), h=hk, bits=bits, snr=None if bits else snr,
                scale=float(abs(w).max()))
    checked(stats, "w")
    imp = importance("w", w.shape, stats)
    check(np.isfinite(imp).all() and (imp >= 0).all(), "importance not finite or negative")
    res = encode_classic(mode, "w", w, "float32", stats, bits=bits, snr_db=snr)
    check(np.isfinite(res.recon).all() and res.recon.shape == w.shape, "reconstruction not finite")


def _to_torch(w, dtype: str):
    import numpy as np
    import torch
    t = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64))
    return t.to({"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}[dtype])


def _roundtrip_stats(rng, stats, desc: dict):
    """The statistics through a statistics file (compact precisions round H: slightly indefinite)."""
    import numpy as np
    from tqcodec.model.stats import PRECISIONS, Stats
    finite = all(all(a is None or np.isfinite(a).all() for a in (s.h, s.mean, s.counts, s.row_h))
                 and np.isfinite(s.gain) for s in stats.tensors.values()) and np.isfinite(stats.output_power)
    if not finite or rng.random() >= 0.25:
        return stats
    prec = str(rng.choice(PRECISIONS))
    desc["stats_file"] = prec
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "s.safetensors")
        stats.save(p, precision=prec)
        return Stats.load(p)


def save_and_check(sd: dict, names: list, desc: dict, **opts) -> None:
    import warnings
    import torch
    import tqcodec
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = tqcodec.encode_bytes(sd, **opts)
    back = tqcodec.load(data)
    check(set(back) == set(sd), "the file does not hold every tensor")
    for k, t in sd.items():
        b = back[k]
        check(b.shape == t.shape and b.dtype == t.dtype, "shape or dtype changed", k)
        if t.is_floating_point() and bool(torch.isfinite(t).all()):
            check(bool(torch.isfinite(b).all()), "decoded values not finite", k)
    desc["bytes"] = len(data)


def path_save(rng, desc: dict, auto: bool = False) -> None:
    mode = "auto" if auto else str(rng.choice(["default", "tq", "ecsq", "kmeans", "pq", "dither"]))
    count = int(rng.integers(1, 5))
    sd, st, hks, names = {}, {}, [], []
    for i in range(count):
        kind = str(rng.choice(KINDS))
        name = f"layer{i}.weight" if kind != "plain" else f"layer{i}.bias"
        w, s, hk = gen_tensor(rng, kind, name)
        dtype = str(rng.choice(["float32", "float32", "float32", "float16", "bfloat16", "float64"]))
        sd[name], st[name] = _to_torch(w, dtype), s
        hks.append(hk)
        names.append(name)
        if kind in ("linear", "conv") and rng.random() < 0.4:  # its bias, weighed with the weight's gain
            b = f"layer{i}.bias"
            sd[b] = _to_torch(gen_weight(rng, (w.shape[0],)), dtype)
            from tqcodec.model.stats import TensorStats
            st[b] = TensorStats("plain", gain=s.gain) if s is not None and rng.random() < 0.7 else None
            names.append(b)
    if count > 1 and rng.random() < 0.1:  # a tied tensor
        sd["tied.weight"] = sd[names[0]]
        names.append("tied.weight")
    stats = _roundtrip_stats(rng, gen_stats(rng, st, hks), desc)
    target = {"bits": float(rng.choice(BITS))} if rng.random() < 0.8 else {"quality": float(rng.uniform(1, 80))}
    desc.update(mode=mode, tensors={k: [list(v.shape), str(v.dtype).replace("torch.", ""),
                                        None if st.get(k) is None else st[k].kind] for k, v in sd.items()},
                h=hks, **target)
    save_and_check(sd, names, desc, stats=stats, mode=None if mode == "default" else mode, **target)


def path_calibrate(rng, desc: dict) -> None:
    import math
    import torch
    import tqcodec
    from tests.model import test_calibrate_properties as cp
    seed = int(rng.integers(2**16))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    how = str(rng.choice(cp.DEGENERATE))
    max_samples = int(rng.choice([65536, 65536, 5, 7, 1]))
    method = str(rng.choice(["probe", "probe", "perturb"]))
    sensitivity = bool(rng.random() < 0.7)
    if rng.random() < 0.5:
        embed, batch_first = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        rnn = str(rng.choice(["LSTM", "GRU", "RNN", "none"]))
        layers, bidir = int(rng.integers(1, 3)), bool(rng.random() < 0.5)
        attn, out = str(rng.choice(["self", "cross", "none"])), str(rng.choice(["tensor", "tuple", "dict", "dataclass"]))
        batch, steps, nb = int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(1, 3))
        m = cp.SeqModel(embed, rnn, layers, bidir, batch_first, attn, out)
        shape = (batch, steps) if batch_first else (steps, batch)
        batches = []
        for _ in range(nb):
            if embed:
                batches.append(torch.randint(0, 11, shape, generator=gen))
            else:
                batches.append(cp._degrade(torch.randn(*shape, 6, generator=gen), how, gen, 2))
        if embed:
            with torch.no_grad():
                m.embed.weight.copy_(cp._degrade(m.embed.weight, how, gen, 1))
                if how in ("nan", "inf"):
                    m.embed.weight[batches[0].reshape(-1)[0]] = float("nan") if how == "nan" else float("inf")
        if how == "zero_weights":
            with torch.no_grad():
                m.inp.weight.zero_()
                m.inp.bias.zero_()
        if how == "bad_shape":
            batches[-1] = torch.randn(*shape, 7) if not embed else torch.full(shape, 99)
        desc.update(model="seq", embed=embed, rnn=rnn, layers=layers, bidirectional=bidir, batch_first=batch_first,
                    attn=attn, batch=batch, steps=steps)
    else:
        nd, cin = int(rng.integers(1, 4)), int(rng.choice([2, 4]))
        groups = {"one": 1, "two": 2, "depthwise": cin}[str(rng.choice(["one", "two", "depthwise"]))]
        groups = groups if 4 % groups == 0 else 1
        kernel, stride, dilation = int(rng.integers(1, 4)), int(rng.integers(1, 3)), int(rng.integers(1, 3))
        padding = rng.choice([0, 1, "same"])
        padding = padding if padding == "same" else int(padding)
        stride = 1 if padding == "same" else stride
        pmode = str(rng.choice(["zeros", "reflect", "replicate", "circular"]))
        se, tstride, tgroups = bool(rng.random() < 0.5), int(rng.integers(1, 3)), int(rng.choice([1, 2]))
        batch, size, nb = int(rng.integers(1, 3)), int(rng.integers(4, 7)), int(rng.integers(1, 3))
        size = max(size, dilation * (kernel - 1) + 1)
        m = cp.ConvModel(nd, cin, groups, kernel, stride, dilation, padding, pmode, se, tstride, tgroups, "tensor")
        if how == "zero_weights":
            with torch.no_grad():
                m.conv.weight.zero_()
        batches = [cp._degrade(torch.randn(batch, cin, *([size] * nd), generator=gen), how, gen, 1) for _ in range(nb)]
        if how == "bad_shape":
            batches[-1] = torch.randn(batch, cin + 1, *([size] * nd))
        desc.update(model="conv", nd=nd, cin=cin, groups=groups, kernel=kernel, stride=stride, dilation=dilation,
                    padding=padding, padding_mode=pmode, se=se, tstride=tstride, tgroups=tgroups, batch=batch, size=size)
    desc.update(how=how, max_samples=max_samples, method=method, sensitivity=sensitivity, seed=seed)
    try:
        stats = tqcodec.calibrate(m, batches, max_samples=max_samples, sensitivity=sensitivity,
                                  sensitivity_method=method, sensitivity_batches=2, sensitivity_samples=3)
    except tqcodec.TqzError as exc:
        check(exc.code == "BAD_INPUT", "calibrate refusal not BAD_INPUT", exc.code)
        raise
    check(how not in ("nan", "inf", "bad_shape"), "calibrate accepted a bad input", how)
    check(math.isfinite(stats.output_power), "output power not finite")
    if rng.random() < 0.5:
        sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
        mode = str(rng.choice(["default", "default", "tq", "auto", "ecsq", "kmeans", "pq", "dither"]))
        bits = float(rng.choice(BITS))
        desc.update(save_mode=mode, bits=bits)
        save_and_check(sd, list(sd), desc, stats=stats, bits=bits, mode=None if mode == "default" else mode)


RUNNERS = {
    "units": path_units,
    "transforms": lambda rng, desc: path_units(rng, desc, transforms=True),
    "classic": path_classic,
    "save": path_save,
    "auto": lambda rng, desc: path_save(rng, desc, auto=True),
    "calibrate": path_calibrate,
}


def pick_path(rng, paths: list[str]) -> str:
    weights = [PATHS[p] for p in paths]
    x = rng.random() * sum(weights)
    for p, w in zip(paths, weights):
        x -= w
        if x < 0:
            return p
    return paths[-1]


def names_in(desc: dict) -> list[str]:
    if "tensors" in desc:
        return list(desc["tensors"])
    return ["w"] if desc.get("path") != "calibrate" else []


def run_case(seed: int, case: int, paths: list[str]) -> tuple[str, str, dict, str]:
    """(path, outcome label, description of the case, traceback for a failure or '')."""
    import numpy as np
    import tqcodec
    rng = np.random.default_rng([seed, case])
    path = pick_path(rng, paths)
    desc: dict = {"path": path}
    try:
        RUNNERS[path](rng, desc)
        return path, "ok", desc, ""
    except tqcodec.TqzError as exc:
        return path, f"TqzError:{exc.code}", desc, ""
    except Invalid as exc:
        return path, f"invalid:{exc.args[0]}", desc, traceback.format_exc()
    except MemoryError:
        return path, "over-memory", desc, ""
    except ValueError as exc:
        msg = str(exc)
        named = any(repr(n) in msg or n in msg for n in names_in(desc))
        if path == "calibrate":  # a module's layer or parameter name
            named = "'" in msg or "layer" in msg
        return path, "ValueError:named" if named else "ValueError:unnamed", desc, "" if named else traceback.format_exc()
    except Exception as exc:  # noqa: BLE001 - this is what the fuzzer looks for
        return path, f"uncaught:{type(exc).__name__}", desc, traceback.format_exc()


# --- the harness (as benchmarks/fuzz.py: a worker process per slot, timeouts, a memory cap) --------

def _vm_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _injected(case: int):
    """--self-check: cases 1-4 misbehave on purpose."""
    import signal
    if case == 1:
        time.sleep(3600)
    if case == 2:
        try:
            bytearray(8 << 30)
        except MemoryError:
            return "units", "over-memory", {}, ""
    if case == 3:
        return "units", "uncaught:RuntimeError", {}, "injected"
    if case == 4:
        os.kill(os.getpid(), signal.SIGSEGV)
    return None


def worker(conn, seed: int, paths: list[str], mem_mb: int, self_check: bool = False) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings
    warnings.simplefilter("ignore")
    import resource

    import torch
    torch.set_num_threads(1)
    for p in paths:  # warm up every import before the cap
        for c in range(3):
            run_case(seed + 10**9, c, [p])
    cap = _vm_bytes() + (mem_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    conn.send(("ready", cap))
    while True:
        case = conn.recv()
        if case is None:
            return
        t0 = time.perf_counter()
        try:
            res = (self_check and _injected(case)) or run_case(seed, case, paths)
        except MemoryError:
            res = ("?", "over-memory", {}, "")
        conn.send((case, res, time.perf_counter() - t0))


class Slot:
    def __init__(self, ctx, seed: int, paths: list[str], mem_mb: int, self_check: bool = False):
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(child, seed, paths, mem_mb, self_check), daemon=True)
        self.proc.start()
        child.close()
        msg = self.parent.recv()
        assert msg[0] == "ready"
        self.case = None
        self.started = 0.0

    def submit(self, case: int) -> None:
        self.case = case
        self.started = time.monotonic()
        self.parent.send(case)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.parent.close()


def path_of(seed: int, case: int, paths: list[str]) -> str:
    import numpy as np
    return pick_path(np.random.default_rng([seed, case]), paths)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--first", type=int, default=0, help="number of the first case (to resume or split a run)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    ap.add_argument("--mem-mb", type=int, default=1024, help="address space a worker may add during a case")
    ap.add_argument("--replay", type=int, default=None, help="run one case here and print its outcome")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--self-check", action="store_true",
                    help="make cases 1-4 hang, exhaust memory, raise and segfault; check they are counted")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        ap.error(f"unknown paths {sorted(unknown)}")

    if args.replay is not None:
        import warnings
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        path, label, desc, tb = run_case(args.seed, args.replay, paths)
        print(f"case {args.replay} (seed {args.seed}): {path} -> {label} in {time.perf_counter() - t0:.2f} s")
        print(json.dumps(desc, default=str))
        if tb:
            print(tb)
        return 0 if label.split(":")[0] not in FAILURES and label not in FAILURES else 1

    ctx = mp.get_context("spawn")
    if args.self_check:
        args.timeout = min(args.timeout, 10.0)
    slots = [Slot(ctx, args.seed, paths, args.mem_mb, args.self_check) for _ in range(args.workers)]
    counts: dict[str, Counter] = defaultdict(Counter)
    seconds: Counter = Counter()
    bad: list[dict] = []
    cases = range(args.first, args.first + args.cases)
    todo = iter(cases)
    done = 0
    loads = [os.getloadavg()[0]]
    t0 = time.monotonic()
    last_report = t0
    for s in slots:
        c = next(todo, None)
        if c is not None:
            s.submit(c)
    import multiprocessing.connection as mpc
    while done < args.cases:
        busy = [s for s in slots if s.case is not None]
        ready = mpc.wait([s.parent for s in busy], timeout=0.5)
        now = time.monotonic()
        for i, s in enumerate(slots):
            if s.case is None:
                continue
            res = None
            if s.parent in ready:
                try:
                    case, res, took = s.parent.recv()
                except (EOFError, OSError):
                    res, took = None, now - s.started
                    label = "died"
            elif now - s.started > args.timeout:
                label, took = "hang", now - s.started
            elif not s.proc.is_alive():
                label, took = "died", now - s.started
            else:
                continue
            if res is not None:
                path, label, desc, tb = res
            else:
                path, desc, tb = path_of(args.seed, s.case, paths), {}, ""
            counts[path][label] += 1
            seconds[path] += took
            done += 1
            if label.split(":")[0] in FAILURES or label in FAILURES:
                bad.append({"case": s.case, "path": path, "label": label, "case_desc": desc, "traceback": tb})
                print(f"FAILURE case {s.case} {path}: {label}\n{tb}", flush=True)
            if label in ("hang", "died"):
                s.kill()
                slots[i] = s = Slot(ctx, args.seed, paths, args.mem_mb, args.self_check)
            s.case = None
            c = next(todo, None)
            if c is not None:
                s.submit(c)
        if now - last_report > 60:
            last_report = now
            loads.append(os.getloadavg()[0])
            print(f"[{done}/{args.cases}] {done / (now - t0):.1f} cases/s  failures={len(bad)}  "
                  f"load={loads[-1]:.2f}", flush=True)
    elapsed = time.monotonic() - t0
    loads.append(os.getloadavg()[0])
    for s in slots:
        s.parent.send(None)
        s.proc.join(5)
        if s.proc.is_alive():
            s.kill()

    if args.self_check:
        want = {1: "hang", 2: "over-memory", 3: "uncaught:RuntimeError", 4: "died"}
        got = {b["case"]: b["label"] for b in bad}
        ok = all(got.get(c) == lab for c, lab in want.items()) and len(bad) == 4
        print(f"self-check {'passed' if ok else 'FAILED'}: {got}")
        return 0 if ok else 1
    total = Counter()
    for c in counts.values():
        total.update(c)
    summary = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/fuzz_statistics.py"] + (argv or sys.argv[1:])),
        "cases": args.cases, "first": args.first, "seed": args.seed, "paths": paths, "workers": args.workers,
        "timeout_s": args.timeout, "mem_mb": args.mem_mb, "seconds": round(elapsed, 1),
        "cases_per_s": round(args.cases / elapsed, 2),
        "load_average": {"start": round(loads[0], 2), "end": round(loads[-1], 2),
                         "mean_of_samples": round(sum(loads) / len(loads), 2), "samples": len(loads)},
        "failures": len(bad),
        "cases_per_path": {p: sum(c.values()) for p, c in sorted(counts.items())},
        "seconds_per_case": {p: round(seconds[p] / max(sum(counts[p].values()), 1), 4) for p in sorted(counts)},
        "counts": dict(sorted(total.items(), key=lambda kv: -kv[1])),
        "counts_per_path": {p: dict(sorted(c.items(), key=lambda kv: -kv[1])) for p, c in sorted(counts.items())},
        "failed_cases": bad[:500],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"fuzz_statistics-{args.cases}-seed{args.seed}.json"
    out.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "failed_cases"}, indent=1))
    print(f"{'FAIL' if bad else 'PASS'}: {len(bad)} cases with an uncaught exception, an unnamed ValueError, an "
          f"invalid result, a hang, over memory or a dead worker; results in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

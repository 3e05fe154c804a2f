"""Property tests of tqcodec.model.calibrate (issue 19): random small modules built from every
supported layer (Linear, Conv1d/2d/3d with groups, depthwise and padding modes, ConvTranspose,
LSTM/GRU/RNN, MultiheadAttention, Embedding, a squeeze-excitation branch, nested outputs) on random
degenerate inputs (zeros, dead channels, 1e12 and 1e-30 scales, one sample, NaN, Inf, a failing
forward). Whatever happens, no exception but TqzError/ValueError escapes; NaN/Inf and failing
forwards are BAD_INPUT; otherwise every statistic is finite, every H symmetric positive
semi-definite (up to rounding), every gain finite and >= 0, every rows count the number of samples
the layer saw (capped by max_samples), and the statistics survive a file round trip.

1,150 generated cases in all (derandomized; about 25 s on one core)."""
from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tqcodec.errors import TqzError
from tqcodec.model.calibrate import calibrate
from tqcodec.model.stats import Stats, psd_violation

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny modules: one torch thread (a second one only waits on a shared machine, 100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FAILING = ("nan", "inf", "bad_shape")  # must end in TqzError BAD_INPUT
DEGENERATE = ("normal", "zeros", "dead", "huge", "tiny", "mixed", "constant", "zero_weights") + FAILING


def _degrade(x: torch.Tensor, how: str, gen: torch.Generator, channel_dim: int) -> torch.Tensor:
    x = x.clone()
    if how == "zeros":
        x.zero_()
    elif how == "dead":
        x.select(channel_dim, 0).zero_()
    elif how == "huge":
        x *= 1e12
    elif how == "tiny":
        x *= 1e-30
    elif how == "mixed":
        shape = [1] * x.dim()
        shape[channel_dim] = x.shape[channel_dim]
        x *= torch.logspace(-12, 12, x.shape[channel_dim]).reshape(shape)
    elif how == "constant":
        x.fill_(3.0)
    elif how in ("nan", "inf"):  # one input channel of one sample: every layer reads some of it
        b = int(torch.randint(0, x.shape[0], (1,), generator=gen))
        x[b].select(channel_dim - 1, 0).fill_(float("nan") if how == "nan" else -float("inf"))
    return x


@dataclasses.dataclass
class Pair:
    main: torch.Tensor
    extra: tuple


def _structure(kind: str, a: torch.Tensor, b: torch.Tensor):
    if kind == "tensor":
        return a
    if kind == "tuple":
        return (a, [b, None])
    if kind == "dict":
        return {"a": a, "more": {"b": b, "n": torch.arange(2)}}
    return Pair(a, (b,))


def _expected_rows(module: nn.Module, batches: list) -> dict[str, int]:
    """Samples each weight's statistics should count, from the module's own shapes (hooks of
    the test, one plain forward per batch)."""
    rows: dict[str, int] = {}
    hooks = []

    def add(name, n):
        rows[name] = rows.get(name, 0) + int(n)
    for mname, mod in module.named_modules():
        p = f"{mname}." if mname else ""
        if isinstance(mod, nn.MultiheadAttention):
            def h(m, args, out, p=p):
                q, k = args[0], args[1]
                add(p + "in_proj_weight", min(q.numel(), k.numel()) // q.shape[-1])
                add(p + "out_proj.weight", q.numel() // q.shape[-1])
        elif isinstance(mod, nn.RNNBase):
            def h(m, args, out, p=p):
                x = args[0]
                n = x.numel() // x.shape[-1]
                for k in range(m.num_layers):
                    for sfx in ([""] + (["_reverse"] if m.bidirectional else [])):
                        add(f"{p}weight_ih_l{k}{sfx}", n)
                        add(f"{p}weight_hh_l{k}{sfx}", n)
        elif isinstance(mod, nn.Linear) and not mname.endswith("out_proj"):
            def h(m, args, out, p=p):
                add(p + "weight", args[0].numel() // args[0].shape[-1])
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            def h(m, args, out, p=p):
                add(p + "weight", out.numel() // out.shape[1])
        elif isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            def h(m, args, out, p=p):
                add(p + "weight", args[0].numel() // args[0].shape[1])
        elif isinstance(mod, nn.Embedding):
            def h(m, args, out, p=p):
                add(p + "weight", args[0].numel())
        else:
            continue
        hooks.append(mod.register_forward_hook(h))
    try:
        with torch.no_grad():
            for x in batches:
                module(*x) if isinstance(x, tuple) else module(x)
    finally:
        for h in hooks:
            h.remove()
    return rows


RAN: dict[str, int] = {}  # cases run per property test


def _check(module: nn.Module, batches: list, how: str, max_samples: int, method: str, sensitivity: bool) -> None:
    expect_rows = None if how in FAILING else _expected_rows(module, batches)
    try:
        stats = calibrate(module, batches, max_samples=max_samples, sensitivity=sensitivity,
                          sensitivity_method=method, sensitivity_batches=2, sensitivity_samples=3, views=False)
    except TqzError as exc:
        assert exc.code == "BAD_INPUT", exc
        assert how in FAILING or (how == "huge" and "NaN or Inf" in str(exc)), exc  # float32 overflow
        if how in ("nan", "inf"):
            assert "NaN or Inf" in str(exc)
        return
    assert how not in FAILING, "a NaN/Inf input or a failing forward went through"
    assert math.isfinite(stats.output_power) and stats.output_power >= 0
    for name, s in stats.tensors.items():
        assert math.isfinite(s.gain) and s.gain >= 0, (name, s.gain)
        if s.h is not None:
            assert np.isfinite(s.h).all(), name
            assert np.array_equal(s.h, np.swapaxes(s.h, 1, 2)), name
            assert psd_violation(s.h) < 1e-9, (name, psd_violation(s.h))
            if s.kind == "embedding":  # the output gradients' second moment: no input mean, mean diagonal 1
                assert s.mean is None and s.h.shape == (1, s.h.shape[1], s.h.shape[1])
                assert np.trace(s.h[0]) / s.h.shape[1] == pytest.approx(1.0), name
            else:
                assert np.isfinite(s.mean).all(), name
                assert s.h.shape[0] == s.mean.shape[0] and s.h.shape[1:] == (s.mean.shape[1],) * 2
        if s.row_h is not None:
            assert np.isfinite(s.row_h).all() and (s.row_h >= 0).all(), name
        if s.counts is not None:
            assert (s.counts >= 0).all() and s.counts.sum() == s.rows
        if s.kind != "plain":  # token counts count every token; the others at most max_samples
            cap = math.inf if s.kind == "embedding" else max_samples
            assert s.rows == min(expect_rows[name], cap), (name, s.rows, expect_rows[name])
    assert {n for n in expect_rows} <= set(stats.tensors), set(expect_rows) - set(stats.tensors)
    with tempfile.TemporaryDirectory() as d:  # the file keeps everything (float64: exactly)
        path = Path(d) / "s.safetensors"
        stats.save(str(path), precision="float64")
        back = Stats.load(str(path))
        for name, s in stats.tensors.items():
            b = back.get(name)
            assert (b.kind, b.rows, b.gain) == (s.kind, s.rows, s.gain)
            if s.h is not None:
                assert np.array_equal(b.h, s.h)
        stats.save(str(path))  # compact: finite
        for s in Stats.load(str(path)).tensors.values():
            assert s.h is None or np.isfinite(s.h).all()


# --- sequence models: embedding, linear, recurrent, attention, two heads -------------------------

class SeqModel(nn.Module):
    def __init__(self, embed: bool, rnn: str, layers: int, bidirectional: bool, batch_first: bool, attn: str,
                 out: str):
        super().__init__()
        self.embed = nn.Embedding(11, 6) if embed else None
        self.inp = nn.Linear(6, 6)
        cls = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN, "none": None}[rnn]
        self.rnn = cls(6, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first) if cls else None
        feat = (10 if bidirectional else 5) if cls else 6
        self.to4 = nn.Linear(feat, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first) if attn != "none" else None
        self.attn_kind = attn
        self.head1, self.head2 = nn.Linear(4, 3), nn.Linear(feat, 2)
        self.out = out

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        h = torch.tanh(self.inp(x))
        if self.rnn is not None:
            h = self.rnn(h)[0]
        z = self.to4(h)
        if self.attn is not None:
            t = 1 if self.attn.batch_first else 0  # cross-attention: one key more than queries
            kv = z if self.attn_kind == "self" else torch.cat([z.flip(t), z.narrow(t, 0, 1)], t) * 0.5
            z = self.attn(z, kv, kv, need_weights=False)[0]
        return _structure(self.out, self.head1(z), self.head2(h))


@settings(max_examples=450, **SETTINGS)
@given(embed=st.booleans(), rnn=st.sampled_from(["LSTM", "GRU", "RNN", "none"]), layers=st.integers(1, 2),
       bidirectional=st.booleans(), batch_first=st.booleans(), attn=st.sampled_from(["self", "cross", "none"]),
       out=st.sampled_from(["tensor", "tuple", "dict", "dataclass"]), batch=st.integers(1, 3),
       steps=st.integers(1, 4), nbatches=st.integers(1, 2), how=st.sampled_from(DEGENERATE),
       max_samples=st.sampled_from([65536, 65536, 5]), method=st.sampled_from(["probe", "probe", "perturb"]),
       sensitivity=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_sequence_models(embed, rnn, layers, bidirectional, batch_first, attn, out, batch, steps, nbatches, how,
                         max_samples, method, sensitivity, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    m = SeqModel(embed, rnn, layers, bidirectional, batch_first, attn, out)
    shape = (batch, steps) if batch_first else (steps, batch)
    batches = []
    for _ in range(nbatches):
        if embed:
            batches.append(torch.randint(0, 11, shape, generator=gen))
        else:
            batches.append(_degrade(torch.randn(*shape, 6, generator=gen), how, gen, 2))
    if embed:  # degenerate activations through the embedding table
        with torch.no_grad():
            m.embed.weight.copy_(_degrade(m.embed.weight, how, gen, 1))
            if how in ("nan", "inf"):
                m.embed.weight[batches[0].reshape(-1)[0]] = float("nan") if how == "nan" else float("inf")
    if how == "zero_weights":
        with torch.no_grad():
            m.inp.weight.zero_()
            m.inp.bias.zero_()
    if how == "bad_shape":
        batches[-1] = torch.randn(*shape, 7) if not embed else torch.full(shape, 99)
    RAN["sequence"] = RAN.get("sequence", 0) + 1
    _check(m, batches, how, max_samples, method, sensitivity)


# --- convolutional models: conv, squeeze-excitation, transposed conv ------------------------------

CONV = {1: (nn.Conv1d, nn.ConvTranspose1d), 2: (nn.Conv2d, nn.ConvTranspose2d), 3: (nn.Conv3d, nn.ConvTranspose3d)}


class ConvModel(nn.Module):
    def __init__(self, nd, cin, groups, kernel, stride, dilation, padding, padding_mode, se, tstride, tgroups, out):
        super().__init__()
        conv, tconv = CONV[nd]
        self.conv = conv(cin, 4, kernel, stride=stride, dilation=dilation, padding=padding, groups=groups,
                         padding_mode=padding_mode)
        self.se = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 4)) if se else None
        self.up = tconv(4, 2, 2, stride=tstride, groups=tgroups)
        self.nd, self.out = nd, out

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if self.se is not None:
            s = self.se(y.mean(dim=tuple(range(2, 2 + self.nd))))
            y = y * torch.sigmoid(s).reshape(*s.shape, *([1] * self.nd))
        z = self.up(y)
        return _structure(self.out, z, y.mean(dim=1))


@settings(max_examples=450, **SETTINGS)
@given(nd=st.integers(1, 3), cin=st.sampled_from([2, 4]), groups=st.sampled_from(["one", "two", "depthwise"]),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), dilation=st.integers(1, 2),
       padding=st.sampled_from([0, 1, "same"]), padding_mode=st.sampled_from(["zeros", "reflect", "replicate",
                                                                              "circular"]),
       se=st.booleans(), tstride=st.integers(1, 2), tgroups=st.sampled_from([1, 2]),
       out=st.sampled_from(["tensor", "tuple", "dict", "dataclass"]), batch=st.integers(1, 2),
       size=st.integers(4, 6), nbatches=st.integers(1, 2), how=st.sampled_from(DEGENERATE),
       max_samples=st.sampled_from([65536, 65536, 7]), method=st.sampled_from(["probe", "probe", "perturb"]),
       seed=st.integers(0, 2 ** 16))
def test_conv_models(nd, cin, groups, kernel, stride, dilation, padding, padding_mode, se, tstride, tgroups, out,
                     batch, size, nbatches, how, max_samples, method, seed):
    if padding == "same":
        stride = 1
    size = max(size, dilation * (kernel - 1) + 1)  # every window fits (a failing forward is tested apart)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    g = {"one": 1, "two": 2, "depthwise": cin}[groups]
    if 4 % g:
        g = 1
    m = ConvModel(nd, cin, g, kernel, stride, dilation, padding, padding_mode, se, tstride, tgroups, out)
    if how == "zero_weights":
        with torch.no_grad():
            m.conv.weight.zero_()
    batches = [_degrade(torch.randn(batch, cin, *([size] * nd), generator=gen), how, gen, 1) for _ in range(nbatches)]
    if how == "bad_shape":
        batches[-1] = torch.randn(batch, cin + 1, *([size] * nd))
    RAN["conv"] = RAN.get("conv", 0) + 1
    _check(m, batches, how, max_samples, method, True)


# --- plain layers and statistics from activations -------------------------------------------------

@settings(max_examples=250, **SETTINGS)
@given(n=st.integers(1, 40), d=st.integers(1, 12), groups=st.integers(1, 3), scale=st.sampled_from([0.0, 1e-30, 1.0,
                                                                                                    1e12]),
       dead=st.integers(0, 3), seed=st.integers(0, 2 ** 16), precision=st.sampled_from(["float64", "float32",
                                                                                       "float16", "eig", "compact"]))
def test_from_activations_and_files(n, d, groups, scale, dead, seed, precision):
    """Grouped and rows-kind samples of any size and scale give finite PSD statistics that every
    file precision stores finite and PSD, diagonal kept."""
    RAN["files"] = RAN.get("files", 0) + 1
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, groups, d)) * scale
    x[..., :min(dead, d)] = 0
    stats = Stats.from_activations({"w": x, "r": x[:, 0]}, groups={"w": groups}, kinds={"r": "rows"})
    w, r = stats.get("w"), stats.get("r")
    assert w.h.shape == (groups, d, d) and w.rows == n and r.rows == n and r.row_h.shape == (d,)
    assert psd_violation(w.h) < 1e-12 and np.isfinite(r.row_h).all()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.safetensors"
        stats.save(str(path), precision=precision)
        back = Stats.load(str(path)).get("w")
    assert np.isfinite(back.h).all()
    assert psd_violation(back.h) < (1e-9 if precision in ("float64", "eig") or d <= 2 else 5e-3 * d)
    np.testing.assert_allclose(np.diagonal(back.h, axis1=1, axis2=2), np.diagonal(w.h, axis1=1, axis2=2),
                               rtol=2e-3 if precision == "eig" else 1e-12)


def test_the_property_tests_ran_over_1000_cases():
    """The three property tests above really ran at least 1,000 generated cases (hypothesis
    settings or profiles cannot quietly cut them)."""
    if set(RAN) != {"sequence", "conv", "files"}:
        pytest.skip("run the whole file")
    assert sum(RAN.values()) >= 1000, RAN


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])

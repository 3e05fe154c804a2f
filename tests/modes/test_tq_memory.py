"""What the calibrated tq encoder holds while it works: one H per distinct input, half of each
damped inverse's factor, and error-feedback levels within a byte budget (the same bytes either
way). A 600M-parameter Llama's calibrated encode peaked at 18 GiB with all of them held."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import tqcodec
from tqcodec.model.stats import Stats
from tqcodec.modes.tq import allocation
from tqcodec.modes.tq.encoder import Item, make_units, transform_options
from tqcodec.modes.tq.rounding import prepare, gptq_round


def _full_factor_rounding(w, h, step, q_min, q_max, block=32):
    """Error-feedback rounding as it read the whole upper factor U (the loop before U was kept
    as row blocks): the reference the row blocks must reproduce bit for bit."""
    from tqcodec.modes.tq.rounding import _hinv_upper
    perm = np.argsort(-np.diag(h), kind="stable")
    u = _hinv_upper(h[np.ix_(perm, perm)], 0.01)[0]
    wt = np.array(np.asarray(w, dtype=np.float64).T[perm], order="C")
    m, n = wt.shape
    qt = np.zeros((m, n))
    for i1 in range(0, m, block):
        i2 = min(i1 + block, m)
        w1, err1, u1 = wt[i1:i2], np.zeros((i2 - i1, n)), u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            qi = np.clip(np.rint(w1[i] * (1.0 / step)), q_min, q_max)
            qt[i1 + i] = qi
            e = (w1[i] - qi * step) / u1[i, i]
            if i + 1 < i2 - i1:
                w1[i + 1:] -= u1[i, i + 1:, None] * e[None, :]
            err1[i] = e
        if i2 < m:
            wt[i2:] -= u[i1:i2, i2:].T @ err1
    q = np.empty((n, m), dtype=np.int64)
    q[:, perm] = qt.T.astype(np.int64)
    return q


def test_the_damped_inverse_keeps_half_its_factor_and_rounds_as_the_whole_one():
    rng = np.random.default_rng(0)
    d = 513
    x = rng.standard_normal((2 * d, d)) * rng.uniform(0.1, 3.0, d)
    h = x.T @ x / len(x)
    prepared = prepare(h)
    assert prepared.nbytes < 0.6 * d * d * 8  # the whole factor: d * d * 8 bytes
    w = rng.standard_normal((40, d))
    w32 = w.astype(np.float32)  # a matrix kept as float32 is rounded without a float64 copy of it
    for step in (0.05, 0.4, rng.uniform(0.05, 0.4, 40)):
        np.testing.assert_array_equal(gptq_round(w, h, step, -1000, 1000, prepared=prepared),
                                      _full_factor_rounding(w, h, step, -1000, 1000))
        np.testing.assert_array_equal(gptq_round(w32, None, step, -1000, 1000, prepared=prepared),
                                      _full_factor_rounding(w32.astype(np.float64), h, step, -1000, 1000))


class _Attention(nn.Module):
    """Three projections of one input (query, key, value) and a wide one after them."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(24, 48), nn.Linear(24, 48), nn.Linear(24, 48)
        self.out = nn.Linear(48, 24)

    def forward(self, x):
        return self.out(torch.tanh(self.q(x)) * torch.sigmoid(self.k(x)) + self.v(x))


def test_tensors_reading_one_input_share_one_h_from_a_lazily_opened_file(tmp_path):
    torch.manual_seed(0)
    model = _Attention().eval()
    stats = tqcodec.calibrate(model, [torch.randn(64, 24) for _ in range(4)])
    stats.save(tmp_path / "stats.safetensors")
    lazy = Stats.open(tmp_path / "stats.safetensors")
    items = [Item.of(n, "float32", p.detach().double().numpy()) for n, p in model.named_parameters()]
    usable: dict = {}
    units, layouts = make_units(items, lazy, usable=usable)
    h_of = {u.name.split("\x00")[0]: u.h for u in units if u.h is not None}
    assert h_of["q.weight"] is h_of["k.weight"] is h_of["v.weight"]
    assert h_of["out.weight"] is not h_of["q.weight"]
    assert len(usable) == 2  # the projections' input and the output layer's
    options = transform_options(items, lazy, layouts, usable=usable)
    assert options, "48 x 24 projections are offered a transform"
    for name, option in options.items():  # the AAT's metric is the units' H, not another copy
        assert any(v is h_of[name] for v in usable.values())


def test_error_feedback_levels_stay_within_their_budget_and_give_the_same_file(monkeypatch):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 10)).eval()
    stats = tqcodec.calibrate(model, [torch.randn(64, 32) for _ in range(4)])
    sd = model.state_dict()
    kept = allocation.KeptLevels(allocation.KEPT_LEVELS_BYTES)
    monkeypatch.setattr(allocation, "KEPT", kept)
    monkeypatch.setattr("tqcodec.modes.tq.encoder.KEPT", kept)
    roomy = tqcodec.encode_bytes(sd, stats=stats, bits=3.0)
    assert kept.nbytes > 0

    tight = allocation.KeptLevels(3000)  # a few bands' levels at a time
    most, total, largest, put = [0], [0], [0], tight.put

    def counted(owner, code, levels):
        out = put(owner, code, levels)
        total[0] += levels.nbytes
        largest[0] = max(largest[0], levels.nbytes)
        most[0] = max(most[0], tight.nbytes)
        return out

    monkeypatch.setattr(tight, "put", counted)
    monkeypatch.setattr(allocation, "KEPT", tight)
    monkeypatch.setattr("tqcodec.modes.tq.encoder.KEPT", tight)
    assert tqcodec.encode_bytes(sd, stats=stats, bits=3.0) == roomy
    assert 0 < most[0] <= max(3000, largest[0])  # the limit, or one set of levels larger than it
    assert total[0] > 3 * 3000  # so levels were dropped (and made again where the file needed them)


def test_a_wide_h_made_again_when_read_gives_the_same_file(monkeypatch, tmp_path):
    """Units whose H is at least LAZY_H_DIM wide hold a LazyH (made again from the statistics
    when read, two held at a time) instead of the array: the same file, from statistics in
    memory and from a lazily opened file."""
    from tqcodec.modes.tq import encoder
    torch.manual_seed(2)
    model = _Attention().eval()
    stats = tqcodec.calibrate(model, [torch.randn(64, 24) for _ in range(4)])
    stats.save(tmp_path / "stats.safetensors")
    lazy = Stats.open(tmp_path / "stats.safetensors")
    sd = model.state_dict()
    held = {which: tqcodec.encode_bytes(sd, stats=st, bits=3.0) for which, st in (("memory", stats), ("file", lazy))}
    monkeypatch.setattr(encoder, "LAZY_H_DIM", 24)  # every H of this model
    items = [Item.of(n, "float32", p.detach().double().numpy()) for n, p in model.named_parameters()]
    units, _ = make_units(items, lazy)
    assert all(isinstance(u.h, allocation.LazyH) for u in units if u.h is not None and u.h.shape[-1] >= 24)
    assert any(isinstance(u.h, allocation.LazyH) for u in units)
    for which, st in (("memory", stats), ("file", lazy)):
        assert tqcodec.encode_bytes(sd, stats=st, bits=3.0) == held[which]


def test_a_lazy_h_keeps_nothing_of_the_statistics_it_was_read_from(monkeypatch, tmp_path):
    """A LazyH holds a way to read the statistics again, not the H read when the units were made
    (a 600M-parameter Llama's encode held twenty 128 MiB ones that way)."""
    import gc
    import weakref
    from tqcodec.model import stats as stats_module
    from tqcodec.modes.tq import encoder
    torch.manual_seed(3)
    model = _Attention().eval()
    tqcodec.calibrate(model, [torch.randn(64, 24) for _ in range(4)]).save(tmp_path / "stats.safetensors")
    lazy = Stats.open(tmp_path / "stats.safetensors")
    read, get = [], stats_module._StatsFile.__getitem__

    def recorded(self, name):
        st = get(self, name)
        if st.h is not None:
            read.append(weakref.ref(st.h))
        return st

    monkeypatch.setattr(stats_module._StatsFile, "__getitem__", recorded)
    monkeypatch.setattr(encoder, "LAZY_H_DIM", 24)
    items = [Item.of(n, "float32", p.detach().double().numpy()) for n, p in model.named_parameters()]
    units, _ = make_units(items, lazy)
    gc.collect()
    assert read and all(r() is None for r in read)
    assert all(u.h[0].shape == (u.h.shape[1],) * 2 for u in units if u.h is not None)  # read again


def test_the_damped_inverse_factor_is_of_the_damped_h_with_dead_columns_set_to_one():
    """``_hinv_upper`` (one Cholesky factorisation of H reversed and a triangular inverse): U is
    upper triangular and U^T U the inverse of H as damped, its dead columns set to 1."""
    from tqcodec.modes.tq.rounding import _hinv_upper
    rng = np.random.default_rng(1)
    d = 70
    x = rng.standard_normal((3 * d, d)) * rng.uniform(0.1, 3.0, d)
    x[:, [3, 40]] = 0.0  # two inputs that never carried energy
    h = x.T @ x / len(x)
    u, shift, dead, exact = _hinv_upper(h, 0.01)
    assert exact and np.array_equal(np.flatnonzero(dead), [3, 40])
    damped = h.copy()
    damped[dead, dead] = 1.0
    damped[np.diag_indices(d)] += shift
    assert shift == 0.01 * float(np.mean(np.diag(damped) - shift))
    assert np.array_equal(u, np.triu(u))
    np.testing.assert_allclose(u.T @ u @ damped, np.eye(d), atol=1e-9)


def test_error_feedback_rounding_gives_each_rows_weighted_error_without_a_product_with_h():
    """gptq_round's ``losses``: each row's e H e^T from the rounding's own scaled errors equals
    the product with H (dead input columns, one step or one per row, float32 rows); the
    degenerate fallback gives NaN, and the levels are the same with or without ``losses``."""
    from tqcodec.modes.tq import rounding
    rng = np.random.default_rng(2)
    d, n = 90, 37
    x = rng.standard_normal((2 * d, d)) * rng.uniform(0.1, 3.0, d)
    x[:, 7] = 0.0
    h = x.T @ x / len(x)
    w = rng.standard_normal((n, d)).astype(np.float32)
    prepared = prepare(h)
    for step in (0.2, rng.uniform(0.05, 0.5, n)):
        losses = np.empty(n)
        q = gptq_round(w, None, step, -50, 50, prepared=prepared, losses=losses)
        assert np.array_equal(q, gptq_round(w, None, step, -50, 50, prepared=prepared))
        e = w - q * np.reshape(step, (-1, 1))
        product = np.sum((e @ h) * e, axis=1)
        np.testing.assert_allclose(losses, product, rtol=1e-9, atol=1e-12 * product.max())
    fallback = rounding.Prepared(prepared.perm, tuple(np.eye(d)[i:i + 32, i:] for i in range(0, d, 32)), 32,
                                 exact_loss=False)
    losses = np.zeros(n)
    gptq_round(w, None, 0.2, -50, 50, prepared=fallback, losses=losses)
    assert np.isnan(losses).all()


def test_exact_points_weigh_errors_as_the_product_with_h(monkeypatch):
    """A unit's exact curve point takes its distortion from the rounding's losses: the same value
    (to rounding) as ``gain * tr(E H E^T)`` with its row weights, for a unit of its own, bands of
    a shared whole-matrix rounding, and bands refined together in one pass (_feed_row_bands)."""
    from tqcodec.format.steps import step_from_code
    from tqcodec.modes.tq.allocation import SharedRounding, Unit
    rng = np.random.default_rng(3)
    d, n = 64, 48
    x = rng.standard_normal((3 * d, d)) * rng.uniform(0.1, 3.0, d)
    h = (x.T @ x / len(x))[None]
    w = rng.standard_normal((n, d))
    rw = rng.uniform(0.5, 2.0, n)

    def product(u: Unit, code: int) -> float:
        e = (u.w - u.quantize(code, True) * step_from_code(code)) * np.sqrt(u.row_weights)[:, None]
        return u.gain * float(np.sum((e @ h[0]) * e))

    code = allocation.candidate_codes(w)[4]
    alone = Unit("alone", w, h, rw, 1.3)
    assert alone.evaluate(code, True)[0] == pytest.approx(product(alone, code), rel=1e-9)
    for whole in (True, False):
        monkeypatch.setattr(allocation, "WHOLE_MATRIX_ROUNDING", 10**9 if whole else 0)
        shared = SharedRounding(w)
        index = [np.arange(0, n, 2), np.arange(1, n, 2)]
        bands = [Unit(f"b\x00{i}", w[ix], h, rw[ix], 0.7, shared=shared, row_index=ix) for i, ix in enumerate(index)]
        if not whole:
            allocation._feed_row_bands(bands, {u.name: [code] for u in bands})
            assert all(code in u._fed for u in bands)
        for u in bands:
            assert u.evaluate(code, True)[0] == pytest.approx(product(u, code), rel=1e-9)


@pytest.mark.parametrize("psd", [True, False])
def test_an_h_made_again_is_checked_again_only_if_it_failed(monkeypatch, psd):
    """A wide H (a LazyH) made again from the same statistics gives the same array; the Cholesky
    check it passed the first time is not made again (an H that failed it is clipped again)."""
    from tqcodec.model.stats import TensorStats
    from tqcodec.modes.tq import encoder as enc
    monkeypatch.setattr(enc, "LAZY_H_DIM", 8)
    checks = []
    real = enc._psd_checked
    monkeypatch.setattr(enc, "_psd_checked", lambda h, mean: checks.append(1) or real(h, mean))
    x = np.random.default_rng(8).standard_normal((64, 12))
    h = (x.T @ x / 64)[None]
    if not psd:
        h = h - (float(np.linalg.eigvalsh(h[0]).min()) + 0.1) * np.eye(12)[None]  # smallest eigenvalue -0.1
    st = TensorStats("linear", h, None, 64)
    held = allocation.Matrices()
    lazy = enc.usable_h_of(st, {}, lambda: st, held)
    assert isinstance(lazy, allocation.LazyH) and len(checks) == 1
    first = lazy.array().copy()
    held.release()
    np.testing.assert_array_equal(lazy.array(), first)
    np.testing.assert_array_equal(first, enc.usable_h(h, 64))
    # made three times (to learn its shape, when first read, again after the release) and once by
    # usable_h above: checked once and by usable_h, or every time
    assert len(checks) == (2 if psd else 4)

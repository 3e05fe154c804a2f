"""tqcodec.model.stats: Stats.from_activations (grouped and rows samples), the statistics file
(format 2: each distinct H stored once, compact precisions; the first format still read),
Stats.open, and the encoder taking every kind of statistics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.numpy import save_file

import tqcodec
from tqcodec.model.calibrate import calibrate
from tqcodec.model.stats import Stats, TensorStats, local_distortion, psd_violation


def _spectrum_h(d: int, seed: int = 0, decay: float = 0.05) -> np.ndarray:
    """A PSD matrix like an activation second moment: decaying spectrum, uneven diagonal."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = np.exp(-decay * np.arange(d)) + 1e-3
    s = np.exp(rng.normal(size=d))
    h = (q * lam) @ q.T * s[:, None] * s[None, :]
    return (h + h.T) / 2  # exactly symmetric, as calibrate's


# --- from_activations ----------------------------------------------------------------------------

def test_from_activations_groups_tuples_and_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3, 4))
    st = Stats.from_activations({"g": x, "t": (x[:, 0], x[:10, 1], torch.from_numpy(x[:20, 2])), "r": x[:, 0]},
                                groups={"g": 3}, kinds={"r": "rows"})
    g, t, r = st.get("g"), st.get("t"), st.get("r")
    for i in range(3):
        np.testing.assert_allclose(g.h[i], x[:, i].T @ x[:, i] / 30)
        np.testing.assert_allclose(g.mean[i], x[:, i].mean(0))
    assert g.rows == 30 and t.rows == 10  # the smallest group's count
    np.testing.assert_allclose(t.h[1], x[:10, 1].T @ x[:10, 1] / 10)
    assert r.kind == "rows" and r.h is None and r.rows == 30
    np.testing.assert_allclose(r.row_h, (x[:, 0] ** 2).mean(0))
    for bad in (dict(groups={"g": 2}), dict(kinds={"g": "sideways"}), dict(layouts={"g": "in_out"}, groups={"g": 3})):
        with pytest.raises(ValueError):
            Stats.from_activations({"g": x}, **bad)
    with pytest.raises(ValueError, match="NaN"):
        Stats.from_activations({"g": np.full((2, 2), np.nan)})


# --- the file -------------------------------------------------------------------------------------

def test_each_distinct_h_is_stored_once(tmp_path):
    """query/key/value with one input and a self-attention in_proj's three groups: one matrix in
    the file, and one shared array after load."""
    h = _spectrum_h(64)[None]
    other = _spectrum_h(64, seed=1)[None]
    shared = Stats({"q": TensorStats("linear", h, rows=5), "k": TensorStats("linear", h.copy(), rows=5),
                    "v": TensorStats("linear", h.copy(), rows=5), "in_proj": TensorStats("linear", np.repeat(h, 3, 0),
                                                                                         rows=5)})
    distinct = Stats({"q": TensorStats("linear", h, rows=5), "k": TensorStats("linear", other, rows=5)})
    for precision in ("float64", "compact"):
        a, b = tmp_path / f"shared-{precision}", tmp_path / f"distinct-{precision}"
        shared.save(str(a), precision=precision)
        distinct.save(str(b), precision=precision)
        size_a, size_b = a.stat().st_size, b.stat().st_size
        assert size_a < 0.6 * size_b  # 6 uses of one matrix < 2 matrices
        back = Stats.load(str(a))
        assert back.get("q").h is back.get("k").h is back.get("v").h
        np.testing.assert_array_equal(back.get("in_proj").h[2], back.get("q").h[0])
        assert back.get("in_proj").h.shape == (3, 64, 64)


@pytest.mark.parametrize("precision,tol", [("float64", 1e-12), ("float32", 1e-6), ("float16", 2e-3), ("eig", 2e-2),
                                           ("compact", 2e-3)])
def test_precisions_keep_what_the_encoder_needs(tmp_path, precision, tol):
    """Every precision keeps the diagonal (eig: to float16 rounding), stays PSD where promised
    (float64, eig), and predicts a random error's distortion within ``tol``."""
    h = _spectrum_h(96)[None]
    st = Stats({"w": TensorStats("linear", h, rows=7, gain=2.5, mean=np.ones((1, 96)))})
    path = tmp_path / "s.safetensors"
    st.save(str(path), precision=precision)
    back = Stats.load(str(path)).get("w")
    assert (back.rows, back.gain) == (7, 2.5) and np.array_equal(back.mean, np.ones((1, 96)))
    np.testing.assert_allclose(np.diag(back.h[0]), np.diag(h[0]), rtol=2e-3 if precision == "eig" else 1e-12)
    if precision in ("float64", "eig"):
        assert psd_violation(back.h) < 1e-12
    e = np.random.default_rng(1).normal(size=(10, 96))
    want = local_distortion(e, st.get("w"))
    assert local_distortion(e, back) == pytest.approx(want, rel=tol)
    if precision == "float64":
        assert np.array_equal(back.h, h)


def test_compact_uses_eigenpairs_for_large_inputs(tmp_path):
    """d > 512: top eigenpairs of the correlation matrix (rank max(64, d/8)) and the diagonal
    remainder; the file is a fraction of the float64 one and the distortion of a random error
    and of a low-rank one are close."""
    d = 640
    h = _spectrum_h(d, decay=0.1)[None]
    st = Stats({"w": TensorStats("linear", h, rows=1)})
    st.save(str(tmp_path / "full"), precision="float64")
    st.save(str(tmp_path / "compact"))
    assert (tmp_path / "compact").stat().st_size < 0.15 * (tmp_path / "full").stat().st_size
    back = Stats.load(str(tmp_path / "compact")).get("w")
    assert psd_violation(back.h) < 1e-12
    rng = np.random.default_rng(2)
    for e in (rng.normal(size=(4, d)), rng.normal(size=(4, 3)) @ rng.normal(size=(3, d))):
        assert local_distortion(e, back) == pytest.approx(local_distortion(e, st.get("w")), rel=0.02)


def test_dead_inputs_and_extreme_scales_survive_every_precision(tmp_path):
    h = np.diag([1e24, 0.0, 1e-24, 1.0])[None].copy()
    h[0, 0, 3] = h[0, 3, 0] = 1e11
    for precision in ("float64", "float32", "float16", "eig", "compact"):
        Stats({"w": TensorStats("linear", h, rows=1)}).save(str(tmp_path / precision), precision=precision)
        back = Stats.load(str(tmp_path / precision)).get("w").h[0]
        assert np.isfinite(back).all() and np.all(back[1] == 0) and np.all(back[:, 1] == 0)
        np.testing.assert_allclose(np.diag(back), np.diag(h[0]), rtol=1e-3)


def test_first_format_files_are_still_read(tmp_path):
    """A file written by the first Stats.save (float64 arrays per tensor, two metadata keys)."""
    h = _spectrum_h(6)[None]
    meta = {"fc.weight": {"kind": "linear", "rows": 12, "layout": "out_in", "gain": 0.5},
            "emb.weight": {"kind": "embedding", "rows": 9, "layout": "out_in", "gain": 2.0},
            "fc.bias": {"kind": "plain", "rows": 0, "layout": "out_in", "gain": 0.5}}
    arrays = {"fc.weight::h": h, "fc.weight::mean": np.ones((1, 6)), "emb.weight::counts": np.arange(4.0)}
    path = tmp_path / "old.safetensors"
    save_file(arrays, str(path), metadata={"tqz.stats": json.dumps(meta, sort_keys=True), "tqz.output_power": "3.5"})
    for st in (Stats.load(str(path)), Stats.open(str(path))):
        assert st.output_power == 3.5 and sorted(st.keys()) == sorted(meta)
        fc = st.get("fc.weight")
        assert np.array_equal(fc.h, h) and fc.rows == 12 and fc.gain == 0.5 and np.array_equal(fc.mean, np.ones((1, 6)))
        assert np.array_equal(st.get("emb.weight").counts, np.arange(4.0)) and st.get("fc.bias").h is None


def test_unknown_files_and_options_are_refused(tmp_path):
    st = Stats({"w": TensorStats("linear", np.eye(3)[None], rows=1)})
    with pytest.raises(ValueError, match="precision"):
        st.save(str(tmp_path / "x"), precision="float8")
    save_file({"a": np.zeros(1)}, str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="not a statistics file"):
        Stats.load(str(tmp_path / "plain"))
    doc = {"format": "3", "tensors": {}, "blocks": {}, "output_power": 0.0}
    save_file({"a": np.zeros(1)}, str(tmp_path / "newer"), metadata={"tqz.stats": json.dumps(doc)})
    with pytest.raises(ValueError, match="format '3'"):
        Stats.open(str(tmp_path / "newer"))


def test_open_reads_the_same_as_load(tmp_path):
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.l, self.a = nn.Embedding(10, 8), nn.LSTM(8, 8, batch_first=True), nn.MultiheadAttention(8, 2)
            self.up = nn.ConvTranspose1d(8, 4, 2, stride=2)

        def forward(self, ids):
            h = self.l(self.e(ids))[0]
            h = self.a(h, h, h)[0]
            return self.up(h.transpose(1, 2))
    st = calibrate(M(), [torch.randint(0, 10, (3, 5))])
    path = tmp_path / "s.safetensors"
    st.save(str(path))
    eager, lazy = Stats.load(str(path)), Stats.open(str(path))
    assert sorted(eager.keys()) == sorted(lazy.keys()) == sorted(st.keys())
    for n in st.keys():
        a, b = eager.get(n), lazy.tensors[n]
        assert (a.kind, a.rows, a.gain) == (b.kind, b.rows, b.gain)
        for f in ("h", "mean", "counts", "row_h"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None) == (y is None) and (x is None or np.array_equal(x, y)), (n, f)
    assert eager.get("up.weight").kind == "rows" and eager.get("a.in_proj_weight").h.shape == (3, 8, 8)


def test_the_encoder_takes_every_kind(tmp_path):
    """tq encodes a model whose statistics hold every kind (linear with groups, rows, embedding,
    plain), from memory and from a compact file, and the file decodes."""
    torch.manual_seed(1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.l = nn.Embedding(50, 32), nn.GRU(32, 32, batch_first=True, bidirectional=True)
            self.a = nn.MultiheadAttention(64, 4, batch_first=True)
            self.up = nn.ConvTranspose1d(64, 16, 4, stride=4)

        def forward(self, ids):
            h = self.l(self.e(ids))[0]
            return self.up(self.a(h, h, h)[0].transpose(1, 2))
    m = M()
    st = calibrate(m, [torch.randint(0, 50, (4, 12)) for _ in range(3)])
    kinds = {s.kind for s in st.tensors.values()}
    assert kinds == {"linear", "rows", "embedding", "plain"}
    st.save(str(tmp_path / "s.safetensors"))
    sd = m.state_dict()
    for i, stats in enumerate((st, Stats.load(str(tmp_path / "s.safetensors")))):
        tqcodec.save(sd, tmp_path / f"m{i}.tqz", stats=stats, bits=4)
        back = tqcodec.load(tmp_path / f"m{i}.tqz")
        assert set(back) == set(sd)
        size = (tmp_path / f"m{i}.tqz").stat().st_size
        assert 0.9 < 8 * size / sum(t.numel() for t in sd.values()) / 4 < 1.1


def test_synthetic_flag_survives_the_file(tmp_path):
    """Statistics of made-up inputs say so in their file; others keep their bytes."""
    st = Stats({"w": TensorStats("linear", h=np.eye(3)[None], rows=10)}, 2.0)
    plain = st.to_bytes()
    st.synthetic = True
    marked = st.to_bytes()
    assert marked != plain
    path = tmp_path / "s.safetensors"
    path.write_bytes(marked)
    assert Stats.load(str(path)).synthetic and Stats.open(str(path)).synthetic
    assert Stats.open(str(path)).subset(["w"]).synthetic
    path.write_bytes(plain)
    assert not Stats.load(str(path)).synthetic


def test_top_eigenpairs_by_subspace_iteration_match_a_full_eigh(monkeypatch):
    """Above SUBSPACE_MIN_DIM, the top eigenpairs come from seeded subspace iteration: the same
    eigenvalues and the same leading directions as a full eigh, the same bits every call, and a
    stored C as close to the exact one as the full eigh's."""
    from tqcodec.model import stats as stats_module
    monkeypatch.setattr(stats_module, "SUBSPACE_MIN_DIM", 256)
    monkeypatch.setattr(stats_module, "SUBSPACE_OVERSAMPLE", 32)
    rng = np.random.default_rng(2)
    x = np.tanh(rng.standard_normal((2000, 64)) @ rng.standard_normal((64, 400)) / 8)
    h = x.T @ x / len(x)
    _, c = stats_module._correlation(h)
    vals, vecs = stats_module.top_eigenpairs(c, 48)
    full_vals, full_vecs = np.linalg.eigh(c)
    full_vals, full_vecs = full_vals[::-1][:48], full_vecs[:, ::-1][:, :48]
    np.testing.assert_allclose(vals, full_vals, rtol=1e-5, atol=1e-6 * full_vals[0])
    overlap = np.abs(np.sum(vecs[:, :10] * full_vecs[:, :10], axis=0))
    assert overlap.min() > 0.999
    again = stats_module.top_eigenpairs(c, 48)
    np.testing.assert_array_equal(again[1], vecs)

    def stored_error(arrays):
        back = stats_module._decode_matrix(arrays, "eig", 400)
        return np.linalg.norm(back - h) / np.linalg.norm(h)

    fast = stored_error(stats_module._encode_matrix(h, "eig", 48))
    monkeypatch.setattr(stats_module, "SUBSPACE_MIN_DIM", 10 ** 6)
    exact = stored_error(stats_module._encode_matrix(h, "eig", 48))
    assert fast <= exact * 1.01

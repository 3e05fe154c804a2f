"""Mode tq's encoder (spec §7.5; tqcodec.modes.tq.{encoder,allocation,rounding,transforms}):
error-feedback rounding, one-lambda allocation, rate control on whole files, determinism, exact
round trips, convs, bias correction, the choice of transforms. (The decoder's rules:
tests/modes/test_tq_format.py.)"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

import tqcodec
from tqcodec.format.manifest import TensorRecord
from tqcodec.modes import tq as tq_mode
from tqcodec.model.stats import Stats, TensorStats
from tqcodec.modes.tq.encoder import Item, make_units, reconstruction
from tqcodec.modes.tq.rounding import gptq_round, round_nearest
from tests.helpers import Small, param_count


# --- rounding ---------------------------------------------------------------------------------

def test_gptq_beats_nearest_on_correlated_inputs():
    rng = np.random.default_rng(0)
    m, n = 32, 16
    mix = rng.normal(size=(m, m))
    x = rng.normal(size=(2000, m)) @ mix * 0.3 + rng.normal(size=(2000, 1))  # strongly correlated
    h = x.T @ x / len(x)
    w = rng.normal(size=(n, m)) * 0.1
    step = 0.05
    out_err = lambda q: float(np.einsum("ij,jk,ik->", w - q * step, h, w - q * step))  # noqa: E731
    e_rtn = out_err(round_nearest(w, step, -1000, 1000))
    e_gptq = out_err(gptq_round(w, h, step, -1000, 1000))
    assert e_gptq < 0.7 * e_rtn
    # deterministic
    np.testing.assert_array_equal(gptq_round(w, h, step, -1000, 1000), gptq_round(w, h, step, -1000, 1000))


def test_gptq_respects_level_range_and_identity_h_is_nearest():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 10))
    q = gptq_round(w, np.eye(10), 0.25, -2, 1)
    assert q.min() >= -2 and q.max() <= 1
    np.testing.assert_array_equal(gptq_round(w, np.eye(10), 0.1, -99, 99, act_order=False),
                                  round_nearest(w, 0.1, -99, 99))


def test_gptq_step_per_row_is_each_row_rounded_at_its_step():
    """Rows round independently under one H: one pass with a step per row gives every row the
    levels a pass over its own rows at its step gives (what the tq encoder's per-band refine uses)."""
    rng = np.random.default_rng(3)
    m, n = 48, 30
    x = rng.normal(size=(500, m)) @ rng.normal(size=(m, m))
    h = x.T @ x / len(x)
    w = rng.normal(size=(n, m))
    bands = [np.arange(0, n, 3), np.arange(1, n, 3), np.arange(2, n, 3)]
    steps = [0.05, 0.11, 0.3]
    rows = np.concatenate(bands)
    per_row = np.concatenate([np.full(len(b), s) for b, s in zip(bands, steps)])
    together = gptq_round(w[rows], h, per_row, -1000, 1000)
    alone = np.concatenate([gptq_round(w[b], h, s, -1000, 1000) for b, s in zip(bands, steps)])
    np.testing.assert_array_equal(together, alone)
    assert not np.array_equal(together, gptq_round(w[rows], h, 0.11, -1000, 1000))


# --- whole-file rate control, determinism, round trip ------------------------------------------

@pytest.mark.parametrize("bits", [2.0, 3.0, 4.0, 6.0])
def test_bits_target_whole_file(model_and_stats, bits):
    m, st, _ = model_and_stats
    sd = m.state_dict()
    data = tqcodec.encode_bytes(sd, stats=st, bits=bits)
    got = 8 * len(data) / param_count(sd)
    assert abs(got / bits - 1) <= 0.03, got


def test_deterministic_and_decodes(model_and_stats):
    m, st, x = model_and_stats
    sd = m.state_dict()
    a = tqcodec.encode_bytes(sd, stats=st, bits=4.0)
    b = tqcodec.encode_bytes(sd, stats=st, bits=4.0)
    assert a == b
    dec = tqcodec.load(a)
    assert list(dec) == list(sd)
    for k, v in sd.items():
        assert dec[k].dtype == v.dtype and dec[k].shape == v.shape
    with tqcodec.open(a) as f:
        assert f.info("fc1.weight").mode == "tq"
        assert f.info("c2.weight").mode == "tq"
    var, got = sd["bn.running_var"], dec["bn.running_var"]
    assert (got >= 0.5 * var).all() and (got <= 1.5 * var).all()  # never coarser than the smallest variance
    assert torch.equal(dec["bn.num_batches_tracked"], sd["bn.num_batches_tracked"])
    m2 = Small()
    m2.load_state_dict(dec)
    m2.eval()
    with torch.no_grad():
        y, y2 = m(x), m2(x)
    snr = 10 * torch.log10(y.pow(2).mean() / (y - y2).pow(2).mean())
    assert snr > 15  # 4 bits/param keeps the outputs close


def test_stats_make_smaller_output_error_than_data_free(model_and_stats):
    m, st, x = model_and_stats
    sd = m.state_dict()

    def out_err(data):
        m2 = Small()
        m2.load_state_dict(tqcodec.load(data))
        m2.eval()
        with torch.no_grad():
            return float((m(x) - m2(x)).pow(2).mean())

    with_stats = tqcodec.encode_bytes(sd, stats=st, bits=3.0)
    data_free = tqcodec.encode_bytes(sd, mode="tq", bits=3.0)
    assert abs(len(with_stats) / len(data_free) - 1) < 0.05
    assert out_err(with_stats) < out_err(data_free)


def test_quality_target_is_monotonic(model_and_stats):
    m, st, _ = model_and_stats
    sd = m.state_dict()
    sizes = [len(tqcodec.encode_bytes(sd, stats=st, quality=q)) for q in (15, 30, 45)]
    assert sizes[0] < sizes[1] < sizes[2]


def test_decoder_rebuilds_encoder_reconstruction_exactly(model_and_stats):
    m, st, _ = model_and_stats
    sd = m.state_dict()
    items = [Item.of(k, "float32", v.double().numpy()) for k, v in sd.items() if v.is_floating_point()]
    units, layouts = make_units(items, st)
    by_name = {}
    for u in units:
        by_name.setdefault(u.name.split("\x00")[0], []).append(u)
    for name, bands in by_name.items():
        codes = [max(-100, int(np.floor(4 * np.log2(np.sqrt(np.mean(u.w ** 2)) + 1e-12))) - 4) for u in bands]
        _, params, streams = tq_mode.write([u.quantize(c, True) for u, c in zip(bands, codes)], codes,
                                         layout=layouts[name])
        shape = tuple(sd[name].shape)
        rec = TensorRecord(name, "float32", shape, "tq", params)
        assert tuple(s.items for s in tq_mode.stream_items(tq_mode.parse(rec), 0, [rec]))[1:] == tuple(
            sum(c for c, _ in s) for s in streams[1:])
        got = tq_mode.decode(tq_mode.parse(rec), rec, streams)
        want = np.concatenate([reconstruction(u, c) for u, c in zip(bands, codes)]).astype(np.float32)
        np.testing.assert_array_equal(got.reshape(want.shape), want)


def test_grouped_conv_units_use_per_group_statistics(model_and_stats):
    _, st, _ = model_and_stats
    assert st.get("c2.weight").h.shape == (4, 18, 18)
    assert st.get("dw.weight").h.shape == (8, 9, 9)
    sd = model_and_stats[0].state_dict()
    items = [Item.of(k, "float32", sd[k].double().numpy()) for k in ("c2.weight", "dw.weight")]
    units, _ = make_units(items, st)
    assert all(u.h is not None and u.h.shape[0] in (4, 8) for u in units)


def test_tied_weights_stored_once():
    torch.manual_seed(3)
    w = torch.randn(64, 32)
    sd = {"a.weight": w, "b.weight": w, "c.weight": torch.randn(40, 32)}
    data = tqcodec.encode_bytes(sd, mode="tq", bits=4.0)
    with tqcodec.open(data) as f:
        assert f.info("b.weight").mode == "alias"
        assert f.info("a.weight").mode == "tq"
    dec = tqcodec.load(data)
    assert torch.equal(dec["a.weight"], dec["b.weight"])


def test_in_out_layout_from_activations():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 24)) @ rng.normal(size=(24, 24))
    w_in_out = torch.from_numpy(rng.normal(size=(24, 40)).astype(np.float32))
    st = tqcodec.Stats.from_activations({"mm": x}, layouts={"mm": "in_out"})
    data = tqcodec.encode_bytes({"mm": w_in_out}, stats=st, quality=30)
    with tqcodec.open(data) as f:
        assert f.info("mm").params["layout"] == "in_out"
        back = f.get_tensor("mm")
    assert back.shape == w_in_out.shape
    err = (back - w_in_out).double().numpy()
    rel = np.einsum("ji,jk,ki->", err, x.T @ x, err) / np.einsum("ji,jk,ki->", w_in_out.double().numpy(),
                                                                x.T @ x, w_in_out.double().numpy())
    assert rel < 10 ** (-2.5)


def test_bias_correction_removes_mean_output_error():
    """Before its own rounding, the corrected bias cancels the mean output shift of the
    quantized weight: (W_hat - W) E[x] + (b' - b) = 0."""
    from tqcodec.modes.tq.encoder import _bias_pairs, _correct_biases
    torch.manual_seed(6)
    lin = nn.Linear(16, 8)
    x = torch.randn(256, 16) * 0.1 + 1.0
    st = tqcodec.calibrate(lin, [x], sensitivity=True)
    assert st.get("weight").mean.shape == (1, 16)
    sd = lin.state_dict()
    items = [Item.of(k, "float32", v.double().numpy()) for k, v in sd.items()]
    units, layouts = make_units(items, st)
    pairs = _bias_pairs(units, st, layouts)
    assert len(pairs) == 1
    bands, bias = pairs[0]
    pick = {u.name: -12 for u in units}
    orig = {id(b): b.w.copy() for b in bias}
    _correct_biases(pairs, orig, pick)
    w_hat = np.concatenate([reconstruction(u, -12) for u in bands])
    mu = x.double().mean(0).numpy()
    new_bias = np.concatenate([b.w.reshape(-1) for b in bias])
    shift = (w_hat - sd["weight"].double().numpy()) @ mu + new_bias - sd["bias"].double().numpy()
    assert np.abs(shift).max() < 1e-9


# --- transforms: numerics (tqcodec.modes.tq.transforms) -----------------------------------------

def test_transforms_are_deterministic_and_invert():
    from tqcodec.modes.tq import transforms as T
    rng = np.random.default_rng(7)
    mat = rng.normal(size=(6, 40))
    x = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    h = x.T @ x / 300
    a, s, _ = T.aat(mat, h)
    np.testing.assert_allclose(s @ (a @ mat), mat, atol=1e-9)
    a2, s2, _ = T.aat(mat.copy(), h.copy())
    np.testing.assert_array_equal(a, a2)
    ak, sk, w = T.klt(mat)
    np.testing.assert_allclose(sk @ ak, np.eye(6), atol=1e-12)
    assert np.all(np.diff(w) <= 1e-12)


def test_transform_chosen_only_when_it_pays():
    from tqcodec.modes.tq import transforms as T
    rng = np.random.default_rng(8)
    # a conv-like tall matrix (m = 8 inputs, p = 4096 columns) with strongly correlated inputs
    basis = rng.normal(size=(8, 8)) * np.array([10, 5, 2, 1, 0.1, 0.05, 0.01, 0.01])
    tall = basis @ rng.normal(size=(8, 4096))
    assert T.pays(tall)
    # a square random projection: decorrelated already, the transform cannot pay its m*m*16 bits
    square = rng.normal(size=(64, 64))
    assert not T.pays(square)


# --- transform choice (encoder: tqcodec.modes.tq.encoder) ---------------------------------------

def _tall(correlated: bool, n: int = 4096, m: int = 32, rank: int = 32, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if not correlated:
        return torch.tensor(rng.standard_normal((n, m)), dtype=torch.float32)
    z = rng.standard_normal((n, m)) * (0.5 ** (np.arange(m) / 3))
    z[:, rank:] = 0.0
    q, _ = np.linalg.qr(rng.standard_normal((m, m)))
    return torch.tensor(z @ q.T, dtype=torch.float32)


def _rel_err(data: bytes, name: str, t: torch.Tensor) -> float:
    out = tqcodec.load(data)[name]
    return float(((out - t) ** 2).sum() / (t ** 2).sum())


def test_transform_chosen_where_it_pays_for_its_bytes(monkeypatch):
    """A tall matrix with correlated columns gets the weight KLT (data-free): at the same file
    size its error is far below the identity's; i.i.d. columns keep the identity."""
    import tqcodec.modes.tq.encoder as enc
    w = _tall(True)
    with_t = tqcodec.encode_bytes({"w": w}, mode="tq", bits=2.0)
    assert tqcodec.open(with_t).info("w").params.get("transform") == "float16"
    monkeypatch.setattr(enc, "TRANSFORM_MIN_RATIO", 10 ** 9)  # no transform offered
    without = tqcodec.encode_bytes({"w": w}, mode="tq", bits=2.0)
    assert "transform" not in tqcodec.open(without).info("w").params
    assert abs(len(with_t) / len(without) - 1) < 0.03
    assert _rel_err(with_t, "w", w) < 0.1 * _rel_err(without, "w", w)
    monkeypatch.undo()
    iid = tqcodec.encode_bytes({"w": _tall(False)}, mode="tq", bits=2.0)
    assert "transform" not in tqcodec.open(iid).info("w").params


def test_a_weight_klt_is_weighed_only_where_the_gaussian_model_lets_it_pay(monkeypatch):
    """Data-free, a KLT option is coded exactly only where the Gaussian model of both codings saves
    at least TRANSFORM_SCREEN_SHARE of its S's bits: i.i.d. columns are not weighed (the same
    file as weighing them, which chose the identity), correlated ones are (and chosen)."""
    import tqcodec.modes.tq.encoder as enc
    weighed = []
    cost = enc.transformed_cost

    def counted(bands, pick, lam, m):
        weighed.append(bands[0].name)
        return cost(bands, pick, lam, m)
    monkeypatch.setattr(enc, "transformed_cost", counted)
    iid = {"w": _tall(False)}
    screened = tqcodec.encode_bytes(iid, mode="tq", bits=2.0)
    assert weighed == []
    monkeypatch.setattr(enc, "TRANSFORM_SCREEN_SHARE", -np.inf)  # every option weighed
    everything = tqcodec.encode_bytes(iid, mode="tq", bits=2.0)
    assert weighed and screened == everything
    monkeypatch.undo()
    monkeypatch.setattr(enc, "transformed_cost", counted)
    weighed.clear()
    data = tqcodec.encode_bytes({"w": _tall(True)}, mode="tq", bits=2.0)
    assert weighed and tqcodec.open(data).info("w").params.get("transform") == "float16"


def test_a_weight_klt_is_made_only_when_weighed():
    """Data-free, an option holds only its spectrum (inputs' and components' variances) until
    it is first weighed; made then, its S is the float16 KLT of the matrix."""
    from tqcodec.modes.tq import transforms as T
    from tqcodec.modes.tq.encoder import Item, make_units, transform_options
    w = _tall(True, n=256, m=16, seed=4)
    item = Item.of("w", "float32", w)
    _, layouts = make_units([item], None)
    opt = transform_options([item], None, layouts)["w"]
    assert opt.bands is None and opt.stored is None
    var, eig, n = opt.spectrum
    mat = w.double().numpy().T
    assert n == 256
    np.testing.assert_allclose(var, (mat ** 2).mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(eig, np.linalg.eigvalsh(mat @ mat.T)[::-1] / n, rtol=1e-4, atol=1e-6 * eig[0])
    assert opt.ready() and len(opt.bands) == 16
    np.testing.assert_array_equal(opt.stored, T.klt(mat)[1].astype(np.float16))


def test_transform_drops_components_of_a_low_rank_matrix():
    """Rank 6 of 32: coefficient bands past the rank quantize to zero and are left out with their
    columns of S (k < m: dimensionality reduction)."""
    w = _tall(True, rank=6, seed=1)
    data = tqcodec.encode_bytes({"w": w}, mode="tq", bits=1.0)
    p = tqcodec.open(data).info("w").params
    assert p.get("transform") == "float16"
    assert sum(p["band_rows"]) < 32
    assert _rel_err(data, "w", w) < 1e-2


def test_activation_aware_transform_with_statistics():
    """With calibration statistics a tall layer is offered the activation-aware transform; the
    file keeps its size target and the output error is below the identity's."""
    torch.manual_seed(7)
    lin = nn.Linear(16, 1024, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_tall(True, n=1024, m=16, seed=2))
    x = torch.randn(512, 16) @ torch.diag(torch.linspace(0.2, 3.0, 16))
    st = tqcodec.calibrate(lin, [x], sensitivity=False)
    data = tqcodec.encode_bytes(lin.state_dict(), mode="tq", stats=st, bits=2.0)
    assert tqcodec.open(data).info("weight").params.get("transform") == "float16"
    assert abs(8 * len(data) / lin.weight.numel() / 2.0 - 1) < 0.03
    out = tqcodec.load(data)["weight"]
    err = float(((x @ (out - lin.weight.detach()).T) ** 2).mean())
    import tqcodec.modes.tq.encoder as enc
    saved, enc.TRANSFORM_MIN_RATIO = enc.TRANSFORM_MIN_RATIO, 10 ** 9
    try:
        ident = tqcodec.load(tqcodec.encode_bytes(lin.state_dict(), mode="tq", stats=st, bits=2.0))["weight"]
    finally:
        enc.TRANSFORM_MIN_RATIO = saved
    err_ident = float(((x @ (ident - lin.weight.detach()).T) ** 2).mean())
    assert err < 0.5 * err_ident


def test_a_transform_is_kept_only_where_it_pays_at_the_multiplier_its_own_bytes_need(monkeypatch):
    """At a rate target a transform's stored S takes bits from every other tensor: chosen at the
    multiplier of the identity's allocation, a 192 x 96 layer's transform starved the layer
    after its LayerNorm (output SNR 5.6 dB, 16.6 without transforms). The choice is made again at
    the multiplier that meets the target with S counted."""
    import tqcodec.modes.tq.encoder as enc
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(96, 192), nn.LayerNorm(192), nn.Linear(192, 10)).eval()
    latent = torch.randn(8, 96, generator=torch.Generator().manual_seed(101))

    def inputs(n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 8, generator=g) @ latent + 0.1 * torch.randn(n, 96, generator=g)
    x = inputs(512, 1)
    st = tqcodec.calibrate(net, [x[i:i + 128] for i in range(0, 512, 128)])
    test = inputs(1024, 2)
    ref = net(test).detach()

    def snr_db(data: bytes) -> float:
        other = nn.Sequential(nn.Linear(96, 192), nn.LayerNorm(192), nn.Linear(192, 10)).eval()
        other.load_state_dict(tqcodec.load(data))
        return 10.0 * float(np.log10(float((ref ** 2).mean()) / float(((other(test).detach() - ref) ** 2).mean())))
    offered = snr_db(tqcodec.encode_bytes(net.state_dict(), stats=st, bits=1.0))
    monkeypatch.setattr(enc, "TRANSFORM_MIN_RATIO", 10 ** 9)  # no transform offered
    plain = snr_db(tqcodec.encode_bytes(net.state_dict(), stats=st, bits=1.0))
    assert offered > plain - 1.0, (offered, plain)


def _coefficient_bands(rows: int = 4, n: int = 64, m: int = 8) -> list:
    from tqcodec.modes.tq.allocation import Unit
    rng = np.random.default_rng(3)
    return [Unit(f"w#{b}", rng.normal(size=(rows, n)) * 0.01, None, None, 1.0, r0=b * rows) for b in range(m // rows)]


def test_a_transformed_tensor_whose_coefficients_are_all_zero_stores_no_synthesis():
    from tqcodec.modes.tq.encoder import encode_transformed
    from tqcodec.format.steps import step_from_code
    bands = _coefficient_bands()
    coarse = next(c for c in range(0, 200) if step_from_code(c) > 1.0)  # every |coefficient| < step / 2
    _, params, _ = encode_transformed(bands, [coarse, coarse], "out_in", np.eye(8))
    assert "transform" not in params
    fine = coarse - 60
    _, params, _ = encode_transformed(bands, [fine, coarse], "out_in", np.eye(8))
    assert params.get("transform") == "float16"


def test_a_transforms_cost_counts_the_distortion_of_the_bands_it_drops():
    from tqcodec.modes.tq.encoder import transformed_cost
    bands = _coefficient_bands()
    bands[0].curve = {0: (1.0, 100.0)}
    bands[1].curve = {0: (5.0, 96.0)}
    bands[0].levels = {0: np.ones((4, 64), dtype=np.int64)}
    bands[1].levels = {0: np.zeros((4, 64), dtype=np.int64)}  # dropped: no bits, its D stays
    assert transformed_cost(bands, {"w#0": 0, "w#1": 0}, 0.5, 8) == 1.0 + 5.0 + 0.5 * (100.0 + 16 * 8 * 4)


def _outlier_layer():
    """A 256 -> 512 linear layer and ``inputs(n)``: n draws (one seeded generator, so successive
    calls give other draws) of a 16-dimensional latent law plus noise, two of the 256 channels 60x
    the others, as large language models' outlier channels are."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 512)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.05)
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(16, 256, generator=g) * 0.3

    def inputs(n: int) -> torch.Tensor:
        x = torch.randn(n, 16, generator=g) @ latent + 0.3 * torch.randn(n, 256, generator=g)
        x[:, [3, 77]] *= 60.0
        return x
    return lin, inputs


def test_a_transform_whose_synthesis_outweighs_the_budget_still_codes_the_weight():
    """The stored S (m x k float16) is part of the rate the bits loop aims at. A 512 x 256 layer
    with low-rank inputs at 2 bits/param: a full S is 1.05 Mbit, four times the whole file. Left
    to the measured overhead, the attempts swung between a file with all of S and one with every
    coefficient zero, and the zero one, nearer the target, was written."""
    lin, inputs = _outlier_layer()
    x = inputs(4096)
    st = tqcodec.calibrate(lin, [x[i:i + 512] for i in range(0, len(x), 512)], sensitivity=False)
    params = sum(p.numel() for p in lin.parameters())
    data = tqcodec.encode_bytes(lin.state_dict(), mode="tq", stats=st, bits=2.0)
    assert 8 * len(data) / params < 2.0 * 1.1
    out = tqcodec.load(data)
    test = inputs(1024)
    ref = test @ lin.weight.detach().T + lin.bias.detach()
    err = float(((test @ out["weight"].T + out["bias"] - ref) ** 2).mean())
    assert err < 0.1 * float((ref ** 2).mean())  # the all-zero file: err equal to the output power


def test_few_samples_with_outlier_channels_still_weigh_the_outliers():
    """Fewer samples than input channels: H is shrunk toward a typical channel's energy (the
    median of its diagonal), not the mean, which two channels 60x the others would make ~30x a
    typical one's, so every unreached direction looked as costly as an outlier's. 3 bits/param,
    output SNR on other inputs of the same law: 22.7 dB (toward the mean: 20.3; data-free 16.0)."""
    lin, inputs = _outlier_layer()
    st = tqcodec.calibrate(lin, [inputs(32)], sensitivity=True)
    assert st.tensors["weight"].rows < 256  # the shrinkage applies
    test = inputs(2048)
    ref = test @ lin.weight.detach().T + lin.bias.detach()

    def snr_db(stats) -> float:
        out = tqcodec.load(tqcodec.encode_bytes(lin.state_dict(), mode="tq", stats=stats, bits=3.0))
        err = float(((test @ out["weight"].T + out["bias"] - ref) ** 2).mean())
        return 10.0 * float(np.log10(float((ref ** 2).mean()) / err))
    assert snr_db(st) > snr_db(None) + 5.0


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1000, 32)
        self.pos = nn.Parameter(torch.randn(16, 32) * 0.1)  # a position table: no statistics
        self.fc = nn.Linear(32, 8)

    def forward(self, ids):
        return self.fc(self.emb(ids) + self.pos[: ids.shape[1]])


def test_embedding_rows_follow_token_frequency_and_unmeasured_tensors_stay_accurate():
    """Rows of tokens the calibration used often are reconstructed more finely than rows never
    seen; a tensor without statistics (position table) still comes back close."""
    torch.manual_seed(8)
    m = _Tokens().eval()
    ids = torch.randint(0, 40, (64, 16))  # only tokens 0..39 occur
    st = tqcodec.calibrate(m, [ids[i:i + 16] for i in range(0, 64, 16)])
    assert "pos" in st and st.get("pos").kind == "plain"
    del st.tensors["pos"]  # as for a tensor the calibration could not measure
    sd = m.state_dict()
    data = tqcodec.encode_bytes(sd, stats=st, bits=3.0)
    dec = tqcodec.load(data)
    err = (dec["emb.weight"] - sd["emb.weight"]).pow(2).mean(dim=1)
    assert float(err[:40].mean()) < 0.25 * float(err[200:].mean())
    rel_pos = float((dec["pos"] - sd["pos"]).pow(2).sum() / sd["pos"].pow(2).sum())
    assert rel_pos < 1e-2


# --- BatchNorm buffers (running statistics weighed by their effect, issue 19) -------------------

class _BNNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> linear, with BN statistics spread over
    decades (as trained models have them), so that a coarse step on them would be ruinous."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def bn_model():
    torch.manual_seed(3)
    m = _BNNet()
    x = torch.randn(64, 3, 8, 8)
    m.train()
    with torch.no_grad():
        for bn in (m.b1, m.b2):
            bn.momentum = None  # cumulative: the running statistics are the batch statistics
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
        m(x)
        m.b1.running_var.mul_(torch.logspace(-2, 1, 32))  # spread over three decades
        m.b1.running_mean.add_(torch.linspace(-3, 3, 32))
    m.eval()
    return m, x


def _sqnr(m, sd, x):
    m2 = _BNNet()
    m2.load_state_dict(sd)
    m2.eval()
    with torch.no_grad():
        y, y2 = m(x), m2(x)
    return float(10 * torch.log10(y.pow(2).sum() / (y - y2).pow(2).sum().clamp_min(1e-30)))


@pytest.mark.parametrize("calibrated", [True, False])
@pytest.mark.parametrize("bits", [2.0, 3.0])
def test_low_rate_keeps_batchnorm_buffers_close(bn_model, calibrated, bits):
    """At low rates the running statistics are coded (not stored raw at 32 bits), every decoded
    variance stays within half of its value, num_batches_tracked is exact, and the statistics'
    own error costs the outputs no more than the whole file's error (they are not starved).
    b1's statistics (variances over three decades: steps fine enough for its small variances cost
    more than its 32-bit values, and with statistics its means, divided by those small deviations,
    weigh as much) may be stored exactly instead; b2's are coded."""
    m, x = bn_model
    sd = m.state_dict()
    stats = tqcodec.calibrate(m, [x[i:i + 16] for i in range(0, 64, 16)]) if calibrated else None
    data = tqcodec.encode_bytes(sd, stats=stats, bits=bits)
    dec = tqcodec.load(data)
    for bn in ("b1", "b2"):
        var, got = sd[f"{bn}.running_var"], dec[f"{bn}.running_var"]
        assert (got >= 0.5 * var).all() and (got <= 1.5 * var).all()
        assert torch.equal(dec[f"{bn}.num_batches_tracked"], sd[f"{bn}.num_batches_tracked"])
    with tqcodec.open(data) as f:
        assert f.info("b2.running_mean").mode == "tq" and f.info("b2.running_var").mode == "tq"
    only_buffers = dict(sd)
    for k in sd:
        if "running_" in k:
            only_buffers[k] = dec[k]
    assert _sqnr(m, only_buffers, x) >= _sqnr(m, dec, x)  # the buffers are not the weak point
    if calibrated:
        assert _sqnr(m, dec, x) > 5.0  # no collapse


def test_batchnorm_variance_too_spread_for_any_step_is_exact():
    """A running variance whose smallest positive value is below every candidate step is stored
    exactly (a coarser step could make a variance vanish or go negative)."""
    var = torch.ones(16) * 10.0
    var[3] = 1e-12
    sd = {"conv.weight": torch.randn(16, 8, 3, 3), "bn.weight": torch.ones(16), "bn.bias": torch.zeros(16),
          "bn.running_mean": torch.randn(16), "bn.running_var": var}
    dec = tqcodec.load(tqcodec.encode_bytes(sd, mode="tq", bits=2.0))
    assert torch.equal(dec["bn.running_var"], var)


def test_following_batchnorm_scale():
    from tqcodec.modes.tq.encoder import following_batchnorm_scale
    g = torch.tensor([1.0, 2.0])
    v = torch.tensor([4.0, 1.0])
    sd = {"c.weight": torch.randn(2, 3), "c.bias": torch.zeros(2), "bn.weight": g, "bn.bias": torch.zeros(2),
          "bn.running_mean": torch.zeros(2), "bn.running_var": v, "fc.weight": torch.randn(4, 2)}
    items = [Item.of(k, "float32", t.double().numpy()) for k, t in sd.items()]
    s = following_batchnorm_scale(items, 0, 2)
    np.testing.assert_allclose(s, (g * g / (v + 1e-5)).numpy(), rtol=1e-6)
    assert following_batchnorm_scale(items, len(items) - 1, 4) is None  # nothing follows


def test_data_free_small_tensors_never_coarser_than_one_slope():
    """Without statistics every weight tensor takes at most the step of equal slope on weight MSE
    (NNCodec's one step for all): a small tensor, whose table and chunk header weigh more per
    weight, is not left coarser or zeroed (its error per weight is at most the big tensor's); the
    big tensor's bands are not cut below DATA_FREE_MIN_BAND weights."""
    from tqcodec.modes.tq.encoder import DATA_FREE_MIN_BAND
    g = torch.Generator().manual_seed(5)
    sd = {"big.weight": 0.05 * torch.randn(256, 256, generator=g),
          "small.weight": 0.05 * torch.randn(8, 16, generator=g),
          "tiny.weight": 0.05 * torch.randn(4, 1, 3, 3, generator=g)}
    with pytest.warns(tqcodec.TqzWarning):
        data = tqcodec.encode_bytes(sd, bits=2.0)
    dec = tqcodec.load(data)
    with tqcodec.open(data) as f:
        assert len(f.encoded("big.weight").params["band_rows"]) == max(1, 256 * 256 // DATA_FREE_MIN_BAND)
    mse = {k: float((dec[k] - v).pow(2).mean()) for k, v in sd.items()}
    assert mse["small.weight"] <= mse["big.weight"] and mse["tiny.weight"] <= mse["big.weight"]


def test_data_free_embedding_table_takes_a_coarser_step():
    """Without statistics an embedding table (by its module's name) of at least
    DATA_FREE_EMBED_MIN_ROWS rows (a vocabulary) weighs its weight error by DATA_FREE_EMBED_GAIN: a
    step about 4x the projections' (8 step codes); a projection of the same values is not affected,
    nor is a smaller table (positions, token types: each row is used by many inputs)."""
    from tqcodec.modes.tq.encoder import DATA_FREE_EMBED_MIN_ROWS, is_embedding_name
    assert is_embedding_name("model.embed_tokens.weight") and is_embedding_name("transformer.wte.weight")
    assert not is_embedding_name("embeddings.LayerNorm.weight") and not is_embedding_name("lm_head.weight")
    g = torch.Generator().manual_seed(6)
    n = DATA_FREE_EMBED_MIN_ROWS
    sd = {"tok.embed.weight": 0.05 * torch.randn(n, 16, generator=g),
          "proj.weight": 0.05 * torch.randn(n, 16, generator=g),
          "pos.embed.weight": 0.05 * torch.randn(n // 2, 16, generator=g)}
    with tqcodec.open(tqcodec.encode_bytes(sd, bits=4.0)) as f:
        emb, proj, small = (f.encoded(k).params["steps"] for k in ("tok.embed.weight", "proj.weight", "pos.embed.weight"))
    assert min(emb) - max(proj) >= 6
    assert max(small) <= max(proj)


def _table_steps(sd: dict, table: str, proj: str) -> tuple[list, list]:
    with tqcodec.open(tqcodec.encode_bytes(sd, bits=4.0)) as f:
        return f.encoded(table).params["steps"], f.encoded(proj).params["steps"]


def test_a_data_free_table_that_is_also_the_output_layer_keeps_the_projections_step():
    """A vocabulary table that is also the output layer (a tied ``lm_head``: every row's error
    reaches every position's logits) is not given the lookup table's coarser step: tied in the
    state dict, or a generative model's table (``wte``) whose file holds no head of its own. An
    untied head of the table's shape, or an encoder's ``embeddings.word_embeddings``, leaves the
    table input-only (coarser)."""
    from tqcodec.modes.tq.encoder import DATA_FREE_EMBED_MIN_ROWS
    g = torch.Generator().manual_seed(7)
    n, d = DATA_FREE_EMBED_MIN_ROWS, 16
    wte = 0.05 * torch.randn(n, d, generator=g)
    block = {"transformer.h.0.mlp.c_fc.weight": 0.05 * torch.randn(d, 4 * n // d, generator=g)}
    proj = "transformer.h.0.mlp.c_fc.weight"

    tied_in_file = _table_steps({"transformer.wte.weight": wte, **block}, "transformer.wte.weight", proj)
    tied_in_memory = _table_steps({"transformer.wte.weight": wte, **block, "lm_head.weight": wte},
                                  "transformer.wte.weight", proj)
    untied = _table_steps({"transformer.wte.weight": wte, **block, "lm_head.weight": wte.clone() + 0.01},
                          "transformer.wte.weight", proj)
    encoder = _table_steps({"bert.embeddings.word_embeddings.weight": wte, **block},
                           "bert.embeddings.word_embeddings.weight", proj)
    for emb, p in (tied_in_file, tied_in_memory):
        assert abs(min(emb) - max(p)) <= 2, (emb, p)
    for emb, p in (untied, encoder):
        assert min(emb) - max(p) >= 6, (emb, p)


class _TinyLM(nn.Module):
    """A token embedding, one mixing layer, and an output layer over the vocabulary, tied to the
    embedding or not."""

    def __init__(self, vocab: int = 4096, width: int = 32, tied: bool = True):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def test_a_tied_output_layer_weighs_every_row_of_the_embedding():
    """An embedding that is also the output layer gets each row's measured output sensitivity
    (``row_gain``: the rows no input used are output rows still), and the encoder mixes that into
    the rows' token-count weights: the output's SNR at 1.5 and 2 bits/param is higher than with
    the counts alone. An untied embedding gets no ``row_gain``."""
    torch.manual_seed(0)
    model = _TinyLM().eval()
    g = torch.Generator().manual_seed(1)
    law = 1.0 / torch.arange(1, 201).float()  # the inputs use 200 of the 4,096 tokens

    def ids(n: int) -> torch.Tensor:
        return torch.multinomial(law / law.sum(), n * 32, replacement=True, generator=g).reshape(n, 32)

    x, x_test = ids(64), ids(64)
    stats = tqcodec.calibrate(model, [x[:32], x[32:]])
    table = stats.tensors["emb.weight"]
    unseen = np.asarray(table.counts) == 0
    assert table.kind == "embedding" and table.row_gain is not None and (table.row_gain[unseen] > 0).all()
    assert tqcodec.calibrate(_TinyLM(tied=False).eval(), [x[:32]]).tensors["emb.weight"].row_gain is None
    counts_only = Stats(dict(stats.tensors), output_power=stats.output_power, default_gain=stats.default_gain)
    counts_only.tensors["emb.weight"] = dataclasses.replace(table, row_gain=None)
    with torch.no_grad():
        ref = model(x_test)

    def snr_db(st: Stats, bits: float) -> float:
        decoded = _TinyLM().eval()
        decoded.load_state_dict(tqcodec.load(tqcodec.encode_bytes(model.state_dict(), stats=st, bits=bits)))
        with torch.no_grad():
            return float(10 * torch.log10(ref.pow(2).mean() / (decoded(x_test) - ref).pow(2).mean()))

    for bits in (1.5, 2.0):
        assert snr_db(stats, bits) > snr_db(counts_only, bits) + 0.3, bits


# --- issue 19: more rate never hurts; transposed convolutions; row gains; fewer bands -----------

def test_more_rate_never_hurts_with_few_statistics():
    """Statistics of a handful of inputs (rank-deficient H): the decoded output error falls at
    every step up the rate, and the file grows."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = torch.randn(256, 32)
    st = tqcodec.calibrate(m, [x[:6]])
    errs, sizes = [], []
    for bits in (2.0, 4.0, 8.0):
        data = tqcodec.encode_bytes(m.state_dict(), stats=st, bits=bits)
        m2 = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
        m2.load_state_dict(tqcodec.load(data))
        with torch.no_grad():
            errs.append(float((m(x) - m2(x)).pow(2).mean()))
        sizes.append(len(data))
    assert sizes == sorted(sizes) and errs == sorted(errs, reverse=True), (sizes, errs)


def _upsampler(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A transposed convolution reading channels that are strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.ConvTranspose2d(12, 12, 4, 2, 1), nn.Tanh()).eval()
    base = torch.randn(64, 1, 4, 4, generator=g)
    x = base * torch.linspace(1.0, 2.0, 12)[None, :, None, None] + 0.1 * torch.randn(64, 12, 4, 4, generator=g)
    return m, x


def test_transposed_conv_rounds_along_input_channels_with_their_second_moments():
    m, x = _upsampler()
    st = tqcodec.calibrate(m, [x[:32], x[32:]])
    s = st.get("0.weight")
    rows = x.permute(0, 2, 3, 1).reshape(-1, 12).double()
    assert s.kind == "rows" and s.h.shape == (1, 12, 12)
    np.testing.assert_allclose(s.h[0], (rows.T @ rows / len(rows)).numpy(), rtol=1e-9)
    np.testing.assert_allclose(s.row_h, np.diag(s.h[0]), rtol=1e-12)
    diagonal = Stats({k: dataclasses.replace(v, h=None) for k, v in st.tensors.items()}, st.output_power)
    # (the channels' energies only: rounding to nearest)

    def out_err(stats):
        m2 = nn.Sequential(nn.ConvTranspose2d(12, 12, 4, 2, 1), nn.Tanh()).eval()
        data = tqcodec.encode_bytes(m.state_dict(), stats=stats, bits=4.0)
        m2.load_state_dict(tqcodec.load(data))
        with torch.no_grad():
            return float((m(x) - m2(x)).pow(2).mean()), len(data)
    (e_full, n_full), (e_diag, n_diag) = out_err(st), out_err(diagonal)
    assert n_full <= 1.1 * n_diag, (n_full, n_diag)
    assert e_full < 0.5 * e_diag, (e_full, e_diag)


def test_row_gains_follow_output_sensitivity():
    """A linear layer whose first output the model multiplies by 10: that row's measured gain is
    about 100 times the others', the bias takes the weight's row gains, and the encoder codes the
    sensitive row more finely."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x) * torch.tensor([10.0] + [1.0] * 7)
    m = Scaled().eval()
    x = torch.randn(256, 16)
    st = tqcodec.calibrate(m, [x[i:i + 64] for i in range(0, 256, 64)])
    rg = st.get("lin.weight").row_gain
    assert rg.shape == (8,) and 30 < rg[0] / np.median(rg[1:]) < 300
    np.testing.assert_array_equal(st.get("lin.bias").row_gain, rg)
    units, _ = make_units([Item.of("lin.weight", "float32", lin.weight.detach().double().numpy())], st)
    rw = np.concatenate([u.row_weights for u in units])
    assert rw[0] > 30 * np.median(rw[1:])


def test_small_tensor_takes_fewer_bands_when_they_do_not_pay():
    """A tensor cut into 8 bands of rows alike: with statistics the encoder codes it in fewer
    (each band is a table and a chunk header). Without statistics a band holds at least
    DATA_FREE_MIN_BAND weights, so these 1,024 are one band."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 16, generator=g) * 0.1
    sd = {"w": w}
    st = Stats({"w": TensorStats("linear", np.eye(16)[None], None, 1000)}, 1.0)
    with tqcodec.open(tqcodec.encode_bytes(sd, stats=st, bits=6.0)) as f:
        calibrated = len(f.info("w").params["band_rows"])
    with pytest.warns(tqcodec.TqzWarning), tqcodec.open(tqcodec.encode_bytes(sd, mode="tq", bits=6.0)) as f:
        data_free = len(f.info("w").params["band_rows"])
    assert data_free == 1 and 1 <= calibrated < 8


def _dead_units_model(seed: int = 7) -> dict[str, torch.Tensor]:
    """Trained-looking weights without statistics: a quarter of ``fc.weight``'s rows dead (all zero)
    and the rest of unequal scale; a quarter of ``out.weight``'s columns (inputs) dead."""
    g = torch.Generator().manual_seed(seed)
    fc = 0.05 * torch.randn(256, 256, generator=g) * torch.rand(256, 1, generator=g).add(0.3)
    fc[torch.randperm(256, generator=g)[:64]] = 0.0
    out = 0.05 * torch.randn(64, 256, generator=g)
    out[:, torch.randperm(256, generator=g)[:64]] = 0.0
    return {"fc.weight": fc, "out.weight": out}


def test_magnitude_class_gain_sees_dead_and_unequal_rows():
    from tqcodec.modes.tq.encoder import MAGNITUDE_CLASS_MIN_GAIN, magnitude_class_gain, magnitude_layout
    assert magnitude_class_gain(np.full(10, 0.3)) == pytest.approx(0.0, abs=1e-12)
    assert magnitude_class_gain(np.zeros(10)) == 0.0
    assert magnitude_class_gain(np.array([1.0, 4.0])) == pytest.approx(0.5 * np.log2(2.5) - 0.5, rel=1e-9)
    g = torch.Generator().manual_seed(1)
    alike = (0.05 * torch.randn(128, 64, generator=g)).numpy()
    assert magnitude_class_gain(np.mean(alike ** 2, axis=1)) < MAGNITUDE_CLASS_MIN_GAIN
    sd = _dead_units_model()
    assert magnitude_layout(alike)[0] == "out_in"
    assert magnitude_layout(sd["fc.weight"].numpy())[0] == "out_in"   # dead rows: rows stay rows
    assert magnitude_layout(sd["out.weight"].numpy())[0] == "in_out"  # dead columns: columns become rows


def test_data_free_rows_of_like_magnitude_share_a_band(monkeypatch):
    """Without statistics, a tensor whose rows (or columns) differ much in magnitude is coded in
    bands of rows of like magnitude (row_band; columns as rows by the in_out layout): dead units
    decode to exactly zero, and at the same bits/param the weight error is smaller than with one
    band for all. Rows alike stay one band."""
    from tqcodec.modes.tq import encoder
    sd = _dead_units_model()

    def coded() -> tuple[dict, dict, float, int]:
        with pytest.warns(tqcodec.TqzWarning):
            data = tqcodec.encode_bytes(sd, mode="tq", bits=2.0)
        dec = tqcodec.load(data)
        with tqcodec.open(data) as f:
            params = {k: f.encoded(k).params for k in sd}
        err = sum(float((dec[k] - v).pow(2).sum()) for k, v in sd.items())
        return params, dec, err, len(data)

    params, dec, err, size = coded()
    assert "row_band" in params["fc.weight"] and len(params["fc.weight"]["band_rows"]) > 1
    assert params["out.weight"].get("layout") == "in_out" and "row_band" in params["out.weight"]
    assert bool((dec["fc.weight"][sd["fc.weight"].abs().sum(1) == 0] == 0).all())
    assert bool((dec["out.weight"][:, sd["out.weight"].abs().sum(0) == 0] == 0).all())
    monkeypatch.setattr(encoder, "MAGNITUDE_CLASS_MIN_GAIN", float("inf"))
    params_one, _, err_one, size_one = coded()
    assert "row_band" not in params_one["fc.weight"] and params_one["out.weight"].get("layout", "out_in") == "out_in"
    assert abs(size / size_one - 1) < 0.03 and err < 0.8 * err_one

    g = torch.Generator().manual_seed(2)
    with pytest.warns(tqcodec.TqzWarning):
        alike = tqcodec.encode_bytes({"w": 0.05 * torch.randn(256, 256, generator=g)}, mode="tq", bits=2.0)
    with tqcodec.open(alike) as f:
        assert "row_band" not in f.encoded("w").params


def test_data_free_vectors_take_a_step_finer_than_the_weights(monkeypatch):
    """Without statistics a bias or norm vector of at least DATA_FREE_VECTOR_MIN entries is coded
    (tq) as a weight of DATA_FREE_VECTOR_GAIN times the gain: at most 1/16 of the weights' step,
    so its error stays far below theirs, in fewer bytes than stored raw."""
    from tqcodec.modes.tq import encoder
    g = torch.Generator().manual_seed(8)
    sd = {"fc.weight": 0.05 * torch.randn(128, 256, generator=g), "fc.bias": 0.1 * torch.randn(128, generator=g),
          "norm.weight": 1 + 0.1 * torch.randn(128, generator=g), "tiny.bias": torch.randn(8, generator=g)}

    def coded() -> tuple[bytes, dict]:
        with pytest.warns(tqcodec.TqzWarning):
            data = tqcodec.encode_bytes(sd, mode="tq", bits=2.0)
        return data, tqcodec.load(data)

    data, dec = coded()
    with tqcodec.open(data) as f:
        assert f.info("fc.bias").mode == "tq" and f.info("norm.weight").mode == "tq"
        assert f.info("tiny.bias").mode == "raw"
        weight_step = max(f.encoded("fc.weight").params["steps"])
    for name in ("fc.bias", "norm.weight"):
        err = (dec[name] - sd[name]).abs().max().item()
        assert 0 < err <= 2.0 ** (weight_step / 4) / 32  # half of a step 1/16 the weights'
    assert torch.equal(dec["tiny.bias"], sd["tiny.bias"])
    alone = tqcodec.encode_bytes(sd, mode="tq", bits=2.0, tq_scope="tensor")  # a vector coded alone has no
    # weights' step to follow
    with tqcodec.open(alone) as f:
        assert f.info("fc.bias").mode == "raw" and torch.equal(tqcodec.load(alone)["fc.bias"], sd["fc.bias"])
    monkeypatch.setattr(encoder, "DATA_FREE_VECTOR_GAIN", 0.0)
    raw, dec_raw = coded()
    with tqcodec.open(raw) as f:
        assert f.info("fc.bias").mode == "raw"
        raw_vectors = f.info("fc.bias").stored_bytes + f.info("norm.weight").stored_bytes
    with tqcodec.open(data) as f:
        assert f.info("fc.bias").stored_bytes + f.info("norm.weight").stored_bytes < raw_vectors / 2


def _embedding_file(weight: torch.Tensor, ids: torch.Tensor) -> tuple[int, float]:
    """(file bytes, token-count-weighted squared error of the decoded rows) of an embedding coded
    at 3 bits/param with statistics counted from ``ids``."""
    emb = torch.nn.Embedding(*weight.shape)
    emb.weight.data.copy_(weight)
    st = tqcodec.calibrate(emb, [ids])
    data = tqcodec.encode_bytes(emb.state_dict(), stats=st, mode="tq", bits=3.0)
    counts = torch.bincount(ids.reshape(-1), minlength=weight.shape[0]).double()
    err = (tqcodec.load(data)["weight"].double() - weight.double()).pow(2).sum(dim=1)
    return len(data), float((counts * err).sum())


def test_embedding_bands_follow_frequency_wherever_the_rows_are():
    """Rows are banded by token frequency, not by id (spec 1.4 row_band): numbering the vocabulary
    in another order gives the same file size and the same weighted error. Bands of consecutive
    ids would mix frequent and rare tokens when frequency does not follow the id."""
    torch.manual_seed(4)
    vocab, dim = 2000, 32
    weight = torch.randn(vocab, dim) * 0.05
    freq = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1  # Zipf over frequency rank
    ids = torch.multinomial(freq, 20000, replacement=True, generator=torch.Generator().manual_seed(5))
    by_rank = _embedding_file(weight, ids.reshape(40, -1))  # id = frequency rank
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(6))  # row perm[r] holds rank r
    scattered_weight = torch.empty_like(weight)
    scattered_weight[perm] = weight
    scattered = _embedding_file(scattered_weight, perm[ids].reshape(40, -1))
    assert abs(scattered[0] / by_rank[0] - 1) < 0.03
    # the map of scattered rows compresses less in the manifest, leaving the coefficients a little
    # less of the same file (the 1.3 encoder's error was 3.1x)
    assert abs(scattered[1] / by_rank[1] - 1) < 0.08


def test_embedding_rows_round_by_what_reaches_the_output():
    """An embedding followed by a LayerNorm and a projection to fewer dimensions: its calibrated
    column metric (the output gradients' second moment) lets the encoder round each row with
    error feedback, pushing error into the directions that reach the output least. At the same
    file size the output error is well below what the same statistics without the metric give."""
    torch.manual_seed(8)
    vocab, dim = 1024, 32

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 6)

        def forward(self, ids):
            return self.head(self.norm(self.emb(ids)))

    model = M().eval()
    with torch.no_grad():
        model.emb.weight.mul_(0.05)
        model.head.weight.copy_(torch.randn(6, dim) @ torch.diag(torch.linspace(0.1, 3.0, dim)) * 0.3)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, vocab, (16, 64), generator=g)
    st = tqcodec.calibrate(model, [ids[i:i + 4] for i in range(0, 16, 4)])
    assert st.get("emb.weight").h is not None
    plain = dataclasses.replace(st, tensors={**st.tensors, "emb.weight": dataclasses.replace(st.get("emb.weight"), h=None)})
    test_ids = torch.randint(0, vocab, (8, 64), generator=g)
    with torch.no_grad():
        reference = model(test_ids)

    def coded(stats) -> tuple[int, float]:
        data = tqcodec.encode_bytes(model.state_dict(), stats=stats, mode="tq", bits=3.0)
        copy = M().eval()
        copy.load_state_dict(tqcodec.load(data))
        with torch.no_grad():
            return len(data), float((copy(test_ids) - reference).pow(2).mean())

    size, err = coded(st)
    plain_size, plain_err = coded(plain)
    assert abs(size / plain_size - 1) < 0.03
    assert err < 0.5 * plain_err


def _clustered_embedding(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(weight [2048, 32] in 8 clusters of 256 rows, rows scattered; calibration ids: 48 tokens of
    cluster 0; cluster of each row)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, 32, generator=g)
    cluster = torch.randperm(2048, generator=g) % 8
    weight = (centres[cluster] + 0.35 * torch.randn(2048, 32, generator=g)) * 0.05
    members = torch.nonzero(cluster == 0).flatten()
    ids = members[torch.randint(0, 48, (8, 64), generator=g)]  # a sample on one subject
    return weight, ids, cluster.numpy()


def test_unseen_tokens_near_the_seen_ones_weigh_more(monkeypatch):
    """Statistics from text on one subject: the unseen tokens that lie near the seen ones in the
    embedding (the subject's other words) get the larger part of the missed mass, so they are
    coded finer than unseen tokens far away; without that share (NEAR_SHARE = 0, a uniform
    floor) the two kinds of unseen rows are coded alike."""
    from tqcodec.modes.tq import tokens
    weight, ids, cluster = _clustered_embedding()
    emb = torch.nn.Embedding(*weight.shape)
    emb.weight.data.copy_(weight)
    st = tqcodec.calibrate(emb, [ids])
    counts = np.asarray(st.get("weight").counts)
    unseen = counts == 0
    near, far = unseen & (cluster == 0), unseen & (cluster != 0)
    assert near.sum() > 100 and far.sum() > 1000

    def row_errors(near_share: float) -> tuple[int, float, float]:
        monkeypatch.setattr(tokens, "NEAR_SHARE", near_share)
        data = tqcodec.encode_bytes(emb.state_dict(), stats=st, mode="tq", bits=2.0)
        err = (tqcodec.load(data)["weight"].double() - weight.double()).pow(2).sum(dim=1).numpy()
        return len(data), float(err[near].mean()), float(err[far].mean())

    size, near_err, far_err = row_errors(tokens.NEAR_SHARE)
    assert near_err < 0.5 * far_err
    flat_size, flat_near, flat_far = row_errors(0.0)
    assert 0.8 < flat_near / flat_far < 1.25
    assert abs(size / flat_size - 1) < 0.05
    assert near_err < flat_near


def test_classic_modes_weigh_unseen_tokens_by_likeness_too():
    """Modes ecsq, kmeans, pq and dither take an embedding's row weights from the same floored
    counts (``importance`` with the tensor): coded in ``ecsq`` from text on one subject, the
    subject's unseen tokens come back closer than the unseen tokens far from it."""
    weight, ids, cluster = _clustered_embedding()
    emb = torch.nn.Embedding(*weight.shape)
    emb.weight.data.copy_(weight)
    st = tqcodec.calibrate(emb, [ids])
    unseen = np.asarray(st.get("weight").counts) == 0
    data = tqcodec.encode_bytes(emb.state_dict(), stats=st, mode="ecsq", bits=2.0)
    err = (tqcodec.load(data)["weight"].double() - weight.double()).pow(2).sum(dim=1).numpy()
    assert err[unseen & (cluster == 0)].mean() < 0.5 * err[unseen & (cluster != 0)].mean()


def test_floored_counts_hand_out_the_missed_mass(monkeypatch):
    """The floor adds the same mass with or without the embedding; with it the unseen tokens'
    part goes by likeness (the nearest cluster's rows get most), and the seen tokens keep theirs."""
    from tqcodec.modes.tq import tokens
    weight, ids, cluster = _clustered_embedding()
    counts = np.bincount(ids.flatten().numpy(), minlength=len(weight)).astype(np.float64)
    flat = tokens.floored_counts(counts)
    shaped = tokens.floored_counts(counts, weight.numpy())
    assert np.isclose(flat.sum(), shaped.sum())
    seen = counts > 0
    np.testing.assert_allclose(shaped[seen], flat[seen])
    near, far = ~seen & (cluster == 0), ~seen & (cluster != 0)
    assert shaped[near].mean() > 5 * shaped[far].mean()
    assert (shaped[~seen] > 0).all()  # every unseen token keeps part of the floor
    np.testing.assert_array_equal(shaped, tokens.floored_counts(counts, weight.numpy()))  # deterministic
    # rows of more columns than MAX_DIM are compared in a projection, with the same outcome here
    wide = torch.cat([weight, weight], dim=1).numpy()
    monkeypatch.setattr(tokens, "MAX_DIM", 16)
    projected = tokens.floored_counts(counts, wide)
    assert projected[near].mean() > 5 * projected[far].mean()


class _Scaled(nn.Module):
    """A linear layer whose outputs matter unequally: output i is scaled by ``scale[i]`` (spread over
    four octaves) before a second layer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(128, 256)
        self.register_buffer("scale", 2.0 ** (torch.arange(256) % 5 - 2.0))  # not in runs of rows
        self.out = nn.Linear(256, 16)

    def forward(self, x):
        return self.out(self.fc(x) * self.scale)


def test_rows_of_unequal_sensitivity_get_their_own_bands(monkeypatch):
    """A weight with error-feedback statistics whose rows' measured output sensitivities differ is
    cut into bands of rows of like sensitivity (row_band), which gives a smaller output error at
    the same rate than one band for the whole weight."""
    from tqcodec.modes.tq import encoder
    torch.manual_seed(2)
    model = _Scaled().eval()
    x = torch.randn(512, 128)
    stats = tqcodec.calibrate(model, [x[i:i + 128] for i in range(0, 512, 128)])
    sd = model.state_dict()
    test = torch.randn(256, 128)

    def encoded() -> tuple[int, float, dict]:
        data = tqcodec.encode_bytes(sd, stats=stats, mode="tq", bits=3.0)
        dec = _Scaled()
        dec.load_state_dict(tqcodec.load(data))
        with torch.no_grad():
            err = float((dec(test) - model(test)).pow(2).mean())
        with tqcodec.open(data) as f:
            return len(data), err, f.info("fc.weight").params

    size, err, params = encoded()
    from tqcodec.modes.tq import allocation
    monkeypatch.setattr(allocation, "WHOLE_MATRIX_ROUNDING", 0)  # each band rounds its own rows
    own_rows = encoded()
    monkeypatch.setattr(allocation, "_feed_row_bands", lambda group, wanted: None)  # band by band
    assert encoded() == own_rows  # the same file as the bands' refine in one pass per code
    monkeypatch.undo()
    stats.synthetic = True  # sensitivities measured on made-up inputs set row weights, not bands
    assert "row_band" not in encoded()[2]
    stats.synthetic = False
    monkeypatch.setattr(encoder, "MAX_ROW_CLASSES", 1)
    size_one, err_one, params_one = encoded()
    assert "row_band" in params and len(params["band_rows"]) > 1 and "row_band" not in params_one
    assert abs(size / size_one - 1) < 0.03
    assert err < 0.9 * err_one


def test_transform_coefficients_in_column_blocks_are_one_solve():
    """``coefficients`` solves COEFFICIENT_COLUMNS columns at a time to keep its temporaries
    small; the bits must be those of one solve over every column (the file's bytes depend on
    them), for a float32 view as for float64, at any width."""
    from threadpoolctl import threadpool_limits
    from tqcodec.modes.tq.encoder import COEFFICIENT_COLUMNS, coefficients
    rng = np.random.default_rng(3)
    m = 48
    with threadpool_limits(limits=1, user_api="blas"):  # as the encoder runs it
        for n in (COEFFICIENT_COLUMNS * 2 + 37, COEFFICIENT_COLUMNS * 2 + 1, COEFFICIENT_COLUMNS - 5, 3):
            view = rng.standard_normal((n, m)).astype(np.float32)
            stored = np.linalg.qr(rng.standard_normal((m, m)))[0].astype(np.float16)
            for metric in (np.eye(m), np.cov(rng.standard_normal((m, 4 * m))) + np.eye(m)):
                s16 = stored.astype(np.float64)
                g = s16.T @ metric @ s16
                one = np.linalg.solve(g + 1e-12 * np.trace(g) / m * np.eye(m),
                                      s16.T @ metric @ np.ascontiguousarray(view.T, dtype=np.float64))
                got = coefficients(view, stored, metric)
                assert got.dtype == np.float64 and np.array_equal(got, one), n
                assert np.array_equal(coefficients(view.astype(np.float64), stored, metric), one)


def test_matrices_kept_as_float32_give_the_same_bytes_as_float64():
    """A float32/bfloat16 weight's matrix is kept as float32 (Item.load_narrow) and widened
    where it is computed with: the same numbers, so the same file."""
    from tqcodec.modes.tq.encoder import LAZY_ELEMENTS, encode_model
    g = torch.Generator().manual_seed(4)
    rows = LAZY_ELEMENTS // 64 + 40  # above LAZY_ELEMENTS: made when needed
    values = {"a": torch.randn(rows, 64, generator=g).to(torch.bfloat16).double().numpy(),
              "b": (torch.randn(4 * rows, 32, generator=g) * torch.rand(4 * rows, 1, generator=g)).numpy().astype(np.float64)}

    def items(narrow: bool) -> list:
        return [Item(k, "float32", v.shape, lambda v=v: v.copy(), (lambda v=v: v.astype(np.float32)) if narrow else None)
                for k, v in values.items()]

    def size_of(enc):
        return sum(len(p) for e in enc.values() for chunks in e.streams for _, p in chunks)
    total = sum(v.size for v in values.values())
    wide = encode_model(items(False), None, bits=3.0, total_params=total, size_of=size_of)
    narrow = encode_model(items(True), None, bits=3.0, total_params=total, size_of=size_of)
    assert wide.keys() == narrow.keys() == values.keys()
    for k in values:
        assert wide[k].params == narrow[k].params and wide[k].streams == narrow[k].streams


@pytest.mark.parametrize("lazy", [False, True])
def test_rounding_and_distortion_by_row_blocks_match_the_whole_matrix(monkeypatch, lazy):
    """Without H, a unit's levels and exact distortion are made ROW_BLOCK weights at a time (no
    float64 copy of an embedding-sized unit), the levels in the narrowest integer type: the same
    levels and the same float64 sum as the whole-matrix formulas, for rows held as an array and
    for rows of a float32 Matrices entry."""
    from tqcodec.modes.tq import allocation
    from tqcodec.modes.tq.allocation import Matrices, Unit
    from tqcodec.format.steps import step_from_code
    monkeypatch.setattr(allocation, "ROW_BLOCK", 7 * 24 + 5)  # 7 rows a block, the last one short
    rng = np.random.default_rng(5)
    # enough rows that a sum of per-block sums would differ from the one sum (pairwise summation)
    full = (rng.standard_normal((701, 24)) * rng.random((701, 1))).astype(np.float32)
    row_weights = rng.random(600) + 0.5
    if lazy:
        matrices = Matrices()
        matrices.add("w", lambda: full)
        data = matrices.rows("w", 30, 630, (600, 24))
    else:
        data = full[30:630].astype(np.float64)
    w = full[30:630].astype(np.float64)
    for rw in (None, row_weights):
        unit = Unit("u", data, row_weights=rw, gain=1.7)
        code = allocation.candidate_codes(w)[3]
        step = step_from_code(code)
        lv = unit.quantize(code, True)
        expected = round_nearest(w, step, -2**20, 2**20)
        assert np.array_equal(lv, expected) and lv.dtype == allocation.narrow(expected).dtype
        e = w - lv * step
        if rw is not None:
            e = e * np.sqrt(rw)[:, None]
        d, _ = unit.evaluate(code, True)
        assert d == 1.7 * float(np.sum(e * e))


def test_band_symbols_count_and_shift_levels_of_any_integer_type(monkeypatch):
    """The writer's symbols (level - q_min, int32) and counts, counted COUNT_BLOCK at a time,
    are those of the int64 levels, whatever integer type the levels come in."""
    from tqcodec.modes.tq import format as tq_format
    monkeypatch.setattr(tq_format, "COUNT_BLOCK", 1000)
    rng = np.random.default_rng(6)
    levels = rng.integers(-40, 90, size=(57, 61))
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        q_min, symbols, counts = tq_format.band_symbols(levels.astype(dtype))
        assert q_min == levels.min() and symbols.dtype == np.int32
        assert np.array_equal(symbols, levels.reshape(-1) - q_min)
        assert np.array_equal(counts, np.bincount(levels.reshape(-1) - q_min))


@pytest.mark.parametrize("calibrated", [False, True])
def test_bits_search_returns_the_attempt_closest_to_the_target_coded_again(model_and_stats, calibrated):
    """The bits loop keeps one attempt's coded tensors at a time: when an earlier attempt was
    closer to the target than the last, its allocation is coded again, and that must give the
    very tensors whose size was measured."""
    from tqcodec.modes.tq.encoder import encode_model
    from tqcodec.pipeline.encode import EncodeOptions, tq_items
    m, st, _ = model_and_stats
    stats = st if calibrated else None
    items, total = tq_items(list(m.state_dict().items()), EncodeOptions(mode="tq", bits=4.0, stats=stats))
    measured = []

    def size_of(enc):  # the first attempt's size is the real one; every later one looks 10x the target
        size = sum(len(p) for e in enc.values() for chunks in e.streams for _, p in chunks)
        measured.append(repr(sorted((k, e.params, e.streams) for k, e in enc.items())))
        return size if len(measured) == 1 else 10 * total * 4 // 8
    coded = []
    got = encode_model(items, stats, bits=4.0, total_params=total, size_of=size_of, tolerance=0.0,
                       progress=lambda what, done, n: coded.append(what) if what.startswith("rate search: coding") else None)
    assert len(measured) > 1  # more attempts were made, each worse than the first
    assert len(coded) == (len(measured) + 1) * len(got)  # ... and the first one was coded again
    assert repr(sorted((k, e.params, e.streams) for k, e in got.items())) == measured[0]

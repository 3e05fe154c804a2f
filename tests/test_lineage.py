"""Modes ecsq, kmeans, pq, dither (spec/mode-lineage.md §7.6-§7.9) and their encoders
(tqcodec.modes.{ecsq,kmeans,pq,dither}, tqcodec.pipeline.classic): exact round trips, determinism, rate targets, rate-distortion against plain
uniform quantization, dither error statistics, hostile parameters, mode auto's choice, the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tqcodec
from tqcodec.format.dtypes import storage_to_float64
from tqcodec.errors import TqzError
from tqcodec.format.manifest import TensorRecord
from tqcodec.modes import MODES
from tqcodec.modes.dither import format as dither_mode
from tqcodec.modes import uniform as uniform_mode
from tqcodec.modes.dither import encoder as dither_enc
from tqcodec.modes.dither.format import numerators, splitmix64
from tqcodec.modes.ecsq import encoder as ecsq_enc
from tqcodec.modes.kmeans import encoder as kmeans_enc
from tqcodec.modes.pq import encoder as pq_enc
from tqcodec.modes.rd import measured_bits, weighted_distortion
from tqcodec.pipeline.classic import encode_classic as encode_tensor
from tqcodec.format.steps import steps_from_codes

LINEAGE = ("ecsq", "kmeans", "pq", "dither")


def _decode(mode: str, dtype: str, shape: tuple, params: dict, streams: list) -> np.ndarray:
    """The mode's decoder on the encoder's params and streams (stream counts checked first)."""
    rec = TensorRecord("w", dtype, tuple(shape), mode, params)
    p = MODES[mode].parse(rec)
    items = tuple(s.items for s in MODES[mode].stream_items(p, 0, [rec]))
    assert items == tuple(sum(n for n, _ in s) for s in streams)
    return storage_to_float64(dtype, MODES[mode].decode(p, rec, streams))


def _stream_items(rec: TensorRecord) -> tuple:
    mod = MODES[rec.mode]
    return mod.stream_items(mod.parse(rec), 0, [rec])


def _laplace(shape, seed=0, scale=0.05):
    return np.random.default_rng(seed).laplace(size=shape) * scale


# --- spec pins (§7.S.6, §7.9.3 worked values) ----------------------------------------------------

def test_splitmix64_check_values_of_the_spec():
    assert [int(z) for z in splitmix64(0, 0, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [int(z) for z in splitmix64(1234567, 0, 3)] == [0x599ED017FB08FC85, 0x2C73F08458540FA5,
                                                             0x883EBCE5A3F27C77]
    assert [int(z) for z in splitmix64(0, 2, 1)] == [0x06C45D188009454F]  # any output on its own
    t1, t2 = numerators(splitmix64(0, 0, 1))
    assert (int(t1[0]), int(t2[0])) == (1607723, -1979431)


def test_dither_worked_values_of_the_spec():
    assert np.float64(dither_mode.scalar_values(np.array([3]), 0, 0)[0]).view(np.uint64) == 0x4004EEFAA0000000
    r = dither_mode.scalar_values(np.array([-2]), -37, 0)[0]
    assert np.float64(r).view(np.uint64) == 0xBF70AEE4B4000000
    assert np.float32(r).view(np.uint32) == 0xBB857726
    x, y = dither_mode.hex_values(np.array([1]), np.array([-1]), 0, 0)
    assert np.float64(x[0]).view(np.uint64) == 0x3FF5A47A20000000
    assert np.float64(y[0]).view(np.uint64) == 0xBFDD44B848BE76CC
    assert np.float64(dither_mode.H).view(np.uint64) == 0x3FEBB67AE8584CAA


# --- exact round trips ---------------------------------------------------------------------------

CASES = [("ecsq", {"variant": "grid"}), ("ecsq", {"variant": "codebook"}), ("kmeans", {"groups": 1}),
         ("kmeans", {"groups": 3}), ("pq", {}), ("dither", {"lattice": "scalar"}), ("dither", {"lattice": "hex"})]


@pytest.mark.parametrize("mode,kw", CASES, ids=[f"{m}-{'-'.join(map(str, k.values()))}" for m, k in CASES])
@pytest.mark.parametrize("dtype,shape", [("float32", (48, 40)), ("float16", (16, 5, 3, 3)),
                                         ("bfloat16", (33, 17)), ("float64", (7, 9))])
def test_decoder_rebuilds_the_encoders_reconstruction_exactly(mode, kw, dtype, shape):
    w = _laplace(shape, seed=hash((mode, dtype)) % 1000)
    imp = np.random.default_rng(1).gamma(0.7, size=(1, int(np.prod(shape[1:]))))
    enc = {"ecsq": ecsq_enc, "kmeans": kmeans_enc, "pq": pq_enc, "dither": dither_enc}[mode]
    res = enc.encode(w, dtype, imp, bits=2.5, **kw)
    assert res.mode == mode and res.recon.shape == shape
    got = _decode(mode, dtype, shape, res.encoded.params, res.encoded.streams).reshape(shape)
    np.testing.assert_array_equal(got, res.recon)
    assert res.rate_bits == measured_bits(res.encoded.params, res.encoded.streams)
    assert res.distortion == pytest.approx(weighted_distortion(got.reshape(shape[0], -1), w.reshape(shape[0], -1),
                                                               imp))


def test_save_load_keeps_dtype_and_shape_and_version_2():
    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(40, 24, generator=g) * 0.1, "a.bias": torch.randn(40, generator=g),
          "c.weight": (torch.randn(8, 4, 3, 3, generator=g) * 0.2).half(),
          "e.weight": (torch.randn(30, 16, generator=g)).bfloat16(), "small": torch.randn(10, 10, generator=g)}
    for mode in LINEAGE:
        data = tqcodec.encode_bytes(sd, mode=mode, bits=3)
        assert data[8:12] == bytes([1, 0, 2, 0])  # spec §3/§13: Minor_Version 2
        back = tqcodec.load(data)
        with tqcodec.open(data) as f:
            modes = {n: f.info(n).mode for n in f.keys()}
        assert modes == {"a.weight": mode, "a.bias": "raw", "c.weight": mode, "e.weight": mode, "small": "raw"}
        for k, v in sd.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape
            rel = float((back[k].double() - v.double()).pow(2).mean() / v.double().pow(2).mean())
            if v.numel() >= 400:  # 3 bits/weight include the params and chunk headers: tiny tensors get few
                assert rel < 0.5, (mode, k, rel)
    # files without these modes keep their minor version (spec §13)
    assert tqcodec.encode_bytes(sd, mode="uniform")[8:12] == bytes([1, 0, 0, 0])


def test_cli_encode_mode_and_decode_round_trip(tmp_path):
    from typer.testing import CliRunner

    from tqcodec.cli import app
    g = torch.Generator().manual_seed(2)
    sd = {"w": torch.randn(32, 48, generator=g) * 0.1, "b": torch.randn(32, generator=g)}
    src = tmp_path / "m.pt"
    torch.save(sd, src)
    for mode in LINEAGE:
        out, dec = tmp_path / f"{mode}.tqz", tmp_path / f"{mode}.pt"
        r = CliRunner().invoke(app, ["encode", str(src), "-o", str(out), "--mode", mode, "--bits", "3"])
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(app, ["decode", str(out), "-o", str(dec)])
        assert r.exit_code == 0, r.output
        back = torch.load(dec, weights_only=True)
        with tqcodec.open(out) as f:
            assert f.info("w").mode == mode and f.version == (1, 2)
            assert torch.equal(back["w"], f.get_tensor("w")) and torch.equal(back["b"], sd["b"])
    r = CliRunner().invoke(app, ["encode", str(src), "-o", str(tmp_path / "x.tqz"), "--mode", "lloyd"])
    assert r.exit_code == 1 and "BAD_OPTION" in r.output


# --- determinism and rate targets ------------------------------------------------------------------

def test_same_bytes_twice():
    g = torch.Generator().manual_seed(3)
    sd = {"w": torch.randn(64, 32, generator=g) * 0.1, "v": torch.randn(16, 3, 3, 3, generator=g)}
    for opts in [{"mode": m, "bits": 2.0} for m in LINEAGE] + [{"mode": m} for m in LINEAGE] + [{"bits": 2.0}]:
        assert tqcodec.encode_bytes(sd, **opts) == tqcodec.encode_bytes(sd, **opts), opts


@pytest.mark.parametrize("mode", LINEAGE)
def test_rate_target_is_honoured_roughly(mode):
    w = _laplace((128, 96), seed=4)
    for bits in (2.0, 4.0):
        res = encode_tensor(mode, "w", w, "float32", bits=bits)
        # the measured bits (params, chunk headers, payloads) within the target; step codes and
        # codebook sizes are discrete, so rates land somewhat below
        assert 0.6 * bits <= res.bits_per_weight <= 1.02 * bits, (bits, res.bits_per_weight, res.info)


# --- rate-distortion: where the methods promise to beat plain uniform quantization ----------------

def _uniform_point(w: np.ndarray, h: np.ndarray, code: int) -> tuple[float, float]:
    _, params, streams = uniform_mode.encode(w, "float32", "tensor", codes=np.array([code]))
    step = float(steps_from_codes([code])[0])
    return measured_bits(params, streams), weighted_distortion(np.rint(w / step) * step, w, h)


def test_ecsq_beats_uniform_at_low_rate():
    """Entropy-constrained decisions (a dead zone where the importance is low) at <= 1.2 bits/weight."""
    rng = np.random.default_rng(5)
    w = rng.laplace(size=(128, 192)) * 0.05
    h = rng.gamma(0.5, size=(1, 192))
    for code in (-11, -9):
        r_u, d_u = _uniform_point(w, h, code)
        assert r_u / w.size < 1.3
        res = ecsq_enc.encode(w, "float32", h, bits=r_u / w.size)
        assert res.rate_bits <= 1.02 * r_u
        assert res.distortion < 0.8 * d_u, (code, res.distortion, d_u, res.info)


def test_kmeans_and_ecsq_codebook_beat_uniform_on_clustered_weights():
    """A codebook fits weights that sit in a few clusters off any uniform grid."""
    rng = np.random.default_rng(6)
    centers = np.array([-0.31, -0.12, 0.07, 0.26, 0.52])
    w = centers[rng.integers(0, 5, size=(96, 128))] + rng.normal(size=(96, 128)) * 0.004
    h = np.ones((1, 1))
    r_u, d_u = _uniform_point(w, h, -14)  # step 0.0625: about 2.6 bits/weight
    km = kmeans_enc.encode(w, "float32", h, bits=r_u / w.size)
    cb = ecsq_enc.encode(w, "float32", h, bits=r_u / w.size, variant="codebook")
    for res in (km, cb):
        assert res.rate_bits <= 1.02 * r_u
        assert res.distortion < 0.2 * d_u, (res.mode, res.distortion, d_u)


def test_importance_steers_kmeans():
    """With importance on a subset of weights, weighted k-means serves them better than unweighted."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(64, 64)) * 0.1
    h = np.where(np.arange(64) < 8, 100.0, 1.0)[None, :]
    weighted = kmeans_enc.encode(w, "float32", h, bits=2.0)
    plain = kmeans_enc.encode(w, "float32", np.ones((1, 1)), bits=2.0)
    d_plain = weighted_distortion(plain.recon, w, h)
    assert weighted.rate_bits <= 1.05 * plain.rate_bits
    assert weighted.distortion < d_plain


# --- dither: the error is uniform, zero-mean and independent of the signal ------------------------

@pytest.mark.parametrize("lattice", ["scalar", "hex"])
def test_dither_error_statistics(lattice):
    rng = np.random.default_rng(8)
    n = 1 << 16
    ramp = np.linspace(-1.0, 1.0, n).reshape(256, 256)
    on_grid = np.zeros((256, 256))  # every weight on a lattice point: plain rounding would be exact
    noise = rng.normal(size=(256, 256)) * 0.3
    for x in (ramp, on_grid, noise):
        res = dither_enc.encode(x, "float64", np.ones((1, 1)), bits=5.0, lattice=lattice, name="t")
        delta = float(steps_from_codes([res.info["step"]])[0])
        e = (res.recon - x).reshape(-1)
        # mean 0; variance of the cell (scalar: 1/12; A2 with minimal distance 1: 5/72 per coordinate)
        var = delta * delta * (1 / 12 if lattice == "scalar" else 5 / 72)
        assert abs(e.mean()) < 5 * np.sqrt(var / n)
        assert e.var() == pytest.approx(var, rel=0.04)
        if lattice == "scalar":
            assert np.abs(e).max() <= delta / 2 * (1 + 1e-9)
        else:
            pairs = e.reshape(-1, 2)
            assert np.sqrt((pairs ** 2).sum(axis=1)).max() <= delta / np.sqrt(3) * (1 + 1e-6)
        if x.std() > 0:
            assert abs(np.corrcoef(e, x.reshape(-1))[0, 1]) < 5 / np.sqrt(n)


# --- hostile parameters: the right code, before anything is allocated ------------------------------

HOSTILE = [
    ("ecsq", (4, 4), {"recon": "grid", "counts": b"\x10", "step": 0}, "BAD_TENSOR_RECORD"),
    ("ecsq", (4, 4), {"recon": "grid", "counts": b"\x10", "step": 0, "q_min": 0, "precision": "float16"},
     "BAD_TENSOR_RECORD"),
    ("ecsq", (4, 4), {"recon": "grid", "counts": b"\x10", "step": 999, "q_min": 0}, "BAD_STEP"),
    ("ecsq", (4, 4), {"recon": "codebook", "counts": b"\x08\x00\x08"}, "BAD_TABLE"),
    ("ecsq", (4, 4), {"recon": "grid", "counts": b"\xff\xff\xff\xff\xff\xff\x01", "step": 0, "q_min": 0},
     "BAD_TABLE"),
    ("ecsq", (4, 4), {"recon": "grid", "counts": b"\x10", "step": 0, "q_min": 1 << 21}, "LIMIT_EXCEEDED"),
    ("kmeans", (6, 4), {"group_rows": [2, 2], "counts": [b"\x08", b"\x08"]}, "BAD_TENSOR_RECORD"),
    ("kmeans", (6, 4), {"group_rows": [2 ** 63, 2 ** 63 + 6], "counts": [b"\x08", b"\x10"]}, "BAD_TENSOR_RECORD"),
    ("kmeans", (6, 4), {"group_rows": [6] * 4097, "counts": [b"\x18"] * 4097}, "BAD_TENSOR_RECORD"),
    ("kmeans", (6, 4), {"group_rows": [6], "counts": [b"\x18"], "precision": "float64"}, "BAD_TENSOR_RECORD"),
    ("kmeans", (), {"group_rows": [1], "counts": [b"\x01"]}, "BAD_TENSOR_RECORD"),
    ("kmeans", (6, 4), {"group_rows": [6], "counts": [b"\x17"]}, "BAD_TABLE"),
    ("pq", (4, 10), {"dim": 11, "counts": b"\x0c"}, "BAD_TENSOR_RECORD"),
    ("pq", (4, 1000), {"dim": 257, "counts": b"\x10"}, "BAD_TENSOR_RECORD"),
    ("pq", (4, 10), {"dim": True, "counts": b"\x0c"}, "BAD_TENSOR_RECORD"),
    ("pq", (4, 10), {"dim": 4, "counts": b"\x06\x00\x06"}, "BAD_TABLE"),
    ("dither", (4, 4), {"step": 0, "seed": -1, "q_min": [0], "counts": [b"\x10"]}, "BAD_TENSOR_RECORD"),
    ("dither", (4, 4), {"step": 0, "seed": 1, "q_min": [0], "counts": [b"\x10"], "lattice": "hex"},
     "BAD_TENSOR_RECORD"),
    ("dither", (4, 4), {"step": 0, "seed": 1, "q_min": [0, 0], "counts": [b"\x10", b"\x10"], "lattice": "hex"},
     "BAD_TABLE"),  # hex: 8 pairs, not 16
    ("dither", (4, 4), {"step": -161, "seed": 1, "q_min": [0], "counts": [b"\x10"]}, "BAD_STEP"),
    ("dither", (4, 4), {"step": 0, "seed": 1, "q_min": [-(1 << 20) - 1], "counts": [b"\x10"]}, "LIMIT_EXCEEDED"),
    ("dither", (4, 4), {"step": 0, "seed": 1.0, "q_min": [0], "counts": [b"\x10"]}, "BAD_TENSOR_RECORD"),
]


@pytest.mark.parametrize("mode,shape,params,code", HOSTILE)
def test_hostile_params_are_rejected_with_their_code(mode, shape, params, code):
    rec = TensorRecord("w", "float32", shape, mode, params)
    with pytest.raises(TqzError) as exc:
        _stream_items(rec)
    assert exc.value.code == code


def test_hostile_payloads():
    """Stored values: NaN/inf and out-of-order codebooks are BAD_PAYLOAD; length rules BAD_CHUNK."""
    _, params, streams = MODES["ecsq"].write(np.array([0, 1, 2, 1]), recon="codebook", values=np.array([-1.0, 0.0, 2.0]))
    rec = TensorRecord("w", "float32", (2, 2), "ecsq", params)
    good = streams[0][0][1]
    for bad, code in ((good[:2] + b"\x00\x7e" + good[4:], "BAD_PAYLOAD"),      # NaN
                      (good[:2] + b"\x00\x40" + good[4:], "BAD_PAYLOAD"),      # 2.0 twice: not increasing
                      (good + b"\x00", "BAD_CHUNK")):                          # Payload_Length != Item_Count
        with pytest.raises(TqzError) as exc:
            MODES["ecsq"].decode(MODES["ecsq"].parse(rec), rec, [[(len(good), bad)], streams[1]])
        assert exc.value.code == code
    with pytest.raises(TqzError) as exc:
        MODES["ecsq"].decode(MODES["ecsq"].parse(rec), rec, [streams[0], [(4, streams[1][0][1] + b"\x00\x00")]])
    assert exc.value.code == "BAD_CHUNK"


# --- mode auto: tq or a lineage mode per tensor ----------------------------------------------------

def test_auto_picks_tq_or_a_lineage_mode_by_rate_distortion_cost():
    rng = np.random.default_rng(7)
    m = 64
    xa = rng.normal(size=(4000, m)) @ rng.normal(size=(m, m)) * 0.3  # correlated inputs: error feedback pays
    xb = rng.normal(size=(4000, m))
    wa = rng.normal(size=(96, m)) * 0.1
    centers = np.array([-0.31, -0.12, 0.07, 0.26, 0.52])
    wb = centers[rng.integers(0, 5, size=(96, m))] + rng.normal(size=(96, m)) * 0.004  # clustered weights
    sd = {"a.weight": torch.from_numpy(wa.astype(np.float32)), "b.weight": torch.from_numpy(wb.astype(np.float32))}
    st = tqcodec.Stats.from_activations({"a.weight": xa, "b.weight": xb})
    data = tqcodec.encode_bytes(sd, stats=st, bits=3.0)
    with tqcodec.open(data) as f:
        modes = {n: f.info(n).mode for n in f.keys()}
        assert f.version == (1, 2)
    assert modes["a.weight"] == "tq"
    assert modes["b.weight"] in ("kmeans", "ecsq", "pq")
    assert abs(8 * len(data) / (wa.size + wb.size) / 3.0 - 1) <= 0.03  # the whole-file target still holds
    tq_only = tqcodec.encode_bytes(sd, stats=st, bits=3.0, mode="tq")
    err = lambda d: float(((tqcodec.load(d)["b.weight"].double() - sd["b.weight"].double()) ** 2).sum())  # noqa
    assert err(data) < err(tq_only)
    # auto without stats or bits is unchanged: uniform
    with tqcodec.open(tqcodec.encode_bytes(sd)) as f:
        assert {f.info(n).mode for n in f.keys()} == {"uniform"}


# --- mutation fuzz over files of these modes (the harness of tests/test_fuzz.py) -------------------

def _lineage_seeds() -> list[bytes]:
    g = torch.Generator().manual_seed(9)
    w = torch.randn(12, 40, generator=g) * 0.1
    seeds = [tqcodec.encode_bytes({"w": w, "h": w.half()[:7]}, mode=m, bits=3) for m in LINEAGE]
    _, params, streams = dither_mode.write([np.arange(-3, 4).repeat(2)[:13], np.arange(13) % 5 - 2], step=-6, seed=5,
                                         lattice="hex")
    from tqcodec.format.writer import ContainerWriter
    import io
    buf = io.BytesIO()
    with ContainerWriter(buf) as wr:
        wr.add_tensor(TensorRecord("x", "float32", (5, 5), "dither", params), streams)
        wr.finish({})
    seeds.append(buf.getvalue())
    _, params, streams = MODES["kmeans"].write([np.arange(20).reshape(2, 10) % 3, np.zeros((1, 10), int)],
                                             [np.array([-1.0, 0.0, 1.0]), np.array([0.5])], precision="float32")
    buf = io.BytesIO()
    with ContainerWriter(buf) as wr:
        wr.add_tensor(TensorRecord("k", "bfloat16", (3, 10), "kmeans", params), streams)
        wr.finish({})
    seeds.append(buf.getvalue())
    return seeds


def test_mutated_lineage_files_fail_cleanly():
    """600 mutated files (manifest values, lengths, bytes; CRCs fixed half the time): every one decodes or
    fails with a spec §11 code, within the fuzz harness's time and memory bounds."""
    import random

    from tests.test_fuzz import check_case, mutate
    seeds = _lineage_seeds()
    for s in seeds:
        assert check_case(s, trace=True) == "ok"
    rng = random.Random(77)
    outcomes: dict[str, int] = {}
    for i in range(600):
        label = check_case(mutate(seeds[i % len(seeds)], rng, seeds))
        outcomes[label] = outcomes.get(label, 0) + 1
    assert len(outcomes) >= 5, outcomes  # the mutations reach several rules

"""The classic modes ecsq, kmeans, pq and dither together (spec/mode-lineage.md §7.6-§7.9;
tqcodec.modes.{ecsq,kmeans,pq,dither} and tqcodec.pipeline.classic): exact round trips, files of
each mode through save/load, determinism, rate targets, hostile parameters and mutated files.
Mode-specific tests: tests/modes/test_ecsq.py, test_kmeans.py, test_dither.py (pq has none of its own)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tqcodec
from tqcodec.format.dtypes import storage_to_float64
from tqcodec.errors import TqzError
from tqcodec.format.manifest import TensorRecord
from tqcodec.modes import MODES
from tqcodec.modes.dither import encoder as dither_enc
from tqcodec.modes.dither import format as dither_mode
from tqcodec.modes.ecsq import encoder as ecsq_enc
from tqcodec.modes.kmeans import encoder as kmeans_enc
from tqcodec.modes.pq import encoder as pq_enc
from tqcodec.modes.rd import measured_bits, weighted_distortion
from tqcodec.pipeline.classic import encode_classic as encode_tensor
from tests.helpers import CLASSIC_MODES


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
    for mode in CLASSIC_MODES:
        # bits are the whole file's: at 8 bits/param the raw tensors, headers and manifest of this tiny
        # model leave the coded tensors about 3 bits/weight
        data = tqcodec.encode_bytes(sd, mode=mode, bits=8)
        # spec §3/§13: Minor_Version 2, or 3 where the manifest is stored compressed (§5.0)
        assert data[8:12] == bytes([1, 0, 3 if data[12] & 1 else 2, 0])
        back = tqcodec.load(data)
        with tqcodec.open(data) as f:
            modes = {n: f.info(n).mode for n in f.keys()}
        assert modes == {"a.weight": mode, "a.bias": "raw", "c.weight": mode, "e.weight": mode, "small": "raw"}
        for k, v in sd.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape
            rel = float((back[k].double() - v.double()).pow(2).mean() / v.double().pow(2).mean())
            if v.numel() >= 400:  # a few bits/weight include the params and chunk headers: tiny tensors get few
                assert rel < 0.5, (mode, k, rel)
    # files without these modes keep their minor version (spec §13): 0, or 3 for a compressed manifest
    data = tqcodec.encode_bytes(sd, mode="uniform")
    assert data[8:12] == bytes([1, 0, 3 if data[12] & 1 else 0, 0])


# --- determinism and rate targets ------------------------------------------------------------------

def test_same_bytes_twice():
    g = torch.Generator().manual_seed(3)
    sd = {"w": torch.randn(64, 32, generator=g) * 0.1, "v": torch.randn(16, 3, 3, 3, generator=g)}
    for opts in ([{"mode": m, "bits": 2.0} for m in CLASSIC_MODES] + [{"mode": m} for m in CLASSIC_MODES]
                 + [{"bits": 2.0}]):
        assert tqcodec.encode_bytes(sd, **opts) == tqcodec.encode_bytes(sd, **opts), opts


@pytest.mark.parametrize("mode", CLASSIC_MODES)
def test_rate_target_is_honoured_roughly(mode):
    w = _laplace((128, 96), seed=4)
    for bits in (2.0, 4.0):
        res = encode_tensor(mode, "w", w, "float32", bits=bits)
        # the measured bits (params, chunk headers, payloads) within the target; step codes and
        # codebook sizes are discrete, so rates land somewhat below
        assert 0.6 * bits <= res.bits_per_weight <= 1.02 * bits, (bits, res.bits_per_weight, res.info)


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


# --- mutation fuzz over files of these modes (the harness of tests/fuzzing.py) -------------------

def _lineage_seeds() -> list[bytes]:
    g = torch.Generator().manual_seed(9)
    w = torch.randn(12, 40, generator=g) * 0.1
    seeds = [tqcodec.encode_bytes({"w": w, "h": w.half()[:7]}, mode=m, bits=3) for m in CLASSIC_MODES]
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

    from tests.fuzzing import check_case, mutate
    seeds = _lineage_seeds()
    for s in seeds:
        assert check_case(s, trace=True) == "ok"
    rng = random.Random(77)
    outcomes: dict[str, int] = {}
    for i in range(600):
        label = check_case(mutate(seeds[i % len(seeds)], rng, seeds))
        outcomes[label] = outcomes.get(label, 0) + 1
    assert len(outcomes) >= 5, outcomes  # the mutations reach several rules

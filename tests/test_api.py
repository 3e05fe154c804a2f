"""Round trips through save/load/open: names, order, dtypes, shapes, values."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import tqcodec
from tqcodec.format.steps import steps_from_codes


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A view that compares bit for bit (NaN-safe)."""
    if t.dtype.is_floating_point:
        width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
        return t.contiguous().view(width)
    return t


def test_lossless_roundtrip_is_bit_exact(tmp_path, state_dict):
    path = tmp_path / "m.tqz"
    tqcodec.save(state_dict, path, lossless=True)
    out = tqcodec.load(path)
    assert list(out) == list(state_dict)
    for k, v in state_dict.items():
        assert out[k].dtype == v.dtype, k
        assert out[k].shape == v.shape, k
        assert torch.equal(_bits(out[k]), _bits(v)), k


def test_lossless_keeps_nan_inf_and_negative_zero(tmp_path):
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    out = tqcodec.load(tqcodec.encode_bytes({"x": t}, lossless=True))["x"]
    assert torch.equal(_bits(out), _bits(t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_uniform_error_is_within_half_a_step(dtype):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(40, 30, generator=g) * 0.05).to(dtype)
    data = tqcodec.encode_bytes({"w": w}, mode="uniform", snr_db=30)
    with tqcodec.open(data) as f:
        info = f.info("w")
        out = f.get_tensor("w")
    assert info.mode == "uniform" and out.dtype == dtype
    steps = steps_from_codes(np.array(info.params["steps"]))
    err = (out.double() - w.double()).abs().numpy().reshape(40, -1).max(axis=1)
    # half a step, plus the rounding of the exact value to the dtype
    ulp = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float64: 0}[dtype]
    assert np.all(err <= steps / 2 + ulp * w.double().abs().max().item() + 1e-12)


def test_uniform_values_are_exact_multiples_of_the_step():
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(2))
    data = tqcodec.encode_bytes({"w": w}, mode="uniform", granularity="tensor")
    with tqcodec.open(data) as f:
        step = float(steps_from_codes(np.array(f.info("w").params["steps"]))[0])
        out = f.get_tensor("w").double().numpy()
    levels = out / step
    assert np.array_equal(levels, np.round(levels))


def test_higher_snr_gives_smaller_error_and_larger_file():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    sizes, errors = [], []
    for snr in (20, 40, 60):
        data = tqcodec.encode_bytes({"w": w}, snr_db=snr)
        sizes.append(len(data))
        errors.append(float((tqcodec.load(data)["w"] - w).pow(2).mean()))
    assert sizes[0] < sizes[1] < sizes[2]
    assert errors[0] > errors[1] > errors[2]
    # SNR is met: noise power below signal power / 10^(snr/10)
    assert errors[1] <= float(w.pow(2).mean()) * 10 ** (-40 / 10) * 1.5


def test_constant_tensor_has_no_chunks():
    data = tqcodec.encode_bytes({"c": torch.full((32, 32), 0.5)}, mode="uniform")
    with tqcodec.open(data) as f:
        assert f.info("c").stored_bytes == 0
        assert torch.equal(f.get_tensor("c"), torch.full((32, 32), 0.5))


def test_encoding_is_deterministic(state_dict):
    assert tqcodec.encode_bytes(state_dict) == tqcodec.encode_bytes(state_dict)
    assert tqcodec.encode_bytes(state_dict, lossless=True) == tqcodec.encode_bytes(state_dict, lossless=True)


def test_tied_tensors_are_stored_once(state_dict):
    state_dict["head.weight"] = state_dict["emb.weight"]
    data = tqcodec.encode_bytes(state_dict)
    with tqcodec.open(data) as f:
        assert f.info("head.weight").mode == "alias"
        assert f.info("head.weight").stored_bytes == 0
        assert torch.equal(f.get_tensor("head.weight"), f.get_tensor("emb.weight"))
    out = tqcodec.load(data)
    assert out["head.weight"] is out["emb.weight"]


def test_open_reads_one_tensor_and_matches_load(tmp_path, state_dict):
    path = tmp_path / "m.tqz"
    tqcodec.save(state_dict, path)
    full = tqcodec.load(path)
    with tqcodec.open(path) as f:
        assert f.keys() == list(state_dict)
        assert "fc.weight" in f and "nope" not in f
        assert f.metadata["tqz.encoder"].startswith("tqcodec ")
        for k in reversed(f.keys()):
            assert torch.equal(_bits(f.get_tensor(k)), _bits(full[k])), k
        with pytest.raises(KeyError):
            f.get_tensor("nope")


def test_large_tensor_spans_several_chunks():
    w = torch.randn(1 << 21, generator=torch.Generator().manual_seed(4)).reshape(2048, 1024)
    data = tqcodec.encode_bytes({"w": w}, mode="uniform")
    out = tqcodec.load(data)["w"]
    assert out.shape == w.shape
    assert float((out - w).abs().max()) < 0.1
    assert data.count(b"TQCK") >= 2


def test_metadata_round_trip_and_reserved_prefix():
    data = tqcodec.encode_bytes({"w": torch.ones(3)}, metadata={"source": "unit", "n": 3, "nested": {"a": [1, 2]}})
    with tqcodec.open(data) as f:
        assert f.metadata["source"] == "unit" and f.metadata["n"] == 3 and f.metadata["nested"] == {"a": [1, 2]}
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.encode_bytes({"w": torch.ones(3)}, metadata={"tqz.x": "no"})
    assert e.value.code == "BAD_OPTION"


def test_streaming_decode_from_a_non_seekable_stream(state_dict):
    data = tqcodec.encode_bytes(state_dict)

    class Pipe(io.RawIOBase):
        def __init__(self, b: bytes):
            self.b, self.pos = b, 0

        def readable(self):
            return True

        def readinto(self, buf):
            n = min(len(buf), 7, len(self.b) - self.pos)  # tiny reads, like a slow pipe
            buf[:n] = self.b[self.pos:self.pos + n]
            self.pos += n
            return n

    got = dict(tqcodec.iter_tensors(Pipe(data)))
    ref = tqcodec.load(data)
    assert list(got) == list(ref)
    assert all(torch.equal(_bits(got[k]), _bits(ref[k])) for k in ref)


def test_nan_weights_are_stored_exactly_with_a_warning():
    w = torch.randn(32, 32)
    w[3, 4] = float("nan")
    with pytest.warns(UserWarning, match="NaN"):
        data = tqcodec.encode_bytes({"w": w})
    with tqcodec.open(data) as f:
        assert f.info("w").mode == "raw"
        assert torch.equal(_bits(f.get_tensor("w")), _bits(w))


@pytest.mark.parametrize("bad,code", [
    ({"": torch.ones(2)}, "BAD_INPUT"),
    ({"../x": torch.ones(2)}, "BAD_INPUT"),
    ({"a\x00b": torch.ones(2)}, "BAD_INPUT"),
    ({"x" * 2000: torch.ones(2)}, "BAD_INPUT"),
    ({"c": torch.ones(2, dtype=torch.complex64)}, "BAD_INPUT"),
    ({"n": 3}, "BAD_INPUT"),
])
def test_bad_encoder_inputs(bad, code):
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.encode_bytes(bad)
    assert e.value.code == code


@pytest.mark.parametrize("opts", [{"mode": "zip"}, {"snr_db": -1}, {"snr_db": float("nan")}, {"granularity": "row"}])
def test_bad_options(opts):
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.encode_bytes({"w": torch.ones(4, 4)}, **opts)
    assert e.value.code == "BAD_OPTION"


def test_non_contiguous_and_shared_storage_inputs():
    base = torch.randn(20, 30)
    sd = {"t": base.t(), "row": base[3], "slice": base[:, 5:9]}
    out = tqcodec.load(tqcodec.encode_bytes(sd, lossless=True))
    for k, v in sd.items():
        assert torch.equal(out[k], v), k


def test_failed_save_leaves_previous_file(tmp_path):
    path = tmp_path / "m.tqz"
    tqcodec.save({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(tqcodec.TqzError):
        tqcodec.save({"w": torch.ones(3), "bad": torch.ones(2, dtype=torch.complex64)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tqz"]

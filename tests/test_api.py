"""Round trips through save/load/open: names, order, dtypes, shapes, values."""
from __future__ import annotations

import io

import pytest
import torch

import tqcodec
from tests.helpers import bit_view


def test_lossless_roundtrip_is_bit_exact(tmp_path, state_dict):
    path = tmp_path / "m.tqz"
    tqcodec.save(state_dict, path, lossless=True)
    out = tqcodec.load(path)
    assert list(out) == list(state_dict)
    for k, v in state_dict.items():
        assert out[k].dtype == v.dtype, k
        assert out[k].shape == v.shape, k
        assert torch.equal(bit_view(out[k]), bit_view(v)), k


def test_encoding_is_deterministic(state_dict):
    assert tqcodec.encode_bytes(state_dict) == tqcodec.encode_bytes(state_dict)
    assert tqcodec.encode_bytes(state_dict, lossless=True) == tqcodec.encode_bytes(state_dict, lossless=True)


def test_open_reads_one_tensor_and_matches_load(tmp_path, state_dict):
    path = tmp_path / "m.tqz"
    tqcodec.save(state_dict, path)
    full = tqcodec.load(path)
    with tqcodec.open(path) as f:
        assert f.keys() == list(state_dict)
        assert "fc.weight" in f and "nope" not in f
        assert f.metadata["tqz.encoder"].startswith("tqcodec ")
        for k in reversed(f.keys()):
            assert torch.equal(bit_view(f.get_tensor(k)), bit_view(full[k])), k
        with pytest.raises(KeyError):
            f.get_tensor("nope")


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
    assert all(torch.equal(bit_view(got[k]), bit_view(ref[k])) for k in ref)


def test_failed_save_leaves_previous_file(tmp_path):
    path = tmp_path / "m.tqz"
    tqcodec.save({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(tqcodec.TqzError):
        tqcodec.save({"w": torch.ones(3), "bad": torch.ones(2, dtype=torch.complex64)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tqz"]

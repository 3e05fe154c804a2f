"""tqcodec.api: round trips through save/load/open (names, order, dtypes, shapes, values), the same
bytes twice, metadata."""
from __future__ import annotations

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


def test_save_refuses_to_overwrite_unless_asked(tmp_path, state_dict):
    """save and ``tqz encode`` agree: an existing file is replaced only with overwrite=True."""
    path = tmp_path / "m.tqz"
    tqcodec.save(state_dict, path)
    before = path.read_bytes()
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.save(state_dict, path, lossless=True)
    assert e.value.code == "OUTPUT_EXISTS" and path.read_bytes() == before
    tqcodec.save(state_dict, path, lossless=True, overwrite=True)
    assert path.read_bytes() != before


def test_a_missing_file_is_also_a_file_not_found_error(tmp_path):
    """IO_ERROR is an OSError (FileNotFoundError for a file that does not exist): code that catches
    the built-in errors of file work catches tqcodec's too, and keeps the spec §11 code."""
    missing = tmp_path / "nope.tqz"
    for call in (lambda: tqcodec.load(missing), lambda: tqcodec.open(missing), lambda: tqcodec.verify(missing)):
        with pytest.raises(FileNotFoundError) as e:
            call()
        assert isinstance(e.value, tqcodec.TqzError) and e.value.code == "IO_ERROR" and str(missing) in str(e.value)
        assert e.value.errno == 2 and e.value.filename == str(missing)
    from tqcodec.io.files import read_model
    with pytest.raises(FileNotFoundError):
        read_model(tmp_path / "nope.pt")
    with pytest.raises(OSError) as e:  # a folder where a file is due: an OSError, not a FileNotFoundError
        tqcodec.load(tmp_path)
    assert isinstance(e.value, tqcodec.TqzError) and not isinstance(e.value, FileNotFoundError)

"""A tensor named ``__metadata__`` (valid in .tqz, spec §5.4; the key a safetensors header keeps its
metadata under): a .safetensors output maps it to ``/__metadata__`` with a warning, a .pt output
keeps it, a Hugging Face folder output refuses the file with BAD_INPUT."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tqcodec
from tqcodec import api
from tqcodec.errors import TqzError
from tqcodec.io.files import safetensors_key, write_model


def _tensors() -> dict[str, torch.Tensor]:
    return {"__metadata__": torch.tensor([1.5, -2.0]), "x": torch.arange(3, dtype=torch.uint8)}


def test_the_mapping_is_injective_on_valid_names():
    assert safetensors_key("__metadata__") == "/__metadata__"
    for name in ("x", "__metadata", "_metadata__", "a/__metadata__", "__METADATA__"):
        assert safetensors_key(name) == name


def test_safetensors_output_maps_the_name(tmp_path):
    out = tmp_path / "m.safetensors"
    with pytest.warns(UserWarning, match="/__metadata__"):
        write_model(_tensors(), out, overwrite=False, metadata={"format": "pt"})
    got = load_file(str(out))  # a standard reader reads the file
    assert sorted(got) == ["/__metadata__", "x"]
    assert torch.equal(got["/__metadata__"], _tensors()["__metadata__"])
    assert torch.equal(got["x"], _tensors()["x"])


def test_safetensors_output_refuses_a_collision(tmp_path):
    t = {**_tensors(), "/__metadata__": torch.zeros(1)}  # not a .tqz name, but write_model is general
    with pytest.raises(TqzError) as ei:
        write_model(t, tmp_path / "m.safetensors", overwrite=False)
    assert ei.value.code == "BAD_INPUT"
    assert not list(tmp_path.iterdir())


def test_pt_output_keeps_the_name(tmp_path):
    out = tmp_path / "m.pt"
    write_model(_tensors(), out, overwrite=False)
    assert sorted(torch.load(out, weights_only=True)) == ["__metadata__", "x"]


def test_a_tqz_file_with_the_name_round_trips_and_the_cli_decodes_it(tmp_path):
    src = tmp_path / "m.tqz"
    tqcodec.save(_tensors(), src, mode="raw")
    got = tqcodec.load(src)
    assert sorted(got) == ["__metadata__", "x"]
    out = tmp_path / "m.safetensors"
    p = subprocess.run([sys.executable, "-m", "tqcodec", "decode", str(src), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "/__metadata__" in p.stderr  # the warning
    assert sorted(load_file(str(out))) == ["/__metadata__", "x"]


def test_folder_output_refuses_the_name(tmp_path):
    src = tmp_path / "m.tqz"
    tqcodec.save(_tensors(), src, mode="raw")
    out = tmp_path / "folder"
    with pytest.raises(TqzError) as ei:
        api.decode_folder(src, out)
    assert ei.value.code == "BAD_INPUT"
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tqz"]  # no temporary folder left

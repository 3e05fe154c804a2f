"""Hostile and odd inputs to the encoder (issue 8): each has one defined outcome.

| input | outcome |
|---|---|
| `.pt` pickle that would run code (any suffix) | `BAD_INPUT`; the code never runs; `torch.load` is called once, with `weights_only=True` |
| tensor subclass (in a `.pt`, or handed to `save`) | `BAD_INPUT` (`nn.Parameter` is accepted as a plain tensor) |
| non-tensor value (int, ndarray, list, nested junk) | `BAD_INPUT` |
| NaN / ±Inf in a float tensor | stored exactly in `raw`, with a `UserWarning` naming the tensor |
| non-contiguous, expanded, negated-view tensors | stored with their values (as if `.contiguous()`) |
| tensors sharing storage | the same view twice: stored once (`alias`); other views of one storage: each stored |
| int / uint / bool buffers | stored exactly in `raw` |
| complex, float8, quantized, sparse, meta tensors | `BAD_INPUT` |
| names: not `str` (bytes, int), not valid Unicode, > 1024 UTF-8 bytes, path-like | `BAD_INPUT` |
| corrupt `.safetensors` / unknown suffix | `BAD_INPUT` |
"""
from __future__ import annotations

import os
import pickle
import struct
import warnings
from pathlib import Path

import pytest
import torch

import tqcodec
from tqcodec.io.files import read_model

MARKER_ENV = "TQZ_HOSTILE_MARKER"


def _bits(t: torch.Tensor) -> bytes:
    flat = t.contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy()) if flat.numel() else b""


def roundtrip(tensors: dict, **kw) -> dict:
    return tqcodec.load(tqcodec.encode_bytes(tensors, **kw))


def code_of(fn) -> str:
    with pytest.raises(tqcodec.TqzError) as e:
        fn()
    return e.value.code


# --- pickles with code ---------------------------------------------------------------------------

class RunsCode:
    """Unpickling this creates the marker file (if it is ever unpickled)."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ[MARKER_ENV]}",))


class RunsEval:
    def __reduce__(self):
        return (eval, (f"open({os.environ[MARKER_ENV]!r}, 'w').close()",))


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    m = tmp_path / "code-ran"
    monkeypatch.setenv(MARKER_ENV, str(m))
    return m


@pytest.mark.parametrize("how", ["raw-pickle", "torch-zip", "nested-in-state-dict", "eval"])
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt"])
def test_pickle_with_code_never_runs(tmp_path, marker, monkeypatch, how, suffix):
    p = tmp_path / f"evil{suffix}"
    if how == "raw-pickle":
        p.write_bytes(pickle.dumps({"w": RunsCode()}, protocol=2))
    elif how == "torch-zip":
        torch.save({"w": torch.ones(2), "x": RunsCode()}, p)
    elif how == "nested-in-state-dict":
        torch.save({"state_dict": {"w": torch.ones(2)}, "hook": RunsCode()}, p)
    else:
        torch.save({"w": RunsEval()}, p)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(tqcodec.TqzError) as e:
        read_model(p)
    assert e.value.code == "BAD_INPUT" and "refusing to unpickle" in e.value.message
    assert str(p) in str(e.value)
    assert calls == [True], "torch.load must be called once, with weights_only=True (no fallback)"
    assert not marker.exists(), "the pickle's code ran"


def test_pickle_with_code_via_cli_leaves_no_output(tmp_path, marker):
    from typer.testing import CliRunner
    from tqcodec.cli import app
    p = tmp_path / "evil.pt"
    torch.save({"w": RunsCode()}, p)
    r = CliRunner().invoke(app, ["encode", str(p)])
    assert r.exit_code == 1 and "BAD_INPUT" in r.output
    assert not marker.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["evil.pt"]


# --- tensor subclasses and non-tensors -------------------------------------------------------------

class MyTensor(torch.Tensor):
    pass


def test_tensor_subclass_in_a_pt_file_is_refused(tmp_path):
    p = tmp_path / "sub.pt"
    torch.save({"w": torch.randn(3).as_subclass(MyTensor)}, p)
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"  # weights_only refuses the class
    # ... and if the user allow-lists the class for torch.load, tqcodec still refuses it
    with torch.serialization.safe_globals([MyTensor]):
        with pytest.raises(tqcodec.TqzError) as e:
            read_model(p)
    assert e.value.code == "BAD_INPUT" and "subclass" in e.value.message


def test_tensor_subclass_handed_to_save_is_refused():
    t = torch.randn(3).as_subclass(MyTensor)
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.encode_bytes({"w": t})
    assert e.value.code == "BAD_INPUT" and "subclass" in e.value.message
    # its plain values are one call away
    out = roundtrip({"w": t.as_subclass(torch.Tensor)}, lossless=True)
    assert type(out["w"]) is torch.Tensor and _bits(out["w"]) == _bits(t.as_subclass(torch.Tensor))


def test_parameter_is_a_plain_tensor(tmp_path):
    p = torch.nn.Parameter(torch.randn(4, 4))
    out = roundtrip({"p": p}, lossless=True)
    assert type(out["p"]) is torch.Tensor and not out["p"].requires_grad
    assert _bits(out["p"]) == _bits(p.detach())
    f = tmp_path / "m.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(keep_vars=True), f)
    assert set(read_model(f)) == {"weight", "bias"}


@pytest.mark.parametrize("value", [3, 0.5, "w", None, [torch.ones(2)], {"nested": torch.ones(2)}],
                         ids=["int", "float", "str", "none", "list", "dict"])
def test_non_tensor_values_are_refused(tmp_path, value):
    assert code_of(lambda: tqcodec.encode_bytes({"w": torch.ones(2), "x": value})) == "BAD_INPUT"
    p = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2), "x": value}, p)
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"


def test_numpy_array_is_refused():
    import numpy as np
    assert code_of(lambda: tqcodec.encode_bytes({"x": np.zeros(3)})) == "BAD_INPUT"


@pytest.mark.parametrize("content", [[torch.ones(2)], torch.ones(2), {}, 7], ids=["list", "tensor", "empty", "int"])
def test_pt_files_that_are_not_state_dicts(tmp_path, content):
    p = tmp_path / "m.pt"
    torch.save(content, p)
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"


# --- values ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["auto", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nan_inf_stored_exactly_in_raw_with_a_warning(mode, dtype):
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    w[3, 4] = float("nan")
    w[5, 6] = float("inf")
    w[7, 8] = -float("inf")
    w[9, 9] = -0.0
    with pytest.warns(UserWarning, match=r"^w: NaN or infinite values, stored exactly \(raw\)"):
        data = tqcodec.encode_bytes({"w": w}, mode=mode)
    with tqcodec.open(data) as f:
        assert f.info("w").mode == "raw"
        out = f.get_tensor("w")
    assert out.dtype == dtype and _bits(out) == _bits(w)


def test_finite_tensors_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tqcodec.encode_bytes({"w": torch.randn(32, 32)})


def test_non_contiguous_and_lazy_views_store_their_values():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(12, 16, generator=g)
    views = {
        "transposed": base.T,
        "strided": base[::3, 1::2],
        "expanded": torch.randn(1, 16, generator=g).expand(64, 16),
        "negated_view": torch.randn(5, generator=g)._neg_view(),
        "channels_last": torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
        "zero_stride_scalar": torch.tensor(3.0).expand(()),
    }
    for kw in ({"lossless": True}, {"mode": "uniform"}):
        out = roundtrip(views, **kw)
        for k, v in views.items():
            assert out[k].shape == v.shape and out[k].is_contiguous(), k
            if "lossless" in kw:
                assert torch.equal(out[k], v.resolve_neg().contiguous()), k
            else:
                assert torch.allclose(out[k], v.resolve_neg(), atol=0.05 * v.abs().max().item() + 1e-6), k


def test_shared_storage():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 8, generator=g)
    tensors = {"w": w, "tied": w, "tied.view": w.view(6, 8), "row0": w[0], "flat": w.view(48),
               "T": w.T, "other": w.clone()}
    data = tqcodec.encode_bytes(tensors, lossless=True)
    with tqcodec.open(data) as f:
        modes = {k: f.info(k).mode for k in f.keys()}
    assert modes["tied"] == "alias" and modes["tied.view"] == "alias"   # same view: stored once
    assert all(modes[k] == "raw" for k in ("w", "row0", "flat", "T", "other"))
    out = tqcodec.load(data)
    for k, v in tensors.items():
        assert torch.equal(out[k], v), k


def test_shared_storage_through_a_pt_file(tmp_path):
    w = torch.randn(4, 4)
    p = tmp_path / "tied.pt"
    torch.save({"enc": w, "dec": w, "half": w[:2]}, p)
    loaded = read_model(p)
    out = tqcodec.load(tqcodec.encode_bytes(loaded, lossless=True))
    assert all(torch.equal(out[k], loaded[k]) for k in loaded)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                                   torch.uint16, torch.uint32, torch.uint64, torch.bool])
def test_int_and_bool_buffers_are_exact(dtype):
    g = torch.Generator().manual_seed(3)
    if dtype == torch.bool:
        t = torch.rand(100, generator=g) > 0.5
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(0, 100, (100,), generator=g).to(dtype)
        t[0] = info.min
        if dtype == torch.uint64:  # torch cannot set 2^64-1 from a Python int
            t.view(torch.int64)[1] = -1
        else:
            t[1] = info.max
    data = tqcodec.encode_bytes({"buf": t, "scalar": t[5].clone()})  # default options, not just lossless
    with tqcodec.open(data) as f:
        assert f.info("buf").mode == "raw"
        out = f.get_tensor("buf")
    assert out.dtype == dtype and torch.equal(out, t)


@pytest.mark.parametrize("make", [
    lambda: torch.zeros(3, dtype=torch.complex64),
    lambda: torch.zeros(3, dtype=torch.complex128),
    lambda: torch.randn(3, dtype=torch.complex64).conj(),
    lambda: torch.zeros(3, dtype=torch.float8_e4m3fn),
    lambda: torch.zeros(3, dtype=torch.float8_e5m2),
    lambda: torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8),
    lambda: torch.randn(4, 4).to_sparse(),
    lambda: torch.randn(4, 4).to_sparse_csr(),
    lambda: torch.empty(4, 4, device="meta"),
], ids=["complex64", "complex128", "conj", "float8_e4m3", "float8_e5m2", "qint8", "sparse_coo", "sparse_csr", "meta"])
def test_tensors_the_format_cannot_hold_are_refused(tmp_path, make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation notes for quantized/sparse
        t = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ResourceWarning from a half-built writer either
        assert code_of(lambda: tqcodec.encode_bytes({"ok": torch.ones(2), "bad": t})) == "BAD_INPUT"
    out = tmp_path / "x.tqz"
    assert code_of(lambda: tqcodec.save({"bad": t}, out)) == "BAD_INPUT"
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_complex_in_a_pt_file(tmp_path):
    p = tmp_path / "c.pt"
    torch.save({"c": torch.zeros(2, dtype=torch.complex64)}, p)
    with pytest.raises(tqcodec.TqzError) as e:
        read_model(p)
    assert e.value.code == "BAD_INPUT" and "complex" in e.value.message


# --- names -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [b"w", b"\xff\xfe", 3, ("a", "b"), None], ids=["bytes", "bytes-not-utf8", "int", "tuple", "none"])
def test_names_that_are_not_strings(tmp_path, name):
    assert code_of(lambda: tqcodec.encode_bytes({name: torch.ones(2)})) == "BAD_INPUT"
    p = tmp_path / "m.pt"
    torch.save({name: torch.ones(2)}, p)
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"


@pytest.mark.parametrize("name", ["a\udc80", "\ud800", "x" * 1025, "é" * 512 + "a", "", "../etc/passwd",
                                  "/abs", "a\\b", "a/./b", "nul\x00", "tab\t", "del\x7f"],
                         ids=["lone-low-surrogate", "lone-high-surrogate", "1025-bytes", "1025-utf8-bytes",
                              "empty", "dotdot", "absolute", "backslash", "dot-segment", "nul", "tab", "del"])
def test_bad_names_are_refused(name):
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.encode_bytes({name: torch.ones(2)})
    assert e.value.code == "BAD_INPUT"


def test_absurdly_long_name_is_refused_quickly():
    import time
    t0 = time.perf_counter()
    assert code_of(lambda: tqcodec.encode_bytes({"x" * (64 << 20): torch.ones(2)})) == "BAD_INPUT"
    assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize("name", ["x" * 1024, "é" * 512, "日本" * 170 + "a", "a.b", "layer.0.weight",
                                  "dense/kernel:0", "emoji😀"])
def test_names_at_the_limits_are_kept(name):
    assert list(roundtrip({name: torch.ones(2)})) == [name]


# --- other model files ------------------------------------------------------------------------------

def test_corrupt_safetensors_is_bad_input(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")  # header length far past the file
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"
    p.write_bytes(b"")
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"
    header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,999999]}}'
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 16)
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"


def test_unknown_suffix_and_directory(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"x")
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"
    assert code_of(lambda: read_model(tmp_path)) == "IO_ERROR"
    assert code_of(lambda: read_model(tmp_path / "missing.pt")) == "IO_ERROR"

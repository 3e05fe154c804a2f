"""tqcodec.pipeline.tensors: the encoder's input rules, tied tensors (stored once, as ``alias``) and
dtypes torch <-> numpy storage. Hostile and odd inputs each have one defined outcome (issue 8):

| input | outcome |
|---|---|
| tensor subclass (handed to `save`) | `BAD_INPUT` (`nn.Parameter` is accepted as a plain tensor) |
| non-tensor value (int, ndarray, list, nested junk) | `BAD_INPUT` |
| non-contiguous, expanded, negated-view tensors | stored with their values (as if `.contiguous()`) |
| tensors sharing storage | the same view twice: stored once (`alias`); other views of one storage: each stored |
| int / uint / bool buffers | stored exactly in `raw` |
| complex, float8, quantized, sparse, meta tensors | `BAD_INPUT` |
| names: not `str` (bytes, int), not valid Unicode, > 1024 UTF-8 bytes, path-like | `BAD_INPUT` |

Model files (pickles, `.pt` that are not state dicts, corrupt `.safetensors`): tests/io/test_files.py;
NaN and ±Inf: tests/pipeline/test_encode.py.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import tqcodec
from tqcodec.io.files import read_model
from tests.helpers import MyTensor, code_of, tensor_bytes


def roundtrip(tensors: dict, **kw) -> dict:
    return tqcodec.load(tqcodec.encode_bytes(tensors, **kw))


# --- tensor subclasses and non-tensors -------------------------------------------------------------


def test_tensor_subclass_handed_to_save_is_refused():
    t = torch.randn(3).as_subclass(MyTensor)
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.encode_bytes({"w": t})
    assert e.value.code == "BAD_INPUT" and "subclass" in e.value.message
    # its plain values are one call away
    out = roundtrip({"w": t.as_subclass(torch.Tensor)}, lossless=True)
    assert type(out["w"]) is torch.Tensor and tensor_bytes(out["w"]) == tensor_bytes(t.as_subclass(torch.Tensor))


def test_parameter_is_a_plain_tensor(tmp_path):
    p = torch.nn.Parameter(torch.randn(4, 4))
    out = roundtrip({"p": p}, lossless=True)
    assert type(out["p"]) is torch.Tensor and not out["p"].requires_grad
    assert tensor_bytes(out["p"]) == tensor_bytes(p.detach())
    f = tmp_path / "m.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(keep_vars=True), f)
    assert set(read_model(f)) == {"weight", "bias"}


@pytest.mark.parametrize("value", [3, 0.5, "w", None, [torch.ones(2)], {"nested": torch.ones(2)}],
                         ids=["int", "float", "str", "none", "list", "dict"])
def test_non_tensor_values_are_refused(tmp_path, value):
    assert code_of(lambda: tqcodec.encode_bytes({"w": torch.ones(2), "x": value})) == "BAD_INPUT"
    assert code_of(lambda: tqcodec.encode_bytes({"x": value})) == "BAD_INPUT"  # and alone
    p = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2), "x": value}, p)
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"


def test_numpy_array_is_refused():
    import numpy as np
    assert code_of(lambda: tqcodec.encode_bytes({"x": np.zeros(3)})) == "BAD_INPUT"


# --- values ------------------------------------------------------------------------------------------


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
        "row": base[3],                  # an offset view, and a column slice
        "column_slice": base[:, 5:9],
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
        assert code_of(lambda: tqcodec.encode_bytes({"bad": t})) == "BAD_INPUT"  # and alone
    out = tmp_path / "x.tqz"
    assert code_of(lambda: tqcodec.save({"bad": t}, out)) == "BAD_INPUT"
    assert not out.exists() and list(tmp_path.iterdir()) == []


# --- names -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [b"w", b"\xff\xfe", 3, ("a", "b"), None], ids=["bytes", "bytes-not-utf8", "int", "tuple", "none"])
def test_names_that_are_not_strings(tmp_path, name):
    assert code_of(lambda: tqcodec.encode_bytes({name: torch.ones(2)})) == "BAD_INPUT"
    p = tmp_path / "m.pt"
    torch.save({name: torch.ones(2)}, p)
    assert code_of(lambda: read_model(p)) == "BAD_INPUT"


@pytest.mark.parametrize("name", ["a\udc80", "\ud800", "x" * 1025, "é" * 512 + "a", "", "../etc/passwd",
                                  "/abs", "a\\b", "a/./b", "nul\x00", "tab\t", "del\x7f",
                                  "../x", "a\x00b", "x" * 2000],
                         ids=["lone-low-surrogate", "lone-high-surrogate", "1025-bytes", "1025-utf8-bytes",
                              "empty", "dotdot", "absolute", "backslash", "dot-segment", "nul", "tab", "del",
                              "dotdot-short", "nul-inside", "2000-bytes"])
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


# --- tied tensors: stored once --------------------------------------------------------------------------


def test_tied_tensors_are_stored_once(state_dict):
    state_dict["head.weight"] = state_dict["emb.weight"]
    data = tqcodec.encode_bytes(state_dict)
    with tqcodec.open(data) as f:
        assert f.info("head.weight").mode == "alias"
        assert f.info("head.weight").stored_bytes == 0
        assert torch.equal(f.get_tensor("head.weight"), f.get_tensor("emb.weight"))
    out = tqcodec.load(data)
    assert out["head.weight"] is out["emb.weight"]

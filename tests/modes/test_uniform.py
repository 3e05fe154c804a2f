"""Mode uniform (spec §7.3; tqcodec.modes.uniform): the error within half a step, values on the
step grid, the SNR target, constant tensors without chunks, large tensors in several chunks, and
encoding block by block (same bytes, bounded memory)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tqcodec
from tqcodec import api
from tqcodec.format.manifest import TensorRecord
from tqcodec.format.steps import steps_from_codes


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


def test_large_tensor_spans_several_chunks():
    w = torch.randn(1 << 21, generator=torch.Generator().manual_seed(4)).reshape(2048, 1024)
    data = tqcodec.encode_bytes({"w": w}, mode="uniform")
    out = tqcodec.load(data)["w"]
    assert out.shape == w.shape
    assert float((out - w).abs().max()) < 0.1
    assert data.count(b"TQCK") >= 2


# --- encoding block by block ------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_uniform_blocks_give_the_same_bytes(granularity, monkeypatch):
    """encode_storage converts the storage block by block; blocks of any size give the bytes of
    the whole-array encoder."""
    import numpy as np
    from tqcodec.format.dtypes import storage_to_float64
    from tqcodec.pipeline.tensors import tensor_to_storage
    from tqcodec import modes
    from tqcodec.modes import uniform

    g = torch.Generator().manual_seed(4)
    t = (torch.randn(37, 53, generator=g) * torch.linspace(0.01, 3.0, 53)).to(torch.bfloat16)
    dtype, arr = tensor_to_storage(t)
    whole = uniform.encode(storage_to_float64(dtype, arr), dtype, granularity, 30.0)
    monkeypatch.setattr(uniform, "BLOCK_ELEMENTS", 100)  # rows of 53: one or two rows a block
    assert uniform.encode_storage(arr, dtype, granularity, 30.0) == whole
    monkeypatch.setattr(uniform, "CHUNK_SYMBOLS", 257)  # chunks cut across blocks
    _, params, streams = uniform.encode_storage(arr, dtype, granularity, 30.0)
    assert params == whole.params
    assert [c[0] for c in streams[0]] == [257] * 7 + [37 * 53 - 7 * 257]
    rec = TensorRecord("w", dtype, tuple(t.shape), "uniform", params)
    want = modes.decode(TensorRecord("w", dtype, tuple(t.shape), "uniform", whole.params), whole.streams)
    np.testing.assert_array_equal(modes.decode(rec, streams), want)


def test_uniform_encode_memory_is_bounded_by_blocks():
    """A 64 MiB bfloat16 tensor encodes in uniform mode with far less traced memory than one
    float64 copy of it (512 MiB)."""
    import tracemalloc

    t = torch.randn(8192, 4096, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    tracemalloc.start()
    try:
        data = api.encode_bytes({"w": t}, snr_db=20.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 << 20, peak
    assert tqcodec.open(data).info("w").mode == "uniform"

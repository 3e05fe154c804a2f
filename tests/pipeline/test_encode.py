"""tqcodec.pipeline.encode: what the encoder does with each tensor (NaN and ±Inf stored exactly in
raw, with a warning naming the tensor) and the checks of its options (EncodeOptions)."""
from __future__ import annotations

import warnings

import pytest
import torch

import tqcodec
from tqcodec.errors import TqzError
from tests.helpers import tensor_bytes


@pytest.mark.parametrize("mode", ["auto", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nan_inf_stored_exactly_in_raw_with_a_warning(mode, dtype):
    """Mode auto is also the default: its cases are what ``encode_bytes`` does without options."""
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
    assert out.dtype == dtype and tensor_bytes(out) == tensor_bytes(w)


def test_finite_tensors_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tqcodec.encode_bytes({"w": torch.randn(32, 32)})


@pytest.mark.parametrize("opts", [{"mode": "zip"}, {"snr_db": -1}, {"snr_db": float("nan")}, {"granularity": "row"}])
def test_bad_options(opts):
    with pytest.raises(tqcodec.TqzError) as e:
        tqcodec.encode_bytes({"w": torch.ones(4, 4)}, **opts)
    assert e.value.code == "BAD_OPTION"


def test_encode_options_reject_bad_rate_targets():
    with pytest.raises(TqzError):
        tqcodec.EncodeOptions(bits=-1)
    with pytest.raises(TqzError):
        tqcodec.EncodeOptions(bits=2, quality=30)

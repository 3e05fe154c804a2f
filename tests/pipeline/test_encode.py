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


@pytest.mark.parametrize("options", [{}, {"mode": "uniform"}, {"bits": 3}, {"mode": "ecsq", "bits": 3}])
def test_no_tensor_costs_more_than_storing_it_exactly(options):
    """A 16-element bias and a 256-element constant-ish weight: whatever the mode, each tensor's
    bytes in the file (record params and chunks) are at most what mode raw takes for it."""
    from tqcodec.modes import raw
    from tqcodec.pipeline.encode import stored_bytes
    from tqcodec.pipeline.tensors import tensor_to_storage
    g = torch.Generator().manual_seed(1)
    sd = {"w": torch.randn(48, 64, generator=g) * 0.1, "b": torch.randn(16, generator=g),
          "c": torch.full((16, 16), 0.25) + torch.randn(16, 16, generator=g) * 1e-3}
    with tqcodec.open(tqcodec.encode_bytes(sd, **options)) as f:
        for name, t in sd.items():
            got = stored_bytes(f.encoded(name))
            exact = stored_bytes(raw.encode(tensor_to_storage(t)[1]))
            assert got <= exact, (options, name, got, exact)


@pytest.mark.parametrize("mode, bits", [(m, b) for m in ("ecsq", "kmeans", "dither") for b in (2.0, 3.0, 4.5)]
                         + [("pq", 2.0), ("pq", 4.5)])  # pq's codebook search is the slow one: two rates
def test_classic_modes_bits_is_the_whole_files(mode, bits):
    """--bits lands within ±3% of the whole file in the classic modes, as in tq (the file holds raw
    biases, headers and a manifest beside the coded tensors)."""
    g = torch.Generator().manual_seed(4)
    sd = {"a.weight": torch.randn(256, 96, generator=g) * 0.05, "a.bias": torch.randn(256, generator=g) * 0.01,
          "b.weight": (torch.randn(64, 32, 3, 3, generator=g) * 0.1), "b.bias": torch.randn(64, generator=g)}
    data = tqcodec.encode_bytes(sd, mode=mode, bits=bits)
    params = sum(t.numel() for t in sd.values())
    assert abs(8 * len(data) / params / bits - 1) <= 0.03, (mode, bits, 8 * len(data) / params)
    with tqcodec.open(data) as f:
        assert f.info("a.weight").mode == mode and f.info("b.weight").mode == mode

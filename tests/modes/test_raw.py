"""Mode raw (spec §7.2; tqcodec.modes.raw), what ``lossless=True`` stores: every bit, NaN, ±Inf,
-0.0 and subnormals included."""
from __future__ import annotations

import torch

import tqcodec
from tests.helpers import bit_view


def test_lossless_keeps_nan_inf_and_negative_zero(tmp_path):
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    out = tqcodec.load(tqcodec.encode_bytes({"x": t}, lossless=True))["x"]
    assert torch.equal(bit_view(out), bit_view(t))

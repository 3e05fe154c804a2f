"""Mode tq's decoder (spec §7.5; tqcodec.modes.tq.format): records written by the mode's own writer
decode as the spec says (with a synthesis transform, single-symbol bands), and bad parameters are
rejected with their code."""
from __future__ import annotations

import numpy as np
import pytest

from tqcodec.errors import TqzError
from tqcodec.format.manifest import TensorRecord
from tqcodec.format.steps import steps_from_codes
from tqcodec.modes import tq as tq_mode


def _rec(params, shape=(4, 6), dtype="float32"):
    return TensorRecord("t", dtype, shape, "tq", params)


def test_transform_decode_matches_reference():
    rng = np.random.default_rng(5)
    n, m, k = 6, 5, 3
    s = rng.normal(size=(m, k)).astype(np.float16)
    lv = rng.integers(-7, 8, size=(k, n))
    _, params, streams = tq_mode.write([lv[:2], lv[2:]], [-8, -12], transform=s)
    rec = _rec(params, shape=(n, m))
    assert tuple(s.items for s in tq_mode.stream_items(tq_mode.parse(rec), 0, [rec])) == (2 * m * k, 2 * n, n)
    got = tq_mode.decode(tq_mode.parse(rec), rec, streams)
    c = np.concatenate([lv[:2] * steps_from_codes([-8])[0], lv[2:] * steps_from_codes([-12])[0]])
    want = (s.astype(np.float64) @ c).T
    bound = 2.0 ** -20 * (np.abs(s.astype(np.float64)) @ np.abs(c)).T + np.spacing(np.abs(want).astype(np.float32))
    assert np.all(np.abs(got - want) <= bound)


def test_single_symbol_band_has_no_stream_items():
    _, params, streams = tq_mode.write([np.zeros((4, 6), dtype=np.int64)], [0])
    rec = _rec(params)
    assert tuple(s.items for s in tq_mode.stream_items(tq_mode.parse(rec), 0, [rec])) == (0, 0)
    assert not streams[1]
    assert np.all(tq_mode.decode(tq_mode.parse(rec), rec, streams) == 0)


@pytest.mark.parametrize("change,code", [
    ({"layout": "sideways"}, "BAD_TENSOR_RECORD"),
    ({"transform": "float8"}, "BAD_TENSOR_RECORD"),
    ({"band_rows": [3]}, "BAD_TENSOR_RECORD"),
    ({"band_rows": [True, 3]}, "BAD_TENSOR_RECORD"),
    ({"steps": [999]}, "BAD_STEP"),
    ({"steps": [1.0]}, "BAD_TENSOR_RECORD"),
    ({"counts": [b"\x00"]}, "BAD_TABLE"),
    ({"counts": [b"\x05"]}, "BAD_TABLE"),
    ({"counts": [b"\x80\x00"]}, "BAD_TABLE"),
    ({"q_min": [-(1 << 21)]}, "LIMIT_EXCEEDED"),
    ({"extra": 1}, "BAD_TENSOR_RECORD"),
    ({"layout": 3}, "BAD_TENSOR_RECORD"),
])
def test_bad_params_rejected(change, code):
    _, params, _ = tq_mode.write([np.arange(24).reshape(4, 6) % 5], [-4])
    params = {**params, **change}
    rec = _rec(params)
    with pytest.raises(TqzError) as ei:
        tq_mode.stream_items(tq_mode.parse(rec), 0, [rec])
    assert ei.value.code == code


def test_transform_rows_bounded_by_min_dimension():
    s = np.ones((6, 5), dtype=np.float16)
    _, params, _ = tq_mode.write([np.zeros((5, 4), dtype=np.int64)], [0], transform=s)
    rec = _rec(params, shape=(4, 6))  # k = 5 > n = 4
    with pytest.raises(TqzError) as ei:
        tq_mode.stream_items(tq_mode.parse(rec), 0, [rec])
    assert ei.value.code == "BAD_TENSOR_RECORD"

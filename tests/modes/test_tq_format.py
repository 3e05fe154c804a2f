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


# --- row_band (spec 1.4, §7.5.1 rule 5): bands that are sets of rows ----------------------------

def _row_band_record(transform=None):
    rng = np.random.default_rng(11)
    n, m = 9, 5
    lv = rng.integers(-6, 7, size=(n, m))
    band = np.array([2, 0, 1, 0, 2, 2, 1, 0, 0], dtype=np.uint8)
    codes = [-8, -4, 0]
    _, params, streams = tq_mode.write([lv[band == b] for b in range(3)], codes, row_band=band)
    return lv, band, codes, params, streams, _rec(params, shape=(n, m))


def test_row_band_rows_take_their_bands_step():
    lv, band, codes, params, streams, rec = _row_band_record()
    assert params["row_band"] == band.tobytes()
    got = tq_mode.decode(tq_mode.parse(rec), rec, streams)
    want = lv * steps_from_codes(codes)[band][:, None]
    assert np.array_equal(got, want.astype(np.float32))
    parts = tq_mode.parts(tq_mode.parse(rec), rec, streams)
    assert np.array_equal(parts["row_band"], band)
    assert all(np.array_equal(parts["levels"][b], lv[band == b]) for b in range(3))


def test_row_band_of_consecutive_runs_is_left_out_and_means_the_same():
    lv = np.arange(24).reshape(4, 6) % 5
    band = np.array([0, 0, 1, 1], dtype=np.uint8)
    _, params, streams = tq_mode.write([lv[:2], lv[2:]], [-4, -6], row_band=band)
    assert "row_band" not in params
    rec = _rec({**params, "row_band": band.tobytes()})  # written anyway: the same tensor
    plain = _rec(params)
    assert np.array_equal(tq_mode.decode(tq_mode.parse(rec), rec, streams),
                          tq_mode.decode(tq_mode.parse(plain), plain, streams))


@pytest.mark.parametrize("row_band,why", [
    (bytes([0, 1, 0, 1, 0, 1, 0, 1]), "8 bytes for 9 rows"),
    (bytes([0, 1, 2, 3, 0, 1, 2, 0, 0]), "band 3 of 3"),
    (bytes([0, 0, 1, 0, 2, 2, 1, 0, 0]), "band 0 named 5 times, band_rows says 4"),
    ("abc", "not a bin"),
])
def test_bad_row_band_rejected(row_band, why):
    *_, params, _, _ = _row_band_record()
    rec = _rec({**params, "row_band": row_band}, shape=(9, 5))
    with pytest.raises(TqzError) as ei:
        tq_mode.parse(rec)
    assert ei.value.code == "BAD_TENSOR_RECORD", why


def test_row_band_allows_at_most_256_bands():
    lv = np.zeros((257, 2), dtype=np.int64)
    band = np.arange(257)
    band[-1], band[0] = 0, 256  # 257 bands, not in order
    with pytest.raises(ValueError):
        tq_mode.write([lv[band == b] for b in range(257)], [0] * 257, row_band=band)
    _, params, _ = tq_mode.write([lv[:1]] * 257, [0] * 257)
    rec = _rec({**params, "row_band": bytes(range(256)) + b"\x00"}, shape=(257, 2))
    with pytest.raises(TqzError) as ei:
        tq_mode.parse(rec)
    assert ei.value.code == "BAD_TENSOR_RECORD"


def test_row_band_with_a_transform_matches_reference():
    rng = np.random.default_rng(3)
    n, m, k = 6, 5, 4
    s = rng.normal(size=(m, k)).astype(np.float16)
    lv = rng.integers(-7, 8, size=(k, n))
    band = np.array([1, 0, 1, 0], dtype=np.uint8)
    codes = [-8, -12]
    _, params, streams = tq_mode.write([lv[band == b] for b in range(2)], codes, transform=s, row_band=band)
    rec = _rec(params, shape=(n, m))
    got = tq_mode.decode(tq_mode.parse(rec), rec, streams)
    c = lv * steps_from_codes(codes)[band][:, None]
    want = (s.astype(np.float64) @ c).T
    bound = 2.0 ** -20 * (np.abs(s.astype(np.float64)) @ np.abs(c)).T + np.spacing(np.abs(want).astype(np.float32))
    assert np.all(np.abs(got - want) <= bound)

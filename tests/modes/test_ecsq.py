"""Mode ecsq (spec/mode-lineage.md §7.6; tqcodec.modes.ecsq): entropy-constrained decisions beat
plain uniform quantization at a low rate, and hostile stored values are rejected with their code.
(ecsq's exact round trips, rate targets and hostile parameters: tests/modes/test_classic.py.)"""
from __future__ import annotations

import numpy as np
import pytest

from tqcodec.errors import TqzError
from tqcodec.format.manifest import TensorRecord
from tqcodec.modes import MODES
from tqcodec.modes.ecsq import encoder as ecsq_enc
from tests.helpers import uniform_point


def test_ecsq_beats_uniform_at_low_rate():
    """Entropy-constrained decisions (a dead zone where the importance is low) at <= 1.2 bits/weight."""
    rng = np.random.default_rng(5)
    w = rng.laplace(size=(128, 192)) * 0.05
    h = rng.gamma(0.5, size=(1, 192))
    for code in (-11, -9):
        r_u, d_u = uniform_point(w, h, code)
        assert r_u / w.size < 1.3
        res = ecsq_enc.encode(w, "float32", h, bits=r_u / w.size)
        assert res.rate_bits <= 1.02 * r_u
        assert res.distortion < 0.8 * d_u, (code, res.distortion, d_u, res.info)


def test_hostile_payloads():
    """Stored values: NaN/inf and out-of-order codebooks are BAD_PAYLOAD; length rules BAD_CHUNK."""
    _, params, streams = MODES["ecsq"].write(np.array([0, 1, 2, 1]), recon="codebook", values=np.array([-1.0, 0.0, 2.0]))
    rec = TensorRecord("w", "float32", (2, 2), "ecsq", params)
    good = streams[0][0][1]
    for bad, code in ((good[:2] + b"\x00\x7e" + good[4:], "BAD_PAYLOAD"),      # NaN
                      (good[:2] + b"\x00\x40" + good[4:], "BAD_PAYLOAD"),      # 2.0 twice: not increasing
                      (good + b"\x00", "BAD_CHUNK")):                          # Payload_Length != Item_Count
        with pytest.raises(TqzError) as exc:
            MODES["ecsq"].decode(MODES["ecsq"].parse(rec), rec, [[(len(good), bad)], streams[1]])
        assert exc.value.code == code
    with pytest.raises(TqzError) as exc:
        MODES["ecsq"].decode(MODES["ecsq"].parse(rec), rec, [streams[0], [(4, streams[1][0][1] + b"\x00\x00")]])
    assert exc.value.code == "BAD_CHUNK"

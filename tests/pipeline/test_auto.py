"""tqcodec.pipeline.auto: mode ``auto`` with statistics and a rate target picks, per tensor, tq or
one of the classic modes by rate-distortion cost; without them it stays uniform. The default mode
with statistics or a rate target is tq alone."""
from __future__ import annotations

import numpy as np
import torch

import tqcodec


def test_auto_picks_tq_or_a_classic_mode_by_rate_distortion_cost():
    rng = np.random.default_rng(7)
    m = 64
    xa = rng.normal(size=(4000, m)) @ rng.normal(size=(m, m)) * 0.3  # correlated inputs: error feedback pays
    xb = rng.normal(size=(4000, m))
    wa = rng.normal(size=(96, m)) * 0.1
    centers = np.array([-0.31, -0.12, 0.07, 0.26, 0.52])
    wb = centers[rng.integers(0, 5, size=(96, m))] + rng.normal(size=(96, m)) * 0.004  # clustered weights
    sd = {"a.weight": torch.from_numpy(wa.astype(np.float32)), "b.weight": torch.from_numpy(wb.astype(np.float32))}
    st = tqcodec.Stats.from_activations({"a.weight": xa, "b.weight": xb})
    data = tqcodec.encode_bytes(sd, stats=st, bits=3.0, mode="auto")
    with tqcodec.open(data) as f:
        modes = {n: f.info(n).mode for n in f.keys()}
        assert f.version == (1, 3 if f.manifest_bytes[1] else 2)
    assert modes["a.weight"] == "tq"
    assert modes["b.weight"] in ("kmeans", "ecsq", "pq")
    assert abs(8 * len(data) / (wa.size + wb.size) / 3.0 - 1) <= 0.03  # the whole-file target still holds
    tq_only = tqcodec.encode_bytes(sd, stats=st, bits=3.0, mode="tq")
    assert tqcodec.encode_bytes(sd, stats=st, bits=3.0) == tq_only  # the default with stats and bits: tq
    err = lambda d: float(((tqcodec.load(d)["b.weight"].double() - sd["b.weight"].double()) ** 2).sum())  # noqa
    assert err(data) < err(tq_only)
    # auto without stats or bits is unchanged: uniform
    with tqcodec.open(tqcodec.encode_bytes(sd)) as f:
        assert {f.info(n).mode for n in f.keys()} == {"uniform"}

"""Mode kmeans (spec/mode-lineage.md §7.7; tqcodec.modes.kmeans): a codebook fits clustered weights
far better than a uniform grid (as does ecsq's codebook variant), and importance steers the
weighted k-means. (kmeans' exact round trips, rate targets and hostile parameters:
tests/modes/test_classic.py.)"""
from __future__ import annotations

import numpy as np

from tqcodec.modes.ecsq import encoder as ecsq_enc
from tqcodec.modes.kmeans import encoder as kmeans_enc
from tqcodec.modes.rd import weighted_distortion
from tests.helpers import uniform_point


def test_kmeans_and_ecsq_codebook_beat_uniform_on_clustered_weights():
    """A codebook fits weights that sit in a few clusters off any uniform grid."""
    rng = np.random.default_rng(6)
    centers = np.array([-0.31, -0.12, 0.07, 0.26, 0.52])
    w = centers[rng.integers(0, 5, size=(96, 128))] + rng.normal(size=(96, 128)) * 0.004
    h = np.ones((1, 1))
    r_u, d_u = uniform_point(w, h, -14)  # step 0.0625: about 2.6 bits/weight
    km = kmeans_enc.encode(w, "float32", h, bits=r_u / w.size)
    cb = ecsq_enc.encode(w, "float32", h, bits=r_u / w.size, variant="codebook")
    for res in (km, cb):
        assert res.rate_bits <= 1.02 * r_u
        assert res.distortion < 0.2 * d_u, (res.mode, res.distortion, d_u)


def test_importance_steers_kmeans():
    """With importance on a subset of weights, weighted k-means serves them better than unweighted."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(64, 64)) * 0.1
    h = np.where(np.arange(64) < 8, 100.0, 1.0)[None, :]
    weighted = kmeans_enc.encode(w, "float32", h, bits=2.0)
    plain = kmeans_enc.encode(w, "float32", np.ones((1, 1)), bits=2.0)
    d_plain = weighted_distortion(plain.recon, w, h)
    assert weighted.rate_bits <= 1.05 * plain.rate_bits
    assert weighted.distortion < d_plain

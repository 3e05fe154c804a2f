"""Mode dither (spec/mode-lineage.md §7.9; tqcodec.modes.dither): the spec's SplitMix64 and worked
values, and the encoder's error statistics (uniform, zero-mean, independent of the signal)."""
from __future__ import annotations

import numpy as np
import pytest

from tqcodec.format.steps import steps_from_codes
from tqcodec.modes.dither import encoder as dither_enc
from tqcodec.modes.dither import format as dither_mode
from tqcodec.modes.dither.format import numerators, splitmix64


# --- spec pins (§7.S.6, §7.9.3 worked values) ----------------------------------------------------

def test_splitmix64_check_values_of_the_spec():
    assert [int(z) for z in splitmix64(0, 0, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [int(z) for z in splitmix64(1234567, 0, 3)] == [0x599ED017FB08FC85, 0x2C73F08458540FA5,
                                                             0x883EBCE5A3F27C77]
    assert [int(z) for z in splitmix64(0, 2, 1)] == [0x06C45D188009454F]  # any output on its own
    t1, t2 = numerators(splitmix64(0, 0, 1))
    assert (int(t1[0]), int(t2[0])) == (1607723, -1979431)


def test_dither_worked_values_of_the_spec():
    assert np.float64(dither_mode.scalar_values(np.array([3]), 0, 0)[0]).view(np.uint64) == 0x4004EEFAA0000000
    r = dither_mode.scalar_values(np.array([-2]), -37, 0)[0]
    assert np.float64(r).view(np.uint64) == 0xBF70AEE4B4000000
    assert np.float32(r).view(np.uint32) == 0xBB857726
    x, y = dither_mode.hex_values(np.array([1]), np.array([-1]), 0, 0)
    assert np.float64(x[0]).view(np.uint64) == 0x3FF5A47A20000000
    assert np.float64(y[0]).view(np.uint64) == 0xBFDD44B848BE76CC
    assert np.float64(dither_mode.H).view(np.uint64) == 0x3FEBB67AE8584CAA


# --- the error is uniform, zero-mean and independent of the signal ------------------------------

@pytest.mark.parametrize("lattice", ["scalar", "hex"])
def test_dither_error_statistics(lattice):
    rng = np.random.default_rng(8)
    n = 1 << 16
    ramp = np.linspace(-1.0, 1.0, n).reshape(256, 256)
    on_grid = np.zeros((256, 256))  # every weight on a lattice point: plain rounding would be exact
    noise = rng.normal(size=(256, 256)) * 0.3
    for x in (ramp, on_grid, noise):
        res = dither_enc.encode(x, "float64", np.ones((1, 1)), bits=5.0, lattice=lattice, name="t")
        delta = float(steps_from_codes([res.info["step"]])[0])
        e = (res.recon - x).reshape(-1)
        # mean 0; variance of the cell (scalar: 1/12; A2 with minimal distance 1: 5/72 per coordinate)
        var = delta * delta * (1 / 12 if lattice == "scalar" else 5 / 72)
        assert abs(e.mean()) < 5 * np.sqrt(var / n)
        assert e.var() == pytest.approx(var, rel=0.04)
        if lattice == "scalar":
            assert np.abs(e).max() <= delta / 2 * (1 + 1e-9)
        else:
            pairs = e.reshape(-1, 2)
            assert np.sqrt((pairs ** 2).sum(axis=1)).max() <= delta / np.sqrt(3) * (1 + 1e-6)
        if x.std() > 0:
            assert abs(np.corrcoef(e, x.reshape(-1))[0, 1]) < 5 / np.sqrt(n)

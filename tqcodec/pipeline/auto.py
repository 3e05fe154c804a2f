"""Mode ``auto`` with statistics or a rate target: per tensor, ``tq`` or one of the classic modes
(spec §7.6-§7.9, :mod:`tqcodec.pipeline.classic`), whichever has the least ``D + lam R`` at the
multiplier of the tq allocation.

``D`` is the tq encoder's own distortion of a unit (``gain * tr(E H E^T)`` with the full input
second moment, row weights for embeddings; ``||E||^2`` without statistics), measured on each
candidate's exact reconstruction; ``R`` is the tensor's measured bits in the file (params, chunk
headers, payloads). The classic encoders optimise their own parameters for the same ``lam``
with the diagonal of H (their importance); the comparison uses the full H, so a candidate wins
only where it really is cheaper (by at least ``MARGIN`` of tq's cost).

Plugged into ``tqcodec.modes.tq.encoder.encode_model`` as its ``alternatives`` hook
(``tqcodec.modes.tq.encoder.with_alternatives``). The choice is made at the allocator's first call;
its retries (to land the whole file on a bits target) keep it. A chosen tensor is written at a
rate target: the rate it had when chosen relative to its tq rate, times its tq rate in the
current allocation, so its bits follow the allocator's multiplier smoothly (the bits loop's
overhead correction converges) rather than in a classic encoder's discrete jumps. Tensors that
keep tq: see :meth:`Chooser._locked`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..modes.rd import Result, measured_bits
from ..modes.tq.encoder import reconstruction, view_shape
from .classic import CLASSIC_MODES, encode_classic

CANDIDATES = CLASSIC_MODES
MARGIN = 0.01  # a candidate must undercut tq's D + lam R by this share: smaller differences are within the
               # estimates' noise (diagonal vs full H, subsampled curves), and tq stays the default
MIN_ELEMENTS = 256  # as the forced modes: float tensors with >= 2 dims and >= 256 elements


class Chooser:
    """The ``alternatives`` callback. ``items[name]``: the tensors offered to tq
    (``tqcodec.modes.tq.encoder.Item``: dtype, shape, values made when asked); ``stats`` as given to
    tq; ``modes``: the candidate classic modes. Results are cached per tensor, mode and multiplier
    (a quarter-octave grid), so the allocator's retries re-encode only when the multiplier moved;
    the cache keeps encoded tensors and their distortion, not reconstructions."""

    def __init__(self, items: Mapping[str, Any], stats: Any, modes: Sequence[str] = CANDIDATES):
        self.items = dict(items)
        self.stats = stats
        self.modes = tuple(modes)
        self._cache: dict[tuple, Result] = {}
        self.last: dict[str, str] = {}  # tensor -> mode chosen at the last call (for tests, reports)
        # the modes chosen at the first call, kept for the allocator's later calls: re-deciding at every
        # retry of its bits loop made the file size jump between retries (measured: +3.2% off target)
        self.decided: Optional[dict[str, tuple[str, float]]] = None  # name -> (mode, rate ratio to tq)
        self._decisions: dict[str, tuple[str, float]] = {}

    def _candidate(self, name: str, mode: str, lam: float, bands: list, in_out: bool) -> tuple[Result, float]:
        """The tensor in ``mode`` at multiplier ``lam`` and the units' distortion of it."""
        key = (name, mode, int(round(4 * math.log2(lam))))
        if key not in self._cache:
            it = self.items[name]
            self._cache[key] = self._measured(encode_classic(mode, name, it.values, it.dtype, self.stats,
                                                             lam=2.0 ** (key[2] / 4)), bands, in_out)
        return self._cache[key]

    def _matched(self, name: str, mode: str, bits: float, bands: list, in_out: bool) -> tuple[Result, float]:
        """The tensor in ``mode`` at a rate target of ``bits`` (the whole tensor's bits)."""
        key = (name, mode, int(round(200 * math.log2(max(bits, 1.0)))))  # 0.35% grid of rates
        if key not in self._cache:
            it = self.items[name]
            self._cache[key] = self._measured(encode_classic(mode, name, it.values, it.dtype, self.stats,
                                                             bits=2.0 ** (key[2] / 200) / it.size), bands, in_out)
        return self._cache[key]

    def _measured(self, res: Result, bands: list, in_out: bool) -> tuple[Result, float]:
        """``res`` without its reconstruction (not held) and the units' distortion of it."""
        d = self._distortion(bands, res.recon, in_out)
        res.recon = None
        return res, d

    @staticmethod
    def _locked(name: str, bands: list, by_parent: Mapping[str, list], in_out: bool) -> bool:
        """Tensors that keep tq: a weight whose bias the tq encoder corrected for the tq
        reconstruction's mean output error (``tq.encoder._correct_biases``: another
        reconstruction would leave the corrected bias wrong), and a weight stored ``in_out``
        (statistics say it is [in, out], e.g. an ONNX MatMul initialiser: tq keeps that layout for
        transform-domain use, the classic modes have none and would group input channels)."""
        return in_out or (bands[0].h_mean is not None and name.endswith("weight")
                          and (name[:-len("weight")] + "bias") in by_parent)

    @staticmethod
    def _distortion(bands: list, recon: np.ndarray, in_out: bool) -> float:
        """The units' distortion of a reconstruction of the whole tensor (stored shape)."""
        view = recon.T if in_out else recon.reshape(recon.shape[0], -1)
        d, r0 = 0.0, 0
        for u in bands:
            rows = u.shape[0]
            d += u.distortion(view[r0:r0 + rows] - u.w)
            r0 += rows
        return d

    def __call__(self, lam: float, by_parent: Mapping[str, list], pick: Mapping[str, int],
                 enc: dict[str, tuple[str, dict, list]]) -> dict[str, tuple[str, dict, list]]:
        out = dict(enc)
        self.last = {}
        if not (lam > 0 and math.isfinite(lam)):
            return out
        for name, bands in by_parent.items():
            if name not in enc or name not in self.items or enc[name].mode != "tq":
                continue
            shape = self.items[name].shape
            _, params, streams = enc[name]
            in_out = params.get("layout") == "in_out"
            if len(shape) < 2 or self.items[name].size < MIN_ELEMENTS or self._locked(name, bands, by_parent, in_out):
                continue
            view = view_shape(shape, "in_out" if in_out else "out_in")
            if params.get("transform", "none") != "none" or sum(u.shape[0] for u in bands) != view[0] \
                    or any(u.shape[1] != view[1] or u.transposed for u in bands):
                continue  # units in a transform's coefficient domain: no common distortion to compare
            tq_d = sum(u.distortion(reconstruction(u, pick[u.name]) - u.w) for u in bands)
            tq_r = measured_bits(params, streams)
            if self.decided is None:  # the first call decides: least D + lam R, tq unless undercut by MARGIN
                tq_cost = tq_d + lam * tq_r
                best_cost, mode, ratio = (1.0 - MARGIN) * tq_cost, "tq", 1.0
                for m in self.modes:
                    res, d = self._candidate(name, m, lam, bands, in_out)
                    cost = d + lam * res.rate_bits
                    if cost < best_cost:
                        best_cost, mode, ratio = cost, m, res.rate_bits / tq_r
                self._decisions[name] = (mode, ratio)
            mode, ratio = self.decided.get(name, ("tq", 1.0)) if self.decided is not None else \
                self._decisions[name]
            best = None
            if mode != "tq":
                # written at a rate target: the rate it had when chosen, scaled with the rate the allocation
                # gives the tensor in tq (a smooth function of lam, so the allocator's bits loop converges)
                best, d = self._matched(name, mode, ratio * tq_r, bands, in_out)
                if self.decided is None and d + lam * best.rate_bits >= tq_d + lam * tq_r:
                    best = None  # at its rate target it no longer undercuts tq: tq, now and in later calls
                    self._decisions[name] = ("tq", 1.0)
            if best is not None:
                out[name] = best.encoded
                self.last[name] = best.mode
            else:
                self.last[name] = "tq"
        if self.decided is None:
            self.decided = dict(self._decisions)
        return out


def chooser_for(items: Sequence[Any], stats: Any, modes: Optional[Sequence[str]] = None) -> Chooser:
    """A :class:`Chooser` for ``tqcodec.modes.tq.encoder.Item`` s (name, dtype, values)."""
    return Chooser({it.name: it for it in items}, stats, modes or CANDIDATES)

"""The smallest file that keeps a metric: a search over the whole-file rate (bits per parameter)
whose every trial is encoded, written and judged by the caller's evaluation. Knows rates and
metrics, not files or models: ``trial(bits)`` does the work and gives the file size and metric.

The metric is assumed to improve with the rate (the search brackets the passing rate and bisects
it in log scale); every trial is kept in the log, which the caller stores with the file.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Generic, Optional, TypeVar

from ..errors import fail

T = TypeVar("T")

START_BITS = 4.0
MIN_BITS = 0.25
MAX_BITS = 16.0
SIZE_TOLERANCE = 0.03  # stop when the passing file is within 3% of the largest failing one
MAX_TRIALS = 12


@dataclass(frozen=True)
class Trial:
    """One candidate file: its bits target, its size in bytes, its metric, and whether it passed."""

    bits: float
    size: int
    metric: float
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Target:
    """What passes: ``metric >= threshold`` (``higher_is_better``) or ``metric <= threshold``."""

    threshold: float
    higher_is_better: bool = True

    def passes(self, metric: float) -> bool:
        if math.isnan(metric):
            return False
        return metric >= self.threshold if self.higher_is_better else metric <= self.threshold

    def describe(self) -> str:
        return f"{'>=' if self.higher_is_better else '<='} {self.threshold:g}"


@dataclass
class Found(Generic[T]):
    """The search's answer: the passing candidate (what ``trial`` made for it) and every trial."""

    result: T
    best: Trial
    trials: list[Trial]


def smallest_passing(trial: Callable[[float], tuple[T, int, float]], target: Target, *,
                     start: float = START_BITS, min_bits: float = MIN_BITS, max_bits: float = MAX_BITS,
                     tolerance: float = SIZE_TOLERANCE, max_trials: int = MAX_TRIALS,
                     progress: Optional[Callable[[Trial, int], None]] = None) -> Found[T]:
    """Search the bits per parameter for the smallest file whose metric passes ``target``.

    ``trial(bits) -> (candidate, size_bytes, metric)``. The search doubles or halves from
    ``start`` until the pass/fail boundary is bracketed (or ``min_bits`` passes), then bisects
    in log scale until the passing file is within ``tolerance`` of the failing one's size, or
    ``max_trials`` trials are spent; it returns the smallest passing candidate seen.
    ``progress(trial, number)`` after each trial. No rate up to ``max_bits`` passing:
    ``TqzError`` ``METRIC_NOT_MET``."""
    if not (0 < min_bits <= start <= max_bits):
        raise fail("BAD_OPTION", f"the search needs 0 < min_bits <= start <= max_bits, got "
                                 f"{min_bits}, {start}, {max_bits}")
    trials: list[Trial] = []
    best: Optional[tuple[Trial, T]] = None  # the smallest passing
    worst_fail: Optional[Trial] = None  # the largest failing

    def run(bits: float) -> Trial:
        nonlocal best, worst_fail
        candidate, size, metric = trial(bits)
        t = Trial(round(bits, 6), int(size), float(metric), target.passes(float(metric)))
        trials.append(t)
        if t.passed and (best is None or t.size < best[0].size):
            best = (t, candidate)
        if not t.passed and (worst_fail is None or t.size > worst_fail.size):
            worst_fail = t
        if progress:
            progress(t, len(trials))
        return t

    # bracket: lo fails, hi passes
    bits = start
    t = run(bits)
    lo = hi = None
    if t.passed:
        hi = bits
        while len(trials) < max_trials and bits / 2 >= min_bits:
            bits /= 2
            if run(bits).passed:
                hi = bits
            else:
                lo = bits
                break
    else:
        lo = bits
        while len(trials) < max_trials and bits < max_bits:
            bits = min(bits * 2, max_bits)
            if run(bits).passed:
                hi = bits
                break
            lo = bits
    if best is None:
        raise fail("METRIC_NOT_MET", f"no rate up to {max_bits:g} bits/param gives a metric {target.describe()} "
                                     f"(best {_best_metric(trials, target):g} in {len(trials)} trials)")
    # bisect in log scale between the largest failing and the smallest passing rate
    while lo is not None and len(trials) < max_trials:
        if worst_fail is not None and best[0].size <= (1.0 + tolerance) * worst_fail.size:
            break
        mid = math.sqrt(lo * hi)
        if run(mid).passed:
            hi = mid
        else:
            lo = mid
    return Found(best[1], best[0], trials)


def _best_metric(trials: list[Trial], target: Target) -> float:
    metrics = [t.metric for t in trials if not math.isnan(t.metric)]
    if not metrics:
        return float("nan")
    return max(metrics) if target.higher_is_better else min(metrics)

"""The smallest file that keeps a metric: a search over the whole-file rate (bits per parameter)
whose every trial is encoded, written and judged by the caller's evaluation. Knows rates and
metrics, not files or models: ``trial(bits)`` does the work and gives the file size and metric.

The metric is assumed to improve with the rate: the search brackets the passing rate, then narrows
the bracket in log scale as Brent's root finder does, stepping to where the metric interpolated
through the last trials meets the threshold, and bisecting where the trials say the metric is noisy
(trials whose metric does not strictly improve with the rate) or where interpolating has cost
more trials than bisection would. Every trial is kept in the log, which the caller stores with
the file.
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
# Interpolating may spend this many trials more than bisection would. On smooth metrics it saves
# more: replaying MiniLM's measured cosine searches, 7 trials become 5; on 45 saturating curves,
# 7.0 become 4.9. On a noisy one it is what trying costs: digits-like top-1 (500 images, simulated
# over 60 seeds) takes 7.9 trials on average, at most 9 (bisection: 8)
INTERPOLATION_SLACK = 2


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
    ``start`` until the pass/fail boundary is bracketed (or ``min_bits`` passes), then narrows
    it in log scale (interpolating the metric, or bisecting: see the module's docstring) until
    the passing file is within ``tolerance`` of the failing one's size, or the rates are (the
    file's size jumps inside a bracket that narrow), or ``max_trials`` trials are spent; it
    returns the smallest passing candidate seen.
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
    # narrow the bracket, in at most INTERPOLATION_SLACK trials more than bisecting it would take
    step = 0.95 * math.log1p(tolerance)  # a step this near a bracket end settles the search either way
    budget = len(trials) + _bisections(lo, hi, step) if lo is not None else 0
    while lo is not None and len(trials) < max_trials:
        if worst_fail is not None and best[0].size <= (1.0 + tolerance) * worst_fail.size:
            break
        if math.log(hi / lo) <= step:  # the size jumps inside a bracket this narrow: a tensor changes its step
            break
        x_lo, x_hi = math.log(lo), math.log(hi)
        if len(trials) + 1 + _bisections(lo, hi, step) <= budget + INTERPOLATION_SLACK:
            x = _interpolated_log_rate(trials, target, lo, hi, step)
        else:
            x = 0.5 * (x_lo + x_hi)
        bits = math.exp(x)
        if run(bits).passed:
            hi = bits
        else:
            lo = bits
    return Found(best[1], best[0], trials)


def _bisections(lo: float, hi: float, step: float) -> int:
    """Bisections of the log-rate bracket [lo, hi] until it is no wider than ``step``."""
    return max(0, math.ceil(math.log2(math.log(hi / lo) / step))) if hi > lo else 0


def _interpolated_log_rate(trials: list[Trial], target: Target, lo: float, hi: float, step: float) -> float:
    """The log rate inside the bracket (``lo`` fails, ``hi`` passes) where the metric meets the
    threshold, kept ``step`` inside the bracket: through the bracket's ends and the trial nearest
    them, the metric fitted as a saturating exponential ``L - c * exp(-k * bits)`` (a metric that
    approaches the uncompressed model's as the error falls geometrically with the rate), or as the
    parabola through them where they bend the other way. The midpoint with fewer than three trials,
    where the trials' metrics do not strictly improve with the rate (a noisy metric), or where
    neither fit meets the threshold inside the bracket."""
    sign = 1.0 if target.higher_is_better else -1.0
    margin = {}  # rate -> how far its metric is past the threshold (negative: fails)
    for t in trials:
        margin[t.bits] = sign * (t.metric - target.threshold)
    lo, hi = round(lo, 6), round(hi, 6)
    mid = 0.5 * (math.log(lo) + math.log(hi))
    ys = [margin[b] for b in sorted(margin)]
    others = [b for b in margin if b not in (lo, hi)]
    if lo not in margin or hi not in margin or not others or any(math.isnan(y) for y in ys) \
            or any(y1 <= y0 for y0, y1 in zip(ys, ys[1:])) or math.log(hi / lo) <= 2 * step:
        return mid
    nearest = min(others, key=lambda b: abs(math.log(b) - mid))
    points = sorted((b, margin[b]) for b in (lo, hi, nearest))
    estimate = _saturating_root(points)
    if estimate is None:
        estimate = _parabola_root(points)
    if estimate is None or not lo <= estimate <= hi:
        return mid
    return min(max(math.log(estimate), math.log(lo) + step), math.log(hi) - step)


def _saturating_root(points: list[tuple[float, float]]) -> Optional[float]:
    """Where ``y = A - c * exp(-k * b)`` (c, k > 0) through three points (b ascending, y rising)
    crosses zero; None where the points do not bend that way."""
    (b1, y1), (b2, y2), (b3, y3) = points
    ratio = (y2 - y1) / (y3 - y2)

    def bend(k: float) -> float:  # the ratio the exponential with rate k gives
        return (1 - math.exp(-k * (b2 - b1))) / (math.exp(-k * (b2 - b1)) - math.exp(-k * (b3 - b1)))
    k_lo, k_hi = 1e-6, 50.0 / (b3 - b1)
    if not bend(k_lo) < ratio < bend(k_hi):
        return None
    for _ in range(100):  # bend(k) rises with k
        k = math.sqrt(k_lo * k_hi)
        k_lo, k_hi = (k, k_hi) if bend(k) < ratio else (k_lo, k)
    k = math.sqrt(k_lo * k_hi)
    c = (y2 - y1) / (1 - math.exp(-k * (b2 - b1)))  # in units of exp(-k * (b - b1))
    a = y1 + c
    if a <= 0:
        return None
    return b1 + math.log(c / a) / k


def _parabola_root(points: list[tuple[float, float]]) -> Optional[float]:
    """Inverse quadratic interpolation: the rate where the parabola in y through three points
    (distinct y) gives y = 0."""
    if len({y for _, y in points}) < 3:
        return None
    return sum(b * math.prod(-yo / (y - yo) for bo, yo in points if bo != b) for b, y in points)


def _best_metric(trials: list[Trial], target: Target) -> float:
    metrics = [t.metric for t in trials if not math.isnan(t.metric)]
    if not metrics:
        return float("nan")
    return max(metrics) if target.higher_is_better else min(metrics)

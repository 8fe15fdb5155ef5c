"""Statistics over the seeds of a comparison grid: spread of one configuration, paired differences between two.

Every (method, FLOPs target) of a grid is trained once per seed; runs of the same seed start from the same detector
(and see the same data order), so two methods are compared on their per-seed differences
(:func:`paired_difference`): mean difference and a two-sided interval from Student's t distribution with n − 1
degrees of freedom. :func:`verdict` turns such an interval into better / worse / indistinguishable.

An interval that holds 0 does not say the two are equal: :func:`detectable_difference` gives the smallest true
mean difference that this many seeds, at the spread the differences showed, would find beyond the interval with a
given probability (power, 80 % by default), and :func:`seeds_needed` how many seeds a given difference needs. Both
use the power of the two-sided paired t-test from the noncentral t distribution (the figures of G*Power's
"matched pairs" test), taking the observed standard deviation of the differences as the true one.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = ["Spread", "PairedDifference", "spread", "t_quantile", "paired_difference", "verdict", "power",
           "detectable_difference", "seeds_needed", "POWER", "SEEDS_LIMIT"]

#: the probability with which a difference counts as detectable (:func:`detectable_difference`)
POWER = 0.8
#: :func:`seeds_needed` gives up beyond this many seeds
SEEDS_LIMIT = 100_000


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (n − 1; 0 for one value), count, minimum and maximum."""

    mean: float
    std: float
    n: int
    min: float
    max: float


@dataclass(frozen=True)
class PairedDifference:
    """``a − b`` over the seeds both have: mean, half-width of the ``level`` interval (None below two seeds), the
    seeds and the differences."""

    mean: float
    half_width: float | None
    n: int
    seeds: tuple
    differences: tuple
    level: float = 0.95

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    @property
    def std(self) -> float | None:
        """Sample standard deviation of the differences (None below two seeds)."""
        return None if self.n < 2 else spread(self.differences).std

    def detectable(self, power_: float = POWER) -> float | None:
        """:func:`detectable_difference` at these seeds' spread and count (None below two seeds)."""
        return None if self.n < 2 else detectable_difference(self.std, self.n, power_, self.level)

    def seeds_for(self, delta: float, power_: float = POWER) -> int | None:
        """:func:`seeds_needed` to find ``delta`` at these seeds' spread (None below two seeds or beyond the
        limit)."""
        return None if self.n < 2 else seeds_needed(delta, self.std, power_, self.level)


def spread(values) -> Spread | None:
    """:class:`Spread` of the non-None ``values`` (None when there are none)."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return Spread(mean, std, len(v), min(v), max(v))


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def paired_difference(a: dict, b: dict, level: float = 0.95) -> PairedDifference | None:
    """``a[seed] − b[seed]`` over the seeds present (not None) in both: the mean and ± t((1+level)/2, n−1)·s/√n
    (s: sample standard deviation of the differences). None when no seed is shared."""
    seeds = tuple(sorted(s for s in a if s in b and a[s] is not None and b[s] is not None))
    if not seeds:
        return None
    d = tuple(float(a[s]) - float(b[s]) for s in seeds)
    sp = spread(d)
    half = None
    if sp.n > 1:
        half = t_quantile(0.5 + level / 2, sp.n - 1) * sp.std / math.sqrt(sp.n)
    return PairedDifference(sp.mean, half, sp.n, seeds, d, level)


def verdict(diff: PairedDifference | None) -> str:
    """``"better"`` / ``"worse"`` when the interval of ``a − b`` lies above / below 0, ``"indistinguishable"`` when
    it holds 0, ``"undetermined"`` with fewer than two shared seeds."""
    if diff is None or diff.half_width is None:
        return "undetermined"
    if diff.low > 0:
        return "better"
    if diff.high < 0:
        return "worse"
    return "indistinguishable"


def power(delta: float, std: float, n: int, level: float = 0.95) -> float:
    """Probability that the two-sided paired t-test at ``level`` over ``n`` seeds finds a true mean difference
    ``delta`` when the differences have standard deviation ``std`` (noncentral t with n − 1 degrees of freedom)."""
    from scipy.stats import nct

    _check_spread(std, n)
    if std == 0:
        return 1.0 if delta != 0 else 1 - level
    df = n - 1
    crit = t_quantile(0.5 + level / 2, df)
    nc = abs(delta) * math.sqrt(n) / std
    upper, lower = float(nct.sf(crit, df, nc)), float(nct.cdf(-crit, df, nc))
    if not math.isfinite(upper):
        upper = 1.0 - float(nct.cdf(crit, df, nc))
    if not math.isfinite(lower):       # scipy returns NaN for some far tails; this one is below the central t's
        lower = 0.0
    if not math.isfinite(upper):
        # scipy's noncentral t gives NaN beyond a noncentrality of about 3e9 (a spread of float rounding, say):
        # there the power is 1 to double precision
        if nc > crit:
            return 1.0
        raise ValueError(f"power of delta={delta!r}, std={std!r}, n={n!r} could not be computed")
    return upper + lower


def detectable_difference(std: float, n: int, power_: float = POWER, level: float = 0.95) -> float:
    """The smallest true mean difference that ``n`` seeds find beyond the ``level`` interval with probability
    ``power_``, for differences of standard deviation ``std`` (:func:`power` solved for ``delta``)."""
    from scipy.optimize import brentq

    _check_spread(std, n)
    _check_power(power_, level)
    if std == 0:
        return 0.0
    # twice the usual approximation (t_crit + t_power)·s/√n lies above the root; doubled again until it does
    hi = 2 * (t_quantile(0.5 + level / 2, n - 1) + abs(t_quantile(power_, n - 1))) * std / math.sqrt(n)
    while power(hi, std, n, level) < power_:
        hi *= 2
    return float(brentq(lambda d: power(d, std, n, level) - power_, 0.0, hi, xtol=1e-12 * std))


def seeds_needed(delta: float, std: float, power_: float = POWER, level: float = 0.95,
                 limit: int = SEEDS_LIMIT) -> int | None:
    """The smallest number of seeds (≥ 2) with which a true mean difference ``delta`` is found beyond the
    ``level`` interval with probability ``power_`` (:func:`power`); None if more than ``limit`` are needed."""
    _check_std(std)
    _check_power(power_, level)
    if delta == 0:
        return None
    if std == 0:
        return 2

    def enough(n):
        return power(delta, std, n, level) >= power_
    if not enough(limit):
        return None
    lo, hi = 1, 2                      # power grows with n: double, then bisect
    while not enough(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def _check_std(std: float) -> None:
    if not (isinstance(std, (int, float)) and math.isfinite(std) and std >= 0):
        raise ValueError(f"the standard deviation must be a finite number ≥ 0, got {std!r}")


def _check_spread(std: float, n: int) -> None:
    _check_std(std)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ValueError(f"the number of seeds must be an integer, got n={n!r}")
    if n < 2:
        raise ValueError(f"power needs at least two seeds, got n={n!r}")


def _check_power(power_: float, level: float) -> None:
    # below 1 − level even a zero difference is "found" that often: no difference is needed for it
    if not 1 - level < power_ < 1:
        raise ValueError(f"power must be in ({1 - level:g}, 1) at level {level:g}, got {power_!r}")

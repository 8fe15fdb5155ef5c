"""Statistics over the seeds of a comparison grid: spread of one configuration, paired differences between two.

Every (method, FLOPs target) of a grid is trained once per seed; runs of the same seed start from the same detector
(and see the same data order), so two methods are compared on their per-seed differences
(:func:`paired_difference`): mean difference and a two-sided interval from Student's t distribution with n − 1
degrees of freedom. :func:`verdict` turns such an interval into better / worse / indistinguishable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Spread", "PairedDifference", "spread", "t_quantile", "paired_difference", "verdict"]


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

"""Means and 95% intervals over seeds (Student's t), and whether two intervals say two means differ.

With few seeds the t interval is wide on purpose (3 seeds: mean ± 4.30·s/√3): a grid cell is a plateau-escape
lottery, and a single seed cannot rank variants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# two-sided 95% critical values of Student's t for 1 … 30 degrees of freedom (then the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        return float("nan")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass
class Interval:
    """Mean of n values with a 95% t interval [lo, hi] (lo = hi = mean for one value: no interval)."""

    mean: float
    lo: float
    hi: float
    n: int
    sd: float

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2


def mean_interval(values: list[float]) -> Interval:
    """Mean and 95% t interval of `values` (None / NaN entries dropped)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, float("nan"))
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, mean, mean, 1, 0.0)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_critical(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd)


def compare(a: Interval, b: Interval) -> str:
    """'higher' / 'lower' when a's interval lies wholly above / below b's, else 'no difference' (or 'one seed')."""
    if a.n < 2 or b.n < 2:
        return "one seed: no interval"
    if a.lo > b.hi:
        return "higher"
    if a.hi < b.lo:
        return "lower"
    return "no difference"

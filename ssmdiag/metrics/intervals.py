"""The one home of ssmdiag's 95% intervals and comparisons: Student-t over independent units (samples, seeds).

Every interval ssmdiag prints is a Student-t interval of a mean over *independent units*: one number per sample
(a sequence), per seed (a training run) or per pair of them. The units are never rows of one sequence. A 95%
t interval of n independent roughly-normal values covers the truth 95% of the time at any n ≥ 2 — at n = 2 it is
mean ± 12.7·s/√2, wide on purpose. Its coverage is checked by simulation in tests/test_intervals.py at the sample
counts users run; a command that needs another estimand (a ratio, a shape) maps it onto such a mean first
(log ratios, per-sample fits).

Comparisons follow the design: `compare_paired` when the two arms share their units (the same samples through two
models, the same seed's training stream and test set for two variants), `compare_unpaired` (Welch) otherwise. A
difference is called only when its interval excludes 0; otherwise the verdict is "not detected" together with the
smallest difference the run could have detected (80% power at the 5% level, through the noncentral t), so "no
difference" is never claimed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

LEVEL = 0.95
POWER = 0.80
NOT_DETECTED = "not detected"


# --- Student's t distribution (CDF through the regularized incomplete beta function, quantile by bisection) -----


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` > 0 degrees of freedom (real df, for Welch)."""
    if math.isinf(df):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def _t_pdf(t: float, df: float) -> float:
    """Density of Student's t with `df` degrees of freedom (the normal density for infinite df)."""
    if math.isinf(df):
        return math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    return math.exp(math.lgamma((df + 1.0) / 2.0) - math.lgamma(df / 2.0) - 0.5 * math.log(df * math.pi)
                    - (df + 1.0) / 2.0 * math.log1p(t * t / df))


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` > 0 degrees of freedom (NaN for df ≤ 0 or NaN).

    Newton steps on the CDF kept inside a shrinking bracket (a bisection step whenever Newton would leave it):
    converges in a handful of CDF evaluations; cached, since the same (p, df) recur (integer df of n − 1).
    """
    if not (df > 0) or not (0.0 < p < 1.0):
        return float("nan")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    x = 0.5 * (lo + hi)
    for _ in range(200):
        err = t_cdf(x, df) - p
        lo, hi = (x, hi) if err < 0 else (lo, x)
        step = err / _t_pdf(x, df)
        if abs(step) <= 1e-13 * max(1.0, abs(x)) or hi - lo <= 1e-12 * max(1.0, hi):
            return x - step if lo <= x - step <= hi else x
        x = x - step if lo < x - step < hi else 0.5 * (lo + hi)
    return x


def t_critical(df: float, level: float = LEVEL) -> float:
    """The two-sided critical value of a `level` interval: the (1 + level)/2 quantile of t with `df`."""
    return t_quantile(0.5 + level / 2.0, df)


# --- intervals of a mean over independent units ---------------------------------------------------------------


@dataclass
class Interval:
    """Mean of n independent values with its 95% Student-t interval.

    lo / hi are None when there is no interval (fewer than 2 finite values); `note` then says why.
    """

    mean: float
    lo: float | None
    hi: float | None
    n: int
    sd: float | None
    se: float | None = None
    unit: str = "samples"
    note: str | None = None

    @property
    def ci95(self) -> tuple[float, float] | None:
        return None if self.lo is None or self.hi is None else (self.lo, self.hi)

    @property
    def half(self) -> float | None:
        return None if self.ci95 is None else (self.hi - self.lo) / 2

    @property
    def method(self) -> str:
        return f"Student-t over {self.n} {self.unit}" if self.ci95 is not None else "none"


def finite(values) -> list[float]:
    """The finite floats of `values` (None, NaN and ±inf dropped)."""
    out = []
    for v in values:
        if v is None:
            continue
        x = float(v)
        if math.isfinite(x):
            out.append(x)
    return out


def mean_interval(values, unit: str = "samples", level: float = LEVEL) -> Interval:
    """Mean and `level` Student-t interval of one value per independent unit (non-finite values dropped).

    Args:
        values: one number per unit (sample, seed, pair). unit: the unit's name, for method strings and notes.
    """
    xs = finite(values)
    n = len(xs)
    if n == 0:
        return Interval(float("nan"), None, None, 0, None, None, unit, f"no finite values over {unit}")
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, None, None, 1, None, None, unit, f"one {unit.rstrip('s')}: an interval needs ≥ 2 {unit}")
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    se = sd / math.sqrt(n)
    half = t_critical(n - 1, level) * se
    return Interval(mean, mean - half, mean + half, n, sd, se, unit)


def log_mean_interval(values, unit: str = "samples") -> Interval:
    """Geometric mean of positive values with the exponentiated t interval of their logs (for ratios).

    Non-positive or non-finite values are dropped (a ratio with a zero side has no log).
    """
    logs = [math.log(v) for v in finite(values) if v > 0]
    iv = mean_interval(logs, unit)
    ex = (lambda z: None if z is None else math.exp(z))
    return Interval(math.exp(iv.mean) if iv.n else float("nan"), ex(iv.lo), ex(iv.hi), iv.n, iv.sd, iv.se, unit,
                    iv.note)


# --- comparisons ------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """first − second: the estimate, its 95% interval, and a verdict that never claims "no difference".

    Args:
        difference: the estimate (mean of paired differences, or difference of means).
        mdd: the smallest true difference this design detects with 80% power at the 5% level (noncentral t);
            None without an interval.
        verdict: "higher" | "lower" (first vs second; the interval excludes 0) | "not detected" | "no interval".
        text: the verdict for a table, e.g. "not detected (would need > 0.12)".
    """

    difference: float
    lo: float | None
    hi: float | None
    n: int
    se: float | None
    df: float | None
    mdd: float | None
    verdict: str
    text: str
    paired: bool
    unit: str = "samples"

    @property
    def ci95(self) -> tuple[float, float] | None:
        return None if self.lo is None or self.hi is None else (self.lo, self.hi)


def _t_test_power(lam: float, df: float, crit: float) -> float:
    """Power of the two-sided t test with critical value `crit` when the true mean is `lam` standard errors from 0:
    P(|Z + lam| > crit·S), S = √(V/df), V ~ χ²(df) — the noncentral t, integrated over V on a log grid."""
    k = df / 2.0
    lo, hi = math.log(1e-10), math.log(df + 60.0 * math.sqrt(2.0 * df) + 100.0)
    steps = 600
    h = (hi - lo) / steps
    norm = math.lgamma(k) + k * math.log(2.0)
    phi = (lambda z: 0.5 * math.erfc(-z / math.sqrt(2.0)))
    total = 0.0
    for i in range(steps):
        x = lo + (i + 0.5) * h
        v = math.exp(x)
        w = math.exp(k * x - v / 2.0 - norm)  # χ² density times v (the d(log v) Jacobian)
        s = math.sqrt(v / df)
        total += w * (phi(lam - crit * s) + phi(-lam - crit * s))
    return total * h


@functools.lru_cache(maxsize=1024)
def _detectable_lambda(df: float, power: float, level: float) -> float:
    """The noncentrality (true difference in standard errors) at which the t test reaches `power`."""
    crit = t_critical(df, level)
    lo, hi = 0.0, crit + 2.0 * t_quantile(power, df) + 10.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_test_power(mid, df, crit) < power else (lo, mid)
    return 0.5 * (lo + hi)


def minimum_detectable(se: float, df: float, power: float = POWER, level: float = LEVEL) -> float:
    """The smallest true difference the two-sided `level` t test detects with `power`, if the spread is what was seen.

    Exact through the noncentral t (the usual (t_crit + t_power)·SE shortcut gives only 73% power at 2 units).
    """
    if not (df > 0) or se is None or not math.isfinite(se):
        return float("nan")
    df = float(df)  # λ(df) is smooth: a grid of df (quarters below 10, integers below 200) keeps Welch's real df cached
    key = round(df * 4) / 4 if df < 10 else float(round(df)) if df < 200 else 200.0
    return _detectable_lambda(max(key, 0.25), power, level) * se


def _verdict(diff: float, lo: float | None, hi: float | None, mdd: float | None, fmt, n: int, unit: str,
             higher: str, lower: str) -> tuple[str, str]:
    if lo is None or hi is None:
        return "no interval", f"no interval ({n} {unit}: needs ≥ 2)"
    if lo > 0:
        return "higher", higher
    if hi < 0:
        return "lower", lower
    if not mdd:  # every unit gave the same difference (0): no spread to size a detectable difference from
        return NOT_DETECTED, f"{NOT_DETECTED} (the same in every one of the {n} {unit})"
    return NOT_DETECTED, f"{NOT_DETECTED} (would need > {fmt(mdd)})"


def compare_paired(first, second, unit: str = "samples", fmt=lambda v: f"{v:.3g}", higher: str = "higher",
                   lower: str = "lower") -> Comparison:
    """first − second over units that the design pairs (the same sample through two models, the same seed).

    Units where either side is non-finite are dropped together.

    Args:
        first, second: equal-length sequences, one value per shared unit. fmt: formats the MDD in the text.
        higher, lower: the verdict texts when the interval lies above / below 0.
    """
    if len(first) != len(second):
        raise ValueError(f"paired comparison of {len(first)} and {len(second)} {unit}")
    diffs = [float(a) - float(b) for a, b in zip(first, second)
             if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))]
    iv = mean_interval(diffs, unit)
    mdd = minimum_detectable(iv.se, iv.n - 1) if iv.se is not None else None
    verdict, text = _verdict(iv.mean, iv.lo, iv.hi, mdd, fmt, iv.n, unit, higher, lower)
    return Comparison(iv.mean, iv.lo, iv.hi, iv.n, iv.se, iv.n - 1 if iv.n > 1 else None, mdd, verdict, text,
                      True, unit)


def compare_unpaired(first, second, unit: str = "samples", fmt=lambda v: f"{v:.3g}", higher: str = "higher",
                     lower: str = "lower") -> Comparison:
    """mean(first) − mean(second) for independent groups: Welch's interval (Welch–Satterthwaite df)."""
    a, b = mean_interval(first, unit), mean_interval(second, unit)
    diff = a.mean - b.mean
    lo = hi = se = df = mdd = None
    if a.se is not None and b.se is not None:
        va, vb = a.se**2, b.se**2
        se = math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1)) if se > 0 else float(a.n + b.n - 2)
        half = t_critical(df) * se
        lo, hi, mdd = diff - half, diff + half, minimum_detectable(se, df)
    verdict, text = _verdict(diff, lo, hi, mdd, fmt, min(a.n, b.n), unit, higher, lower)
    return Comparison(diff, lo, hi, min(a.n, b.n), se, df, mdd, verdict, text, False, unit)


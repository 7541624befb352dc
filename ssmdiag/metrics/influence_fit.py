"""Influence curves by distance, their confidence band, and the exponential-decay fit (paper Thm 3.1, Fig. 1, 7).

Rows are influence scores I[row, s] of source s on one target t (one row per sample × target). A row is
re-indexed by distance t − s; the curve is the mean (or median) of log10 I over rows at each distance, with a
95% percentile-bootstrap band over rows. The fit is a least-squares line of that curve against distance:
log10 I ≈ a + slope·d, reported as a decay rate per token in natural-log units (rate = −slope·ln 10, so
I ∝ exp(−rate·d)), a half-life ln 2 / rate in tokens, and R².

Verdict: a curve "decays" only when the rate's 95% interval lies above 0 AND the line explains at least
R2_MIN = 0.5 of the curve's variance over the window; otherwise "no exponential decay" and no half-life is
given (the numbers are kept beside the verdict). 0.5 separates the two cases the issue names: a falling line
(mamba-130m at initialisation: R² 0.90) from a flat curve whose noise or a far-end rise tilts the line
(trained transformer: R² 0.13). A mixture of rates is not one line: the window is also fitted in three equal
distance bands (near, middle, far), each with its own rate, interval and verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import SsmdiagError

TINY = float(np.finfo(np.float32).smallest_subnormal)  # an exact-zero influence is floored here (log10 ≈ -44.9)
N_BOOT = 1000
R2_MIN = 0.5  # the line must explain at least half the curve's variance over the window to count as decay
DECAYS, NO_DECAY = "decays", "no exponential decay"
BANDS = ("near", "middle", "far")


@dataclass
class InfluenceCurve:
    """log10 influence per distance d = t − s (index = distance). Band: 95% bootstrap of the `statistic`."""

    distance: list[int]
    mean_log10: list[float]
    median_log10: list[float]
    band_low: list[float]
    band_high: list[float]
    count: list[int]  # rows (sample × target) that reach this distance
    statistic: str  # "mean" | "median": the curve the band and the fit use
    band: str  # how the band was computed

    def values(self) -> list[float]:
        """The curve the band and the fit use: median_log10 or mean_log10, per `statistic`."""
        return self.median_log10 if self.statistic == "median" else self.mean_log10


@dataclass
class DecayFit:
    """log10 I ≈ intercept + log10_slope·d over distances [fit_lo, fit_hi]."""

    fit_lo: int
    fit_hi: int
    points: int
    log10_slope: float  # decades per token (negative = decaying)
    intercept_log10: float
    decay_rate: float  # per token, natural-log units: I ∝ exp(-decay_rate · d)
    decay_rate_ci95: tuple[float, float] | None  # bootstrap over rows (one row: OLS, see ci_method)
    half_life: float | None  # tokens, ln 2 / decay_rate; None unless the verdict is "decays"
    r2: float
    verdict: str = NO_DECAY  # DECAYS when the rate's 95% CI is above 0 and r2 >= R2_MIN
    ci_method: str = "bootstrap"  # "bootstrap" over rows, or "ols" (one row: the line's own standard error)
    band: str = "all"  # "all" for the whole window, else one of BANDS


def decay_verdict(rate: float, ci: tuple[float, float] | None, r2: float) -> str:
    """DECAYS when the 95% interval of the rate lies above 0 and the line explains >= R2_MIN; else NO_DECAY.

    Args:
        rate: per token (ln units). ci: its 95% interval (None: no interval, never DECAYS). r2: of the line.
    """
    ok = ci is not None and math.isfinite(ci[0]) and ci[0] > 0 and rate > 0 and math.isfinite(r2) and r2 >= R2_MIN
    return DECAYS if ok else NO_DECAY


def rows_by_distance(rows: np.ndarray, targets: list[int]) -> tuple[np.ndarray, int]:
    """Re-index influence rows by distance and take log10.

    Args:
        rows: (samples, T, l) influence of source s on target targets[j]; entries s > t are ignored.
        targets: the T target positions.
    Returns:
        (samples·T, max(targets)+1) float64 log10 influence, NaN where t − s < 0; and the count of exact zeros.
    """
    samples, n_t, _ = rows.shape
    width = max(targets) + 1
    out = np.full((samples, n_t, width), np.nan)
    zeros = 0
    for j, t in enumerate(targets):
        seg = rows[:, j, : t + 1][:, ::-1]  # distance 0..t
        zeros += int((seg <= 0).sum())
        out[:, j, : t + 1] = np.log10(np.maximum(seg, TINY))
    return out.reshape(samples * n_t, width), zeros


def _stat(values: np.ndarray, statistic: str, axis: int) -> np.ndarray:
    """nanmean or nanmedian along `axis`, without warnings for all-NaN slices."""
    with np.errstate(all="ignore"), _quiet_nan():
        return np.nanmedian(values, axis=axis) if statistic == "median" else np.nanmean(values, axis=axis)


class _quiet_nan:
    """Silence numpy's 'Mean of empty slice' warnings (empty distances are NaN by design)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def bootstrap_curves(logvals: np.ndarray, statistic: str, seed: int, n_boot: int = N_BOOT) -> np.ndarray | None:
    """Resample rows with replacement: (n_boot, distances) curves, or None with fewer than 2 rows.

    Args:
        logvals: (rows, distances) log10 influence by distance, NaN where a row does not reach.
        statistic: "mean" | "median" of each resample. seed: for the resampling. n_boot: resamples.
    """
    n = logvals.shape[0]
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    chunk = max(1, int(2**24 // max(logvals.size, 1)))  # bound the (chunk, n, distances) temporary
    return np.concatenate([_stat(logvals[idx[i: i + chunk]], statistic, axis=1) for i in range(0, n_boot, chunk)])


def aggregate_curve(logvals: np.ndarray, statistic: str = "mean", seed: int = 0,
                    boots: np.ndarray | None = None) -> InfluenceCurve:
    """Mean and median of log10 influence per distance, with a 95% percentile-bootstrap band over rows.

    Args:
        logvals: (rows, distances) log10 influence by distance.
        statistic: "mean" | "median": the curve the band bootstraps. seed: for the bootstrap.
        boots: precomputed bootstrap curves (bootstrap_curves), or None to draw them here.
    """
    mean = _stat(logvals, "mean", 0)
    median = _stat(logvals, "median", 0)
    if boots is None:
        boots = bootstrap_curves(logvals, statistic, seed)
    if boots is None:
        low = high = np.full(mean.shape, np.nan)
    else:
        with _quiet_nan():
            low, high = np.nanpercentile(boots, [2.5, 97.5], axis=0)
    width = logvals.shape[1]
    return InfluenceCurve(
        distance=list(range(width)), mean_log10=mean.tolist(), median_log10=median.tolist(),
        band_low=np.asarray(low).tolist(), band_high=np.asarray(high).tolist(),
        count=np.isfinite(logvals).sum(0).astype(int).tolist(), statistic=statistic,
        band=f"95% percentile bootstrap of the {statistic} over {logvals.shape[0]} sample×target rows "
             f"({N_BOOT} resamples)" if boots is not None else "none (a single sample×target row)")


def common_distance(targets: list[int]) -> int:
    """The largest distance every target reaches: min(targets). Fits stay at or below it, so a curve averaged
    over several targets never mixes target populations inside the fit window."""
    return min(targets)


def auto_fit_range(max_distance: int) -> tuple[int, int]:
    """The default fit window (inclusive distances): skip the conv-local first few and the last ~5% (few pairs)."""
    return min(4, max_distance // 4), max_distance - max(1, math.ceil(0.05 * max_distance))


def _line_fits(x: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares lines through each row of ys (NaNs dropped per row): slopes, intercepts, R².

    Args:
        x: (d,) abscissae. ys: (d,) or (rows, d) ordinates.
    """
    slopes, inters, r2s = [], [], []
    for y in np.atleast_2d(ys):
        ok = np.isfinite(y)
        if ok.sum() < 2:
            slopes.append(np.nan), inters.append(np.nan), r2s.append(np.nan)
            continue
        xs, yv = x[ok], y[ok]
        slope, inter = np.polyfit(xs, yv, 1)
        resid = yv - (inter + slope * xs)
        tot = ((yv - yv.mean()) ** 2).sum()
        r2s.append(1.0 - (resid**2).sum() / tot if tot > 0 else 1.0)
        slopes.append(slope), inters.append(inter)
    return np.array(slopes), np.array(inters), np.array(r2s)


def fit_decay(curve_log10: list[float] | np.ndarray, fit_range: tuple[int, int],
              boots: np.ndarray | None = None, band: str = "all") -> DecayFit:
    """Fit log10 influence against distance over `fit_range` (inclusive); rates in natural-log units per token.

    Args:
        curve_log10: log10 influence per distance (index = distance).
        fit_range: inclusive distances (lo, hi).
        boots: (n_boot, distances) bootstrap curves for a CI on the rate, or None (then the OLS interval).
        band: the name stored with the fit ("all" or one of BANDS).
    """
    y = np.asarray(curve_log10, dtype=float)
    lo, hi = fit_range
    x = np.arange(lo, hi + 1, dtype=float)
    window = y[lo: hi + 1]
    if np.isfinite(window).sum() < 3:
        raise SsmdiagError(f"fit range {lo}:{hi} has fewer than 3 finite points",
                           hint="widen --fit-range (the influence may underflow to zero far away)")
    slope, inter, r2 = (float(v[0]) for v in _line_fits(x, window))
    rate = -slope * math.log(10)
    ci, method = None, "bootstrap"
    if boots is not None:
        b_slopes = _line_fits(x, boots[:, lo: hi + 1])[0]
        b_rates = -b_slopes[np.isfinite(b_slopes)] * math.log(10)
        if b_rates.size:
            ci = (float(np.percentile(b_rates, 2.5)), float(np.percentile(b_rates, 97.5)))
    if ci is None:  # a single row: the line's own interval (residuals are correlated, so it is optimistic)
        ci, method = _ols_rate_ci(x, window, slope, inter), "ols"
    verdict = decay_verdict(rate, ci, r2)
    half = math.log(2) / rate if verdict == DECAYS else None
    return DecayFit(fit_lo=lo, fit_hi=hi, points=int(np.isfinite(window).sum()), log10_slope=slope,
                    intercept_log10=inter, decay_rate=rate, decay_rate_ci95=ci, half_life=half, r2=r2,
                    verdict=verdict, ci_method=method, band=band)


def _ols_rate_ci(x: np.ndarray, y: np.ndarray, slope: float, inter: float) -> tuple[float, float] | None:
    """95% normal interval of the rate from the least-squares slope's standard error (None with < 3 points)."""
    ok = np.isfinite(y)
    if ok.sum() < 3:
        return None
    xs, ys = x[ok], y[ok]
    resid = ys - (inter + slope * xs)
    se = math.sqrt((resid**2).sum() / (len(xs) - 2) / ((xs - xs.mean()) ** 2).sum())
    rate = -slope * math.log(10)
    return (rate - 1.96 * se * math.log(10), rate + 1.96 * se * math.log(10))


def band_ranges(fit_range: tuple[int, int]) -> list[tuple[int, int]]:
    """The fit window cut into len(BANDS) equal distance bands (inclusive; neighbours share an end point)."""
    lo, hi = fit_range
    edges = np.linspace(lo, hi, len(BANDS) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def fit_bands(curve_log10: list[float] | np.ndarray, fit_range: tuple[int, int],
              boots: np.ndarray | None = None) -> list[DecayFit]:
    """One fit per distance band of the window (near, middle, far): a mixture of rates shows as different rates.

    Bands with fewer than 3 finite points are left out.

    Args:
        curve_log10: log10 influence per distance. fit_range: the whole window. boots: bootstrap curves or None.
    """
    y = np.asarray(curve_log10, dtype=float)
    fits = []
    for name, (lo, hi) in zip(BANDS, band_ranges(fit_range)):
        if np.isfinite(y[lo: hi + 1]).sum() >= 3:
            fits.append(fit_decay(y, (lo, hi), boots, band=name))
    return fits


def near_share(rows: np.ndarray, targets: list[int], fraction: float = 0.1) -> float:
    """Mean share of a row's total influence (linear scale) on the nearest ⌈fraction·(t+1)⌉ sources.

    Args:
        rows: (samples, T, l) influence rows. targets: the T target positions. fraction: of the sources.
    """
    shares = []
    for j, t in enumerate(targets):
        seg = rows[:, j, : t + 1]  # (samples, t+1)
        k = max(1, math.ceil(fraction * (t + 1)))
        total = seg.sum(-1)
        near = seg[:, t + 1 - k:].sum(-1)
        with np.errstate(all="ignore"):
            shares.extend((near / total)[total > 0].tolist())
    return float(np.mean(shares)) if shares else float("nan")

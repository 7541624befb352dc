"""Influence curves by distance, per-sample decay fits with Student-t intervals, and the decay's shape
(paper Thm 3.1, Fig. 1, 7).

The independent unit is the *sample* (one input sequence). Rows of one sequence (its targets, its distances) are
correlated, so they are never resampled. Per sample the log10 influence of each target is re-indexed by distance
t − s and averaged over its targets (`--aggregate`: mean or median over targets), giving one curve per sample.
Every fit is then made per sample, and every interval is the Student-t interval of the per-sample estimates
(metrics/intervals.mean_interval): with one sample there is no interval.

Three shapes are fitted over the fit window (distances d, inclusive):
- exponential: log10 I ≈ a + slope·d, reported as rate = −slope·ln 10 per token (I ∝ exp(−rate·d)) and
  half-life ln 2 / rate;
- power law: log10 I ≈ a + exponent·log10 d (I ∝ d^exponent; exponent < 0 decays);
- none: log10 I ≈ a (no dependence on distance).
The shape is chosen by leave-one-sample-out prediction: each shape is fitted on the mean curve of the other
samples and scored by its squared error on the held-out sample's curve, both centred over the window (a sample's
overall level is not part of the shape). See `select_shape` for the verdicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import SsmdiagError
from .intervals import mean_interval, minimum_detectable, t_critical

TINY = float(np.finfo(np.float32).smallest_subnormal)  # an exact-zero influence is floored here (log10 ≈ -44.9)
DECAYS, RISES, NOT_DETECTED, NO_INTERVAL = "decays", "rises", "not detected", "no interval"
NO_DECAY = NOT_DETECTED  # the older name
EXPONENTIAL, POWER_LAW, NONE, UNDETERMINED = "exponential", "power_law", "none", "undetermined"
SHAPES = (EXPONENTIAL, POWER_LAW, NONE, UNDETERMINED)
MODELS = (EXPONENTIAL, POWER_LAW, NONE)  # the candidates of the held-out comparison
WIN_SHARE = 0.75  # the chosen shape must predict at least this share of held-out samples better than each rival
BANDS = ("near", "middle", "far")
LN10 = math.log(10)


@dataclass
class InfluenceCurve:
    """log10 influence per distance d = t − s (index = distance), over samples.

    band_low / band_high: 95% Student-t interval of the mean across samples at each distance (NaN with 1 sample).
    count: samples with a finite value at that distance.
    """

    distance: list[int]
    mean_log10: list[float]
    median_log10: list[float]
    band_low: list[float]
    band_high: list[float]
    count: list[int]
    statistic: str  # "mean" | "median": how targets are combined within a sample, and the curve drawn
    band: str  # how the band was computed

    def values(self) -> list[float]:
        """The curve drawn and fitted for R²: median_log10 or mean_log10, per `statistic`."""
        return self.median_log10 if self.statistic == "median" else self.mean_log10


@dataclass
class DecayFit:
    """Exponential fit over distances [fit_lo, fit_hi]: log10 I ≈ intercept + log10_slope·d, per sample.

    decay_rate is the mean of the per-sample rates (= the rate of the mean curve when every sample reaches every
    distance), decay_rate_ci95 their Student-t interval; half_life (and its interval) only when `verdict` is DECAYS.
    """

    fit_lo: int
    fit_hi: int
    points: int
    log10_slope: float  # decades per token (negative = decaying)
    intercept_log10: float
    decay_rate: float  # per token, natural-log units: I ∝ exp(-decay_rate · d)
    decay_rate_ci95: tuple[float, float] | None  # Student-t over samples; None with one sample
    half_life: float | None  # tokens, ln 2 / decay_rate; None unless the verdict is DECAYS
    r2: float  # of the line through the aggregated curve
    verdict: str = NO_INTERVAL  # decays | rises | not detected | no interval
    ci_method: str = "none"
    band: str = "all"  # "all" for the whole window, else one of BANDS
    half_life_ci95: tuple[float, float] | None = None
    samples: int = 0
    detectable: float | None = None  # smallest rate detectable with 80% power (set when not detected)
    note: str | None = None
    per_sample: list[float] = field(default_factory=list)  # each sample's rate: the interval's units


@dataclass
class PowerLawFit:
    """log10 I ≈ intercept + exponent·log10 d over distances [fit_lo, fit_hi] (d ≥ 1), per sample; I ∝ d^exponent."""

    fit_lo: int
    fit_hi: int
    points: int
    exponent: float
    exponent_ci95: tuple[float, float] | None
    intercept_log10: float
    r2: float
    ci_method: str = "none"
    samples: int = 0
    note: str | None = None
    per_sample: list[float] = field(default_factory=list)  # each sample's exponent


@dataclass
class ShapeChoice:
    """The selected shape, one sentence why, and each candidate's held-out error (mean over folds)."""

    shape: str
    reason: str
    heldout_error: dict[str, float] = field(default_factory=dict)
    wins: dict[str, int] = field(default_factory=dict)  # folds where the best beat each rival
    folds: int = 0


def rows_by_distance(rows: np.ndarray, targets: list[int]) -> tuple[np.ndarray, int]:
    """Re-index influence rows by distance and take log10.

    Args:
        rows: (samples, T, l) influence of source s on target targets[j]; entries s > t are ignored.
        targets: the T target positions.
    Returns:
        (samples, T, max(targets)+1) float64 log10 influence, NaN where t − s < 0; and the count of exact zeros.
    """
    samples, n_t, _ = rows.shape
    out = np.full((samples, n_t, max(targets) + 1), np.nan)
    zeros = 0
    for j, t in enumerate(targets):
        seg = rows[:, j, : t + 1][:, ::-1]  # distance 0..t
        zeros += int((seg <= 0).sum())
        out[:, j, : t + 1] = np.log10(np.maximum(seg, TINY))
    return out, zeros


def _stat(values: np.ndarray, statistic: str, axis: int) -> np.ndarray:
    """nanmean or nanmedian along `axis`, without warnings for all-NaN slices."""
    import warnings

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(values, axis=axis) if statistic == "median" else np.nanmean(values, axis=axis)


def sample_curves(logvals: np.ndarray, statistic: str = "mean") -> np.ndarray:
    """One curve per sample: the mean (or median) over its targets of log10 influence at each distance.

    Args:
        logvals: (samples, T, distances) from rows_by_distance. Returns (samples, distances).
    """
    return _stat(logvals, statistic, axis=1)


def aggregate_curve(curves: np.ndarray, statistic: str = "mean") -> InfluenceCurve:
    """Mean and median across samples per distance, with a 95% Student-t band of the mean across samples.

    Args:
        curves: (samples, distances) per-sample log10 curves (sample_curves).
    """
    curves = np.atleast_2d(curves)
    mean, median = _stat(curves, "mean", 0), _stat(curves, "median", 0)
    count = np.isfinite(curves).sum(0)
    with np.errstate(all="ignore"):
        sd = np.sqrt(np.nansum((curves - mean) ** 2, 0) / (count - 1))
        tcrit = np.array([t_critical(k - 1) if k >= 2 else np.nan for k in count])
        half = tcrit * sd / np.sqrt(count)
    n = curves.shape[0]
    how = (f"95% Student-t interval of the mean across {n} samples at each distance" if n >= 2
           else "none (one sample: a band needs ≥ 2 samples)")
    return InfluenceCurve(distance=list(range(curves.shape[1])), mean_log10=mean.tolist(),
                          median_log10=median.tolist(), band_low=(mean - half).tolist(),
                          band_high=(mean + half).tolist(), count=count.astype(int).tolist(), statistic=statistic,
                          band=how)


def common_distance(targets: list[int]) -> int:
    """The largest distance every target reaches: min(targets). Fits stay at or below it, so a curve averaged
    over several targets never mixes target populations inside the fit window."""
    return min(targets)


def auto_fit_range(max_distance: int) -> tuple[int, int]:
    """The default fit window (inclusive distances): skip the conv-local first few and the last ~5% (few pairs)."""
    return min(4, max_distance // 4), max_distance - max(1, math.ceil(0.05 * max_distance))


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and intercept of y on x over finite points (NaN with fewer than 2)."""
    ok = np.isfinite(y) & np.isfinite(x)
    if ok.sum() < 2:
        return float("nan"), float("nan")
    slope, inter = np.polyfit(x[ok], y[ok], 1)
    return float(slope), float(inter)


def _r2(x: np.ndarray, y: np.ndarray, slope: float, inter: float) -> float:
    ok = np.isfinite(y) & np.isfinite(x)
    if ok.sum() < 2 or not math.isfinite(slope):
        return float("nan")
    yv = y[ok]
    tot = ((yv - yv.mean()) ** 2).sum()
    return float(1.0 - ((yv - inter - slope * x[ok]) ** 2).sum() / tot) if tot > 0 else 1.0


def _per_sample_lines(x: np.ndarray, curves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slope and intercept of each sample's curve on x: (samples,) each."""
    lines = np.array([_line(x, y) for y in curves])
    return lines[:, 0], lines[:, 1]


def _window(curves, fit_range: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(samples, distances) curves, the window's distances, and the window's slice of the curves."""
    curves = np.atleast_2d(np.asarray(curves, dtype=float))
    lo, hi = fit_range
    if np.isfinite(_stat(curves[:, lo: hi + 1], "mean", 0)).sum() < 3:
        raise SsmdiagError(f"fit range {lo}:{hi} has fewer than 3 finite points",
                           hint="widen --fit-range (the influence may underflow to zero far away)")
    return curves, np.arange(lo, hi + 1, dtype=float), curves[:, lo: hi + 1]


def fit_decay(curves, fit_range: tuple[int, int], band: str = "all", statistic: str = "mean") -> DecayFit:
    """Exponential fit per sample over `fit_range` (inclusive); the rate's interval is Student-t over samples.

    Args:
        curves: (samples, distances) per-sample log10 curves, or one curve (distances,) = one sample.
        fit_range: inclusive distances (lo, hi). band: the name stored ("all" or one of BANDS).
        statistic: the aggregated curve the R² is computed on ("mean" | "median" across samples).
    """
    curves, x, window = _window(curves, fit_range)
    slopes, inters = _per_sample_lines(x, window)
    iv = mean_interval(-slopes * LN10, "samples")
    slope, inter = -iv.mean / LN10, float(np.nanmean(inters))
    r2 = _r2(x, _stat(window, statistic, 0), slope, inter)
    ci = iv.ci95
    verdict = NO_INTERVAL if ci is None else DECAYS if ci[0] > 0 else RISES if ci[1] < 0 else NOT_DETECTED
    half = math.log(2) / iv.mean if verdict == DECAYS else None
    half_ci = (math.log(2) / ci[1], math.log(2) / ci[0]) if verdict == DECAYS else None
    detectable = minimum_detectable(iv.se, iv.n - 1) if verdict == NOT_DETECTED else None
    return DecayFit(fit_lo=fit_range[0], fit_hi=fit_range[1], points=int(np.isfinite(window).any(0).sum()),
                    log10_slope=slope, intercept_log10=inter, decay_rate=iv.mean, decay_rate_ci95=ci,
                    half_life=half, r2=r2, verdict=verdict, ci_method=iv.method, band=band, half_life_ci95=half_ci,
                    samples=iv.n, detectable=detectable, note=iv.note, per_sample=(-slopes * LN10).tolist())


def fit_power_law(curves, fit_range: tuple[int, int], statistic: str = "mean") -> PowerLawFit:
    """Power-law fit per sample, log10 I ≈ a + exponent·log10 d over the window's distances ≥ 1.

    Args: as fit_decay. The exponent's interval is Student-t over the per-sample exponents.
    """
    lo = max(fit_range[0], 1)
    curves, x, window = _window(curves, (lo, fit_range[1]))
    lx = np.log10(x)
    slopes, inters = _per_sample_lines(lx, window)
    iv = mean_interval(slopes, "samples")
    inter = float(np.nanmean(inters))
    return PowerLawFit(fit_lo=lo, fit_hi=fit_range[1], points=int(np.isfinite(window).any(0).sum()),
                       exponent=iv.mean, exponent_ci95=iv.ci95, intercept_log10=inter,
                       r2=_r2(lx, _stat(window, statistic, 0), iv.mean, inter), ci_method=iv.method, samples=iv.n,
                       note=iv.note, per_sample=slopes.tolist())


def _design(model: str, x: np.ndarray) -> np.ndarray:
    """The abscissa of a candidate shape over the window (None: the constant)."""
    return x if model == EXPONENTIAL else np.log10(np.maximum(x, 1.0)) if model == POWER_LAW else np.zeros_like(x)


def heldout_errors(curves: np.ndarray, fit_range: tuple[int, int]) -> np.ndarray:
    """Leave-one-sample-out squared error of each candidate shape: (samples, len(MODELS)).

    Each shape is fitted (least squares) on the mean curve of the other samples and predicts the held-out
    sample's curve; both are centred over the window first, so only the shape is scored, not the sample's level.
    Distances ≥ max(lo, 1) (the power law needs d ≥ 1).

    Args:
        curves: (samples, distances) per-sample log10 curves, samples ≥ 2.
    """
    lo, hi = max(fit_range[0], 1), fit_range[1]
    x = np.arange(lo, hi + 1, dtype=float)
    window = curves[:, lo: hi + 1]
    errors = np.full((curves.shape[0], len(MODELS)), np.nan)
    for i in range(curves.shape[0]):
        train = _stat(np.delete(window, i, axis=0), "mean", 0)
        test = window[i]
        ok = np.isfinite(train) & np.isfinite(test)
        if ok.sum() < 3:
            continue
        for k, model in enumerate(MODELS):
            z = _design(model, x)[ok]
            slope = np.polyfit(z, train[ok], 1)[0] if model != NONE else 0.0
            pred = slope * (z - z.mean())
            errors[i, k] = float(np.mean((test[ok] - test[ok].mean() - pred) ** 2))
    return errors


def select_shape(curves, fit_range: tuple[int, int], fit: DecayFit, power: PowerLawFit) -> ShapeChoice:
    """Name the decay's shape from the samples: exponential, power_law, none or undetermined.

    - one sample: `undetermined` (shapes and intervals need ≥ 2 samples);
    - `none` when neither the exponential rate nor the power-law exponent is detected as decaying: "rises" when
      either interval lies on the rising side, else "not detected, would need > X"; `undetermined` when one
      falls and the other rises (not monotone over the window);
    - otherwise the shape with the lowest held-out error (heldout_errors), provided it predicts at least
      WIN_SHARE of the held-out samples better than each rival and its own decay is detected; else `undetermined`
      (the samples cannot separate the shapes).

    Args:
        curves: (samples, distances) per-sample log10 curves. fit, power: the window's fits of those curves.
    """
    curves = np.atleast_2d(np.asarray(curves, dtype=float))
    n = curves.shape[0]
    if n < 2 or fit.decay_rate_ci95 is None:
        return ShapeChoice(UNDETERMINED, "one sample: the shape and its intervals need ≥ 2 samples")
    exp_decays = fit.verdict == DECAYS
    pw = power.exponent_ci95
    pow_decays, pow_rises = pw is not None and pw[1] < 0, pw is not None and pw[0] > 0
    rises = fit.verdict == RISES or pow_rises
    if not exp_decays and not pow_decays:
        if rises:
            return ShapeChoice(NONE, "no decay: the influence rises with distance over the window")
        need = f" (would need a rate > {fit.detectable:.2g}/token)" if fit.detectable else ""
        return ShapeChoice(NONE, f"no decay detected: the rate's interval includes 0{need}")
    if rises:  # one fit falls while the other rises: the curve is not monotone over the window
        return ShapeChoice(UNDETERMINED, "the exponential and power-law fits disagree on the direction (the "
                                         "curve rises and falls within the window)")
    errors = heldout_errors(curves, fit_range)
    keep = np.isfinite(errors).all(1)
    errors = errors[keep]
    folds = int(keep.sum())
    if folds < 2:
        return ShapeChoice(UNDETERMINED, "fewer than 2 samples reach the window: shapes cannot be compared")
    mean_err = {m: float(errors[:, k].mean()) for k, m in enumerate(MODELS)}
    best = int(np.argmin(errors.mean(0)))
    wins = {m: int((errors[:, best] < errors[:, k]).sum()) for k, m in enumerate(MODELS) if k != best}
    choice = ShapeChoice(UNDETERMINED, "", mean_err, wins, folds)
    name = MODELS[best]
    worst = min(wins, key=wins.get)
    if wins[worst] < WIN_SHARE * folds:
        choice.reason = (f"held-out samples disagree: {name} predicts {wins[worst]} of {folds} better than "
                         f"{worst} (needs ≥ {math.ceil(WIN_SHARE * folds)})")
    elif name == NONE or (name == EXPONENTIAL and not exp_decays) or (name == POWER_LAW and not pow_decays):
        choice.reason = f"{name.replace('_', ' ')} predicts held-out samples best, but its own decay is not detected"
    else:
        choice.shape = name
        other = POWER_LAW if name == EXPONENTIAL else EXPONENTIAL
        ratio = mean_err[other] / mean_err[name] if mean_err[name] > 0 else float("inf")
        choice.reason = (f"{name.replace('_', ' ')} predicts {wins[other]} of {folds} held-out samples better than "
                         f"{other.replace('_', ' ')} (held-out error {ratio:.3g}× lower)")
    return choice


def band_ranges(fit_range: tuple[int, int]) -> list[tuple[int, int]]:
    """The fit window cut into len(BANDS) equal distance bands (inclusive; neighbours share an end point)."""
    lo, hi = fit_range
    edges = np.linspace(lo, hi, len(BANDS) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def fit_bands(curves, fit_range: tuple[int, int], statistic: str = "mean") -> list[DecayFit]:
    """One exponential fit per distance band of the window (near, middle, far), per sample with t intervals:
    a mixture of rates shows as different rates. Bands with fewer than 3 finite points are left out.

    Args:
        curves: (samples, distances) per-sample log10 curves, or one curve. fit_range: the whole window.
    """
    curves = np.atleast_2d(np.asarray(curves, dtype=float))
    fits = []
    for name, (lo, hi) in zip(BANDS, band_ranges(fit_range)):
        if np.isfinite(_stat(curves[:, lo: hi + 1], "mean", 0)).sum() >= 3:
            fits.append(fit_decay(curves, (lo, hi), band=name, statistic=statistic))
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

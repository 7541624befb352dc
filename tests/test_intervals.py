"""metrics/intervals.py checked like a kernel: by simulation on data of known truth, at the sample counts users run.

A nominal 95% interval must cover the truth 90–98% of the time at n = 2, 3, 4 (every command's default is 4; 2 is
the minimum for an interval, 3 the grid's seeds) and 8, on normal and on skewed data (gamma, log-normal: effects
such as KL values are positive and skewed). 2000 draws per case, fixed seeds, so every figure is reproducible; the
binomial standard error of a coverage of 0.95 over 2000 draws is 0.005.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ssmdiag.metrics.intervals import (compare_paired, compare_unpaired, log_mean_interval, mean_interval,
                                       minimum_detectable, t_critical, t_quantile)

REPS = 2000
NS = [2, 3, 4, 8]
EULER = 0.5772156649015329
DIGAMMA = {0.5: -EULER - 2 * math.log(2), 2.0: 1 - EULER}  # ψ(k): E[ln X] = ψ(k) + ln θ for X ~ Gamma(k, θ)


def _coverage(intervals, truth) -> float:
    return sum(lo <= truth <= hi for lo, hi in intervals) / len(intervals)


def test_t_quantiles_known_values():
    assert t_critical(1) == pytest.approx(12.7062047362, rel=1e-9)
    assert t_critical(2) == pytest.approx(4.30265272975, rel=1e-9)
    assert t_critical(4) == pytest.approx(2.7764451052, rel=1e-9)
    assert t_critical(float("inf")) == pytest.approx(1.95996398454, rel=1e-9)
    assert t_quantile(0.8, 1) == pytest.approx(1.37638192047, rel=1e-9)
    assert t_quantile(0.025, 3) == pytest.approx(-t_critical(3))
    assert math.isnan(t_quantile(0.5, 0))


MEANS = {  # name: (draw(rng, shape), true mean)
    "normal": (lambda rng, s: rng.normal(1.0, 2.0, s), 1.0),
    "gamma(2)": (lambda rng, s: rng.gamma(2.0, 1.0, s), 2.0),
}


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("dist", list(MEANS))
def test_mean_interval_covers(dist, n):
    draw, truth = MEANS[dist]
    rows = draw(np.random.default_rng(n), (REPS, n))
    ivs = [mean_interval(row.tolist()) for row in rows]
    assert all(iv.n == n and iv.unit == "samples" for iv in ivs)
    assert 0.90 <= _coverage([iv.ci95 for iv in ivs], truth) <= 0.98


GEOMETRIC = {  # name: (draw, true geometric mean exp(E ln X))
    "lognormal": (lambda rng, s: rng.lognormal(1.0, 1.5, s), math.e),
    "gamma(0.5)": (lambda rng, s: rng.gamma(0.5, 1.0, s), math.exp(DIGAMMA[0.5])),  # many values near 0, like KL
    "gamma(2)": (lambda rng, s: rng.gamma(2.0, 3.0, s), 3.0 * math.exp(DIGAMMA[2.0])),
}


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("dist", list(GEOMETRIC))
def test_log_mean_interval_covers_the_geometric_mean(dist, n):
    draw, truth = GEOMETRIC[dist]
    rows = draw(np.random.default_rng(10 + n), (REPS, n))
    assert 0.90 <= _coverage([log_mean_interval(row.tolist()).ci95 for row in rows], truth) <= 0.98


def _pairs(rng, n, dist, shared_sd):
    """Two arms measured on the same n units: a unit effect shared by both (sd shared_sd) plus each arm's own noise.
    The true difference first − second is 0.5."""
    shared = rng.normal(0.0, shared_sd, n) if dist == "normal" else shared_sd * rng.gamma(2.0, 1.0, n)
    if dist == "normal":
        return shared + rng.normal(0.5, 1.0, n), shared + rng.normal(0.0, 1.0, n)
    return shared + rng.gamma(2.0, 1.0, n), shared + rng.gamma(2.0, 1.0, n) - 0.5


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("dist", ["normal", "gamma"])
def test_compare_paired_covers(dist, n):
    rng = np.random.default_rng(20 + n)
    cs = [compare_paired(*(x.tolist() for x in _pairs(rng, n, dist, 3.0))) for _ in range(REPS)]
    assert all(c.paired and c.n == n and c.df == n - 1 for c in cs)
    assert 0.90 <= _coverage([c.ci95 for c in cs], 0.5) <= 0.98


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("dist", ["normal", "gamma"])
def test_compare_unpaired_covers(dist, n):
    """Welch on independent groups. At n = 2 its Welch–Satterthwaite df (between 1 and 2) makes it conservative:
    98.1% measured on normal data (wider than needed, never narrower), hence 0.99 there."""
    rng = np.random.default_rng(30 + n)
    cs = [compare_unpaired(*(x.tolist() for x in _pairs(rng, n, dist, 0.0))) for _ in range(REPS)]
    assert all(not c.paired for c in cs)
    assert 0.90 <= _coverage([c.ci95 for c in cs], 0.5) <= (0.99 if n == 2 else 0.98)


@pytest.mark.parametrize("n", [2, 4])
def test_pairing_narrows_the_interval_on_correlated_units(n):
    """The same correlated pairs (unit effect sd 3, arm noise sd 1): the paired interval is much narrower than
    Welch's, which ignores the design, and both still cover."""
    rng = np.random.default_rng(40 + n)
    paired, welch = [], []
    for _ in range(REPS):
        a, b = (x.tolist() for x in _pairs(rng, n, "normal", 3.0))
        paired.append(compare_paired(a, b).ci95)
        welch.append(compare_unpaired(a, b).ci95)
    width = lambda cis: np.mean([hi - lo for lo, hi in cis])  # noqa: E731
    assert width(paired) < 0.7 * width(welch)
    assert 0.90 <= _coverage(paired, 0.5) <= 0.98 and _coverage(welch, 0.5) >= 0.95


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_a_true_difference_of_the_mdd_is_usually_detected(n):
    """mdd is the 80%-power difference of the t test (through the noncentral t). A true difference of that size
    (σ = 1 and SE = 1/√n) is detected 80% of the time at every n (the (t_.975 + t_.80)·SE shortcut gave 73% at n = 2);
    half of it far less often, and with no difference the verdict is 'higher' or 'lower' about 5% of the time."""
    rng = np.random.default_rng(50 + n)
    delta = minimum_detectable(1 / math.sqrt(n), n - 1)

    def detected(shift):
        return sum(compare_paired(rng.normal(shift, 1.0, n).tolist(), [0.0] * n).verdict == "higher"
                   for _ in range(REPS)) / REPS

    assert 0.75 <= detected(delta) <= 0.86
    assert detected(delta / 2) < 0.5
    null = [compare_paired(rng.normal(0.0, 1.0, n).tolist(), [0.0] * n) for _ in range(REPS)]
    assert 0.02 <= sum(c.verdict in ("higher", "lower") for c in null) / REPS <= 0.08
    assert all(c.text.startswith("not detected (would need > ") for c in null if c.verdict == "not detected")


def test_no_spread_says_so_instead_of_a_zero_mdd():
    c = compare_paired([0.4, 0.4, 0.4], [0.4, 0.4, 0.4])
    assert c.verdict == "not detected" and "same in every one of the 3" in c.text

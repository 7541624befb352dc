"""Sharpness and Ā-spectrum maths on plain tensors: known answers, the pdist reference, Theorem 4.2's EMA case."""

from __future__ import annotations

import math
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from ssmdiag.metrics import sharpness as sh
from ssmdiag.metrics.intervals import mean_interval
from ssmdiag.metrics.sharpness import compute_sharpness, depth_slope, sharpness_ref
from ssmdiag.metrics.smoothing import compare_slopes, norm_free_slopes
from ssmdiag.metrics.spectrum import abar_extrema_ref, summarize_spectrum


@pytest.mark.parametrize("pairs", [None, 50])
def test_constant_sequence_has_zero_sharpness(pairs):
    x = torch.full((40, 24), 3.7)
    s = compute_sharpness(x, pairs=pairs)
    assert s.mean == 0 and s.max == 0 and s.scale_free == 0
    assert s.cosine == pytest.approx(1.0)
    assert s.exact is (pairs is None)


def test_known_distances_triangle():
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)  # pairwise distances 3, 4, 5
    assert compute_sharpness(x.float()).mean == pytest.approx(4.0, rel=1e-6)
    s = compute_sharpness(x)
    assert s.mean == pytest.approx(4.0, abs=1e-12)
    assert s.max == pytest.approx(5.0, abs=1e-12)
    assert s.mean_norm == pytest.approx(7 / 3)
    assert s.scale_free == pytest.approx(4.0 / (7 / 3))
    assert s.cosine == pytest.approx(0.0, abs=1e-12)  # the zero vector counts 0; (3,0)·(0,4) = 0
    assert s.pairs == 3 and s.exact


def test_known_distances_line_and_simplex():
    T = 31
    line = torch.arange(T, dtype=torch.float64).unsqueeze(1) * torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    s = compute_sharpness(line)  # |i − j| over pairs: mean (T + 1) / 3, max T − 1
    assert s.mean == pytest.approx((T + 1) / 3, rel=1e-12)
    assert s.max == pytest.approx(T - 1, rel=1e-12)
    simplex = torch.eye(12)  # every pair at distance √2, cosine 0
    s = compute_sharpness(simplex)
    assert s.mean == pytest.approx(math.sqrt(2), rel=1e-6) and s.max == pytest.approx(math.sqrt(2), rel=1e-6)
    assert s.cosine == pytest.approx(0.0, abs=1e-7)


def test_matches_pdist_reference_with_offset_and_chunks(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(70, 9, dtype=torch.float64) * 0.01 + 50.0  # nearly equal tokens far from 0: cancellation
    ref = sharpness_ref(x)
    monkeypatch.setattr(sh, "CHUNK_BYTES", 8 * 4 * 70 * 3)  # 3 rows per chunk
    got = compute_sharpness(x)
    for f in ("mean", "max", "mean_norm", "scale_free", "cosine"):
        assert getattr(got, f) == pytest.approx(getattr(ref, f), rel=1e-9), f
    got32 = compute_sharpness(x.float())  # float32 input: the centred Gram keeps ~1e-5 relative accuracy
    assert got32.mean == pytest.approx(ref.mean, rel=1e-4)
    assert got32.max == pytest.approx(ref.max, rel=1e-4)


def test_parts_are_heads_measured_alone_and_together():
    torch.manual_seed(1)
    x = torch.randn(30, 3, 5, dtype=torch.float64)  # (l, heads, features)
    s = compute_sharpness(x)
    whole = sharpness_ref(x.reshape(30, -1))
    assert s.mean == pytest.approx(whole.mean, rel=1e-10) and s.max == pytest.approx(whole.max, rel=1e-10)
    for k in range(3):
        part = sharpness_ref(x[:, k])
        assert s.parts_mean[k] == pytest.approx(part.mean, rel=1e-10)
        assert s.parts_max[k] == pytest.approx(part.max, rel=1e-10)


def test_sampled_pairs_estimate_the_exact_values():
    torch.manual_seed(2)
    x = torch.randn(200, 16)
    exact = compute_sharpness(x)
    sampled = compute_sharpness(x, pairs=5000, seed=3)
    assert not sampled.exact and sampled.pairs == 5000
    assert sampled.mean == pytest.approx(exact.mean, rel=0.02)
    assert sampled.max <= exact.max + 1e-5  # a lower bound
    assert compute_sharpness(x, pairs=10**9).exact  # more pairs than exist: exact
    assert compute_sharpness(x, pairs=5000, seed=3).mean == sampled.mean  # seeded


def test_depth_slope():
    assert depth_slope([math.exp(-0.1 * i) for i in range(10)]) == pytest.approx(-0.1)
    assert depth_slope([1.0, 3.0, 5.0], log=False) == pytest.approx(2.0)
    assert math.isnan(depth_slope([1.0]))


def ema_states(x: torch.Tensor, abar: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """h_t = Ā_t h_{t−1} + gain·(1 − Ā_t) x_t from h_0 = 0; x (l, d), abar (l,) or (l, d)."""
    h = torch.zeros(x.shape[1], dtype=x.dtype)
    out = []
    for t in range(x.shape[0]):
        a = abar[t]
        h = a * h + gain * (1 - a) * x[t]
        out.append(h)
    return torch.stack(out)


def test_theorem_4_2_ema_layer_does_not_sharpen():
    """Theorem 4.2's setting: Ā_t ∈ [0, 1], B̄_t = 1 − Ā_t, state starting inside the inputs' hull (x_1 = 0 = h_0).

    Every h_t is then a convex combination of x_1 … x_t, so max_{t,s} ‖h_t − h_s‖ ≤ max_{t,s} ‖x_t − x_s‖.
    """
    torch.manual_seed(4)
    x = torch.randn(120, 6, dtype=torch.float64)
    x[0] = 0
    abar = torch.rand(120, dtype=torch.float64)  # selective: a different Ā at every token
    s_in, s_h = compute_sharpness(x), compute_sharpness(ema_states(x, abar))
    assert s_h.max <= s_in.max and s_h.mean <= s_in.mean
    # per channel (diagonal Ā differing by channel) the bound holds channel by channel
    abar_c = torch.rand(120, 6, dtype=torch.float64)
    h = ema_states(x, abar_c)
    for d in range(6):
        assert compute_sharpness(h[:, d:d + 1]).max <= compute_sharpness(x[:, d:d + 1]).max + 1e-12
    # not vacuous: an input gain above 1 breaks the assumption and the states do get sharper
    assert compute_sharpness(ema_states(x, abar * 0.3, gain=4.0)).max > s_in.max


def test_abar_extrema_closed_form():
    A = -torch.tensor([[0.5, 2.0], [1e-4, 30.0]])  # (d, n)
    delta = torch.tensor([[[0.1, 1.0], [2.0, 0.5], [0.7, 3.0]]])  # (b=1, l=3, d=2)
    lo, hi = abar_extrema_ref(delta, A)
    dmin, dmax = delta[0].min(0).values, delta[0].max(0).values  # Ā falls as Δ grows (A < 0)
    torch.testing.assert_close(hi, torch.exp(dmin.unsqueeze(1) * A))
    torch.testing.assert_close(lo, torch.exp(dmax.unsqueeze(1) * A))
    lo2, hi2 = abar_extrema_ref(torch.full((2, 5, 3), 0.5), -torch.tensor([1.0, 2.0, 3.0]))  # Mamba-2 (h,)
    torch.testing.assert_close(lo2, torch.exp(-0.5 * torch.tensor([1.0, 2.0, 3.0])))
    torch.testing.assert_close(hi2, lo2)


def test_spectrum_shares_and_curve():
    lo = torch.tensor([0.001, 0.5, 0.005, 0.9])  # 4 channels of one layer
    hi = torch.tensor([0.995, 0.6, 0.2, 0.999])
    spec = summarize_spectrum([lo], [hi])
    assert spec.near_one == 0.5 and spec.near_zero == 0.5 and spec.both == 0.25
    layer = spec.layers[0]
    assert (layer.near_one, layer.near_zero, layer.both, layer.channels) == (0.5, 0.5, 0.25, 4)
    t = spec.thresholds
    assert spec.curve_max[t.index(0.5)] == 0.25 and spec.curve_max[t.index(1.0)] == 1.0
    assert spec.curve_min[t.index(0.01)] == 0.5 and spec.curve_max[0] == 0.0
    assert sum(spec.horizon_counts) == 4
    # horizons 1/(1 − max Ā): 200, 2.5, 1.25, 1000 tokens
    edges = spec.horizon_edges
    for h in (200.0, 2.5, 1.25, 1000.0):
        i = max(k for k, e in enumerate(edges) if e <= h)
        assert spec.horizon_counts[i] >= 1


# --- the norm-free headline ---------------------------------------------------------------------------------
def test_norm_growth_without_direction_collapse_has_zero_norm_free_slope():
    """Layer l = 1.5^l · (X rotated by a random orthogonal Q_l): norms grow, directions never collapse. The mean
    distance grows by ln 1.5 per layer; the norm-free slope is 0 in every sample."""
    gen = torch.Generator().manual_seed(0)
    layers, samples = 8, 3
    values = [[None] * samples for _ in range(layers)]  # [layer][sample] scale-free sharpness
    mean_dist = [[None] * samples for _ in range(layers)]
    for s in range(samples):
        x = torch.randn(40, 16, generator=gen, dtype=torch.float64)
        for layer in range(layers):
            q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
            y = 1.5**layer * x @ q
            sh_ = compute_sharpness(y)
            values[layer][s], mean_dist[layer][s] = sh_.scale_free, sh_.mean
    assert depth_slope([mean_dist[i][0] for i in range(layers)]) == pytest.approx(math.log(1.5), rel=1e-9)
    slope, ci, per_sample = norm_free_slopes(values)
    assert abs(slope) < 1e-9 and all(abs(v) < 1e-9 for v in per_sample)
    assert ci[0] <= 0 <= ci[1]


def test_collapsing_directions_give_a_negative_norm_free_slope():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 8, generator=gen, dtype=torch.float64)
    common = torch.randn(8, generator=gen, dtype=torch.float64) * 10
    values = [[compute_sharpness(common + 0.7**layer * x).scale_free] for layer in range(6)]  # one sample
    slope, ci, _ = norm_free_slopes(values)
    assert slope < -0.2 and ci is None


def _slopes(name_samples, digest="ids"):
    samples = list(name_samples)
    return NS(norm_free_slope=sum(samples) / len(samples), norm_free_slope_samples=samples, input_digest=digest)


def test_mean_interval_and_paired_comparison_known_answers():
    iv = mean_interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.hi - iv.mean == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    a = _slopes([-0.031, -0.030, -0.029])
    b = _slopes([-0.001, 0.0, 0.001])
    cmp = compare_slopes(("mamba", a), ("pythia", b))
    assert cmp.paired and cmp.difference == pytest.approx(-0.03) and cmp.ci95 == pytest.approx((-0.03, -0.03))
    assert cmp.verdict == "lower" and cmp.text == "mamba smooths faster"
    same = compare_slopes(("x", b), ("y", _slopes([0.001, 0.0, -0.001])))
    assert same.ci95[0] < 0 < same.ci95[1] and same.verdict == "not detected"
    assert same.text.startswith("not detected (would need > ") and same.mdd > 0


def test_paired_slopes_see_through_sample_difficulty_that_welch_cannot():
    """Per-sample slopes vary a lot from sequence to sequence, but model a's is 0.01 below b's on every sample:
    paired by sample the difference is exact; on different samples (digests differ) Welch cannot see it."""
    base = [-0.05, 0.02, -0.11, 0.07]
    a, b = _slopes([x - 0.01 for x in base]), _slopes(base)
    paired = compare_slopes(("a", a), ("b", b))
    assert paired.paired and paired.ci95 == pytest.approx((-0.01, -0.01)) and paired.text == "a smooths faster"
    welch = compare_slopes(("a", a), ("b", _slopes(base, digest="other text windows")))
    assert not welch.paired and welch.verdict == "not detected" and "Welch" in welch.note


@pytest.mark.parametrize("samples", [2, 4])  # smooth's minimum for an interval and its default
def test_norm_free_slope_interval_covers_the_true_slope(samples):
    """2000 synthetic runs of 6 layers: each sample's ln scale-free sharpness falls by a slope drawn around −0.03
    (sd 0.01 across samples) plus layer noise; the interval of the mean slope covers −0.03 in 90–98% of runs."""
    rng = np.random.default_rng(samples)
    hits = 0
    for _ in range(2000):
        slope = rng.normal(-0.03, 0.01, samples)
        logs = np.log(1.4) + np.arange(6)[:, None] * slope + rng.normal(0, 0.005, (6, samples))
        _, ci, _ = norm_free_slopes(np.exp(logs).tolist())
        hits += ci[0] <= -0.03 <= ci[1]
    assert 0.90 <= hits / 2000 <= 0.98, hits

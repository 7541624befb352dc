"""Influence metrics: closed-form hidden attention, estimators, fits, and analytic checks on hand-set tiny SSMs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssmdiag.adapters import get_adapter
from ssmdiag.errors import SsmdiagError
from ssmdiag.metrics.hidden_attention import hidden_attention_map, hidden_attention_ref, hidden_attention_row
from ssmdiag.metrics.influence import (compute_influence, influence_rows, measure_bound, per_layer_rows,
                                       prepare_for_gradients, summarize_influence, summarize_layers)
from ssmdiag.metrics.influence_fit import (DECAYS, NOT_DETECTED, RISES, band_ranges, fit_bands, fit_decay,
                                           near_share)
from ssmdiag.metrics.spectrum import slowest_channel_rates, summarize_bound
from ssmdiag.parse import parse_fit_range, parse_targets
from tinymodels import make_model


def _mamba1_inputs(b=2, L=10, d=5, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, L, d, generator=g) * 0.5, -torch.rand(d, n, generator=g) * 3 - 0.1,
            torch.randn(b, L, n, generator=g), torch.randn(b, L, n, generator=g))


def _mamba2_inputs(b=2, L=10, h=4, g_=2, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, L, h, generator=g) * 0.5, -torch.rand(h, generator=g) * 3 - 0.1,
            torch.randn(b, L, g_, n, generator=g), torch.randn(b, L, g_, n, generator=g))


# --- closed form ------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [_mamba1_inputs, _mamba2_inputs])
def test_hidden_attention_row_and_map_match_the_triple_loop(make):
    delta, A, B, C = make()
    ref = hidden_attention_ref(delta, A, B, C)
    for t in (0, 4, 9):
        torch.testing.assert_close(hidden_attention_row(delta, A, B, C, t), ref[:, t, : t + 1])
    full = hidden_attention_map(delta, A, B, C, reduce="none", max_bytes=1500)  # forces many target blocks
    torch.testing.assert_close(full, ref)
    torch.testing.assert_close(hidden_attention_map(delta, A, B, C), ref.norm(dim=-1))


def _scan(u, delta, A, B, C):
    """A plain sequential Mamba-1 scan without D: u, delta (b, l, d); A (d, n); B, C (b, l, n) -> y (b, l, d)."""
    h = torch.zeros(u.shape[0], u.shape[2], A.shape[1], dtype=torch.float64)
    ys = []
    for k in range(u.shape[1]):
        h = torch.exp(delta[:, k, :, None] * A) * h + (delta[:, k, :, None] * B[:, k, None, :]) * u[:, k, :, None]
        ys.append((h * C[:, k, None, :]).sum(-1))
    return torch.stack(ys, 1)


def test_hidden_attention_is_the_scan_jacobian():
    delta, A, B, C = (x.double() for x in _mamba1_inputs(b=1, L=8))
    u = torch.randn(1, 8, 5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda x: _scan(x, delta, A, B, C), u)  # (1, l, d, 1, l, d)
    row = hidden_attention_row(delta, A, B, C, 7)[0]  # (8, d)
    diag = torch.stack([torch.diagonal(jac[0, 7, :, 0, s, :]) for s in range(8)])
    torch.testing.assert_close(row, diag)


def test_zero_abar_channels_give_zeros_not_nan():
    delta, A, B, C = _mamba1_inputs(L=12)
    A = A.clone()
    A[0] = -float("inf")  # Ā ≡ 0 on channel 0: only s = t survives
    row = hidden_attention_row(delta, A, B, C, 11)
    full = hidden_attention_map(delta, A, B, C, reduce="none")
    assert torch.isfinite(row).all() and torch.isfinite(full).all()
    assert (row[:, :11, 0] == 0).all() and (row[:, 11, 0] != 0).all()
    torch.testing.assert_close(full[:, 11, :12], row)


# --- fits and parsing -----------------------------------------------------------------------------
def test_fit_recovers_an_exact_exponential():
    d = np.arange(50)
    curves = np.stack([-0.02 * d + 1.0, -0.02 * d + 1.3])  # two samples, the same rate at different levels
    fit = fit_decay(curves, (4, 45))
    assert fit.decay_rate == pytest.approx(0.02 * math.log(10)) and fit.verdict == DECAYS
    assert fit.half_life == pytest.approx(math.log(2) / (0.02 * math.log(10)))
    assert fit.r2 == pytest.approx(1.0) and fit.points == 42 and fit.samples == 2
    one = fit_decay(-0.02 * d + 1.0, (4, 45))  # one sample: the rate, but no interval and no half-life
    assert one.decay_rate == pytest.approx(fit.decay_rate) and one.decay_rate_ci95 is None and one.half_life is None


def test_near_share_and_targets_and_fit_range():
    rows = np.ones((2, 1, 20))
    assert near_share(rows, [19]) == pytest.approx(0.1)
    assert parse_targets("last,middle,3,-2", 20) == [3, 10, 18, 19]
    assert parse_fit_range("auto", 99) == (4, 94) and parse_fit_range("2:", 10) == (2, 10)
    with pytest.raises(SsmdiagError, match="outside"):
        parse_targets("25", 20)
    with pytest.raises(SsmdiagError, match="at least 3"):
        parse_fit_range("5:6", 30)
    with pytest.raises(SsmdiagError, match="LO:HI"):
        parse_fit_range("five", 30)


# --- estimators ---------------------------------------------------------------------------------
def _linear_forward(a: float, M: torch.Tensor):
    """y_t = Σ_{s≤t} a^{t-s} M x_s: a linear causal model whose Jacobian blocks are a^{t-s} M."""
    def forward(x):  # (b, l, e) -> (b, l, o)
        L = x.shape[1]
        dist = torch.arange(L)[:, None] - torch.arange(L)[None, :]
        K = torch.where(dist >= 0, a ** dist.clamp(min=0).double(), torch.zeros((), dtype=torch.float64)).to(x.dtype)
        return torch.einsum("ts,bse,oe->bto", K, x, M)
    return forward


def test_grad_and_jacobian_agree_exactly_on_a_one_dimensional_output():
    fwd = _linear_forward(0.8, torch.randn(1, 6))
    x = torch.randn(2, 12, 6)
    g = influence_rows(fwd, x, [11, 6], "grad", generator=torch.Generator().manual_seed(0))
    j = influence_rows(fwd, x, [11, 6], "jacobian", probes=3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(g, j)


def test_linear_model_rates_and_frobenius_estimate():
    torch.manual_seed(0)
    M = torch.randn(8, 6)
    fwd = _linear_forward(0.9, M)
    x = torch.randn(1, 30, 6)
    g = influence_rows(fwd, x, [29], "grad", generator=torch.Generator().manual_seed(0)).numpy()
    j = influence_rows(fwd, x, [29], "jacobian", probes=64, generator=torch.Generator().manual_seed(0)).numpy()
    for rows in (g, j):  # both exactly exponential in distance: the same rate, -ln 0.9
        summary, _ = summarize_influence(rows, [29], (1, 28))
        assert summary.fit.decay_rate == pytest.approx(-math.log(0.9), rel=1e-4)
    exact = 0.9 ** np.arange(29, -1, -1) * torch.linalg.matrix_norm(M).item()  # ‖a^{t-s} M‖_F
    np.testing.assert_allclose(j[0, 0], exact, rtol=0.05)


# --- analytic SSMs and tiny models ----------------------------------------------------------------
def lti_mamba(a_log: float, delta: float, seed: int = 0):
    """A one-layer Mamba made linear time-invariant by hand: Ā = exp(-exp(a_log)·δ) on every channel.

    Δ is fixed (dt_proj weight 0, bias softplus⁻¹(δ)); half the channels get a zero conv kernel and bias 1, so
    their scan input is constant, and x_proj reads B and C only from them: B, C are constant.
    """
    model = make_model("mamba", seed=seed, num_hidden_layers=1, hidden_size=16, state_size=4, time_step_rank=2)
    mix = model.backbone.layers[0].mixer
    half, rank = mix.intermediate_size // 2, mix.time_step_rank
    with torch.no_grad():
        mix.A_log.fill_(a_log)
        mix.dt_proj.weight.zero_()
        mix.dt_proj.bias.fill_(math.log(math.expm1(delta)))
        mix.conv1d.weight[half:] = 0.0
        mix.conv1d.bias[half:] = 1.0
        mix.conv1d.bias[:half] = 0.0
        mix.x_proj.weight[rank:, :half] = 0.0
    return model


def _rate(model, samples=6, L=48, targets=None, seed=0):
    prepare_for_gradients(model)
    ids = torch.randint(0, 384, (samples, L), generator=torch.Generator().manual_seed(seed))
    targets = targets or [L - 1]
    rows = compute_influence(get_adapter(model), ids, targets)
    summary, _ = summarize_influence(rows, targets, parse_fit_range(None, max(targets)))
    return summary.fit, rows


def test_abar_one_everywhere_does_not_decay():
    fit, _ = _rate(lti_mamba(a_log=-30.0, delta=0.1))  # A ≈ -1e-13: Ā = 1 in fp32
    assert abs(fit.decay_rate) < 0.006


@pytest.mark.parametrize("a_log,delta", [(0.0, 0.1), (math.log(4.0), 0.05)])
def test_constant_abar_decays_at_log_c(a_log, delta):
    log_c = -math.exp(a_log) * delta  # Ā = c = exp(A·Δ)
    fit, _ = _rate(lti_mamba(a_log, delta))
    assert fit.decay_rate == pytest.approx(-log_c, rel=0.05)
    assert fit.r2 > 0.95


def test_tiny_mamba_decays_and_gpt_neox_does_not():
    mamba, _ = _rate(make_model("mamba"), samples=4, L=64)
    neox, _ = _rate(make_model("gpt_neox"), samples=4, L=64)
    assert mamba.decay_rate_ci95[0] > 0.01  # significantly decaying
    assert abs(neox.decay_rate) < mamba.decay_rate / 4


def _mamba1_params(model, ids):
    """Δ, A, B, C of the first mixer, recomputed from its submodules (transformers' MambaMixer layout)."""
    mix = model.backbone.layers[0].mixer
    seen = {}
    hook = mix.register_forward_pre_hook(lambda mod, args: seen.setdefault("h", args[0]))
    with torch.no_grad():
        model(ids)
        hook.remove()
        xs, _ = mix.in_proj(seen["h"]).transpose(1, 2).chunk(2, dim=1)
        xs = F.silu(mix.conv1d(xs)[..., : ids.shape[1]]).transpose(1, 2)
        dt, B, C = torch.split(mix.x_proj(xs), [mix.time_step_rank, mix.ssm_state_size, mix.ssm_state_size], -1)
        return F.softplus(mix.dt_proj(dt)), -torch.exp(mix.A_log.float()), B, C


def test_closed_form_rate_agrees_with_gradients_on_one_layer():
    model = make_model("mamba", seed=1, num_hidden_layers=1)
    L, samples = 64, 4
    grad_fit, rows = _rate(model, samples=samples, L=L, seed=1)
    ids = torch.randint(0, 384, (samples, L), generator=torch.Generator().manual_seed(1))
    _, closed = per_layer_rows(model, get_adapter(model), ids, [L - 1])  # via kernels.mixer.record: (1, samples, 1, L)
    for i in range(samples):  # the recorded Δ, B, C are the mixer's own
        mine = hidden_attention_row(*_mamba1_params(model, ids[i: i + 1]), L - 1)[0].norm(dim=-1).numpy()
        np.testing.assert_allclose(closed[0, i, 0], mine, rtol=1e-4)
    layers = summarize_layers(closed, [L - 1], (grad_fit.fit_lo, grad_fit.fit_hi))
    assert layers[0].decay_rate == pytest.approx(grad_fit.decay_rate, rel=0.3)


def test_per_layer_rows_on_mamba2_are_finite_and_causal():
    model = make_model("mamba2")
    ids = torch.randint(0, 384, (1, 20), generator=torch.Generator().manual_seed(0))
    _, rows = per_layer_rows(model, get_adapter(model), ids, [10, 19])  # (layers, samples, T, l)
    assert rows.shape == (2, 1, 2, 20) and np.isfinite(rows).all()
    assert (rows[:, :, 0, 11:] == 0).all() and (rows[:, :, 0, :11] > 0).all()


# --- verdicts, bands, the Ā bound (known answers) ----------------------------------------------------
def test_flat_curve_gets_no_exponential_decay_and_no_half_life():
    """Flat noisy influence with a rise at the far end (the trained transformer's shape): no decay, no half-life."""
    rng = np.random.default_rng(0)
    L = 200
    rows = 10 ** (rng.normal(0.0, 0.3, size=(4, 1, L)))  # flat in distance, noisy
    rows[:, 0, :12] *= 10.0  # far-end rise: the first sources (largest distances) weigh more
    summary, _ = summarize_influence(rows, [L - 1], parse_fit_range(None, L - 1))
    assert summary.fit.verdict != DECAYS and summary.fit.half_life is None and summary.shape == "none"
    assert summary.fit.decay_rate_ci95 is not None  # the numbers stay beside the verdict


def test_verdict_is_the_rates_interval_across_samples():
    d = np.arange(100.0)
    rng = np.random.default_rng(1)
    noisy = -0.001 * d + rng.normal(0, 0.5, (3, 100))  # a tilt inside the noise
    fit = fit_decay(noisy, (4, 95))
    assert fit.verdict == NOT_DETECTED and fit.half_life is None and fit.detectable > fit.decay_rate_ci95[1] / 2
    rising = fit_decay(np.stack([0.01 * d, 0.0101 * d]), (4, 95))
    assert rising.decay_rate < 0 and rising.verdict == RISES and rising.half_life is None


def test_two_rate_mixture_shows_both_rates_in_the_bands():
    """I(d) = exp(-0.1 d) + 2e-3·exp(-0.01 d): near distances fall at ~0.1, far ones at 0.01 per token."""
    d = np.arange(200.0)
    y = np.log10(np.exp(-0.1 * d) + 2e-3 * np.exp(-0.01 * d))
    window = (4, 190)
    bands = {b.band: b for b in fit_bands(y, window)}
    assert band_ranges(window) == [(4, 66), (66, 128), (128, 190)]
    assert bands["near"].decay_rate == pytest.approx(0.1, rel=0.3)
    assert bands["far"].decay_rate == pytest.approx(0.01, rel=0.02)
    single = fit_decay(y, window)
    assert bands["far"].decay_rate < single.decay_rate < bands["near"].decay_rate


def test_fits_only_use_distances_every_target_reaches():
    """Targets 19 and 39: beyond distance 19 only one target contributes; the fit window stops at 19."""
    rows = np.ones((2, 2, 40))
    rows[:, 1, :10] = 1e3  # the far-away sources of the last target only: a step the fit must not see
    summary, _ = summarize_influence(rows, [19, 39], parse_fit_range(None, 19))
    assert summary.common_distance == 19 and summary.fit.fit_hi <= 19
    assert all(b.fit_hi <= 19 for b in summary.bands)
    assert summary.fit.verdict == NOT_DETECTED and abs(summary.fit.decay_rate) < 1e-9


def test_bound_of_a_constant_abar_model_is_its_rate_and_holds():
    model = lti_mamba(0.0, 0.1)  # Ā = exp(-0.1) on every channel
    fit, _ = _rate(model)
    ids = torch.randint(0, 384, (2, 48), generator=torch.Generator().manual_seed(0))
    far = fit_decay([fit.intercept_log10 + fit.log10_slope * i for i in range(48)], (30, 43))
    bound = measure_bound(model, get_adapter(model), ids, far)
    assert bound.layer_rate[0] == pytest.approx(0.1, rel=1e-3)
    assert bound.end_to_end_rate == pytest.approx(0.1, rel=1e-3) and bound.consistent
    assert fit.decay_rate == pytest.approx(bound.end_to_end_rate, rel=0.05)


def test_bound_is_the_slowest_channel_and_flags_a_violation():
    A = -torch.tensor([[1.0, 2.0], [0.5, 4.0]])  # (d, n)
    rigorous, mean = slowest_channel_rates(torch.tensor([0.2, 0.1]), torch.tensor([0.4, 0.3]), A)
    assert rigorous == pytest.approx(0.05) and mean == pytest.approx(0.15)  # channel (1, 0): 0.5·Δ
    slow = fit_decay(-0.001 * np.arange(100), (50, 95))  # rate 0.0023 < 0.05: faster forgetting is promised
    res = summarize_bound([0, 1], [0.05, 0.2], [0.15, 0.3], slow)
    assert res.end_to_end_rate == 0.05 and res.consistent is False


@pytest.mark.parametrize("family", ["zamba", "jamba", "bamba"])
def test_closed_form_of_a_hybrid_layer_reproduces_its_scan(family):
    """Σ_s α_{t,s} u_s equals the scan's output without D and gate: Zamba's per-head B and C taken head by head,
    Jamba's normalised Δ/B/C and Bamba's grouped Mamba-2 heads as recorded."""
    from ssmdiag.kernels import selective_scan_ref, ssd_scan_ref
    from ssmdiag.kernels.mixer import record
    from ssmdiag.metrics.influence import _layer_alpha
    from tinyfamilies import make_hybrid

    model = make_hybrid(family)  # float32: MoE blocks (Jamba) have no float64 kernel
    ids = torch.randint(3, 384, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), record(model, params=True) as rec:
        model(ids, use_cache=False)
    lr, t = rec.layers[0], 23
    alpha = _layer_alpha(lr, t)  # (t+1, channels or heads)
    if lr.A.dim() == 1:  # Mamba-2: α per head, u (b, l, h, p)
        closed = (alpha[:, :, None] * lr.u[0, : t + 1].double()).sum(0)  # (h, p)
        y = ssd_scan_ref(lr.u, lr.delta, lr.A, lr.B, lr.C)[0, t]
    else:
        closed = (alpha * lr.u[0, : t + 1].double()).sum(0)  # (d,)
        heads = lr.B.shape[2] if lr.B.dim() == 4 else 1
        p = lr.A.shape[0] // heads
        ys = []
        for h in range(heads):
            sl = slice(h * p, (h + 1) * p)
            B = lr.B[:, :, h] if lr.B.dim() == 4 else lr.B
            C = lr.C[:, :, h] if lr.C.dim() == 4 else lr.C
            ys.append(selective_scan_ref(lr.u[..., sl].transpose(1, 2), lr.delta[..., sl].transpose(1, 2), lr.A[sl],
                                         B.transpose(1, 2), C.transpose(1, 2)))
        y = torch.cat(ys, 1)[0, :, t]
    torch.testing.assert_close(closed, y.double(), rtol=1e-3, atol=1e-5 * float(y.abs().max()))

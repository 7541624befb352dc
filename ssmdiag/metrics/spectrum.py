"""The Ā spectrum: how far each SSM channel's decay Ā_t = exp(Δ_t·A) ranges over time (the paper's Fig. 6).

Dimension letters (docs/architecture.md): b batch, l time, d channels (d_inner), n state size, h heads (Mamba-2).

A channel is one (d, n) entry of a Mamba-1 layer (A is (d, n)) or one head of a Mamba-2 layer (A is (h,)).
Per channel we keep min_t Ā_t and max_t Ā_t over every token of every sample. Theorem 4.2's smoothing is
avoided only by channels whose Ā reaches both ~0 (forget at once) and ~1 (keep for ever); the shares below
say how many do. The memory horizon 1/(1 − Ā) is the number of tokens a channel's state takes to fall by e.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NEAR_ONE = 0.99
NEAR_ZERO = 0.01
THRESHOLDS = [i / 200 for i in range(201)]
BOUND_REL_TOL = 0.05  # an observed far rate this close below the Ā bound still counts as consistent
HORIZON_EDGES = [10 ** (i / 4) for i in range(0, 29)]  # 1 … 10^7 tokens, 4 bins per decade; last bin open


@dataclass
class LayerSpectrum:
    """One layer's Ā spectrum: shares of channels near 1 / near 0 / reaching both, and medians."""

    layer: int
    channels: int
    near_one: float
    near_zero: float
    both: float
    median_max: float
    median_min: float
    median_horizon: float


@dataclass
class SpectrumResult:
    """Ā spectrum of a model, per layer and pooled over layers.

    Args:
        curve_max[i]: share of all channels whose max_t Ā is below thresholds[i] (the Fig. 6 curve);
            curve_min the same for min_t Ā.
        horizon_counts[i]: channels whose horizon 1/(1 − max_t Ā) lies in [horizon_edges[i], horizon_edges[i+1])
            (the last count is everything at or above the last edge, infinite horizons included).
    """

    layers: list[LayerSpectrum]
    near_one: float
    near_zero: float
    both: float
    thresholds: list[float] = field(default_factory=lambda: list(THRESHOLDS))
    curve_max: list[float] = field(default_factory=list)
    curve_min: list[float] = field(default_factory=list)
    horizon_edges: list[float] = field(default_factory=lambda: list(HORIZON_EDGES))
    horizon_counts: list[int] = field(default_factory=list)


def abar_extrema_ref(delta: torch.Tensor, A: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """min and max over batch and time of Ā_t = exp(Δ_t·A), per channel (plain torch; ground truth for tests).

    Args:
        delta: Δ after bias and softplus, (b, l, d) for Mamba-1 or (b, l, h) for Mamba-2.
        A: (d, n) for Mamba-1 or (h,) for Mamba-2 (negative).
    Returns: (abar_min, abar_max), each shaped like A.
    """
    lo = torch.full(A.shape, float("inf"), dtype=torch.float32)
    hi = torch.full(A.shape, float("-inf"), dtype=torch.float32)
    d = delta.detach().float().flatten(0, 1)  # (b·l, d|h)
    a = A.detach().float().cpu()
    for s in range(0, d.shape[0], chunk):
        dc = d[s:s + chunk].cpu()
        abar = torch.exp(dc.unsqueeze(-1) * a) if a.dim() == 2 else torch.exp(dc * a)  # (m, d, n) | (m, h)
        lo = torch.minimum(lo, abar.min(dim=0).values)
        hi = torch.maximum(hi, abar.max(dim=0).values)
    return lo, hi


def memory_horizon(abar: torch.Tensor) -> torch.Tensor:
    """Tokens for a state to decay by e: 1 / (1 − Ā) (inf where Ā rounds to 1)."""
    gap = 1.0 - abar.double()
    return torch.where(gap > 0, 1.0 / gap.clamp_min(1e-300), torch.full_like(gap, float("inf")))


def summarize_layer(layer: int, abar_min: torch.Tensor, abar_max: torch.Tensor) -> LayerSpectrum:
    """Shares and medians of one layer's per-channel extremes (any shape; every element is a channel).

    Args:
        layer: its index. abar_min, abar_max: per-channel min / max of Ā over time, the same shape.
    """
    lo, hi = abar_min.flatten().double().cpu(), abar_max.flatten().double().cpu()
    near_one, near_zero = hi > NEAR_ONE, lo < NEAR_ZERO
    return LayerSpectrum(
        layer=layer, channels=lo.numel(), near_one=float(near_one.double().mean()),
        near_zero=float(near_zero.double().mean()), both=float((near_one & near_zero).double().mean()),
        median_max=float(hi.median()), median_min=float(lo.median()),
        median_horizon=float(memory_horizon(hi).median()))


def summarize_spectrum(abar_min: list[torch.Tensor], abar_max: list[torch.Tensor],
                       layer_ids: list[int] | None = None) -> SpectrumResult:
    """Per-layer and pooled Ā spectrum from each layer's per-channel min/max over time.

    Args:
        abar_min, abar_max: one tensor per layer, (d, n) or (h,).
        layer_ids: the layer index of each entry (default 0, 1, …).
    """
    layer_ids = layer_ids if layer_ids is not None else list(range(len(abar_min)))
    layers = [summarize_layer(i, lo, hi) for i, lo, hi in zip(layer_ids, abar_min, abar_max)]
    lo = torch.cat([t.flatten().double().cpu() for t in abar_min])
    hi = torch.cat([t.flatten().double().cpu() for t in abar_max])
    thr = torch.tensor(THRESHOLDS, dtype=torch.float64)
    curve_max = (hi.unsqueeze(0) < thr.unsqueeze(1)).double().mean(dim=1)
    curve_min = (lo.unsqueeze(0) < thr.unsqueeze(1)).double().mean(dim=1)
    horizon = memory_horizon(hi)
    edges = torch.tensor(HORIZON_EDGES, dtype=torch.float64)
    idx = torch.bucketize(horizon, edges, right=True) - 1  # horizon >= 1 always (Ā <= 1)
    counts = torch.bincount(idx.clamp(0, len(HORIZON_EDGES) - 1), minlength=len(HORIZON_EDGES))
    near_one, near_zero = hi > NEAR_ONE, lo < NEAR_ZERO
    return SpectrumResult(
        layers=layers, near_one=float(near_one.double().mean()), near_zero=float(near_zero.double().mean()),
        both=float((near_one & near_zero).double().mean()), curve_max=curve_max.tolist(),
        curve_min=curve_min.tolist(), horizon_counts=counts.tolist())


@dataclass
class DecayBound:
    """The far-distance decay an SSM stack must show, from Δ measured on the run's inputs (paper Thm 3.1).

    In a Mamba layer the state carries token s to token t only through Π_{k=s+1..t} Ā_k ≤ (max_k Ā)^{t−s} per
    channel, and every other part of a block (conv: w−1 tokens, gates, norms, MLP, residual) spans a bounded
    distance. So ‖∂y_t/∂x_s‖ ≤ C·poly(t−s)·ρ^{t−s} with ρ the largest Ā of any channel of any layer over every
    token: the end-to-end rate at large distance is at least −ln ρ = min over layers of `layer_rate`. An
    observed far rate below it (its whole 95% interval) would contradict the theorem's setting.

    Args:
        layer_rate[i]: −ln(max over channels and tokens of Ā) of layers[i]: its slowest channel, at its smallest Δ.
        layer_rate_mean_delta[i]: the slowest channel's rate at its mean Δ over the tokens (Π Ā_k = exp(A·ΣΔ_k),
            so this is what the channel does over a long span on these inputs; not a bound).
        end_to_end_rate: min(layer_rate), the bound. end_to_end_rate_mean_delta: min(layer_rate_mean_delta).
        observed_far_rate, observed_far_ci95, far_range: the far-band fit of the influence curve (the mean of the
            per-sample far rates and their 95% Student-t interval across samples; no interval with one sample).
        consistent: the observed far rate's 95% interval reaches the bound, allowing BOUND_REL_TOL for the finite
            window and the poly(t−s) factor; with one sample (no interval) the rate itself must reach it (None
            without an observed rate).
    """

    layers: list[int]
    layer_rate: list[float]
    layer_rate_mean_delta: list[float]
    end_to_end_rate: float
    end_to_end_rate_mean_delta: float
    observed_far_rate: float | None = None
    observed_far_ci95: tuple[float, float] | None = None
    far_range: tuple[int, int] | None = None
    consistent: bool | None = None


def slowest_channel_rates(delta_min: torch.Tensor, delta_mean: torch.Tensor, A: torch.Tensor) -> tuple[float, float]:
    """The slowest channel's decay rate per token, −ln(max Ā) = min over channels of min_t Δ·|A|, and the same
    at each channel's mean Δ.

    Args:
        delta_min, delta_mean: (d,) Mamba-1 or (h,) Mamba-2, Δ's minimum and mean over batch and time.
        A: (d, n) Mamba-1 or (h,) Mamba-2, negative.
    """
    a = A.double().abs()
    if a.dim() == 2:
        return float((delta_min.double()[:, None] * a).min()), float((delta_mean.double()[:, None] * a).min())
    return float((delta_min.double() * a).min()), float((delta_mean.double() * a).min())


def summarize_bound(layers: list[int], rates: list[float], mean_rates: list[float], observed=None) -> DecayBound:
    """The stack's bound (slowest layer) and whether the observed far-band fit respects it.

    Args:
        layers: layer indices. rates, mean_rates: per layer, from slowest_channel_rates.
        observed: the far-band DecayFit of the influence curve (decay_rate, decay_rate_ci95, fit_lo, fit_hi) or None.
    """
    res = DecayBound(layers=layers, layer_rate=rates, layer_rate_mean_delta=mean_rates,
                     end_to_end_rate=min(rates), end_to_end_rate_mean_delta=min(mean_rates))
    if observed is not None:
        res.observed_far_rate, res.observed_far_ci95 = observed.decay_rate, observed.decay_rate_ci95
        res.far_range = (observed.fit_lo, observed.fit_hi)
        top = observed.decay_rate_ci95[1] if observed.decay_rate_ci95 else observed.decay_rate
        res.consistent = bool(top >= res.end_to_end_rate * (1.0 - BOUND_REL_TOL))
    return res

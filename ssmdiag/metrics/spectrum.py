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

"""Before/after diagnostics for `ssmdiag polarize`: the Ā spectrum and the influence decay rate on the same inputs.

Both come from the shared metric modules: the spectrum from the recorded per-channel min/max of
Ā_t = exp(Δ_t·A) over the inputs (metrics/spectrum.py, the paper's Fig. 6), and the decay rate from the
gradient influence of each source token on the last position's hidden state, fitted as
I(d) ∝ exp(-rate·d) over distance d (metrics/influence.py, the paper's §3 / Fig. 2).
A function-preserving patch leaves the influence curve unchanged (the new channels are not read yet) while
the spectrum gains channels at exactly 1 and 0; training is what moves the decay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import get_adapter


@dataclass
class Diagnostics:
    """Ā spectrum shares (pooled over layers) and the influence decay of one model on fixed inputs.

    near_one / near_zero: share of channels (Mamba-1: (d, n) entries; Mamba-2: heads) whose max_t Ā > 0.99 /
    min_t Ā < 0.01; exact_one / exact_zero: share whose Ā is exactly 1.0 / 0.0 at every token.
    decay_rate: per token, natural-log units (larger = faster forgetting); half_life = ln 2 / rate.
    """

    channels: int
    near_one: float
    near_zero: float
    both: float
    exact_one: float
    exact_zero: float
    median_max: float
    median_horizon: float
    decay_rate: float | None
    half_life: float | None
    r2: float | None
    near10_share: float | None
    thresholds: list[float] = field(default_factory=list)
    curve_max: list[float] = field(default_factory=list)  # share of channels with max_t Ā below each threshold
    curve_min: list[float] = field(default_factory=list)
    influence_log10: list[float] = field(default_factory=list)  # mean log10 influence by distance (index = d)


def spectrum_extremes(model: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, min and max over batch and time of Ā = exp(Δ·A): lists of (d, n) or (h,) tensors."""
    from ..kernels.mixer import record

    dev = next(model.parameters()).device
    with torch.no_grad(), record(model, abar_stats=True) as rec:
        get_adapter(model).base()(input_ids=ids.to(dev), use_cache=False)
    layers = sorted(rec.layers)
    return [rec.layers[i].abar_min.float().cpu() for i in layers], [rec.layers[i].abar_max.float().cpu() for i in layers]


def diagnose(model: nn.Module, ids: torch.Tensor, seed: int = 0) -> Diagnostics:
    """Ā spectrum and last-token influence decay of `model` on `ids` (samples, l).

    The influence (a backward pass) is measured only for a float32 model; otherwise its fields are None.
    """
    from .influence import compute_influence, summarize_influence
    from .influence_fit import auto_fit_range
    from .spectrum import summarize_spectrum

    was = model.training
    model.eval()
    lo, hi = spectrum_extremes(model, ids)
    spec = summarize_spectrum(lo, hi)
    lo_all, hi_all = torch.cat([t.flatten() for t in lo]), torch.cat([t.flatten() for t in hi])
    length = int(ids.shape[1])
    targets = [length - 1]
    summary = None
    if next(model.parameters()).dtype == torch.float32:  # far gradients underflow in half precision
        rows = compute_influence(get_adapter(model), ids, targets, estimator="grad", seed=seed)
        summary, _ = summarize_influence(rows, targets, auto_fit_range(length - 1), seed=seed)
    model.train(was)
    from .spectrum import memory_horizon

    fit = summary.fit if summary else None
    return Diagnostics(
        channels=int(lo_all.numel()), near_one=spec.near_one, near_zero=spec.near_zero, both=spec.both,
        exact_one=float((lo_all == 1.0).double().mean()), exact_zero=float((hi_all == 0.0).double().mean()),
        median_max=float(hi_all.median()), median_horizon=float(memory_horizon(hi_all).median()),
        decay_rate=fit.decay_rate if fit else None, half_life=fit.half_life if fit else None,
        r2=fit.r2 if fit else None, near10_share=summary.near10_share if summary else None,
        thresholds=spec.thresholds, curve_max=spec.curve_max, curve_min=spec.curve_min,
        influence_log10=summary.curve.mean_log10 if summary else [])

"""Figures for `ssmdiag influence`: log10 influence vs distance (paper Fig. 1 / 7a), the ratio of two models
(Fig. 7b), and the closed-form decay rate per layer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import color, new_figure, save_figure


def _curve(summary) -> tuple[np.ndarray, np.ndarray]:
    c = summary.curve
    values = c.median_log10 if c.statistic == "median" else c.mean_log10
    return np.asarray(c.distance, dtype=float), np.asarray(values, dtype=float)


def _draw(ax, summary, label: str, colour: str) -> None:
    """One curve, its band (if any) and its fitted line over the fit window."""
    x, y = _curve(summary)
    low = np.asarray(summary.curve.band_low, dtype=float)
    high = np.asarray(summary.curve.band_high, dtype=float)
    fit = summary.fit
    half = f", t½ {fit.half_life:.3g}" if fit.half_life is not None else ", no decay"
    ax.plot(x, y, color=colour, lw=1.2, label=f"{label}: rate {fit.decay_rate:.3g}/token{half}, R² {fit.r2:.2f}")
    if np.isfinite(low).any():
        ax.fill_between(x, low, high, color=colour, alpha=0.2, lw=0)
    xf = np.arange(fit.fit_lo, fit.fit_hi + 1)
    ax.plot(xf, fit.intercept_log10 + fit.log10_slope * xf, color=colour, ls="--", lw=1.5)


def plot_influence(path: Path, named: list[tuple[str, object]], title: str) -> Path:
    """log10 influence against distance t − s for every model, shaded bands and dashed exponential fits."""
    fig, (ax,) = new_figure(width=7.0, height=4.5)
    for i, (name, summary) in enumerate(named):
        _draw(ax, summary, name, color(i))
    ax.set_xlabel("distance t − s (tokens)")
    ax.set_ylabel(f"{named[0][1].curve.statistic} log10 influence")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_ratio(path: Path, name_a: str, name_b: str, ratio) -> Path:
    """log10(I_a / I_b) against distance with its exponential fit (paper Fig. 7b)."""
    fig, (ax,) = new_figure(width=7.0, height=4.5)
    _draw(ax, ratio, f"{name_a} / {name_b}", color(2))
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("distance t − s (tokens)")
    ax.set_ylabel(f"log10 influence ratio {name_a} / {name_b}")
    ax.set_title("influence ratio (dashed: exponential fit)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_per_layer(path: Path, named: list[tuple[str, list]]) -> Path:
    """Closed-form (hidden-attention) decay rate per token for each SSM layer, with bootstrap intervals."""
    fig, (ax,) = new_figure(width=7.0, height=4.0)
    for i, (name, layers) in enumerate(named):
        x = np.array([ld.layer for ld in layers])
        y = np.array([ld.decay_rate for ld in layers])
        ax.plot(x, y, "o-", color=color(i), ms=3, label=name)
        cis = [ld.decay_rate_ci95 for ld in layers]
        if all(ci is not None for ci in cis):
            ax.fill_between(x, [c[0] for c in cis], [c[1] for c in cis], color=color(i), alpha=0.2, lw=0)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("decay rate per token (ln units)")
    ax.set_title("closed-form per-layer influence decay (hidden attention)", fontsize=10)
    if named:
        ax.legend(fontsize=8)
    top = ax.get_ylim()[1]
    if math.isfinite(top) and top > 0:
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    return save_figure(fig, path)

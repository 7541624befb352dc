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


def _legend(label: str, fit) -> str:
    """Name, verdict, and the rate / half-life only when they mean something."""
    if fit.verdict == "decays":
        return f"{label}: decays, rate {fit.decay_rate:.3g}/token, t½ {fit.half_life:.3g}, R² {fit.r2:.2f}"
    return f"{label}: no exponential decay (R² {fit.r2:.2f})"


def _draw(ax, summary, label: str, colour: str) -> None:
    """One curve, its band (if any), its fitted line over the fit window (dashed) and per band (dotted)."""
    x, y = _curve(summary)
    low = np.asarray(summary.curve.band_low, dtype=float)
    high = np.asarray(summary.curve.band_high, dtype=float)
    fit = summary.fit
    ax.plot(x, y, color=colour, lw=1.2, label=_legend(label, fit))
    if np.isfinite(low).any():
        ax.fill_between(x, low, high, color=colour, alpha=0.2, lw=0)
    xf = np.arange(fit.fit_lo, fit.fit_hi + 1)
    ax.plot(xf, fit.intercept_log10 + fit.log10_slope * xf, color=colour, ls="--", lw=1.5)
    for band in getattr(summary, "bands", []):
        xb = np.array([band.fit_lo, band.fit_hi])
        ax.plot(xb, band.intercept_log10 + band.log10_slope * xb, color="k", ls=":", lw=1.4)
        ax.annotate(f"{band.band} {band.decay_rate:.2g}", (xb.mean(), band.intercept_log10 + band.log10_slope
                    * xb.mean()), fontsize=6, color=colour, xytext=(0, 5), textcoords="offset points", ha="center")


def _draw_bound(ax, bound, summary, colour: str) -> None:
    """The slowest channel's rate from Ā (Thm 3.1) as a line through the curve at the far band's start: beyond,
    the curve may not stay above it for long."""
    far = next((b for b in summary.bands if b.band == "far"), None)
    if bound is None or far is None:
        return
    x0 = far.fit_lo
    y0 = far.intercept_log10 + far.log10_slope * x0
    xb = np.array([x0, far.fit_hi])
    slope = -bound.end_to_end_rate / math.log(10)
    ax.plot(xb, y0 + slope * (xb - x0), color=colour, ls="-.", lw=1.2,
            label=f"bound from max Ā: far rate ≥ {bound.end_to_end_rate:.2g}/token (far fit {far.decay_rate:.2g})")
    typical = -bound.end_to_end_rate_mean_delta / math.log(10)
    ax.plot(xb, y0 + typical * (xb - x0), color=colour, ls=(0, (1, 3)), lw=1.0,
            label=f"slowest channel at its mean Δ: {bound.end_to_end_rate_mean_delta:.2g}/token")


def _mark_common(ax, summary) -> None:
    """Shade distances only some targets reach: the curve there averages fewer rows, and no fit uses them."""
    common = getattr(summary, "common_distance", None)
    top = summary.curve.distance[-1] if summary.curve.distance else None
    if common is not None and top is not None and common < top:
        ax.axvspan(common + 0.5, top, color="grey", alpha=0.12, lw=0)
        ax.text(common + 1, 0.02, "fewer targets reach here (not fitted)", transform=ax.get_xaxis_transform(),
                fontsize=7, color="grey")


def plot_influence(path: Path, named: list[tuple], title: str) -> Path:
    """log10 influence against distance t − s for every model: shaded bands, dashed exponential fits, dotted
    near / middle / far fits, and (SSMs) the Ā bound dash-dotted.

    Args:
        named: (name, InfluenceSummary) or (name, InfluenceSummary, DecayBound or None) per model.
    """
    fig, (ax,) = new_figure(width=7.5, height=4.8)
    for i, (name, summary, *bound) in enumerate(named):
        _draw(ax, summary, name, color(i))
        if bound and bound[0] is not None:
            _draw_bound(ax, bound[0], summary, color(i))
    _mark_common(ax, named[0][1])
    ax.set_xlabel("distance t − s (tokens)")
    ax.set_ylabel(f"{named[0][1].curve.statistic} log10 influence")
    ax.set_title(title + "\n(dashed: one exponential; dotted: near / middle / far bands)", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def plot_ratio(path: Path, name_a: str, name_b: str, ratio) -> Path:
    """log10(I_a / I_b) against distance with its exponential fit (paper Fig. 7b)."""
    fig, (ax,) = new_figure(width=7.0, height=4.5)
    _draw(ax, ratio, f"{name_a} / {name_b}", color(2))
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("distance t − s (tokens)")
    ax.set_ylabel(f"log10 influence ratio {name_a} / {name_b}")
    _mark_common(ax, ratio)
    ax.set_title("influence ratio (dashed: exponential fit; dotted: near / middle / far bands)", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_per_layer(path: Path, named: list[tuple[str, list]], bounds: list | None = None) -> Path:
    """Closed-form (hidden-attention) decay rate per token for each SSM layer, with bootstrap intervals, and
    (bounds: one DecayBound or None per model) each layer's slowest channel: −ln max Ā and the rate at mean Δ."""
    fig, (ax,) = new_figure(width=7.0, height=4.0)
    for i, (name, layers) in enumerate(named):
        x = np.array([ld.layer for ld in layers])
        y = np.array([ld.decay_rate for ld in layers])
        ax.plot(x, y, "o-", color=color(i), ms=3, label=name)
        open_ = [ld.layer for ld in layers if ld.verdict != "decays"]
        if open_:  # layers whose closed-form curve is not an exponential decay
            ax.plot(open_, [ld.decay_rate for ld in layers if ld.verdict != "decays"], "o", mfc="white",
                    color=color(i), ms=5, label=f"{name}: no exponential decay")
        cis = [ld.decay_rate_ci95 for ld in layers]
        if all(ci is not None for ci in cis):
            ax.fill_between(x, [c[0] for c in cis], [c[1] for c in cis], color=color(i), alpha=0.2, lw=0)
        b = bounds[i] if bounds else None
        if b is not None:
            ax.plot(b.layers, b.layer_rate, "-.", color=color(i), lw=1, label=f"{name}: slowest channel, −ln max Ā")
            ax.plot(b.layers, b.layer_rate_mean_delta, ":", color=color(i), lw=1.2,
                    label=f"{name}: slowest channel at its mean Δ")
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

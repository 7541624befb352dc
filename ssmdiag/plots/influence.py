"""Figures for `ssmdiag influence`: log10 influence vs distance and vs log distance (paper Fig. 1 / 7a), the ratio
of two models (Fig. 7b), and the closed-form decay rate per layer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import color, new_figure, save_figure


def _curve(summary) -> tuple[np.ndarray, np.ndarray]:
    c = summary.curve
    values = c.median_log10 if c.statistic == "median" else c.mean_log10
    return np.asarray(c.distance, dtype=float), np.asarray(values, dtype=float)


def _legend(label: str, summary) -> str:
    """Name, shape, and the parameter of that shape with its interval."""
    fit, pw, shape = summary.fit, summary.power_law, getattr(summary, "shape", "undetermined")
    if shape == "exponential":
        return f"{label}: exponential, rate {fit.decay_rate:.3g}/token, t½ {fit.half_life:.3g}"
    if shape == "power_law" and pw is not None:
        return f"{label}: power law, I ∝ d^{pw.exponent:.3g}"
    return f"{label}: {shape} (rate {fit.decay_rate:.3g}/token)"


def _draw(ax, summary, label: str, colour: str, loglog: bool = False) -> None:
    """One curve, its band across samples (if any), the exponential fit (dashed), the power-law fit (dash-dot),
    and on the linear-distance panel the near / middle / far band fits (dotted). loglog: x is log10 distance."""
    x, y = _curve(summary)
    low = np.asarray(summary.curve.band_low, dtype=float)
    high = np.asarray(summary.curve.band_high, dtype=float)
    keep = x >= 1 if loglog else np.ones_like(x, dtype=bool)
    xs = np.log10(x[keep]) if loglog else x
    ax.plot(xs, y[keep], color=colour, lw=1.2, label=_legend(label, summary) if not loglog else label)
    if np.isfinite(low).any():
        ax.fill_between(xs, low[keep], high[keep], color=colour, alpha=0.2, lw=0)
    fit, pw = summary.fit, summary.power_law
    xf = np.arange(max(fit.fit_lo, 1 if loglog else 0), fit.fit_hi + 1, dtype=float)
    xa = np.log10(xf) if loglog else xf
    ax.plot(xa, fit.intercept_log10 + fit.log10_slope * xf, color=colour, ls="--", lw=1.3)
    if pw is not None:
        ax.plot(xa, pw.intercept_log10 + pw.exponent * np.log10(np.maximum(xf, 1)), color=colour, ls="-.", lw=1.3)
    if loglog:
        return
    for band in getattr(summary, "bands", []):
        xb = np.array([band.fit_lo, band.fit_hi])
        ax.plot(xb, band.intercept_log10 + band.log10_slope * xb, color="k", ls=":", lw=1.4)
        ax.annotate(f"{band.band} {band.decay_rate:.2g}", (xb.mean(), band.intercept_log10 + band.log10_slope
                    * xb.mean()), fontsize=6, color=colour, xytext=(0, 5), textcoords="offset points", ha="center")


def _draw_bound(ax, bound, summary, colour: str) -> None:
    """The slowest channel's rate from Ā (Thm 3.1) as a line (dash-dot-dot) through the curve at the far band's
    start: beyond, the curve may not stay above it for long."""
    far = next((b for b in summary.bands if b.band == "far"), None)
    if bound is None or far is None:
        return
    x0 = far.fit_lo
    y0 = far.intercept_log10 + far.log10_slope * x0
    xb = np.array([x0, far.fit_hi])
    slope = -bound.end_to_end_rate / math.log(10)
    ax.plot(xb, y0 + slope * (xb - x0), color=colour, ls=(0, (4, 1, 1, 1, 1, 1)), lw=1.2,
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


def _panels(named: list[tuple], ylabel: str, title: str, bounds: bool = True):
    """Two panels: log10 influence against distance (an exponential is a line) and against log10 distance (a
    power law is a line)."""
    fig, (ax, axl) = new_figure(ncols=2, width=6.0, height=4.8)
    for i, (name, summary, *bound) in enumerate(named):
        _draw(ax, summary, name, color(i))
        _draw(axl, summary, name, color(i), loglog=True)
        if bounds and bound and bound[0] is not None:
            _draw_bound(ax, bound[0], summary, color(i))
    _mark_common(ax, named[0][1])
    ax.set_xlabel("distance t − s (tokens)")
    axl.set_xlabel("log10 distance")
    for a in (ax, axl):
        a.set_ylabel(ylabel)
    ax.set_title(title + "\n(dashed: exponential; dash-dot: power law; dotted: near / middle / far)", fontsize=9)
    axl.set_title("log–log: a power law is a straight line here", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    axl.legend(fontsize=7, loc="best")
    return fig, ax


def plot_influence(path: Path, named: list[tuple], title: str) -> Path:
    """log10 influence against distance and against log10 distance for every model: bands across samples,
    exponential (dashed) and power-law (dash-dot) fits, near / middle / far fits, and (SSMs) the Ā bound.

    Args:
        named: (name, InfluenceSummary) or (name, InfluenceSummary, DecayBound or None) per model.
    """
    fig, _ = _panels(named, f"{named[0][1].curve.statistic} log10 influence", title)
    return save_figure(fig, path)


def plot_ratio(path: Path, name_a: str, name_b: str, ratio) -> Path:
    """log10(I_a / I_b) against distance and log distance, paired by sample, with its fits (paper Fig. 7b)."""
    fig, ax = _panels([(f"{name_a} / {name_b}", ratio)], f"log10 influence ratio {name_a} / {name_b}",
                      "influence ratio", bounds=False)
    ax.axhline(0.0, color="grey", lw=0.8)
    return save_figure(fig, path)


def _band(ax, x, cis, colour) -> None:
    """Shade per-layer 95% intervals when every layer has one."""
    if cis and all(ci is not None for ci in cis):
        ax.fill_between(x, [c[0] for c in cis], [c[1] for c in cis], color=colour, alpha=0.2, lw=0)


def plot_per_layer(path: Path, named: list[tuple[str, list]], bounds: list | None = None) -> Path:
    """Closed-form (hidden-attention) influence per SSM layer, with t intervals across samples: left the
    exponential decay rate per token (open circles: the layer's shape is not exponential) and (bounds: one
    DecayBound or None per model) each layer's slowest channel, −ln max Ā and the rate at mean Δ; right the
    power-law exponent (filled: the layer's shape is power_law)."""
    fig, (ax, axp) = new_figure(ncols=2, width=5.5, height=4.0)
    for i, (name, layers) in enumerate(named):
        x = np.array([ld.layer for ld in layers])
        ax.plot(x, [ld.decay_rate for ld in layers], "o-", color=color(i), ms=3, label=name)
        open_ = [ld for ld in layers if ld.shape != "exponential"]
        if open_:  # layers whose closed-form curve is not (or not shown to be) an exponential decay
            ax.plot([ld.layer for ld in open_], [ld.decay_rate for ld in open_], "o", mfc="white",
                    color=color(i), ms=5, label=f"{name}: shape not exponential")
        _band(ax, x, [ld.decay_rate_ci95 for ld in layers], color(i))
        b = bounds[i] if bounds else None
        if b is not None:
            ax.plot(b.layers, b.layer_rate, "-.", color=color(i), lw=1, label=f"{name}: slowest channel, −ln max Ā")
            ax.plot(b.layers, b.layer_rate_mean_delta, ":", color=color(i), lw=1.2,
                    label=f"{name}: slowest channel at its mean Δ")
        expo = [ld.exponent if ld.exponent is not None else np.nan for ld in layers]
        axp.plot(x, expo, "-", color=color(i), lw=1, label=name)
        pw = [ld for ld in layers if ld.shape == "power_law"]
        axp.plot([ld.layer for ld in pw], [ld.exponent for ld in pw], "o", color=color(i), ms=4,
                 label=f"{name}: shape power_law")
        _band(axp, x, [ld.exponent_ci95 for ld in layers], color(i))
    for a in (ax, axp):
        a.axhline(0.0, color="grey", lw=0.8)
        a.set_xlabel("layer")
    ax.set_ylabel("decay rate per token (ln units)")
    axp.set_ylabel("power-law exponent (I ∝ d^exponent)")
    ax.set_title("closed-form per-layer decay: exponential rate", fontsize=10)
    axp.set_title("closed-form per-layer decay: power-law exponent", fontsize=10)
    if named:
        ax.legend(fontsize=7)
        axp.legend(fontsize=7)
    top = ax.get_ylim()[1]
    if math.isfinite(top) and top > 0:
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    return save_figure(fig, path)
